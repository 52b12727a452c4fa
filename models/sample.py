"""One labelled image, torch-free so label tools (``check-data``) start fast."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DatasetError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Sample:
    image: Path
    boxes: np.ndarray  # (N,4) float32 xyxy pixels of the image
    labels: tuple[str, ...]
    group: str | None = None  # photos of one tray (or one video clip): splits never cut a group

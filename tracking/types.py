"""Dataclasses passed between pipeline stages."""
from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded image from a camera. ``image`` is HxWx3 uint8 BGR."""

    camera_id: str
    index: int
    timestamp: float  # wall-clock seconds when the frame was read from the source
    image: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.image.shape[:2]
        return w, h


@dataclass(frozen=True, slots=True)
class Detections:
    """Detector output for one frame. Boxes are xyxy pixels of the frame."""

    camera_id: str
    frame_index: int
    timestamp: float
    boxes: np.ndarray  # (N, 4) float32
    scores: np.ndarray  # (N,) float32
    class_ids: np.ndarray  # (N,) int64, indices into ``labels``
    labels: tuple[str, ...]
    image_size: tuple[int, int]  # (width, height)
    # (N, D) float32, L2-normalised appearance vectors from the detector's own
    # trunk; the tracker uses them to re-identify objects after an occlusion
    embeddings: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.boxes)
        if self.boxes.shape != (n, 4) or self.scores.shape != (n,) or self.class_ids.shape != (n,):
            raise ValueError(
                f"inconsistent detection arrays: boxes {self.boxes.shape}, "
                f"scores {self.scores.shape}, class_ids {self.class_ids.shape}"
            )
        if self.embeddings is not None and (self.embeddings.ndim != 2 or len(self.embeddings) != n):
            raise ValueError(f"embeddings must be (N, D) with N={n}, got {self.embeddings.shape}")

    def __len__(self) -> int:
        return len(self.boxes)


class TrackState(str, enum.Enum):
    TENTATIVE = "tentative"  # seen, not yet min_hits times in a row
    CONFIRMED = "confirmed"  # matched this frame
    OCCLUDED = "occluded"  # confirmed, unmatched now, coasting on its Kalman prediction
    REMOVED = "removed"  # gone: unmatched too long (or tentative and missed)


@dataclass(frozen=True, slots=True)
class Track:
    """Snapshot of one tracked object after a tracker update."""

    track_id: int
    camera_id: str
    state: TrackState
    box: tuple[float, float, float, float]  # xyxy pixels
    class_id: int
    label: str
    confidence: float  # mean detection score over the track's matches
    class_share: float  # share of the lifetime class vote won by ``label``
    hits: int
    age: int  # frames since the track was born
    time_since_update: int
    trajectory: tuple[tuple[float, float, float], ...]  # (timestamp, cx, cy), bounded
    class_margin: float = 1.0  # top class vote share minus the runner-up's (1.0 with one class)

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2.0, (y1 + y2) / 2.0


@dataclass(frozen=True, slots=True)
class Crossing:
    """A track crossing a checkout line."""

    camera_id: str
    zone_id: str
    track_id: int
    timestamp: float
    label: str
    confidence: float


@dataclass(frozen=True, slots=True)
class CheckoutItem:
    label: str
    count: int
    confidence: float


@dataclass(frozen=True, slots=True)
class CheckoutEvent:
    """One tray at the checkout: what crossed the line together."""

    event_id: str
    camera_id: str
    zone_id: str
    started_at: float
    ended_at: float
    items: tuple[CheckoutItem, ...]
    track_ids: tuple[int, ...]
    confidence: float

    def to_dict(self) -> dict:
        return {
            "event_id": self.event_id,
            "camera_id": self.camera_id,
            "zone_id": self.zone_id,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "items": [{"label": i.label, "count": i.count, "confidence": i.confidence} for i in self.items],
            "track_ids": list(self.track_ids),
            "confidence": self.confidence,
        }

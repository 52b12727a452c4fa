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
    # the clock trays run on: wall-clock read time for live streams; for files
    # the media time offset by the wall-clock start (still epoch seconds), so
    # tray gaps do not stretch when processing is slower than real time
    timestamp: float
    image: np.ndarray
    read_at: float | None = None  # wall-clock seconds when read (frame-age metrics); None = timestamp

    @property
    def read_time(self) -> float:
        return self.timestamp if self.read_at is None else self.read_at

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
    # (N, len(labels)) float32, each box's class probabilities (the classifier's, background
    # left out): the tracker's class vote then weighs how sure each frame was, not only its top dish
    probs: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.boxes)
        if self.boxes.shape != (n, 4) or self.scores.shape != (n,) or self.class_ids.shape != (n,):
            raise ValueError(
                f"inconsistent detection arrays: boxes {self.boxes.shape}, "
                f"scores {self.scores.shape}, class_ids {self.class_ids.shape}"
            )
        if self.embeddings is not None and (self.embeddings.ndim != 2 or len(self.embeddings) != n):
            raise ValueError(f"embeddings must be (N, D) with N={n}, got {self.embeddings.shape}")
        if self.probs is not None and self.probs.shape != (n, len(self.labels)):
            raise ValueError(f"probs must be (N, len(labels)) = ({n}, {len(self.labels)}), got {self.probs.shape}")

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
    # top class vote share minus the runner-up's (count vote: 1.0 with one class; the soft vote
    # of class probabilities: how far the summed probabilities put the top dish ahead)
    class_margin: float = 1.0

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
    class_share: float = 1.0
    class_margin: float = 1.0
    track: Track | None = None  # the track's snapshot at the crossing (position, trajectory)


@dataclass(frozen=True, slots=True)
class CheckoutItem:
    """One receipt line. ``needs_review``: some unit's class vote margin was
    below the zone's ``review_margin``, or its track's mean score below its
    ``review_confidence``. Price fields stay None without a menu;
    ``unpriced``: the label is missing from the menu (never priced at 0)."""

    label: str
    count: int
    confidence: float
    needs_review: bool = False
    name: str | None = None
    unit_price: float | None = None
    line_total: float | None = None
    unpriced: bool = False

    def to_dict(self) -> dict:
        return {"label": self.label, "name": self.name, "count": self.count, "confidence": self.confidence,
                "unit_price": self.unit_price, "line_total": self.line_total, "unpriced": self.unpriced,
                "needs_review": self.needs_review}


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
    needs_review: bool = False  # an item needs review (low class margin, or not on the menu)
    currency: str | None = None  # None = no menu configured
    total: float | None = None  # sum of priced lines; unpriced items are excluded (and flagged)

    def to_dict(self) -> dict:
        return {
            "event_id": self.event_id,
            "camera_id": self.camera_id,
            "zone_id": self.zone_id,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "items": [i.to_dict() for i in self.items],
            "track_ids": list(self.track_ids),
            "confidence": self.confidence,
            "needs_review": self.needs_review,
            "currency": self.currency,
            "total": self.total,
        }

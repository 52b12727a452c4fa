"""Evidence crops: one small picture per dish of a checkout event, from its track's best frame,
so a cashier can check (and correct) a receipt by looking at what the camera saw.

Runs in the tracking stage, never in the detector's: per confirmed, matched track it keeps
one crop (box plus context, at most ``crop_max_px``), replaced only when a clearly better
frame comes (dish wholly inside the image, larger). Crops are copied, not encoded; JPEG
encoding happens once per dish when its tray closes. Bounded: at most ``max_tracks`` crops
per camera (least recently seen dropped), and a tray's crops are handed over and forgotten
when its event is written.
"""
from __future__ import annotations

import collections
from collections import Counter
from dataclasses import dataclass

import cv2
import numpy as np

from dishtrack.tracking.geometry import inside_share
from dishtrack.tracking.tracker import TrackUpdate
from dishtrack.tracking.types import CheckoutEvent, Frame, TrackState

_BETTER = 1.05  # a new frame must beat the kept one by 5 % (no copy on every frame of a sliding dish)


@dataclass(frozen=True, slots=True)
class Crop:
    track_id: int
    label: str  # the track's class vote when the crop was taken
    image: np.ndarray  # BGR, box plus context, long side <= crop_max_px
    box: tuple[float, float, float, float]  # the dish box in ``image`` pixels
    quality: float


@dataclass(frozen=True, slots=True)
class EvidenceUnit:
    """One dish of an event: the label it was counted as, and its crop (JPEG) if one was kept."""

    index: int
    track_id: int | None
    label: str
    confidence: float
    jpeg: bytes | None
    box: tuple[float, float, float, float] | None  # dish box in the JPEG's pixels


def crop_quality(boxes: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Per (N,4) xyxy box: wholly visible and large is best, visible share^4 x area."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    area = np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1e-6)
    return inside_share(b, image_size) ** 4 * area


class EvidenceKeeper:
    def __init__(self, crop_max_px: int = 160, context: float = 0.15, max_tracks: int = 512,
                 jpeg_quality: int = 85) -> None:
        self.crop_max_px, self.context, self.max_tracks = crop_max_px, context, max_tracks
        self.jpeg_quality = jpeg_quality
        self._crops: dict[str, collections.OrderedDict[int, Crop]] = {}
        self.dropped = 0  # crops pushed out by the bound before their tray closed

    @classmethod
    def from_config(cls, c) -> "EvidenceKeeper":
        return cls(c.crop_max_px, c.crop_context, c.max_tracks, c.jpeg_quality)

    def held(self, camera_id: str) -> int:
        return len(self._crops.get(camera_id, ()))

    def observe(self, frame: Frame, update: TrackUpdate) -> None:
        crops = self._crops.setdefault(frame.camera_id, collections.OrderedDict())
        seen = [t for t in update.tracks if t.state is TrackState.CONFIRMED and not t.time_since_update]
        for t, q in zip(seen, crop_quality([t.box for t in seen], frame.size)):
            q = float(q)
            old = crops.get(t.track_id)
            if old is not None:
                crops.move_to_end(t.track_id)
                if q <= old.quality * _BETTER:
                    if old.label != t.label:  # keep the latest vote with the picture
                        crops[t.track_id] = Crop(old.track_id, t.label, old.image, old.box, old.quality)
                    continue
            c = self._cut(frame.image, t.box)
            if c is not None:
                crops[t.track_id] = Crop(t.track_id, t.label, c[0], c[1], q)
        while len(crops) > self.max_tracks:
            crops.popitem(last=False)
            self.dropped += 1

    def _cut(self, image: np.ndarray, box) -> tuple[np.ndarray, tuple[float, float, float, float]] | None:
        h, w = image.shape[:2]
        x1, y1, x2, y2 = (float(v) for v in box)
        m = self.context * max(x2 - x1, y2 - y1)
        cx1, cy1 = int(max(0, np.floor(x1 - m))), int(max(0, np.floor(y1 - m)))
        cx2, cy2 = int(min(w, np.ceil(x2 + m))), int(min(h, np.ceil(y2 + m)))
        if cx2 - cx1 < 2 or cy2 - cy1 < 2:
            return None
        patch = image[cy1:cy2, cx1:cx2]
        f = min(1.0, self.crop_max_px / max(patch.shape[:2]))
        patch = cv2.resize(patch, (max(1, round(patch.shape[1] * f)), max(1, round(patch.shape[0] * f))),
                           interpolation=cv2.INTER_AREA) if f < 1 else patch.copy()
        b = ((max(x1, 0) - cx1) * f, (max(y1, 0) - cy1) * f, (min(x2, w) - cx1) * f, (min(y2, h) - cy1) * f)
        return patch, tuple(round(v, 1) for v in b)

    def take(self, event: CheckoutEvent) -> list[EvidenceUnit]:
        """The event's dishes, one unit per crossing track, labelled so they add up to the receipt's
        items (a track whose crop-time vote differs from its final one takes a remaining label);
        the crops are encoded and forgotten."""
        crops = self._crops.get(event.camera_id, {})
        taken = [crops.pop(tid, None) for tid in event.track_ids]
        need = Counter({i.label: i.count for i in event.items})
        conf = {i.label: i.confidence for i in event.items}
        labels: list[str | None] = [None] * len(taken)
        for k, c in enumerate(taken):
            if c is not None and need[c.label] > 0:
                labels[k] = c.label
                need[c.label] -= 1
        rest = list(need.elements())
        for k in range(len(labels)):
            if labels[k] is None:
                labels[k] = rest.pop(0) if rest else (taken[k].label if taken[k] else "unknown")
        units = []
        for k, (tid, c, lbl) in enumerate(zip(event.track_ids, taken, labels)):
            jpeg = None
            if c is not None:
                ok, buf = cv2.imencode(".jpg", c.image, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
                jpeg = buf.tobytes() if ok else None
            units.append(EvidenceUnit(k, int(tid), lbl, float(conf.get(lbl, 0.0)), jpeg,
                                      c.box if c is not None and jpeg else None))
        return units

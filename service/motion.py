"""Motion measurement for frames the detector skips (detection stride): sparse
Lucas-Kanade optical flow inside each track's last box. It lives at the I/O edge
(OpenCV on images); the tracker only receives the moved boxes
(``Tracker.propagate``), so ``tracking/`` stays free of cv2."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np

from dishtrack.tracking.tracker import Tracker, TrackUpdate
from dishtrack.tracking.types import Detections, Frame, Track, TrackState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FlowParams:
    max_points: int = 20  # corners per box (goodFeaturesToTrack)
    min_points: int = 4  # fewer good points in a box: no measurement (Kalman prediction only)
    fb_max_px: float = 1.0  # forward-backward error above this rejects a point
    margin: float = 0.1  # box share trimmed on each side before picking corners (less background)
    win: int = 11  # LK window side (pixels of the downscaled image)
    levels: int = 2  # LK pyramid levels (fast motion, or frames dropped in between)
    # flow runs on the image halved this many times (pyrDown) while its width stays >= 320:
    # a 640x480 frame costs a quarter, and half-pixel precision is plenty for a dish box
    downscale: int = 1

    @classmethod
    def from_config(cls, scfg) -> "FlowParams":
        return cls(max_points=scfg.flow_points, min_points=scfg.flow_min_points, fb_max_px=scfg.flow_fb_px)


@dataclass(frozen=True, slots=True)
class LateDetections:
    """Asynchronous detection (``detector.stride.detect_async``): detections made on
    ``source``, an earlier frame of the camera, handed to the tracking stage with a later
    frame; ``FlowPropagator.catch_up`` moves them onto that frame."""

    detections: Detections
    source: Frame

    def __len__(self) -> int:
        return len(self.detections)


def hand_on(dropped: tuple[list, list], batch: tuple[list, list]) -> tuple[list, list]:
    """A tracking batch (frames, their detections) dropped by the full queue: its detections
    ride on with ``batch``, the next one, instead of being lost. Each lands on the same camera's
    frame there as ``LateDetections`` when that frame has none (a frame skipped by the stride,
    or waiting for the asynchronous detector; a newer detection wins); a camera with no frame in
    ``batch`` keeps its dropped frame, at the front. A dropped frame without detections is only
    a frame: it stays dropped."""
    frames, dets = list(batch[0]), list(batch[1])
    at = {f.camera_id: i for i, f in enumerate(frames)}
    front: list = []
    for f, d in zip(*dropped):
        if d is None:
            continue
        i = at.get(f.camera_id)
        if i is None:
            front.append((f, d))
        elif dets[i] is None:
            dets[i] = d if isinstance(d, LateDetections) else LateDetections(d, f)
    if front:
        frames = [f for f, _ in front] + frames
        dets = [d for _, d in front] + dets
    return frames, dets


def restamp(late: LateDetections, frame: Frame) -> Detections:
    """Late detections put on ``frame`` where they were made (no flow to move them): its index,
    time and size, the boxes rescaled when the stream changed resolution in between."""
    d = late.detections
    boxes = np.array(d.boxes, np.float32).reshape(-1, 4)
    (sw, sh), (w, h) = late.source.size, frame.size
    if (sw, sh) != (w, h):
        boxes *= np.array([w / sw, h / sh, w / sw, h / sh], np.float32)
    return replace(d, frame_index=frame.index, timestamp=frame.timestamp, boxes=boxes, image_size=frame.size)


class FlowPropagator:
    """One camera's flow measurement. ``measure`` is called on every frame in
    order (detected or not): it keeps that frame's grey image and, given the
    tracks as they were on the previous frame, returns where each box moved:
    median point displacement, scaled by the median change of point-pair
    distances (objects approaching or receding)."""

    def __init__(self, params: FlowParams | None = None) -> None:
        self.params = params or FlowParams()
        self._prev: np.ndarray | None = None

    def measure(self, frame: Frame, tracks: Sequence[Track] = ()) -> dict[int, np.ndarray]:
        """Track id -> moved xyxy box for the ``tracks`` (boxes on the previous
        frame) that had enough consistent points; the others are left out."""
        gray, f = self._gray(frame.image)
        prev, self._prev = self._prev, gray
        todo = [t for t in tracks if t.state is not TrackState.OCCLUDED]
        if prev is None or prev.shape != gray.shape or not todo:
            return {}
        moved = self._move(prev, gray, [t.box for t in todo], f, self.params.levels)
        return {t.track_id: b for t, b in zip(todo, moved) if b is not None}

    def catch_up(self, late: LateDetections, frame: Frame) -> Detections:
        """Sees ``frame`` (in place of ``measure``: its image is the next frame's previous one)
        and moves detections the detector made on an earlier frame (``late.source``) onto it,
        each box moved by the flow between the two images (one pyramid level more than frame
        to frame, for the larger motion); a box without enough consistent points keeps its
        place, and the tracker's gate decides. (Moving them as
        the overlapping tracks moved since was tried: no better on checkout video, worse on
        walkers; README "Detection stride".)"""
        dst, f = self._gray(frame.image)
        self._prev = dst  # ``frame`` is seen here, as ``measure`` would see it
        out = restamp(late, frame)
        if late.source.size != frame.size or not len(out) or late.source.index == frame.index:
            return out  # a resolution change in between: same place, new pixels
        boxes = out.boxes.copy()
        src, _ = self._gray(late.source.image)
        for j, m in enumerate(self._move(src, dst, list(boxes), f, self.params.levels + 1)):
            if m is not None:
                boxes[j] = m
        return replace(out, boxes=boxes)

    def _gray(self, img: np.ndarray) -> tuple[np.ndarray, float]:
        """Grey image, halved (pyrDown) up to ``downscale`` times while it stays >= 320 wide; its factor."""
        gray = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        f = 1.0
        for _ in range(self.params.downscale):
            if gray.shape[1] < 640:  # stays >= 320 wide
                break
            gray, f = cv2.pyrDown(gray), f * 2.0
        return gray, f

    def _move(self, prev: np.ndarray, gray: np.ndarray, boxes: Sequence, f: float,
              levels: int) -> list[np.ndarray | None]:
        """Boxes (full-image xyxy) on ``prev`` -> their boxes on ``gray`` (None: too few
        consistent points): median point displacement, scaled by the median change of
        point-pair distances."""
        out: list[np.ndarray | None] = [None] * len(boxes)
        pts, owner = self._corners(prev, boxes, f)
        if not len(pts):
            return out
        p = self.params
        lk = dict(winSize=(p.win, p.win), maxLevel=levels,
                  criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 20, 0.03))
        nxt, st, _ = cv2.calcOpticalFlowPyrLK(prev, gray, pts, None, **lk)
        back, st_b, _ = cv2.calcOpticalFlowPyrLK(gray, prev, nxt, None, **lk)
        fb = np.linalg.norm(back.reshape(-1, 2) - pts.reshape(-1, 2), axis=1)
        good = (st.reshape(-1) == 1) & (st_b.reshape(-1) == 1) & (fb <= p.fb_max_px)
        p0, p1 = pts.reshape(-1, 2), nxt.reshape(-1, 2)
        for j, box in enumerate(boxes):
            sel = good & (owner == j)
            if sel.sum() < p.min_points:
                continue
            a, b = p0[sel], p1[sel]
            d = np.median(b - a, axis=0) * f
            scale = _scale_change(a, b)
            x1, y1, x2, y2 = box
            cx, cy = (x1 + x2) / 2 + d[0], (y1 + y2) / 2 + d[1]
            hw, hh = (x2 - x1) * scale / 2, (y2 - y1) * scale / 2
            out[j] = np.array([cx - hw, cy - hh, cx + hw, cy + hh])
        return out

    def _corners(self, prev: np.ndarray, boxes: Sequence, f: float) -> tuple[np.ndarray, np.ndarray]:
        """Corners inside each box (trimmed by ``margin``; boxes in full-image pixels, ``prev``
        downscaled by ``f``): (M,1,2) float32 points, (M,) owner index."""
        p = self.params
        h, w = prev.shape[:2]
        pts, owner = [], []
        for j, box in enumerate(boxes):
            x1, y1, x2, y2 = (v / f for v in box)
            mx, my = (x2 - x1) * p.margin, (y2 - y1) * p.margin
            ix1, iy1 = max(int(x1 + mx), 0), max(int(y1 + my), 0)
            ix2, iy2 = min(int(x2 - mx), w), min(int(y2 - my), h)
            if ix2 - ix1 < 8 or iy2 - iy1 < 8:
                continue
            dist = max(2.0, min(ix2 - ix1, iy2 - iy1) / 10.0)
            c = cv2.goodFeaturesToTrack(prev[iy1:iy2, ix1:ix2], p.max_points, 0.01, dist, blockSize=5)
            if c is None:
                continue
            c = c.reshape(-1, 2) + (ix1, iy1)
            pts.append(c)
            owner.append(np.full(len(c), j))
        if not pts:
            return np.zeros((0, 1, 2), np.float32), np.zeros(0, np.intp)
        return np.concatenate(pts).astype(np.float32).reshape(-1, 1, 2), np.concatenate(owner)


def _scale_change(a: np.ndarray, b: np.ndarray) -> float:
    """Median ratio of point-pair distances after/before (1.0 with < 2 points), bounded
    to +-10 % per frame so one frame of bad points cannot blow a box up."""
    if len(a) < 2:
        return 1.0
    i, j = np.triu_indices(len(a), 1)
    da = np.linalg.norm(a[i] - a[j], axis=1)
    db = np.linalg.norm(b[i] - b[j], axis=1)
    ok = da > 2.0
    if not ok.any():
        return 1.0
    return float(np.clip(np.median(db[ok] / da[ok]), 0.9, 1.1))


def track_frame(tracker: Tracker, frame: Frame, dets: Detections | LateDetections | None,
                flow: FlowPropagator | None, previous: TrackUpdate | None, noise_scale: float = 4.0) -> TrackUpdate:
    """One frame of a camera under a detection stride: ``dets`` (detector ran) ->
    ``Tracker.update``; None (skipped) -> ``Tracker.propagate`` with the boxes the flow
    moved (no flow: Kalman prediction only); ``LateDetections`` (made on an earlier frame,
    asynchronous detection) -> moved onto this frame by the flow, then ``Tracker.update``
    (no flow: restamped where they were). The flow sees every frame, so it always has the
    previous image."""
    if isinstance(dets, LateDetections):
        if flow is not None:  # catch_up also keeps this frame's image for the next one
            return tracker.update(flow.catch_up(dets, frame))
        dets = restamp(dets, frame)
    if dets is not None:
        if flow is not None:
            flow.measure(frame)  # remember the image for the next skipped frame
        return tracker.update(dets)
    moved = flow.measure(frame, previous.tracks if previous is not None else ()) if flow is not None else {}
    return tracker.propagate(frame.index, frame.timestamp, frame.size, moved, noise_scale)

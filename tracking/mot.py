"""MOTChallenge text format: read detections / ground truth, run a tracker,
write results. Pure numpy; the metrics themselves are computed by callers
(bench/eval_mot15.py, tests) with py-motmetrics."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .tracker import Tracker, TrackerParams
from .types import Detections, TrackState

PERSON = ("person",)


def read_mot(path: str | Path) -> np.ndarray:
    """Rows of frame, id, x, y, w, h, score, ... as float64 (N, >=7)."""
    arr = np.loadtxt(path, delimiter=",", ndmin=2)
    if arr.shape[1] < 7:
        raise ValueError(f"{path}: expected >= 7 comma-separated columns, got {arr.shape[1]}")
    return arr


def track_sequence(dets: np.ndarray, params: TrackerParams | None = None,
                   camera_id: str = "mot", image_size: tuple[int, int] = (640, 480)) -> np.ndarray:
    """Run the tracker over MOT detections; returns rows frame,id,x,y,w,h
    for the tracks confirmed (matched) in each frame, as SORT reports them."""
    tracker = Tracker(camera_id, params)
    out = []
    frames = dets[:, 0].astype(int)
    for f in range(frames.min(), frames.max() + 1):
        d = dets[frames == f]
        boxes = np.c_[d[:, 2:4], d[:, 2:4] + d[:, 4:6]].astype(np.float32)
        det = Detections(camera_id, f, float(f), boxes, d[:, 6].astype(np.float32),
                         np.zeros(len(d), np.int64), PERSON, image_size)
        upd = tracker.update(det)
        for t in upd.tracks:
            if t.state is TrackState.CONFIRMED:
                x1, y1, x2, y2 = t.box
                out.append((f, t.track_id, x1, y1, x2 - x1, y2 - y1))
    return np.array(out, dtype=np.float64).reshape(-1, 6)

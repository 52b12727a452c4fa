"""Evaluate the dishtrack tracker on MOT15 (SORT's published Faster R-CNN
detections) with py-motmetrics and print MOTA / IDF1 beside SORT's published
figures. Ground truth available here: TUD-Campus, TUD-Stadtmitte.

    python bench/eval_mot15.py [--shared ../shared]
"""
from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import motmetrics as mm
import numpy as np

from dishtrack.tracking import iou_matrix
from dishtrack.tracking.mot import read_mot, track_sequence
from dishtrack.tracking.tracker import TrackerParams

log = logging.getLogger("eval_mot15")
SEQUENCES = ("TUD-Campus", "TUD-Stadtmitte")


def _xyxy(a: np.ndarray) -> np.ndarray:
    return np.c_[a[:, 2:4], a[:, 2:4] + a[:, 4:6]]


def evaluate(dets: np.ndarray, gt: np.ndarray, params: TrackerParams | None = None,
             image_size: tuple[int, int] = (640, 480), fps: float = 25.0, result: np.ndarray | None = None) -> dict:
    """MOT devkit conventions: a match needs IoU >= 0.5; gt rows with flag 0 are ignored.
    Defaults are TUD-Campus / TUD-Stadtmitte's 640x480 at 25 fps. ``result`` (frame,id,x,y,w,h
    rows) scores a tracker run made elsewhere (e.g. ``track_video_strided``) instead."""
    gt = gt[gt[:, 6] != 0]
    res = track_sequence(dets, params, image_size=image_size, fps=fps) if result is None else result
    acc = mm.MOTAccumulator(auto_id=False)
    for f in np.unique(np.r_[gt[:, 0], dets[:, 0]]).astype(int):
        g, r = gt[gt[:, 0] == f], res[res[:, 0] == f]
        iou = iou_matrix(_xyxy(g), _xyxy(r))
        # motmetrics' own iou_matrix uses an API numpy 2 removed; same definition here
        acc.update(g[:, 1].astype(int), r[:, 1].astype(int), np.where(iou >= 0.5, 1 - iou, np.nan), frameid=f)
    s = mm.metrics.create().compute(acc, metrics=["mota", "motp", "idf1", "num_false_positives", "num_misses",
                                                  "num_switches", "mostly_tracked"], name="x")
    return {k: float(s[k].iloc[0]) for k in s.columns}


class LatencySchedule:
    """Asynchronous detection (``detector.stride.detect_async``) replayed frame by frame with a
    detector that takes ``latency`` frames: it starts on frame s, its detections arrive with
    frame s + latency, and it starts again on that frame (at most every k-th): what the
    pipeline's ``AsyncDetection`` does, without threads, so runs are reproducible."""

    def __init__(self, latency: int, k: int = 1) -> None:
        self.latency, self.k = latency, k
        self.running = None  # the frame the detector works on
        self.started = -k  # the index of the last frame it started on

    def step(self, frame, detect):
        """``frame`` arrives; ``detect(frame) -> Detections``. Returns the ``LateDetections``
        handed over with it, or None."""
        from dishtrack.service.motion import LateDetections

        out = None
        if self.running is not None and frame.index - self.running.index >= self.latency:
            out, self.running = LateDetections(detect(self.running), self.running), None
        if self.running is None and frame.index - self.started >= self.k:
            self.running, self.started = frame, frame.index
        return out


def track_video_strided(dets: np.ndarray, video: Path, k: int, params: TrackerParams | None = None,
                        fps: float = 25.0, flow: bool = True, noise_scale: float = 4.0,
                        max_frames: int | None = None, latency: int = 0) -> np.ndarray:
    """Detection stride on precomputed detections: the tracker gets frame f's detections
    only when (f - 1) % k == 0; on the frames between, tracks move by Kalman prediction
    corrected with optical flow measured on the sequence's real video frames
    (``service.motion``, as the pipeline does). ``latency`` > 0: asynchronous detection
    with a detector that takes ``latency`` frames (``LatencySchedule``), its detections moved
    by flow onto the frame they arrive with. Rows frame,id,x,y,w,h of confirmed tracks."""
    import cv2

    from dishtrack.service.motion import FlowPropagator, track_frame
    from dishtrack.tracking import Detections, Frame
    from dishtrack.tracking.mot import PERSON
    from dishtrack.tracking.tracker import Tracker
    from dishtrack.tracking.types import TrackState

    tracker = Tracker("mot", params)
    prop = FlowPropagator() if flow else None
    cap = cv2.VideoCapture(str(video))

    def detections(fr):
        d = dets[dets[:, 0] == fr.index]
        return Detections("mot", fr.index, fr.timestamp, np.c_[d[:, 2:4], d[:, 2:4] + d[:, 4:6]].astype(np.float32),
                          d[:, 6].astype(np.float32), np.zeros(len(d), np.int64), PERSON, fr.size)

    out, prev, f = [], None, 0
    schedule = LatencySchedule(latency, k) if latency > 0 else None
    while max_frames is None or f < max_frames:
        ok, img = cap.read()
        if not ok:
            break
        f += 1
        frame = Frame("mot", f, f / fps, img)
        det = None
        if schedule is not None:
            det = schedule.step(frame, detections)
        elif (f - 1) % k == 0:
            det = detections(frame)
        prev = track_frame(tracker, frame, det, prop, prev, noise_scale)
        for t in prev.tracks:
            if t.state is TrackState.CONFIRMED:
                x1, y1, x2, y2 = t.box
                out.append((f, t.track_id, x1, y1, x2 - x1, y2 - y1))
    cap.release()
    return np.array(out, dtype=np.float64).reshape(-1, 6)


def published(shared: Path) -> dict[str, dict]:
    path = shared / "data" / "mot15_sort_frcnn_dets" / "PUBLISHED_SORT_RESULTS.csv"
    with path.open() as f:
        rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
    head = rows[0]
    return {r[0]: dict(zip(head, r)) for r in rows[1:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shared = Path(args.shared)
    pub = published(shared)
    log.info("%-15s %-22s %6s %6s %5s %5s %4s | %s", "sequence", "tracker", "MOTA", "IDF1", "FP", "FN", "IDs",
             "SORT published (MOTA, FP, FN, IDs)")
    for seq in SEQUENCES:
        dets = read_mot(shared / "data/mot15_sort_frcnn_dets/data/train" / seq / "det/det.txt")
        gt = read_mot(shared / "data/motmetrics_pkg_data/motmetrics/data" / seq / "gt.txt")
        p = pub.get(seq)
        ref = f"{p['MOTA']}, {p['FP']}, {p['FN']}, {p['IDs']}" if p else "not published"
        for name, params in (("dishtrack (default)", TrackerParams()),
                             ("SORT settings", TrackerParams.sort())):
            m = evaluate(dets, gt, params)
            log.info("%-15s %-22s %6.1f %6.1f %5d %5d %4d | %s", seq, name, 100 * m["mota"], 100 * m["idf1"],
                     m["num_false_positives"], m["num_misses"], m["num_switches"], ref)


if __name__ == "__main__":
    main()

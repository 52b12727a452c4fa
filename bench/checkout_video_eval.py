"""End-to-end checkout accuracy on a synthetic video (``dishtrack make-video``).

Runs the product's objects on the video and scores the checkout events
against ``receipts.json`` (``dishtrack.tracking.receipts_eval``):

  --mode pipeline (default): ``service.pipeline.Pipeline`` with the file
      reader (``realtime`` false unless --realtime) and a temporary SQLite
      store; events are read back from the store. Event times are wall-clock
      there, so the detector is wrapped to record which frame each timestamp
      belongs to and events are mapped back to video time for matching.
  --mode direct: Detector -> Tracker -> LineCrossingCounter -> CheckoutAssembler
      frame by frame with video time (frame index / fps) as timestamps.

Detector: ``--checkpoint PATH`` (a ``dishtrack train`` file), ``--config YAML``
(its detector/tracker/zones), or ``--oracle``: ground-truth boxes from gt.txt
(jittered; boxes below --min-visibility, e.g. under the hand, are missed).

    python bench/checkout_video_eval.py VIDEO_DIR --oracle [--json out.json]
"""
from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import logging
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pydantic import ValidationError

from dishtrack.config import AppConfig, CameraConfig, DetectorConfig, TrackerConfig, ZoneConfig, load_config
from dishtrack.tracking.receipts_eval import EventCounts, score_receipts, trays_from_receipts
from dishtrack.tracking.types import Detections, Frame

log = logging.getLogger("checkout_video_eval")


class OracleDetector:
    """Detections from the video's gt.txt: what a perfect detector would report, with box
    jitter and misses of boxes that are mostly hidden (frame edge, hand)."""

    def __init__(self, video_dir: Path, jitter: float = 0.03, min_visibility: float = 0.3, drop: float = 0.0,
                 seed: int = 0) -> None:
        self.labels = tuple(line.split(" ", 1)[1] for line in
                            (video_dir / "labels.txt").read_text().splitlines() if line.strip())
        gt = np.loadtxt(video_dir / "gt.txt", delimiter=",", ndmin=2)
        gt = gt[gt[:, 8] >= min_visibility]
        self.by_frame = {int(f): gt[gt[:, 0] == f] for f in np.unique(gt[:, 0])}
        self.jitter, self.drop = jitter, drop
        self.rng = np.random.default_rng(seed)

    def detect(self, frames: list[Frame]) -> list[Detections]:
        out = []
        for f in frames:
            rows = self.by_frame.get(f.index + 1, np.zeros((0, 9)))  # gt.txt frames are 1-based
            rows = rows[self.rng.random(len(rows)) >= self.drop]
            x, y, w, h = (rows[:, i] for i in range(2, 6))
            n = len(rows)
            cx = x + w / 2 + self.rng.normal(0, self.jitter, n) * w
            cy = y + h / 2 + self.rng.normal(0, self.jitter, n) * h
            w = w * (1 + self.rng.normal(0, self.jitter, n))
            h = h * (1 + self.rng.normal(0, self.jitter, n))
            W, H = f.size
            boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).reshape(-1, 4)
            boxes = np.clip(boxes, 0, [W, H, W, H]).astype(np.float32)
            out.append(Detections(f.camera_id, f.index, f.timestamp, boxes, np.full(n, 0.9, np.float32),
                                  rows[:, 7].astype(np.int64), self.labels, (W, H)))
        return out


_PREDICTION_SETTINGS = ("input_size", "nms_iou", "max_detections", "backend", "precision", "device",
                        "calibration_images")


def prediction_key(det: DetectorConfig) -> str:
    """What raw per-frame predictions depend on: the checkpoint's bytes and the detector settings
    that change them (a cache of another localiser input size, runtime or precision is stale). At
    the defaults the key is the checkpoint's hash alone, as caches were keyed before these settings
    were. ``auto`` backend and device are keyed as such, not as what they resolve to on a machine,
    and ``cpu`` as ``auto`` (caches were written on CPU machines)."""
    key = hashlib.sha256(Path(det.checkpoint).read_bytes()).hexdigest()
    default = DetectorConfig(kind="checkpoint", checkpoint=det.checkpoint)

    def value(d: DetectorConfig, f: str):
        if f == "max_detections":
            return min(d.max_detections, 100)  # as load_detector clamps it
        return "auto" if f == "device" and d.device == "cpu" else getattr(d, f)

    changed = {f: value(det, f) for f in _PREDICTION_SETTINGS if value(det, f) != value(default, f)}
    return key + (json.dumps(changed, sort_keys=True) if changed else "")


class CachedPredictions:
    """Wraps a dish detector: raw per-frame predictions are stored in (or replayed from) a file,
    and only the thresholding/calibration policy (``to_detections``) runs again. Tracker,
    checkout and threshold settings can then be compared on one video in seconds."""

    def __init__(self, detector, path: Path, key: str, video: Path | None = None) -> None:
        self.detector = detector
        self.labels = detector.labels
        self.calibrated_threshold = getattr(detector, "calibrated_threshold", None)
        self.path, self.key = path, key
        self.video = hashlib.sha256(video.read_bytes()).hexdigest() if video is not None else None
        saved = pickle.loads(path.read_bytes()) if path.is_file() else {}
        # predictions of another checkpoint, or of another video, are stale (a cache written
        # before the video was recorded is taken as it is)
        fresh = saved.get("key") == key and saved.get("video", self.video) == self.video
        self.preds: dict[int, dict] = saved.get("preds", {}) if fresh else {}
        self.dirty = False

    def detect(self, frames: list[Frame]) -> list[Detections]:
        todo = [f for f in frames if f.index not in self.preds]
        if todo:
            for f, p in zip(todo, self.detector.predict([f.image for f in todo])):
                self.preds[f.index] = p
            self.dirty = True
        return [self.detector.to_detections(f, self.preds[f.index]) for f in frames]

    def save(self) -> None:
        if self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_bytes(pickle.dumps({"key": self.key, "video": self.video, "preds": self.preds}))


def dish_detector(det: DetectorConfig, predictions: Path | None, video: Path):
    """The configured detector; with ``predictions``, wrapped so its raw per-frame output on
    ``video`` is cached there under ``prediction_key(det)`` (call ``save`` when done)."""
    from dishtrack.models.detector import load_detector

    detector = load_detector(det)
    return CachedPredictions(detector, predictions, prediction_key(det), video) if predictions else detector


class FrameClock:
    """Wraps a detector; remembers (timestamp, frame index) so wall-clock event times map to video frames."""

    def __init__(self, detector) -> None:
        self.detector = detector
        self.calibrated_threshold = getattr(detector, "calibrated_threshold", None)
        self.ts: list[float] = []
        self.index: list[int] = []

    def detect(self, frames: list[Frame]) -> list[Detections]:
        for f in frames:
            self.ts.append(f.timestamp)
            self.index.append(f.index)
        return self.detector.detect(frames)

    def frame_at(self, ts: float) -> int:
        i = bisect.bisect_left(self.ts, ts)
        cands = [j for j in (i - 1, i) if 0 <= j < len(self.ts)]
        return self.index[min(cands, key=lambda j: abs(self.ts[j] - ts))]


def build_config(video: Path, receipts: dict, args) -> AppConfig:
    line_x = receipts["line"]["x"]
    zone = {"id": "checkout0", "camera": "cam0", "line": {"p1": [line_x, 0.0], "p2": [line_x, 1.0],
                                                          "direction": "left_to_right"}}
    if args.config:
        cfg = load_config(args.config)
        cam_id = cfg.cameras[0].id
        zones = [z for z in cfg.zones if z.camera == cam_id] or [ZoneConfig.model_validate({**zone, "camera": cam_id})]
    else:
        cfg, cam_id = AppConfig(cameras=[CameraConfig(id="cam0", source=str(video))]), "cam0"
        zones = [ZoneConfig.model_validate(zone)]
    if args.tray_gap_s is not None:
        zones = [z.model_copy(update={"tray_gap_s": args.tray_gap_s}) for z in zones]
    if getattr(args, "zone", None):
        zones = [ZoneConfig.model_validate({**z.model_dump(), **args.zone}) for z in zones]
    det = cfg.detector
    if args.checkpoint:
        det = DetectorConfig(kind="checkpoint", checkpoint=args.checkpoint, device=args.device)
    if getattr(args, "detector", None):  # e.g. the localiser's input side for this camera
        det = DetectorConfig.model_validate({**det.model_dump(), **args.detector})
    if getattr(args, "stride", None) is not None:  # detection stride k (frames between move by optical flow)
        det = det.model_copy(update={"stride": det.stride.model_copy(update={"k": args.stride})})
    cam = CameraConfig(id=cam_id, source=str(video), loop=False, realtime=args.realtime)
    tracker = cfg.tracker
    if getattr(args, "tracker", None):
        tracker = type(tracker).model_validate({**tracker.model_dump(), **args.tracker})
    return cfg.model_copy(update={"cameras": [cam], "zones": zones, "detector": det, "tracker": tracker})


def run_pipeline(cfg: AppConfig, detector, db: Path, timeout_s: float) -> tuple[list[dict], FrameClock]:
    from dishtrack.service.hub import EventHub
    from dishtrack.service.metrics import Metrics
    from dishtrack.service.pipeline import Pipeline
    from dishtrack.service.store import EventStore

    cfg = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"sqlite_path": str(db)})})
    clock = FrameClock(detector)
    store = EventStore(db)
    pipe = Pipeline(cfg, clock, store, EventHub(), Metrics()).start()
    try:
        if not pipe.finished.wait(timeout_s):
            raise TimeoutError(f"pipeline did not finish the video within {timeout_s}s")
    finally:
        pipe.stop()
    events, after = [], 0
    while after is not None:
        page = store.list(after=after, limit=500)
        events += page.items
        after = page.next_after
    store.close()
    return events, clock


def run_direct(cfg: AppConfig, detector, video: Path, fps: float, latency: int = 0) -> list[dict]:
    """Frame by frame without threads (reproducible). ``latency`` > 0: asynchronous detection
    (``detector.stride.detect_async``) with a detector that takes ``latency`` frames
    (``eval_mot15.LatencySchedule``), its detections moved by flow onto the frame they arrive with."""
    import cv2
    from eval_mot15 import LatencySchedule

    from dishtrack.service.motion import FlowParams, FlowPropagator, track_frame
    from dishtrack.tracking.checkout import CheckoutAssembler, LineCrossingCounter, LineSpec, TrayParams
    from dishtrack.tracking.tracker import Tracker, TrackerParams

    cam = cfg.cameras[0].id
    tracker = Tracker(cam, TrackerParams.from_config(cfg.tracker))
    zones = [(LineCrossingCounter(LineSpec(z.id, cam, tuple(z.line.p1), tuple(z.line.p2), z.line.direction,
                                           z.min_track_hits)),
              CheckoutAssembler(z.id, cam, params=TrayParams.from_config(
                  z, getattr(detector, "calibrated_threshold", None)))) for z in cfg.zones]
    events = []
    scfg = cfg.detector.stride  # fixed k here (no load to adapt to): detect frames 0, k, 2k, ...
    flow = FlowPropagator(FlowParams.from_config(scfg)) if (scfg.k > 1 or latency) and scfg.flow else None
    cap = cv2.VideoCapture(str(video))
    idx, upd = 0, None
    schedule = LatencySchedule(latency) if latency else None
    while True:
        ok, img = cap.read()
        if not ok:
            break
        ts = idx / fps
        frame = Frame(cam, idx, ts, img)
        if schedule is not None:
            det = schedule.step(frame, lambda fr: detector.detect([fr])[0])
        else:
            det = detector.detect([frame])[0] if idx % scfg.k == 0 else None
        upd = track_frame(tracker, frame, det, flow, upd, scfg.flow_noise)
        for counter, asm in zones:
            events += [e.to_dict() for e in asm.assemble(counter.count(upd), now=ts, update=upd)]
        idx += 1
    cap.release()
    for _, asm in zones:
        events += [e.to_dict() for e in asm.flush()]
    return events


def evaluate(args) -> dict:
    video_dir = Path(args.video_dir)
    receipts = json.loads((video_dir / "receipts.json").read_text())
    video = video_dir / receipts["video"]
    fps = float(receipts["fps"])
    cfg = build_config(video, receipts, args)
    if args.oracle:
        detector = OracleDetector(video_dir, args.jitter, args.min_visibility, args.drop, args.seed)
    else:
        detector = dish_detector(cfg.detector, Path(args.predictions) if args.predictions else None, video)
    t0 = time.perf_counter()
    if args.mode == "pipeline":
        with tempfile.TemporaryDirectory() as tmp:
            raw, clock = run_pipeline(cfg, detector, Path(tmp) / "events.sqlite3", args.timeout)
        to_video_s = lambda ts: clock.frame_at(ts) / fps  # noqa: E731
    else:
        raw = run_direct(cfg, detector, video, fps, getattr(args, "latency", 0))
        to_video_s = lambda ts: ts  # noqa: E731
    wall = time.perf_counter() - t0
    if isinstance(detector, CachedPredictions):
        detector.save()
    events = [EventCounts((to_video_s(e["started_at"]) + to_video_s(e["ended_at"])) / 2,
                          {i["label"]: i["count"] for i in e["items"]}, bool(e.get("needs_review")))
              for e in raw]
    score = score_receipts(events, trays_from_receipts(receipts))
    z = cfg.zones[0]
    score["setup"] = {
        "mode": args.mode, "realtime": args.realtime, "detector": "oracle" if args.oracle else cfg.detector.kind,
        "zone": {"line": [list(z.line.p1), list(z.line.p2)], "direction": z.line.direction,
                 "tray_gap_s": z.tray_gap_s, "tray_max_s": z.tray_max_s, "min_track_hits": z.min_track_hits,
                 "review_margin": z.review_margin, "review_confidence": z.review_confidence},
        "tracker": cfg.tracker.model_dump(), "stride": cfg.detector.stride.k, "wall_s": round(wall, 2), "frames": receipts["frames"],
        "oracle": {"jitter": args.jitter, "min_visibility": args.min_visibility, "drop": args.drop} if args.oracle else None,
    }
    score["event_times_s"] = [round(e.time_s, 2) for e in events]
    return score


def print_table(s: dict) -> None:
    z = s["setup"]["zone"]
    print(f"mode {s['setup']['mode']} (realtime {s['setup']['realtime']}), detector {s['setup']['detector']}, "
          f"line {z['line']} {z['direction']}, tray_gap_s {z['tray_gap_s']}, tray_max_s {z['tray_max_s']}, "
          f"{s['setup']['frames']} frames in {s['setup']['wall_s']} s")
    rows = [("trays", s["trays"]), ("events", s["events"]), ("events not in any tray's span", s["unmatched_events"]),
            ("trays with exactly one event", s["trays_one_event"]), ("trays with no event", s["trays_no_event"]),
            ("trays split (>1 event)", s["trays_split"]),
            ("exact receipts", f"{s['exact_receipts']} ({s['exact_receipt_rate']:.1%})"),
            ("item precision", f"{s['item_precision']:.3f}"), ("item recall", f"{s['item_recall']:.3f}"),
            ("events per tray", f"{s['events_per_tray']:.2f}"),
            ("trays flagged for review", f"{s['trays_flagged']} (wrong among them: {s['wrong_flagged']})"),
            ("wrong and not flagged", f"{s['wrong_unflagged']} ({s['wrong_unflagged'] / max(s['trays'], 1):.1%})")]
    for k, v in rows:
        print(f"  {k:<32} {v}")
    for r in s["per_tray"]:
        if not r["exact"]:
            print(f"  tray {r['tray']:>3}: {r['events']} event(s), gt {r['gt']} pred {r['pred']}"
                  + (" (flagged)" if r["flagged"] else ""))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video_dir", help="a directory written by `dishtrack make-video`")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", help="detector checkpoint from `dishtrack train`")
    g.add_argument("--oracle", action="store_true", help="ground-truth detector (gt.txt, jittered)")
    p.add_argument("--config", help="YAML app config: its detector, tracker and zones (--checkpoint/--oracle "
                   "replace its detector)")
    p.add_argument("--mode", choices=["pipeline", "direct"], default="pipeline")
    p.add_argument("--realtime", action="store_true", help="pace the file at its fps (pipeline mode)")
    p.add_argument("--tray-gap-s", type=float, default=None, help="override the zone's tray_gap_s")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--jitter", type=float, default=0.03, help="oracle: box noise, fraction of box size")
    p.add_argument("--min-visibility", type=float, default=0.3, help="oracle: gt boxes less visible are missed")
    p.add_argument("--drop", type=float, default=0.0, help="oracle: random miss rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--json", help="write the scores here")
    p.add_argument("--predictions", help="dish checkpoint: store raw per-frame predictions here, or replay them "
                   "if the file exists (compare tracker/checkout settings without running the network again)")
    p.add_argument("--latency", type=int, default=0, help="direct mode: asynchronous detection whose detections "
                   "arrive this many frames late, moved onto the frame by optical flow (detector.stride.detect_async)")
    p.add_argument("--stride", type=int, default=None, help="detection stride k: the detector runs on every k-th "
                   "frame, tracks move by optical flow in between (overrides detector.stride.k)")
    p.add_argument("--zone", help="JSON object of zone settings to override, e.g. '{\"same_dish_overlap\": 1}'")
    p.add_argument("--tracker", help="JSON object of tracker settings to override, e.g. '{\"high_score\": 0.5}'")
    p.add_argument("--detector", help="JSON object of detector settings to override (after --checkpoint), e.g. the "
                   "localiser's input side '{\"input_size\": 448}'; part of the --predictions cache's key")
    args = p.parse_args(argv)
    if not (args.checkpoint or args.oracle or args.config):
        p.error("give --checkpoint, --oracle or --config")
    if args.predictions and not args.checkpoint:
        p.error("--predictions stores a dish checkpoint's raw predictions: give --checkpoint")
    for name, model in (("zone", ZoneConfig), ("tracker", TrackerConfig), ("detector", DetectorConfig)):
        text = getattr(args, name)
        if text is None:
            continue
        try:
            obj = json.loads(text)
        except ValueError as e:
            p.error(f"--{name} {text!r}: not JSON ({e})")
        if not isinstance(obj, dict):
            p.error(f"--{name} {text!r}: a JSON object of settings, e.g. '{{\"high_score\": 0.5}}'")
        unknown = sorted(set(obj) - set(model.model_fields))
        if unknown:
            p.error(f"--{name}: no such {name} setting {unknown} (known: {', '.join(model.model_fields)})")
        setattr(args, name, obj)  # parsed once: evaluate() merges the dict into the config
    if args.detector and args.oracle:
        p.error("--detector sets the dish detector's settings; --oracle uses ground-truth boxes instead")
    if args.latency < 0:
        p.error(f"--latency {args.latency}: frames late, 0 or more")
    if args.latency and args.mode != "direct":
        p.error("--latency replays asynchronous detection frame by frame: use it with --mode direct")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        s = evaluate(args)
    except ValidationError as e:  # a value given in --zone/--tracker/--detector (the error names it)
        raise SystemExit(f"checkout_video_eval.py: error: {e}") from None
    print_table(s)
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

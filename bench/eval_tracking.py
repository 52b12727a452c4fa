"""Tracker benchmark on any MOT-format folder: HOTA, MOTA, IDF1, IDSW, Frag
(trackeval), gap bridging and updates/s, for dishtrack and the Roboflow
``trackers`` SORT, ByteTrack and OC-SORT run on the same detections.

Each sequence is a subfolder with ``gt/gt.txt`` and ``seqinfo.ini`` (or pass
``--fps/--size``), and detections from ``det/det.txt`` unless ``--noise`` asks
for the seeded protocol of ``dishtrack.tracking.mot.NoiseProtocol``.

A subfolder written by ``dishtrack make-video`` (``gt.txt``, ``seqinfo.ini``,
``receipts.json``) is a checkout video: every dish of its gt.txt is an object
(the class column is the dish), boxes less than ``--min-visibility`` inside the
image or out from under the hand are ignored (results on them are dropped, as
MOTChallenge does with distractors), result boxes are clipped to the image as
the gt boxes are, and ``--checkpoint`` gives the detections: the dish model run
on the video with the default detector settings, tracked by dishtrack as the
service tracks it (calibrated scores, classes, appearance embeddings); the
baselines get the same boxes and scores. ``{seq}`` in ``--checkpoint`` and
``--predictions`` is the subfolder's name, so cross-validated folds each use
their own model and every video its own cache:

    python bench/eval_tracking.py runs/cv_videos --checkpoint 'runs/cv_supponly/{seq}/dishes.pt' \
        --predictions 'runs/cv_supponly/{seq}/video_predictions.pkl'

    python bench/eval_tracking.py ../shared/data/mot17_train_dev --noise
    python bench/eval_tracking.py ../shared/data/mot15_sort_frcnn_dets/data/train \\
        --gt-root ../shared/data/motmetrics_pkg_data/motmetrics/data --seqs TUD-Campus TUD-Stadtmitte --fps 25 --size 640 480
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from dishtrack.tracking.geometry import iou_matrix
from dishtrack.tracking.mot import (NoiseProtocol, noisy_detections, read_mot, read_seqinfo, track_detections,
                                    track_sequence)
from dishtrack.tracking.tracker import TrackerParams
from dishtrack.tracking.types import Detections, Frame

log = logging.getLogger("eval_tracking")
DISTRACTORS = (2, 7, 8, 12)  # MOT17 person-on-vehicle, static person, distractor, reflection


def _xyxy(a: np.ndarray) -> np.ndarray:
    return np.c_[a[:, 2:4], a[:, 2:4] + a[:, 4:6]]


def mot_considered(gt: np.ndarray) -> np.ndarray:
    """MOTChallenge: ground truth with flag 1 and class pedestrian (MOT16/17, 9
    columns) or any class (MOT15, whose 10 columns hold world coordinates)."""
    cls = gt[:, 7] if gt.shape[1] == 9 else -np.ones(len(gt))
    return (gt[:, 6] != 0) & ((cls == 1) | (cls == -1))


def mot_ignored(gt: np.ndarray) -> np.ndarray:
    """MOTChallenge (trackeval's MOT17 preprocessing): results matched to these are
    dropped, neither hits nor false positives: the distractor classes of MOT16/17;
    none in MOT15."""
    return np.isin(gt[:, 7], DISTRACTORS) if gt.shape[1] == 9 else np.zeros(len(gt), bool)


@dataclasses.dataclass(frozen=True)
class Sequence:
    """One sequence to score. ``considered``: per gt row, counted; ``ignored``:
    results matched to it are dropped (``_prepare``). ``clip``: results are clipped
    to the image first (the ground truth is: make-video). ``detections``: a
    detector's own output per frame (frame_index = MOT frame), tracked whole by
    dishtrack; the baselines, and every tracker when it is None, get ``dets``
    (MOT det rows)."""

    name: str
    gt: np.ndarray
    dets: np.ndarray
    fps: float
    size: tuple[int, int]
    n: int
    considered: np.ndarray
    ignored: np.ndarray
    clip: bool = False
    detections: tuple[Detections, ...] | None = None


# ---- trackers --------------------------------------------------------------

def run_dishtrack(params: TrackerParams, appearance: bool = True):
    """``appearance=False`` drops the detector's embeddings (IoU-only association)."""
    def run(seq: Sequence):
        if seq.detections is None:
            return track_sequence(seq.dets, params, image_size=seq.size, fps=seq.fps, n_frames=seq.n)
        frames = seq.detections if appearance else (dataclasses.replace(d, embeddings=None) for d in seq.detections)
        return track_detections(frames, params)
    return run


def run_roboflow(kind: str):
    """Roboflow ``trackers`` with their default settings at the sequence frame rate."""
    def run(seq: Sequence):
        import supervision as sv
        from trackers import ByteTrackTracker, OCSORTTracker, SORTTracker

        cls = {"SORT": SORTTracker, "ByteTrack": ByteTrackTracker, "OC-SORT": OCSORTTracker}[kind]
        tr = cls(frame_rate=seq.fps)
        dets, n = seq.dets, seq.n
        frames = dets[:, 0].astype(int)
        out = []
        for f in range(1, n + 1):
            d = dets[frames == f]
            det = sv.Detections(xyxy=_xyxy(d).astype(np.float32), confidence=d[:, 6].astype(np.float32),
                                class_id=np.zeros(len(d), int))
            r = tr.update(det)
            for b, tid in zip(r.xyxy, r.tracker_id):
                if tid >= 0:
                    out.append((f, tid, b[0], b[1], b[2] - b[0], b[3] - b[1]))
        return np.array(out, np.float64).reshape(-1, 6)
    return run


# ---- metrics ---------------------------------------------------------------

def _prepare(gt: np.ndarray, res: np.ndarray, n: int, considered: np.ndarray | None = None,
             ignored: np.ndarray | None = None) -> dict:
    """trackeval's per-sequence data dict, MOTChallenge-style preprocessing: each
    frame's results are matched (Hungarian, IoU >= 0.5) to all its ground truth,
    those matched to ``ignored`` rows are dropped, then only the ``considered``
    ground truth remains. Defaults: ``mot_considered`` / ``mot_ignored``; with
    ``considered`` alone, every other row is ignored."""
    keep_gt = mot_considered(gt) if considered is None else considered
    if ignored is None:
        ignored = mot_ignored(gt) if considered is None else ~keep_gt
    gid = {v: i for i, v in enumerate(np.unique(gt[keep_gt, 1]))}
    tid = {v: i for i, v in enumerate(np.unique(res[:, 1]))} if len(res) else {}
    data = {"num_timesteps": n, "gt_ids": [], "tracker_ids": [], "similarity_scores": []}
    gf, rf = gt[:, 0].astype(int), res[:, 0].astype(int)
    n_gt = n_tr = 0
    for f in range(1, n + 1):
        at = gf == f
        g, r = gt[at], res[rf == f]
        if ignored[at].any() and len(r):
            iou = iou_matrix(_xyxy(g), _xyxy(r))
            iou[iou < 0.5 - 1e-9] = 0.0
            rr, cc = linear_sum_assignment(-iou)
            hit = iou[rr, cc] > 1e-9
            r = np.delete(r, cc[hit & ignored[at][rr]], axis=0)
        g = g[keep_gt[at]]
        data["gt_ids"].append(np.array([gid[v] for v in g[:, 1]], int))
        data["tracker_ids"].append(np.array([tid[v] for v in r[:, 1]], int))
        data["similarity_scores"].append(iou_matrix(_xyxy(g), _xyxy(r)))
        n_gt += len(g)
        n_tr += len(r)
    data.update(num_gt_ids=len(gid), num_tracker_ids=len(tid), num_gt_dets=n_gt, num_tracker_dets=n_tr)
    return data


def trackeval_metrics(gt: np.ndarray, res: np.ndarray, n: int, considered: np.ndarray | None = None,
                      ignored: np.ndarray | None = None) -> dict:
    from trackeval.metrics import CLEAR, HOTA, Identity

    data = _prepare(gt, res, n, considered, ignored)
    out = {}
    for metric in (HOTA({"PRINT_CONFIG": False}), CLEAR({"PRINT_CONFIG": False}), Identity({"PRINT_CONFIG": False})):
        out.update(metric.eval_sequence(data))
    return {"HOTA": float(np.mean(out["HOTA"])), "MOTA": out["MOTA"], "IDF1": out["IDF1"],
            "IDSW": int(out["IDSW"]), "Frag": int(out["Frag"])}


def gap_bridging(gt: np.ndarray, dets: np.ndarray, res: np.ndarray, n: int, min_gap: int, max_gap: int,
                 considered: np.ndarray | None = None) -> tuple[int, int]:
    """Ground-truth objects not detected (IoU >= 0.5) for min_gap..max_gap
    frames: (gaps whose both ends are tracked, gaps tracked with the same id)."""
    gt = gt[(gt[:, 6] != 0) if considered is None else considered]
    ids = np.unique(gt[:, 1]).astype(int)
    index = {v: i for i, v in enumerate(ids)}
    detected = np.zeros((len(ids), n + 2), bool)
    present = np.zeros((len(ids), n + 2), bool)
    track = np.full((len(ids), n + 2), -1)
    gf, df, rf = gt[:, 0].astype(int), dets[:, 0].astype(int), res[:, 0].astype(int)
    for f in range(1, n + 1):
        g = gt[gf == f]
        if not len(g):
            continue
        rows = [index[int(v)] for v in g[:, 1]]
        present[rows, f] = True
        for other, mark in ((dets[df == f], "det"), (res[rf == f], "res")):
            if not len(other):
                continue
            iou = iou_matrix(_xyxy(g), _xyxy(other))
            rr, cc = linear_sum_assignment(-iou)
            for a, c in zip(rr, cc):
                if iou[a, c] >= 0.5:
                    if mark == "det":
                        detected[rows[a], f] = True
                    else:
                        track[rows[a], f] = int(other[c, 1])
    tracked = bridged = 0
    for i in range(len(ids)):
        fr = np.flatnonzero(detected[i])
        for a, b in zip(fr[:-1], fr[1:]):
            gap = b - a - 1
            if min_gap <= gap <= max_gap and track[i, a] >= 0 and track[i, b] >= 0:
                tracked += 1
                bridged += int(track[i, a] == track[i, b])
    return tracked, bridged


def switch_causes(gt: np.ndarray, res: np.ndarray, n: int, crowd_iou: float = 0.3,
                  considered: np.ndarray | None = None) -> dict[str, int]:
    """Identity switches by cause. Each considered ground-truth object keeps the
    track it was matched to (IoU >= 0.5, continuing matches preferred, as
    CLEAR); when the track changes, the switch is counted as ``new`` (the new
    track was first reported within 2 frames: a track was lost and re-born) or
    ``taken`` (an existing track took over), ``after gap`` or ``continuous``
    (the object was unmatched in the previous frame or not), and ``crowd`` when
    another object overlaps it by IoU > crowd_iou."""
    gt = gt[mot_considered(gt) if considered is None else considered]
    gf, rf = gt[:, 0].astype(int), res[:, 0].astype(int)
    first = {int(t): int(res[res[:, 1] == t, 0].min()) for t in np.unique(res[:, 1])}
    prev: dict[int, int] = {}
    last: dict[int, int] = {}
    out: dict[str, int] = {}
    for f in range(1, n + 1):
        g, r = gt[gf == f], res[rf == f]
        if not len(g) or not len(r):
            continue
        iou = iou_matrix(_xyxy(g), _xyxy(r))
        keep = np.array([[prev.get(int(a)) == int(b) for b in r[:, 1]] for a in g[:, 1]])
        rr, cc = linear_sum_assignment(-np.where(iou >= 0.5, iou + 1000.0 * keep, 0.0))
        gg = iou_matrix(_xyxy(g), _xyxy(g))
        np.fill_diagonal(gg, 0.0)
        for a, c in zip(rr, cc):
            if iou[a, c] < 0.5:
                continue
            gi, ti = int(g[a, 1]), int(r[c, 1])
            if gi in prev and prev[gi] != ti:
                kind = ("new" if f - first[ti] <= 2 else "taken") + (" after gap" if f - last[gi] > 1 else " continuous") \
                    + (" crowd" if gg[a].max() > crowd_iou else " open")
                out[kind] = out.get(kind, 0) + 1
            prev[gi], last[gi] = ti, f
    return out


# ---- driver ----------------------------------------------------------------

def load_sequences(root: Path, seqs, gt_root: Path | None, noise: NoiseProtocol | None, fps, size,
                   checkpoint: str | None = None, predictions: str | None = None, min_visibility: float = 0.25,
                   device: str = "auto") -> list[Sequence]:
    """MOTChallenge folders (gt/gt.txt) and make-video folders (gt.txt + receipts.json) under
    ``root``. Raises ValueError naming the folder when it has no detections to track."""
    names = seqs or sorted(p.name for p in root.iterdir() if p.is_dir())
    out = []
    for name in names:
        d = root / name
        video = (d / "receipts.json").is_file() and (d / "gt.txt").is_file()  # dishtrack make-video
        gt = read_mot((gt_root / name / "gt.txt") if gt_root else d / ("gt.txt" if video else "gt/gt.txt"))
        if (d / "seqinfo.ini").exists():
            info = read_seqinfo(d / "seqinfo.ini")
            s_fps, s_size, n = info.fps, info.image_size, info.length
        else:
            s_fps, s_size, n = fps, tuple(size), int(gt[:, 0].max())
        if video:  # every dish is an object; a box mostly outside the image or under the hand is ignored
            visible = gt[:, 8] >= min_visibility
            considered, ignored = (gt[:, 6] != 0) & visible, ~visible
        else:
            considered, ignored = mot_considered(gt), mot_ignored(gt)
            if checkpoint:
                log.warning("%s: not a make-video folder, --checkpoint is not used for it", name)
        detections = None
        if video and checkpoint:
            if noise:
                log.warning("%s: detections from --checkpoint, --noise is not used for it", name)
            detections = checkout_detections(d, checkpoint.format(seq=name),
                                             predictions.format(seq=name) if predictions else None, device)
            dets = mot_rows(detections)
        elif noise:
            dets = noisy_detections(gt, s_size, dataclasses.replace(noise, classes=None) if video else noise)
        elif (d / "det" / "det.txt").is_file():
            dets = read_mot(d / "det" / "det.txt")
        else:
            raise ValueError(f"{d}: no detections to track (det/det.txt); give --noise"
                             + (" or --checkpoint (a dish model run on checkout.mp4)" if video else ""))
        n = max(n, int(dets[:, 0].max()) if len(dets) else 0)
        out.append(Sequence(name, gt, dets, s_fps, s_size, n, considered, ignored, video, detections))
    if len({s.clip for s in out}) > 1:
        log.warning("MOTChallenge and make-video folders mixed: ALL (mean) averages both")
    return out


def checkout_detections(video_dir: Path, checkpoint: str, predictions: str | None, device: str) -> tuple[Detections, ...]:
    """The dish checkpoint on every frame of a make-video folder, as the service
    runs it with the default detector settings (``checkout_video_eval``'s direct
    mode; ``predictions`` caches the raw per-frame output under the checkpoint's
    and the video's hashes, shared with that script)."""
    import cv2
    from checkout_video_eval import CachedPredictions, dish_detector
    from tqdm import tqdm

    from dishtrack.config import DetectorConfig

    receipts = json.loads((video_dir / "receipts.json").read_text())
    fps = float(receipts["fps"])
    video = video_dir / receipts["video"]
    detector = dish_detector(DetectorConfig(kind="checkpoint", checkpoint=checkpoint, device=device),
                             Path(predictions) if predictions else None, video)
    cap = cv2.VideoCapture(str(video))
    out = []
    with tqdm(total=int(receipts["frames"]), desc=f"{video_dir.name}: detect", unit="frame", leave=False) as bar:
        while True:
            ok, img = cap.read()
            if not ok:
                break
            i = len(out)
            det = detector.detect([Frame("cam0", i, i / fps, img)])[0]
            out.append(dataclasses.replace(det, frame_index=i + 1))  # MOT frames are 1-based
            bar.update()
    cap.release()
    if isinstance(detector, CachedPredictions):
        detector.save()
    return tuple(out)


def mot_rows(detections) -> np.ndarray:
    """Detections -> MOT det rows (frame, -1, x, y, w, h, score)."""
    rows = [np.c_[np.full(len(d.boxes), d.frame_index), -np.ones(len(d.boxes)), d.boxes[:, :2],
                  d.boxes[:, 2:] - d.boxes[:, :2], d.scores] for d in detections]
    return np.concatenate(rows).astype(np.float64) if rows else np.zeros((0, 7))


def clip_to_image(res: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Result boxes (frame, id, x, y, w, h) cut at the image border, as a make-video gt.txt is;
    boxes left with no area are dropped. (A Kalman box may reach past the border, a detector's
    box never does: unclipped, the comparison would count the border against Kalman trackers.)"""
    w, h = size
    x1, y1 = np.clip(res[:, 2], 0, w), np.clip(res[:, 3], 0, h)
    x2, y2 = np.clip(res[:, 2] + res[:, 4], 0, w), np.clip(res[:, 3] + res[:, 5], 0, h)
    out = np.c_[res[:, :2], x1, y1, x2 - x1, y2 - y1]
    return out[(out[:, 4] > 0) & (out[:, 5] > 0)]


def evaluate_all(sequences: list[Sequence], trackers: dict, gap_s: float = 2.0, min_gap: int = 5,
                 causes: bool = False) -> list[dict]:
    rows = []
    for tname, run in trackers.items():
        tot = {"tracked": 0, "bridged": 0, "frames": 0, "secs": 0.0}
        per_seq = []
        for seq in sequences:
            gt, n = seq.gt, seq.n
            t0 = time.perf_counter()
            res = run(seq)
            dt = time.perf_counter() - t0
            if seq.clip:
                res = clip_to_image(res, seq.size)
            m = trackeval_metrics(gt, res, n, seq.considered, seq.ignored)
            tr, br = gap_bridging(gt, seq.dets, res, n, min_gap, int(round(gap_s * seq.fps)), seq.considered)
            m.update(sequence=seq.name, tracker=tname, fps=n / dt, gaps=tr, bridged=br)
            if causes:
                m["causes"] = switch_causes(gt, res, n, considered=seq.considered)
            per_seq.append(m)
            tot["tracked"] += tr
            tot["bridged"] += br
            tot["frames"] += n
            tot["secs"] += dt
        rows += per_seq
        if len(per_seq) > 1:
            w = np.array([1.0] * len(per_seq))
            comb = {k: float(np.average([m[k] for m in per_seq], weights=w)) for k in ("HOTA", "MOTA", "IDF1")}
            comb.update(IDSW=sum(m["IDSW"] for m in per_seq), Frag=sum(m["Frag"] for m in per_seq),
                        sequence="ALL (mean)", tracker=tname, fps=tot["frames"] / tot["secs"],
                        gaps=tot["tracked"], bridged=tot["bridged"])
            if causes:
                comb["causes"] = {k: sum(m["causes"].get(k, 0) for m in per_seq)
                                  for k in sorted({k for m in per_seq for k in m["causes"]})}
            rows.append(comb)
    return rows


def format_table(rows: list[dict], gap_s: float) -> str:
    head = f"| sequence | tracker | HOTA | MOTA | IDF1 | IDSW | Frag | gaps<= {gap_s:g}s bridged | updates/s |"
    lines = [head, "|" + "---|" * 9]
    for m in sorted(rows, key=lambda r: (r["sequence"], r["tracker"])):
        pct = 100.0 * m["bridged"] / m["gaps"] if m["gaps"] else float("nan")
        lines.append(f"| {m['sequence']} | {m['tracker']} | {100 * m['HOTA']:.1f} | {100 * m['MOTA']:.1f} | "
                     f"{100 * m['IDF1']:.1f} | {m['IDSW']} | {m['Frag']} | {pct:.0f}% ({m['bridged']}/{m['gaps']}) | "
                     f"{m['fps']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--seqs", nargs="*")
    ap.add_argument("--gt-root", type=Path)
    ap.add_argument("--noise", action="store_true", help="detections from ground truth by the seeded protocol")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--size", type=int, nargs=2, default=(1920, 1080))
    ap.add_argument("--config", help="dishtrack YAML config whose tracker section is used")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--causes", action="store_true", help="also count identity switches by cause")
    ap.add_argument("--legacy", action="store_true", help="also run the previous release's settings (max_age 30 frames, SORT cues)")
    ap.add_argument("--checkpoint", help="make-video folders: detections from this dish checkpoint ({seq}: folder name)")
    ap.add_argument("--predictions", help="with --checkpoint: cache of its raw per-frame predictions ({seq}: folder name)")
    ap.add_argument("--min-visibility", type=float, default=0.25,
                    help="make-video folders: gt boxes less visible are ignored (neither missed nor false)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = TrackerParams()
    if args.config:
        from dishtrack.config import load_config
        params = TrackerParams.from_config(load_config(args.config).tracker)
    noise = NoiseProtocol(seed=args.seed) if args.noise else None
    if args.predictions and not args.checkpoint:
        ap.error("--predictions caches a checkpoint's predictions: give --checkpoint")
    if args.predictions and "{seq}" not in args.predictions and \
            len(args.seqs or [d for d in args.root.iterdir() if d.is_dir()]) > 1:
        ap.error("--predictions: put {seq} (the folder's name) in it, one cache per video")
    try:
        seqs = load_sequences(args.root, args.seqs, args.gt_root, noise, args.fps, args.size, args.checkpoint,
                              args.predictions, args.min_visibility, args.device)
    except ValueError as e:
        ap.error(str(e))
    trackers = {"dishtrack": run_dishtrack(params), "dishtrack SORT settings": run_dishtrack(TrackerParams.sort())}
    if any(s.detections is not None for s in seqs):
        trackers["dishtrack without appearance"] = run_dishtrack(params, appearance=False)
    if args.legacy:
        trackers["dishtrack previous (max_age 30 frames)"] = run_dishtrack(
            dataclasses.replace(TrackerParams.sort(), max_age=30, max_coast_s=1e9, max_coast_occluded_s=1e9))
    if not args.no_baselines:
        for k in ("SORT", "ByteTrack", "OC-SORT"):
            trackers[f"trackers {k}"] = run_roboflow(k)
    rows = evaluate_all(seqs, trackers, causes=args.causes)
    print(format_table(rows, 2.0))
    if args.causes:
        print("\nidentity switches by cause (bench/eval_tracking.switch_causes):")
        for m in sorted(rows, key=lambda r: (r["sequence"], r["tracker"])):
            print(f"{m['sequence']} | {m['tracker']}: " + ", ".join(f"{k} {v}" for k, v in sorted(m["causes"].items())))
    return rows


if __name__ == "__main__":
    main()

"""Appearance cue quality: nearest-neighbour ranking of the tracker's embeddings
(``Detections.embeddings``, the dish classifier's pooled trunk features) of the
same dish across frames.

Ground-truth boxes of a checkout video with MOT ground truth (``dishtrack
make-video`` output: checkout.mp4 + gt.txt) are embedded exactly as the
detector embeds its own boxes. Every embedding (a query) is ranked by cosine
similarity against

* ``later``: all embeddings at least ``--gap-s`` seconds later (any dish, any
  tray): rank-1 and mAP, the usual re-identification measures;
* ``in view``: the dishes visible in the one frame ``--gap-s`` later: rank-1,
  i.e. the choice the tracker faces when it re-finds a dish after a gap.

    python bench/eval_appearance.py runs/bench1/video0 --checkpoint runs/bench1/dishes.pt

The checkpoint's validation trays are the fair videos (``bench/dish_benchmark.py``
makes them from those trays only); trays it was trained on score higher.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from dishtrack.models.dish_detector import DishDetector, classify
from dishtrack.tracking.mot import read_mot, read_seqinfo

log = logging.getLogger("eval_appearance")


@dataclass(frozen=True, slots=True)
class RankingResult:
    queries: int
    rank1_later: float
    map_later: float
    rank1_in_view: float
    in_view_queries: int
    mean_candidates_in_view: float


def embed_ground_truth(video_dir: Path, detector: DishDetector, step: int, min_vis: float,
                       max_frames: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frames, ids, embeddings) of ground-truth boxes in every ``step``-th frame
    with visibility >= ``min_vis``; crops and embeddings as DishDetector.predict."""
    gt = read_mot(video_dir / "gt.txt")
    gt = gt[gt[:, 8] >= min_vis] if gt.shape[1] >= 9 else gt
    cap = cv2.VideoCapture(str(video_dir / "checkout.mp4"))
    if not cap.isOpened():
        raise FileNotFoundError(video_dir / "checkout.mp4")
    frames, ids, embs = [], [], []
    f = 0
    try:
        while True:
            ok, im = cap.read()
            if not ok or (max_frames and f >= max_frames):
                break
            f += 1  # gt frames are 1-based
            rows = gt[gt[:, 0] == f]
            if f % step or not len(rows):
                continue
            h, w = im.shape[:2]
            srcs, fs = detector._crop_sources([cv2.cvtColor(im, cv2.COLOR_BGR2RGB)])
            boxes = torch.tensor(np.c_[rows[:, 2:4], rows[:, 2:4] + rows[:, 4:6]], dtype=torch.float32)
            with torch.inference_mode():
                _, e = classify(detector.model.classifier, srcs, [boxes * fs[0]],
                                [(round(w * fs[0]), round(h * fs[0]))], detector.spec.crop_size)
            frames += [f] * len(rows)
            ids += rows[:, 1].astype(int).tolist()
            embs.append(e.numpy())
    finally:
        cap.release()
    return np.array(frames), np.array(ids), np.concatenate(embs) if embs else np.zeros((0, 1))


def rank(frames: np.ndarray, ids: np.ndarray, emb: np.ndarray, gap: int) -> RankingResult:
    """Nearest-neighbour ranking of each embedding against later ones (see module doc)."""
    sim = emb @ emb.T
    r1, aps, r1v, cand = [], [], [], []
    for q in range(len(ids)):
        later = frames >= frames[q] + gap
        pos = later & (ids == ids[q])
        if pos.any():
            order = np.argsort(-sim[q, later], kind="stable")
            hit = (ids[later] == ids[q])[order]
            r1.append(hit[0])
            ranks = np.flatnonzero(hit) + 1
            aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        view = frames == frames[q] + gap
        if (view & (ids == ids[q])).any() and view.sum() > 1:
            best = np.flatnonzero(view)[np.argmax(sim[q, view])]
            r1v.append(ids[best] == ids[q])
            cand.append(view.sum())
    return RankingResult(len(r1), float(np.mean(r1)) if r1 else float("nan"), float(np.mean(aps)) if aps else float("nan"),
                         float(np.mean(r1v)) if r1v else float("nan"), len(r1v), float(np.mean(cand)) if cand else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("videos", type=Path, nargs="+", help="make-video output folders (checkout.mp4, gt.txt, seqinfo.ini)")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--step", type=int, default=5, help="embed every step-th frame")
    ap.add_argument("--gap-s", type=float, default=1.0, help="query vs gallery at least this much later")
    ap.add_argument("--min-vis", type=float, default=0.5, help="ground-truth boxes at least this visible")
    ap.add_argument("--max-frames", type=int)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    det = DishDetector.from_checkpoint(args.checkpoint, "cpu")
    print(f"| video | queries | rank-1 (later) | mAP (later) | rank-1 (in view) | dishes in view |")
    print("|---|---|---|---|---|---|")
    for v in args.videos:
        fps = read_seqinfo(v / "seqinfo.ini").fps
        gap = max(args.step, int(round(args.gap_s * fps / args.step)) * args.step)
        frames, ids, emb = embed_ground_truth(v, det, args.step, args.min_vis, args.max_frames)
        r = rank(frames, ids, emb, gap)
        print(f"| {v.name} | {r.queries} | {100 * r.rank1_later:.1f}% | {100 * r.map_later:.1f}% | "
              f"{100 * r.rank1_in_view:.1f}% ({r.in_view_queries}) | {r.mean_candidates_in_view:.1f} |")


if __name__ == "__main__":
    main()

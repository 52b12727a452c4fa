"""Shot selection: the N frames of a video (or camera) most worth labelling.

Labels are cheapest where they teach the most: frames unlike the ones already picked (diversity)
and frames the model is unsure about (uncertainty). Each candidate frame is described by the dish
classifier's own embedding (the trunk the model learns with) of the whole frame and of the mean of
its detections; uncertainty is the lowest class margin (top-1 minus top-2 probability) among its
detections. Selection is greedy facility location on cosine distance: each pick is the frame that
brings the most candidate frames closer to a picked one, each frame counted with weight
(1 + ``uncertainty_weight`` x uncertainty); a candidate closer than ``dedup_distance`` to a picked
frame is a near-duplicate and never picked. Measured on tray photos (``bench/learning_curve.py``),
k-center — the farthest frame next — labels outliers first and did worse than random choice;
facility location picks frames that stand for many others and did better at every budget.
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from .dish_detector import DishDetector, classify
from .video_file import not_a_video

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Candidate:
    frame: int  # 0-based frame index in the source
    time_s: float
    feature: np.ndarray  # L2-normalised
    uncertainty: float  # 1 - lowest class margin among detections (0: no detection)
    detections: int
    labels: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Shot:
    rank: int
    frame: int
    time_s: float
    image: str  # relative to the output folder
    uncertainty: float
    novelty: float  # cosine distance to the frames picked before it (1.0 for the first)
    detections: int
    labels: str  # "Plate;Bread;..."


def frame_feature(det: DishDetector, image_bgr: np.ndarray, min_confidence: float = 0.3) -> Candidate:
    """Features and uncertainty of one frame (``frame``/``time_s`` filled in by the caller)."""
    p = det.predict([image_bgr])[0]
    cal = det.calibrate(p["scores"], p["class_ids"]) if len(p["scores"]) else np.zeros(0, np.float32)
    keep = cal >= min_confidence
    h, w = image_bgr.shape[:2]
    f = min(1.0, det.spec.crop_long_side / max(h, w))
    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    small = cv2.resize(rgb, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA) if f < 1 else rgb
    src = torch.from_numpy(small).permute(2, 0, 1).float().to(det.device)
    whole = torch.tensor([[0.0, 0.0, small.shape[1], small.shape[0]]], device=det.device)
    with torch.inference_mode():
        _, emb = classify(det.model.classifier, [src], [whole], [(small.shape[1], small.shape[0])],
                          det.spec.crop_size, run=det.cls_backend.run)
    whole_emb = emb[0].cpu().numpy()
    dets = p["embeddings"][keep]
    det_emb = np.zeros_like(whole_emb)
    if len(dets):
        # weighted by confidence above the cut: a box flickering at the threshold barely moves the feature
        wts = cal[keep] - min_confidence + 1e-3
        det_emb = (wts[:, None] * dets).sum(axis=0)
        det_emb = det_emb / max(float(np.linalg.norm(det_emb)), 1e-6)
    feat = np.concatenate([whole_emb, det_emb]).astype(np.float32)
    feat /= max(float(np.linalg.norm(feat)), 1e-6)
    unc = 0.0
    if keep.any():
        probs = np.sort(p["probs"][keep], axis=1)  # incl. background: a box torn between dish and nothing is unsure too
        unc = float(1.0 - (probs[:, -1] - probs[:, -2]).min())
    labels = tuple(det.labels[i] for i in p["class_ids"][keep])
    return Candidate(-1, 0.0, feat, unc, int(keep.sum()), labels)


def greedy_coverage(dist: np.ndarray, n: int, weight: np.ndarray | None = None, cover: np.ndarray | None = None,
                    dedup_distance: float | None = None) -> list[int]:
    """Greedy weighted facility location: ``dist`` (candidates, points) distances in [0, 1]; each pick
    is the candidate that most lowers the weighted distance of every point to its nearest pick
    (``cover``: the points' distances to what is already chosen; default 1, none). With
    ``dedup_distance`` the candidates are the points themselves (square ``dist``) and one closer
    than that to a pick is never picked. Returns candidate indices in pick order (ties: earliest)."""
    w = np.ones(dist.shape[1], np.float32) if weight is None else weight
    cover = np.ones(dist.shape[1], np.float32) if cover is None else cover
    allowed = np.ones(dist.shape[0], bool)
    picked: list[int] = []
    while len(picked) < n and allowed.any():
        gain = (np.maximum(cover[None, :] - dist, 0.0) * w[None, :]).sum(axis=1)
        gain[~allowed] = -1.0
        k = int(np.argmax(gain))
        picked.append(k)
        cover = np.minimum(cover, dist[k])
        if dedup_distance is not None:
            allowed &= dist[k] >= dedup_distance  # near-duplicates of the pick
        allowed[k] = False
    return picked


def select(cands: list[Candidate], n: int, uncertainty_weight: float = 1.0,
           dedup_distance: float = 0.02) -> list[tuple[int, float]]:
    """Greedy uncertainty-weighted facility location over the frames: indices into ``cands`` with
    their novelty (cosine distance to the nearest frame picked before, 1.0 for the first), in pick order."""
    if not cands or n <= 0:
        return []
    x = np.stack([c.feature for c in cands]).astype(np.float32)
    w = 1.0 + uncertainty_weight * np.array([c.uncertainty for c in cands], np.float32)
    d = np.clip(1.0 - x @ x.T, 0.0, None)  # embeddings are non-negative (pooled ReLU6): distances in [0, 1]
    picks = greedy_coverage(d, n, w, dedup_distance=dedup_distance)
    return [(k, 1.0 if j == 0 else float(min(1.0, d[k, picks[:j]].min()))) for j, k in enumerate(picks)]


def pick_shots(det: DishDetector, source: str, out: str | Path, n: int, every: int = 5, max_frames: int = 2000,
               uncertainty_weight: float = 1.0, dedup_distance: float = 0.02, progress: bool = True) -> list[Shot]:
    """Read ``source`` (file or rtsp://), score every ``every``-th frame (at most ``max_frames``), pick ``n``,
    write ``images/*.jpg``, ``manifest.csv`` and ``manifest.json`` into ``out``."""
    if "://" not in source and Path(source).is_file() and (why := not_a_video(source)) is not None:
        raise ValueError(f"{source} {why}")
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        raise FileNotFoundError(f"cannot open video source {source!r}")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    bar_total = min(max_frames, -(-total // every)) if total > 0 else max_frames
    cands: list[Candidate] = []
    images: dict[int, np.ndarray] = {}  # kept only as JPEG bytes: bounded by max_frames small files
    idx = 0
    try:
        with tqdm(total=bar_total, desc="scoring frames", unit="frame", disable=not progress) as bar:
            while len(cands) < max_frames:
                ok, img = cap.read()
                if not ok:
                    break
                if idx % every == 0:
                    c = frame_feature(det, img)
                    cands.append(Candidate(idx, idx / fps, c.feature, c.uncertainty, c.detections, c.labels))
                    images[len(cands) - 1] = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
                    bar.update(1)
                idx += 1
    finally:
        cap.release()
    if not cands:
        raise ValueError(f"{source}: no frames read")
    picks = select(cands, n, uncertainty_weight, dedup_distance)
    dest = Path(out)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    stem = Path(source).stem if "://" not in source else "camera"
    shots = []
    for rank, (i, novelty) in enumerate(picks, 1):
        c = cands[i]
        rel = f"images/{stem}_f{c.frame:06d}.jpg"
        (dest / rel).write_bytes(images[i].tobytes())
        shots.append(Shot(rank, c.frame, round(c.time_s, 3), rel, round(c.uncertainty, 4), round(novelty, 4),
                          c.detections, ";".join(c.labels)))
    with (dest / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(Shot.__dataclass_fields__))
        w.writeheader()
        w.writerows(asdict(s) for s in shots)
    (dest / "manifest.json").write_text(json.dumps({
        "source": source, "candidates": len(cands), "every": every, "n": n, "uncertainty_weight": uncertainty_weight,
        "dedup_distance": dedup_distance, "shots": [asdict(s) for s in shots]}, indent=1))
    if len(shots) < n:
        log.warning("only %d of %d frames picked: the rest are near-duplicates (dedup_distance %.3f)",
                    len(shots), n, dedup_distance)
    return shots

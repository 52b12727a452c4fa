"""First stage of the dish detector: where are the dishes (one class, "dish").

The bundled CenterNet-MobileNetV3 already finds bowls and plates; a
class-agnostic head on its trunk learns dish extents from few photos because
it does not have to tell dishes apart (the classifier does). Input is
letterboxed (aspect kept, as at inference) and augmented.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from dishtrack.tracking.geometry import iou_matrix

from .augment import AugmentSettings, geometric, letterbox, photometric
from .detector import STRIDE
from .sample import DatasetError, Sample


def _gaussian_radius(h: float, w: float, min_overlap: float = 0.7) -> float:
    """CenterNet's radius so that a shifted box still has IoU >= min_overlap."""
    a1, b1, c1 = 1, h + w, w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1 ** 2 - 4 * a1 * c1)) / 2
    a2, b2, c2 = 4, 2 * (h + w), (1 - min_overlap) * w * h
    r2 = (b2 + math.sqrt(b2 ** 2 - 4 * a2 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (h + w), (min_overlap - 1) * w * h
    r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def centernet_targets(boxes: np.ndarray, class_idx: Sequence[int], size: int, num_classes: int,
                      max_objects: int = 128) -> dict[str, np.ndarray]:
    """Gaussian centre heatmaps + edge distances at the centre cell, as CenterNet trains them."""
    out = size // STRIDE
    heat = np.zeros((num_classes, out, out), np.float32)
    ltrb = np.zeros((max_objects, 4), np.float32)
    ind = np.zeros((max_objects,), np.int64)
    mask = np.zeros((max_objects,), np.float32)
    yy, xx = np.mgrid[0:out, 0:out]
    for k, (b, c) in enumerate(zip(boxes[:max_objects], class_idx)):
        cx, cy = (b[0] + b[2]) / 2 / STRIDE, (b[1] + b[3]) / 2 / STRIDE
        ix, iy = min(int(cx), out - 1), min(int(cy), out - 1)
        bw, bh = (b[2] - b[0]) / STRIDE, (b[3] - b[1]) / STRIDE
        sigma = max(0.0, _gaussian_radius(bh, bw)) / 3 + 1e-3 + 1 / 3
        heat[c] = np.maximum(heat[c], np.exp(-((xx - ix) ** 2 + (yy - iy) ** 2) / (2 * sigma ** 2)))
        px, py = ix * STRIDE, iy * STRIDE
        ltrb[k] = (px - b[0], py - b[1], b[2] - px, b[3] - py)
        ind[k] = iy * out + ix
        mask[k] = 1.0
    return {"heat": heat, "ltrb": ltrb, "ind": ind, "mask": mask}


def read_rgb(path) -> np.ndarray:
    img = cv2.imread(str(path))
    if img is None:
        raise DatasetError(f"cannot decode image {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class ImageCache:
    """Decoded images, downscaled once so the long side is ``long_side``: decoding
    1024x768 JPEGs every epoch would cost more than the forward pass on 2 cores."""

    def __init__(self, samples: Sequence[Sample], long_side: int) -> None:
        self.images: list[np.ndarray] = []
        self.boxes: list[np.ndarray] = []
        for s in samples:
            img = read_rgb(s.image)
            h, w = img.shape[:2]
            f = min(1.0, long_side / max(h, w))
            if f < 1:
                img = cv2.resize(img, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)
            self.images.append(img)
            self.boxes.append(np.asarray(s.boxes, np.float32).reshape(-1, 4) * f)

    def __len__(self) -> int:
        return len(self.images)


class LocaliserDataset(Dataset):
    """Letterboxed (val) or augmented (train) images with one-class CenterNet targets."""

    def __init__(self, cache: ImageCache, size: int, augment: AugmentSettings | None, seed: int = 0) -> None:
        self.cache, self.size, self.augment = cache, size, augment
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        img, boxes = self.cache.images[i], self.cache.boxes[i]
        if self.augment is not None:
            img = photometric(img, self.augment, self.rng)
            img, boxes, _ = geometric(img, boxes, self.size, self.augment, self.rng)
        else:
            img, s = letterbox(img, self.size)
            boxes = boxes * s
        t = centernet_targets(boxes, [0] * len(boxes), self.size, 1)
        out = {k: torch.from_numpy(v) for k, v in t.items()}
        out["image"] = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()
        return out


def average_precision(pred: list[tuple[np.ndarray, np.ndarray]], gt: list[np.ndarray], iou: float = 0.5) -> float:
    """Class-agnostic AP at one IoU (all-point interpolation), for quick per-epoch validation
    of the localiser; the reported mAP comes from faster-coco-eval in ``evaluate``."""
    scores, tps, n_gt = [], [], sum(len(g) for g in gt)
    for (boxes, sc), g in zip(pred, gt):
        order = np.argsort(-sc)
        boxes, sc = boxes[order], sc[order]
        used = np.zeros(len(g), bool)
        ious = iou_matrix(boxes, g)
        for k in range(len(boxes)):
            j = int(np.argmax(ious[k])) if len(g) else -1
            ok = j >= 0 and ious[k, j] >= iou and not used[j]
            if ok:
                used[j] = True
            tps.append(ok)
            scores.append(sc[k])
    if not n_gt:
        return math.nan
    order = np.argsort(-np.asarray(scores))
    tp = np.asarray(tps, float)[order]
    ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
    rec, prec = ctp / n_gt, ctp / np.maximum(ctp + cfp, 1e-9)
    mrec = np.r_[0, rec, 1]
    mpre = np.r_[0, prec, 0]
    for k in range(len(mpre) - 2, -1, -1):
        mpre[k] = max(mpre[k], mpre[k + 1])
    idx = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))

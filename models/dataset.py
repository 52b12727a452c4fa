"""Labelled detection data for ``dishtrack train``.

Format: a directory holding ``manifest.jsonl``, one JSON object per image::

    {"image": "frames/000001.jpg", "boxes": [[x1, y1, x2, y2], ...], "labels": ["plate", ...]}

Paths are relative to the manifest; boxes are pixels of that image.
``export_mot_video`` writes this format from a video and a MOTChallenge gt.txt.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .sample import DatasetError, Sample  # noqa: F401 - re-exported, defined torch-free

STRIDE = 4


def read_manifest(path: str | Path) -> list[Sample]:
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.jsonl"
    if not p.is_file():
        raise DatasetError(f"{p}: no manifest.jsonl")
    samples = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            img = p.parent / rec["image"]
            boxes = np.asarray(rec.get("boxes", []), dtype=np.float32).reshape(-1, 4)
            labels = tuple(str(x) for x in rec.get("labels", []))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{p}:{n}: bad record ({e})") from e
        if len(labels) != len(boxes):
            raise DatasetError(f"{p}:{n}: {len(boxes)} boxes but {len(labels)} labels")
        if len(boxes) and np.any(boxes[:, 2:] <= boxes[:, :2]):
            raise DatasetError(f"{p}:{n}: boxes must be x1<x2, y1<y2")
        if not img.is_file():
            raise DatasetError(f"{p}:{n}: image {img} missing")
        samples.append(Sample(img, boxes, labels))
    if not samples:
        raise DatasetError(f"{p}: no samples")
    return samples


def export_mot_video(video: str | Path, gt: str | Path, out: str | Path, label: str = "person",
                     every: int = 1) -> int:
    """Write frames of ``video`` with their MOT ground-truth boxes as a labelled dataset."""
    arr = np.loadtxt(gt, delimiter=",", ndmin=2)
    out = Path(out)
    (out / "frames").mkdir(parents=True, exist_ok=True)
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise DatasetError(f"cannot open video {video}")
    written = 0
    with (out / "manifest.jsonl").open("w") as mf:
        idx = 0
        while True:
            ok, img = cap.read()
            if not ok:
                break
            idx += 1  # MOT frames are 1-based
            if (idx - 1) % every:
                continue
            rows = arr[(arr[:, 0] == idx) & (arr[:, 6] != 0)]
            h, w = img.shape[:2]
            boxes = np.c_[rows[:, 2:4], rows[:, 2:4] + rows[:, 4:6]]
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
            boxes = boxes[(boxes[:, 2] - boxes[:, 0] > 2) & (boxes[:, 3] - boxes[:, 1] > 2)]
            name = f"frames/{idx:06d}.jpg"
            cv2.imwrite(str(out / name), img)
            mf.write(json.dumps({"image": name, "boxes": boxes.round(1).tolist(), "labels": [label] * len(boxes)}) + "\n")
            written += 1
    cap.release()
    if not written:
        raise DatasetError(f"{video}: no frames read")
    return written


def _gaussian_radius(h: float, w: float, min_overlap: float = 0.7) -> float:
    """CenterNet's radius so that a shifted box still has IoU >= min_overlap."""
    a1, b1, c1 = 1, h + w, w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1 ** 2 - 4 * a1 * c1)) / 2
    a2, b2, c2 = 4, 2 * (h + w), (1 - min_overlap) * w * h
    r2 = (b2 + math.sqrt(b2 ** 2 - 4 * a2 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (h + w), (min_overlap - 1) * w * h
    r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


class DetectionDataset(Dataset):
    """Images resized to ``size``x``size`` (as the detector does) with CenterNet targets."""

    def __init__(self, samples: list[Sample], classes: tuple[str, ...], size: int, augment: bool = False,
                 max_objects: int = 128) -> None:
        self.samples = samples
        self.classes = classes
        self.cls_index = {c: i for i, c in enumerate(classes)}
        self.size = size
        self.augment = augment
        self.max_objects = max_objects

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.samples[i]
        img = cv2.imread(str(s.image))
        if img is None:
            raise DatasetError(f"cannot decode {s.image}")
        h, w = img.shape[:2]
        img = cv2.cvtColor(cv2.resize(img, (self.size, self.size)), cv2.COLOR_BGR2RGB)
        boxes = s.boxes * np.array([self.size / w, self.size / h] * 2, np.float32)
        if self.augment and np.random.rand() < 0.5:
            img = img[:, ::-1].copy()
            boxes = boxes.copy()
            boxes[:, [0, 2]] = self.size - boxes[:, [2, 0]]
        out = self.size // STRIDE
        heat = np.zeros((len(self.classes), out, out), np.float32)
        ltrb = np.zeros((self.max_objects, 4), np.float32)
        ind = np.zeros((self.max_objects,), np.int64)
        mask = np.zeros((self.max_objects,), np.float32)
        yy, xx = np.mgrid[0:out, 0:out]
        for k, (b, lbl) in enumerate(zip(boxes[: self.max_objects], s.labels)):
            c = self.cls_index[lbl]
            cx, cy = (b[0] + b[2]) / 2 / STRIDE, (b[1] + b[3]) / 2 / STRIDE
            ix, iy = min(int(cx), out - 1), min(int(cy), out - 1)
            bw, bh = (b[2] - b[0]) / STRIDE, (b[3] - b[1]) / STRIDE
            sigma = max(0.0, _gaussian_radius(bh, bw)) / 3 + 1e-3 + 1 / 3
            g = np.exp(-((xx - ix) ** 2 + (yy - iy) ** 2) / (2 * sigma ** 2))
            heat[c] = np.maximum(heat[c], g)
            px, py = ix * STRIDE, iy * STRIDE
            ltrb[k] = (px - b[0], py - b[1], b[2] - px, b[3] - py)
            ind[k] = iy * out + ix
            mask[k] = 1.0
        return {"image": torch.from_numpy(img).permute(2, 0, 1).float(), "heat": torch.from_numpy(heat),
                "ltrb": torch.from_numpy(ltrb), "ind": torch.from_numpy(ind), "mask": torch.from_numpy(mask)}

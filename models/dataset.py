"""The ``manifest.jsonl`` dataset format and ``export_mot_video``.

Format: a directory holding ``manifest.jsonl``, one JSON object per image::

    {"image": "frames/000001.jpg", "boxes": [[x1, y1, x2, y2], ...], "labels": ["plate", ...]}

Paths are relative to the manifest; boxes are pixels of that image.
``export_mot_video`` writes this format from a video and a MOTChallenge gt.txt.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from dishtrack.tracking.mot import read_mot

from .sample import DatasetError, Sample  # noqa: F401 - re-exported, defined torch-free
from .video_file import not_a_video


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
    arr = read_mot(gt, empty_boxes="drop")  # a bad row: ValueError naming the file and line
    if not len(arr):
        raise DatasetError(f"{gt}: no ground-truth rows")
    if (why := not_a_video(video)) is not None:
        raise DatasetError(f"{video} {why}")
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise DatasetError(f"cannot open video {video}")
    out = Path(out)
    (out / "frames").mkdir(parents=True, exist_ok=True)
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

"""Label proposals: the current dish model pre-labels photos so an operator corrects
boxes instead of drawing them.

Writes what the labelling tools import as pre-annotations, in the same formats
``importers.load_dataset`` reads back (so the corrected export goes straight into
``dishtrack train --data``):

* ``labelstudio``: ``tasks.json``, one task per photo with ``predictions``
  (``rectanglelabels`` results with a per-box ``score`` and the task's mean
  score) plus ``label_config.xml`` for the project's labelling interface;
* ``cvat``: ``annotations.xml`` ("CVAT for images 1.1", boxes ``source="auto"``);
* ``coco``: ``annotations.json`` with a ``score`` per annotation;
* ``yolo``: ``obj.names`` + a ``.txt`` per photo next to a copy of the photo.

Image references are relative to the photo folder; ``OUT/images`` links to it, so
``OUT`` is itself a dataset folder the importers resolve.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote
from xml.sax.saxutils import escape, quoteattr

import cv2
import numpy as np
from tqdm import tqdm

from .importers import IMAGE_EXTS
from .sample import DatasetError, Sample

log = logging.getLogger(__name__)
PROPOSE_FORMATS = ("labelstudio", "cvat", "coco", "yolo")
LS_FROM, LS_TO = "label", "image"  # control/object names in label_config.xml
LS_URL = "/data/local-files/?d="  # Label Studio local-file serving (LOCAL_FILES_DOCUMENT_ROOT = OUT)


@dataclass(frozen=True, slots=True)
class Proposal:
    """Pre-labels of one photo: boxes (xyxy pixels), labels, scores (calibrated, 0.6 = the dish's threshold)."""

    image: Path
    rel: str  # path relative to the photo folder, as written into the label files
    size: tuple[int, int]  # (w, h)
    boxes: np.ndarray
    labels: tuple[str, ...]
    scores: np.ndarray


@dataclass(frozen=True, slots=True)
class ProposeResult:
    files: tuple[Path, ...]  # the label files written
    proposals: tuple[Proposal, ...]
    format: str


def list_images(folder: str | Path, exclude: Path | None = None) -> list[Path]:
    """Photos under ``folder`` (recursively; hidden files and anything under ``exclude`` left out)."""
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder of photos")
    skip = exclude.resolve() if exclude is not None else None
    imgs = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                  and not any(s.startswith(".") for s in p.relative_to(root).parts)
                  and (skip is None or not p.resolve().is_relative_to(skip)))
    if not imgs:
        raise DatasetError(f"{root}: no photos ({', '.join(sorted(IMAGE_EXTS))})")
    return imgs


def predict_proposals(detector, images: Sequence[Path], root: Path, min_score: float = 0.6,
                      progress: bool = True) -> list[Proposal]:
    """Run ``detector`` (a DishDetector) on each photo; keep boxes whose calibrated score is at
    least ``min_score`` (0.6 = each dish's own validation threshold, i.e. what a receipt counts)."""
    out = []
    for p in tqdm(images, desc="proposing", unit="photo", disable=not progress):
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            log.warning("%s: cannot decode image, skipped", p)
            continue
        raw = detector.predict([img])[0]
        cal = detector.calibrate(raw["scores"], raw["class_ids"]) if len(raw["scores"]) else np.zeros(0, np.float32)
        keep = cal >= min_score
        order = np.argsort(-cal[keep], kind="stable")
        boxes = raw["boxes"][keep][order].astype(np.float64)
        out.append(Proposal(p, p.relative_to(root).as_posix(), (img.shape[1], img.shape[0]), boxes,
                            tuple(detector.labels[i] for i in raw["class_ids"][keep][order]), cal[keep][order]))
    return out


def _link_images(out: Path, root: Path) -> None:
    """``OUT/images`` -> the photo folder, so relative references resolve from ``OUT``."""
    link = out / "images"
    if link.is_symlink() or link.exists():
        if link.resolve() == root.resolve():
            return
        raise DatasetError(f"{link} exists and is not a link to {root}")
    try:
        link.symlink_to(root.resolve(), target_is_directory=True)
    except OSError as e:  # no symlinks (some filesystems): references fall back to the photos' own paths
        log.warning("cannot link %s -> %s (%s); label files name the photos by absolute path", link, root, e)


def _ref(out: Path, p: Proposal) -> str:
    return f"images/{p.rel}" if (out / "images").is_dir() else str(p.image.resolve())


def write_labelstudio(proposals: Sequence[Proposal], classes: Sequence[str], out: Path,
                      model_version: str = "dishtrack") -> list[Path]:
    tasks = []
    for k, p in enumerate(proposals):
        w, h = p.size
        results = [{"id": f"p{k}_{j}", "type": "rectanglelabels", "from_name": LS_FROM, "to_name": LS_TO,
                    "original_width": w, "original_height": h, "image_rotation": 0, "score": round(float(s), 4),
                    "value": {"x": 100 * b[0] / w, "y": 100 * b[1] / h, "width": 100 * (b[2] - b[0]) / w,
                              "height": 100 * (b[3] - b[1]) / h, "rotation": 0, "rectanglelabels": [lbl]}}
                   for j, (b, lbl, s) in enumerate(zip(p.boxes, p.labels, p.scores))]
        tasks.append({"data": {LS_TO: LS_URL + quote(_ref(out, p), safe="/")},
                      "predictions": [{"model_version": model_version, "result": results,
                                       "score": round(float(np.mean(p.scores)), 4) if len(p.scores) else 0.0}]})
    f = out / "tasks.json"
    f.write_text(json.dumps(tasks, indent=1))
    cfg = out / "label_config.xml"
    cfg.write_text(f'<View>\n  <Image name="{LS_TO}" value="${LS_TO}"/>\n'
                   f'  <RectangleLabels name="{LS_FROM}" toName="{LS_TO}">\n'
                   + "".join(f"    <Label value={quoteattr(c)}/>\n" for c in classes)
                   + "  </RectangleLabels>\n</View>\n")
    return [f, cfg]


def write_cvat(proposals: Sequence[Proposal], classes: Sequence[str], out: Path) -> list[Path]:
    lines = ['<?xml version="1.0" encoding="utf-8"?>', "<annotations>", "  <version>1.1</version>",
             "  <meta>", "    <task>", f"      <size>{len(proposals)}</size>", "      <mode>annotation</mode>",
             "      <labels>"]
    lines += [f"        <label><name>{escape(c)}</name><type>rectangle</type><attributes/></label>" for c in classes]
    lines += ["      </labels>", "    </task>", "  </meta>"]
    for k, p in enumerate(proposals):
        lines.append(f"  <image id=\"{k}\" name={quoteattr(p.rel)} width=\"{p.size[0]}\" height=\"{p.size[1]}\">")
        lines += [f"    <box label={quoteattr(lbl)} source=\"auto\" occluded=\"0\" xtl=\"{b[0]:.2f}\" "
                  f"ytl=\"{b[1]:.2f}\" xbr=\"{b[2]:.2f}\" ybr=\"{b[3]:.2f}\" z_order=\"0\"></box>"
                  for b, lbl in zip(p.boxes, p.labels)]
        lines.append("  </image>")
    lines.append("</annotations>")
    f = out / "annotations.xml"
    f.write_text("\n".join(lines) + "\n")
    return [f]


def write_coco_proposals(proposals: Sequence[Proposal], classes: Sequence[str], out: Path) -> list[Path]:
    from .importers import write_coco

    f = out / "annotations.json"
    linked = (out / "images").is_dir()
    samples = [Sample(out / "images" / p.rel if linked else p.image, p.boxes.astype(np.float32), p.labels)
               for p in proposals]
    write_coco(samples, classes, f, scores=[p.scores.tolist() for p in proposals],
               sizes=[p.size for p in proposals])  # known from prediction: no second decode
    return [f]


def write_yolo(proposals: Sequence[Proposal], classes: Sequence[str], out: Path) -> list[Path]:
    """Darknet layout: photos copied into ``OUT`` (the format keeps labels next to images)."""
    ids = {c: i for i, c in enumerate(classes)}
    (out / "obj.names").write_text("".join(f"{c}\n" for c in classes))
    files = [out / "obj.names"]
    for p in proposals:
        dst = out / "photos" / p.rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            shutil.copy2(p.image, dst)
        w, h = p.size
        rows = [f"{ids[lbl]} {(b[0] + b[2]) / 2 / w:.6f} {(b[1] + b[3]) / 2 / h:.6f} {(b[2] - b[0]) / w:.6f} "
                f"{(b[3] - b[1]) / h:.6f}" for b, lbl in zip(p.boxes, p.labels)]
        txt = dst.with_suffix(".txt")
        txt.write_text("".join(r + "\n" for r in rows))
        files.append(txt)
    return files


_WRITERS = {"labelstudio": write_labelstudio, "cvat": write_cvat, "coco": write_coco_proposals, "yolo": write_yolo}


def propose(detector, images: str | Path, out: str | Path, fmt: str = "labelstudio", min_score: float = 0.6,
            progress: bool = True, model_version: str = "dishtrack") -> ProposeResult:
    """Pre-label every photo under ``images`` with ``detector`` and write ``fmt`` files into ``out``
    (``model_version``: what Label Studio shows as the predictions' source, e.g. the checkpoint name)."""
    if fmt not in _WRITERS:
        raise ValueError(f"unknown format {fmt!r} (choose from {', '.join(PROPOSE_FORMATS)})")
    root = Path(images)
    dest = Path(out)
    imgs = list_images(root, exclude=dest)
    dest.mkdir(parents=True, exist_ok=True)
    if fmt != "yolo":
        _link_images(dest, root)
    props = predict_proposals(detector, imgs, root, min_score=min_score, progress=progress)
    kw = {"model_version": model_version} if fmt == "labelstudio" else {}
    files = _WRITERS[fmt](props, list(detector.labels), dest, **kw)
    log.info("proposed %d boxes on %d photos -> %s", sum(len(p.labels) for p in props), len(props),
             ", ".join(str(f) for f in files[:3]))
    return ProposeResult(tuple(files), tuple(props), fmt)

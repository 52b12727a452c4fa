"""Load labelled detection data from what labelling tools export.

``load_dataset`` auto-detects YOLO/darknet folders (incl. CVAT "YOLO 1.1" and
Ultralytics layouts), COCO JSON, CVAT XML ("CVAT for images 1.1"), Label
Studio JSON (full and JSON-MIN) and dishtrack's ``manifest.jsonl``. Every
format is first read into raw records; one shared checker then decodes the
images, maps class names and validates boxes, so all formats report the same
problems the same way: each bad item becomes a ``Problem`` (file, line, what is
wrong, what was done) instead of a traceback or a silent fix. Boxes of unknown
classes are dropped, never turned into new classes.
"""
from __future__ import annotations

import csv
import difflib
import json
import logging
import math
import re
import xml.parsers.expat
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import cv2
import numpy as np
import yaml

from .sample import DatasetError, Sample

log = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
FORMATS = ("yolo", "coco", "cvat", "labelstudio", "manifest")
CLIP_TOLERANCE_PX = 0.5  # float round-off of relative coordinates, not a labelling error
MIN_BOX_PX = 1.0
DUPLICATE_IOU = 0.95
_YOLO_AUX = {"train.txt", "valid.txt", "val.txt", "test.txt", "obj.names", "classes.txt", "readme.txt"}
_LS_HASH = re.compile(r"^[0-9a-f]{8}-")


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int | None  # 1-based line the problem is on (label .txt, JSONL, XML), None where lines mean nothing
    message: str
    action: str  # what was done about it
    kind: str = "other"  # short key for counting: missing-image, unknown-class, clipped-box, ...

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.message} -> {self.action}"


@dataclass(frozen=True, slots=True)
class LabelledData:
    samples: tuple[Sample, ...]
    classes: tuple[str, ...]  # the dataset's own order (or the ``classes`` asked for)
    problems: tuple[Problem, ...]
    format: str

    def boxes_per_class(self) -> dict[str, int]:
        counts = Counter(lbl for s in self.samples for lbl in s.labels)
        return {c: counts.get(c, 0) for c in self.classes}


# ---------------------------------------------------------------- raw records


@dataclass(slots=True)
class _Box:
    label: str | int  # class name, or a YOLO class id
    coords: tuple[float, ...]  # x1 y1 x2 y2: pixels of ``size``, or fractions when ``relative``
    file: str
    line: int | None
    relative: bool = False
    what: str = "box"  # how messages name it: "box", "annotation id 7", ...


@dataclass(slots=True)
class _Item:
    image: Path | None  # resolved image, None when not found
    ref: str  # the image as the annotation names it
    file: str  # where the record is
    line: int | None
    boxes: list[_Box] = field(default_factory=list)
    size: tuple[float, float] | None = None  # (w, h) the annotation declares


@dataclass(slots=True)
class _Raw:
    format: str
    root: Path
    classes: list[str] | None  # declared class list; None: take it from the labels used
    items: list[_Item]
    problems: list[Problem]
    ids: list[str] | None = None  # YOLO id -> name
    classes_file: str | None = None  # where the class list is declared


class _Images:
    """Index of the image files under a folder by name, for exports that name images loosely."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_name: dict[str, list[Path]] | None = None

    @property
    def by_name(self) -> dict[str, list[Path]]:
        if self._by_name is None:  # built on first use: exports that name images exactly never walk the tree
            self._by_name = {}
            for p in sorted(self.root.rglob("*")):
                if p.suffix.lower() in IMAGE_EXTS and p.is_file() and not any(s.startswith(".") for s in p.parts[-3:]):
                    self._by_name.setdefault(p.name, []).append(p)
        return self._by_name

    def find(self, name: str) -> list[Path]:
        return self.by_name.get(name, [])


def _resolve(ref: str, bases: Sequence[Path], index: _Images, file: str, line: int | None,
             problems: list[Problem], strip_hash: bool = False) -> Path | None:
    rel = Path(ref)
    if rel.is_absolute() and rel.is_file():
        return rel
    for b in bases:
        if (b / rel).is_file():
            return b / rel
    names = [rel.name]
    if strip_hash and _LS_HASH.match(rel.name):
        names.append(_LS_HASH.sub("", rel.name, count=1))
    for n in names:
        hits = index.find(n)
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            problems.append(Problem(file, line, f"image '{ref}' matches {len(hits)} files named '{n}'"
                                    f" ({hits[0]}, {hits[1]}, ...)", "skipped image", "ambiguous-image"))
            return None
    return None


# ---------------------------------------------------------------- YOLO / darknet


def _read_names(p: Path) -> list[str]:
    return [ln.strip() for ln in p.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]


def _yolo_names(root: Path) -> tuple[list[str], Path] | None:
    data = root / "obj.data"
    if data.is_file():
        for ln in data.read_text().splitlines():
            k, _, v = ln.partition("=")
            if k.strip() == "names":
                v = v.split("#")[0].strip()
                for cand in (root / v, root / Path(v).name):
                    if cand.is_file():
                        return _read_names(cand), cand
    for n in ("obj.names", "classes.txt"):
        if (root / n).is_file():
            return _read_names(root / n), root / n
    for n in ("data.yaml", "dataset.yaml"):
        if (root / n).is_file():
            try:
                names = (yaml.safe_load((root / n).read_text()) or {}).get("names")
            except yaml.YAMLError:
                continue
            if isinstance(names, dict):
                names = [names[k] for k in sorted(names)]
            if isinstance(names, list):
                return [str(x) for x in names], root / n
    return None


def _label_file_for(img: Path) -> list[Path]:
    cands = [img.with_suffix(".txt")]
    parts = list(img.parts)
    for i in range(len(parts) - 2, -1, -1):  # Ultralytics: images/... -> labels/...
        if parts[i] == "images":
            cands.append(Path(*parts[:i], "labels", *parts[i + 1:]).with_suffix(".txt"))
            break
    return cands


def _parse_yolo_txt(txt: Path, problems: list[Problem]) -> list[_Box]:
    boxes = []
    try:
        text = txt.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        problems.append(Problem(str(txt), None, f"cannot read label file ({e})", "skipped image", "unreadable-label"))
        raise
    for n, ln in enumerate(text.splitlines(), 1):
        f = ln.split()
        if not f:
            continue
        if len(f) != 5:
            problems.append(Problem(str(txt), n, f"expected 5 fields 'class cx cy w h', got {len(f)}: '{ln.strip()}'",
                                    "skipped line", "malformed-line"))
            continue
        try:
            cid = int(f[0])
            cx, cy, w, h = (float(x) for x in f[1:])
        except ValueError:
            problems.append(Problem(str(txt), n, f"not a number in '{ln.strip()}'", "skipped line", "malformed-line"))
            continue
        boxes.append(_Box(cid, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), str(txt), n, relative=True))
    return boxes


def _read_yolo(root: Path) -> _Raw:
    found = _yolo_names(root)
    if found is None:
        raise DatasetError(f"{root}: no obj.names, obj.data, classes.txt or data.yaml")
    names, names_file = found
    problems: list[Problem] = []
    images = [p for ps in _Images(root).by_name.values() for p in ps]
    images.sort()
    used: set[Path] = set()
    items = []
    for img in images:
        txt = next((c for c in _label_file_for(img) if c.is_file()), None)
        if txt is None:
            problems.append(Problem(str(img), None, "no label file (expected "
                                    f"{_label_file_for(img)[0].name})", "skipped image", "missing-label"))
            continue
        used.add(txt)
        try:
            boxes = _parse_yolo_txt(txt, problems)
        except (OSError, UnicodeDecodeError):
            continue
        items.append(_Item(img, img.name, str(txt), None, boxes))
    for txt in sorted(root.rglob("*.txt")):
        if txt in used or txt.name.lower() in _YOLO_AUX or txt == names_file or txt.name.startswith("."):
            continue
        problems.append(Problem(str(txt), None, "label file has no image "
                                f"(no {txt.stem}.jpg/.png/... next to it)", "skipped label file", "missing-image"))
    return _Raw("yolo", root, names, items, problems, ids=names, classes_file=str(names_file))


# ---------------------------------------------------------------- COCO


def _read_coco(files: list[Path], root: Path) -> _Raw:
    problems: list[Problem] = []
    classes: list[str] = []
    items: list[_Item] = []
    index = _Images(root)
    for jf in files:
        doc = _load_json(jf)
        if not isinstance(doc, dict) or "images" not in doc:
            raise DatasetError(f"{jf}: not a COCO file (no 'images')")
        for key in ("images", "annotations", "categories"):
            if key in doc and not (isinstance(doc[key], list) and all(isinstance(x, dict) for x in doc[key])):
                raise DatasetError(f"{jf}: '{key}' must be a list of objects, got {type(doc[key]).__name__}")
        cats = {}
        for c in doc.get("categories", []):
            name = str(c.get("name", ""))
            if name not in classes:
                classes.append(name)
            cats[c.get("id")] = name
        bases = [jf.parent, jf.parent / "images", jf.parent.parent, jf.parent.parent / "images"]
        by_id: dict = {}
        for im in doc["images"]:
            ref = str(im.get("file_name", ""))
            path = _resolve(ref, bases, index, str(jf), None, problems)
            size = (im.get("width"), im.get("height"))
            it = _Item(path, ref, str(jf), None,
                       size=tuple(float(v) for v in size) if all(isinstance(v, (int, float)) for v in size) else None)
            by_id[im.get("id")] = it
            items.append(it)
        for a in doc.get("annotations", []):
            what = f"annotation id {a.get('id')}"
            it = by_id.get(a.get("image_id"))
            if it is None:
                problems.append(Problem(str(jf), None, f"{what}: unknown image_id {a.get('image_id')}",
                                        "dropped box", "unknown-image"))
                continue
            if a.get("category_id") not in cats:
                problems.append(Problem(str(jf), None, f"{what} ({it.ref}): unknown category_id {a.get('category_id')}",
                                        "dropped box", "unknown-class"))
                continue
            if a.get("iscrowd"):
                problems.append(Problem(str(jf), None, f"{what} ({it.ref}): crowd region, not one object",
                                        "dropped box", "crowd"))
                continue
            bb = a.get("bbox")
            try:
                x, y, w, h = (float(v) for v in bb)
            except (TypeError, ValueError):
                problems.append(Problem(str(jf), None, f"{what} ({it.ref}): bad bbox {bb!r}", "dropped box",
                                        "malformed-box"))
                continue
            it.boxes.append(_Box(cats[a["category_id"]], (x, y, x + w, y + h), str(jf), None, what=what))
    return _Raw("coco", root, classes, items, problems, classes_file=str(files[0]))


def _load_json(p: Path):
    try:
        return json.loads(p.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{p}: cannot read JSON ({e})") from e


# ---------------------------------------------------------------- CVAT XML


def _rotated_bounds(cx: float, cy: float, w: float, h: float, deg: float, px: float, py: float):
    """Axis-aligned bounds of a w x h rectangle at centre (cx, cy) rotated by deg about (px, py)."""
    t = math.radians(deg)
    c, s = math.cos(t), math.sin(t)
    xs, ys = [], []
    for dx, dy in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)):
        x, y = cx + dx - px, cy + dy - py
        xs.append(px + x * c - y * s)
        ys.append(py + x * s + y * c)
    return min(xs), min(ys), max(xs), max(ys)


def _read_cvat(xf: Path) -> _Raw:
    problems: list[Problem] = []
    classes: list[str] = []
    items: list[_Item] = []
    index = _Images(xf.parent)
    stack: list[str] = []
    text: list[str] = []
    cur: list[_Item | None] = [None]
    parser = xml.parsers.expat.ParserCreate()
    shapes = {"polygon", "polyline", "points", "mask", "ellipse", "cuboid", "skeleton"}

    def start(tag, a):
        line = parser.CurrentLineNumber
        stack.append(tag)
        text.clear()
        if tag == "image":
            ref = a.get("name", "")
            path = _resolve(ref, [xf.parent, xf.parent / "images"], index, str(xf), line, problems)
            try:
                size = (float(a["width"]), float(a["height"]))
            except (KeyError, ValueError):
                size = None
            cur[0] = _Item(path, ref, str(xf), line, size=size)
            items.append(cur[0])
        elif tag == "box" and cur[0] is not None and "image" in stack:
            try:
                x1, y1, x2, y2 = (float(a[k]) for k in ("xtl", "ytl", "xbr", "ybr"))
            except (KeyError, ValueError):
                problems.append(Problem(str(xf), line, f"box on '{cur[0].ref}' lacks numeric xtl/ytl/xbr/ybr",
                                        "dropped box", "malformed-box"))
                return
            rot = float(a.get("rotation", 0) or 0)
            if rot % 360:
                cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
                x1, y1, x2, y2 = _rotated_bounds(cx, cy, x2 - x1, y2 - y1, rot, cx, cy)
                problems.append(Problem(str(xf), line, f"box rotated by {rot:g} degrees",
                                        "used its axis-aligned bounds", "rotated-box"))
            cur[0].boxes.append(_Box(a.get("label", ""), (x1, y1, x2, y2), str(xf), line))
        elif tag in shapes and cur[0] is not None and "image" in stack:
            problems.append(Problem(str(xf), line, f"<{tag}> on '{cur[0].ref}' is not a box", "skipped shape",
                                    "unsupported-shape"))
        elif tag == "track":
            problems.append(Problem(str(xf), line, "<track> (CVAT for video) is not supported; export "
                                    "'CVAT for images 1.1'", "skipped track", "unsupported-shape"))

    def end(tag):
        if tag == "name" and stack[-3:-1] == ["labels", "label"] and "meta" in stack:
            name = "".join(text).strip()
            if name and name not in classes:
                classes.append(name)
        if tag == "image":
            cur[0] = None
        stack.pop()
        text.clear()

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text.append
    try:
        with xf.open("rb") as fh:
            parser.ParseFile(fh)
    except xml.parsers.expat.ExpatError as e:
        raise DatasetError(f"{xf}:{e.lineno}: broken XML ({xml.parsers.expat.errors.messages[e.code]})") from e
    return _Raw("cvat", xf.parent, classes or None, items, problems, classes_file=str(xf))


# ---------------------------------------------------------------- Label Studio


def _ls_ref(v: str) -> str:
    u = urlparse(v)
    if "d" in parse_qs(u.query):  # /data/local-files/?d=dir/img.jpg
        return unquote(parse_qs(u.query)["d"][0])
    return unquote(u.path) if u.scheme in ("http", "https", "s3", "gs") or v.startswith("/data/") else v


def _ls_box(r: dict, file: str, what: str, problems: list[Problem]) -> _Box | None:
    v = r.get("value", {})
    lbls = v.get("rectanglelabels") or []
    if len(lbls) != 1:
        problems.append(Problem(file, None, f"{what}: rectangle with {len(lbls)} labels {lbls}", "dropped box",
                                "malformed-box"))
        return None
    try:
        x, y, w, h = (float(v[k]) / 100 for k in ("x", "y", "width", "height"))
    except (KeyError, TypeError, ValueError):
        problems.append(Problem(file, None, f"{what}: rectangle without numeric x/y/width/height", "dropped box",
                                "malformed-box"))
        return None
    rot = float(v.get("rotation", 0) or 0)
    box = (x, y, x + w, y + h)
    if rot % 360:
        ow, oh = float(r.get("original_width") or 1), float(r.get("original_height") or 1)
        # LS rotates about the top-left corner; rotate in pixels so the angle is true
        b = _rotated_bounds((x + w / 2) * ow, (y + h / 2) * oh, w * ow, h * oh, rot, x * ow, y * oh)
        box = (b[0] / ow, b[1] / oh, b[2] / ow, b[3] / oh)
        problems.append(Problem(file, None, f"{what}: rectangle rotated by {rot:g} degrees",
                                "used its axis-aligned bounds", "rotated-box"))
    return _Box(str(lbls[0]), box, file, None, relative=True, what=what)


def _read_labelstudio(jf: Path, tasks: list) -> _Raw:
    problems: list[Problem] = []
    items: list[_Item] = []
    index = _Images(jf.parent)
    f = str(jf)
    for ti, task in enumerate(tasks, 1):
        if not isinstance(task, dict):
            problems.append(Problem(f, None, f"task #{ti} is not an object", "skipped task", "malformed-task"))
            continue
        tid = task.get("id", f"#{ti}")
        data = task.get("data") if isinstance(task.get("data"), dict) else task
        ref = data.get("image") or next((v for v in data.values() if isinstance(v, str)
                                         and Path(urlparse(v).path).suffix.lower() in IMAGE_EXTS), None)
        if not isinstance(ref, str):
            problems.append(Problem(f, None, f"task {tid}: no image", "skipped task", "malformed-task"))
            continue
        ref = _ls_ref(ref)
        if "annotations" in task or "data" in task:  # full export
            anns = [a for a in task.get("annotations") or [] if isinstance(a, dict)]
            live = [a for a in anns if not a.get("was_cancelled")]
            if not live:
                problems.append(Problem(f, None, f"task {tid} ({Path(ref).name}): "
                                        + ("annotation cancelled" if anns else "not annotated"
                                           + (" (only predictions)" if task.get("predictions") else "")),
                                        "skipped image", "unlabelled"))
                continue
            ann = next((a for a in live if a.get("ground_truth")), live[-1])
            if len(live) > 1:
                problems.append(Problem(f, None, f"task {tid} ({Path(ref).name}): {len(live)} annotations",
                                        f"used annotation {ann.get('id')}, ignored the others", "several-annotations"))
            results = ann.get("result") or []
        else:  # JSON-MIN: {"image": ..., "<from_name>": [{x, y, width, height, rectanglelabels, ...}]}
            results = [{"type": "rectanglelabels", "value": r, "original_width": r.get("original_width"),
                        "original_height": r.get("original_height")}
                       for v in task.values() if isinstance(v, list)
                       for r in v if isinstance(r, dict) and "rectanglelabels" in r]
        path = _resolve(ref, [jf.parent], index, f, None, problems, strip_hash=True)
        it = _Item(path, ref, f, None)
        for r in results:
            what = f"task {tid} ({Path(ref).name}) result {r.get('id', '')}".rstrip()
            typ = r.get("type", "")
            if typ != "rectanglelabels":
                if typ.endswith("labels"):
                    problems.append(Problem(f, None, f"{what}: {typ} is not a box", "skipped shape",
                                            "unsupported-shape"))
                continue
            if r.get("original_width") and r.get("original_height"):
                it.size = (float(r["original_width"]), float(r["original_height"]))
            b = _ls_box(r, f, what, problems)
            if b is not None:
                it.boxes.append(b)
        items.append(it)
    return _Raw("labelstudio", jf.parent, None, items, problems)


# ---------------------------------------------------------------- manifest.jsonl


def _read_manifest(mf: Path) -> _Raw:
    problems: list[Problem] = []
    items: list[_Item] = []
    f = str(mf)
    for n, line in enumerate(mf.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ref = str(rec["image"])
            boxes = np.asarray(rec.get("boxes", []), dtype=np.float64).reshape(-1, 4)
            labels = [str(x) for x in rec.get("labels", [])]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            problems.append(Problem(f, n, f"bad record ({e})", "skipped line", "malformed-line"))
            continue
        if len(labels) != len(boxes):
            problems.append(Problem(f, n, f"{len(boxes)} boxes but {len(labels)} labels", "skipped line",
                                    "malformed-line"))
            continue
        img = mf.parent / ref
        it = _Item(img if img.is_file() else None, ref, f, n)
        it.boxes = [_Box(lbl, tuple(b), f, n, what=f"box {k + 1}") for k, (b, lbl) in enumerate(zip(boxes, labels))]
        items.append(it)
    return _Raw("manifest", mf.parent, None, items, problems)


# ---------------------------------------------------------------- detection


def _sniff_json(jf: Path) -> str | None:
    doc = _load_json(jf)
    if isinstance(doc, dict) and "images" in doc:
        return "coco"
    if isinstance(doc, list) and doc and all(isinstance(t, dict) for t in doc[:5]):
        t = doc[0]
        if "data" in t or "annotations" in t or any(isinstance(v, list) and v and isinstance(v[0], dict)
                                                    and "rectanglelabels" in v[0] for v in t.values()):
            return "labelstudio"
    return None


def _read(path: Path) -> _Raw:
    if path.is_file():
        suf = path.suffix.lower()
        if suf == ".jsonl":
            return _read_manifest(path)
        if suf == ".xml":
            return _read_cvat(path)
        if suf == ".json":
            kind = _sniff_json(path)
            if kind == "coco":
                return _read_coco([path], path.parent)
            if kind == "labelstudio":
                return _read_labelstudio(path, _load_json(path))
            raise DatasetError(f"{path}: JSON is neither COCO (object with 'images') nor a Label Studio export "
                               "(list of tasks)")
        if path.name in ("obj.names", "obj.data", "classes.txt", "train.txt", "data.yaml"):
            return _read_yolo(path.parent)
        raise DatasetError(f"{path}: unknown label file type (want a folder, .json, .xml or manifest.jsonl)")
    if (path / "manifest.jsonl").is_file():
        return _read_manifest(path / "manifest.jsonl")
    if (path / "annotations.xml").is_file():
        return _read_cvat(path / "annotations.xml")
    jsons = sorted((path / "annotations").glob("*.json")) + sorted(path.glob("*.json"))
    kinds = {j: _sniff_json(j) for j in jsons}
    coco = [j for j, k in kinds.items() if k == "coco"]
    if coco:
        return _read_coco(coco, path)
    ls = [j for j, k in kinds.items() if k == "labelstudio"]
    if len(ls) > 1:
        raise DatasetError(f"{path}: several Label Studio exports ({', '.join(j.name for j in ls)}); pass one file")
    if ls:
        return _read_labelstudio(ls[0], _load_json(ls[0]))
    if _yolo_names(path) is not None:
        return _read_yolo(path)
    raise DatasetError(f"{path}: no labelled data recognised (want obj.names + .txt labels, COCO JSON, CVAT "
                       "annotations.xml, a Label Studio JSON export or manifest.jsonl)")


# ---------------------------------------------------------------- shared checks


def label_key(name: str) -> str:
    """What makes two label names the same dish: case and runs of spaces do not (also the service's
    corrections use it, so a typed "BREAD " is the dataset's "Bread")."""
    return " ".join(name.split()).casefold()


class _ClassMap:
    """Maps label names onto the known classes; near misses are reported, never added."""

    def __init__(self, known: Sequence[str]) -> None:
        self.known = tuple(known)
        self.by_norm: dict[str, str] = {}
        for c in self.known:
            self.by_norm.setdefault(label_key(c), c)

    def map(self, name: str) -> tuple[str | None, str]:
        if name in self.known:
            return name, ""
        close = self.by_norm.get(label_key(name))
        if close is not None:
            return None, f"class '{name}' differs only in case/whitespace from '{close}' (did you mean '{close}'?)"
        sugg = difflib.get_close_matches(name, self.known, n=1, cutoff=0.6)
        hint = f" (did you mean '{sugg[0]}'?)" if sugg else f" (known: {', '.join(self.known)})"
        return None, f"unknown class '{name}'{hint}"


def _classes_from_labels(raw: _Raw) -> list[str]:
    """Class list of formats without one: each spelling group is named by its most used spelling."""
    counts = Counter(b.label for it in raw.items for b in it.boxes if isinstance(b.label, str))
    best: dict[str, str] = {}
    for name, _ in counts.most_common():
        best.setdefault(label_key(name), name)
    return sorted(best.values())


def _declared_duplicates(raw: _Raw) -> None:
    seen: dict[str, str] = {}
    for c in raw.classes or []:
        if label_key(c) in seen and c == seen[label_key(c)]:  # boxes are named by class: one class
            raw.problems.append(Problem(raw.classes_file or str(raw.root), None, f"class '{c}' is listed twice",
                                        "one class: boxes of either id are '{c}'".format(c=c), "class-duplicate"))
        elif label_key(c) in seen:
            raw.problems.append(Problem(raw.classes_file or str(raw.root), None,
                                        f"class '{c}' differs only in case/whitespace from '{seen[label_key(c)]}'",
                                        "kept as separate classes", "class-case"))
        seen.setdefault(label_key(c), c)


def _image_size(p: Path) -> tuple[int, int] | str:
    try:
        buf = np.fromfile(str(p), dtype=np.uint8)
    except OSError as e:
        return f"cannot read image ({e})"
    if buf.size == 0:
        return "image file is empty"
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is None:
        return "image cannot be decoded"
    if p.suffix.lower() in (".jpg", ".jpeg") and b"\xff\xd9" not in buf[-4096:].tobytes():
        return "JPEG is truncated (no end marker)"
    return img.shape[1], img.shape[0]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _check_item(it: _Item, cmap: _ClassMap, ids: list[str] | None, problems: list[Problem]) -> Sample | None:
    if it.image is None:
        problems.append(Problem(it.file, it.line, f"image '{it.ref}' not found", "skipped image", "missing-image"))
        return None
    size = _image_size(it.image)
    if isinstance(size, str):
        problems.append(Problem(str(it.image), None, size, "skipped image", "unreadable-image"))
        return None
    w, h = size
    scale = (1.0, 1.0)
    if it.size is not None and (abs(it.size[0] - w) > 0.5 or abs(it.size[1] - h) > 0.5):
        sx, sy = w / it.size[0], h / it.size[1]
        msg = f"image is {w}x{h} but the labels say {it.size[0]:g}x{it.size[1]:g}"
        if abs(sx - sy) > 0.01 * max(sx, sy):
            problems.append(Problem(it.file, it.line, f"{it.ref}: {msg} (different aspect ratio)", "skipped image",
                                    "size-mismatch"))
            return None
        problems.append(Problem(it.file, it.line, f"{it.ref}: {msg}", "scaled boxes to the image", "size-mismatch"))
        scale = (sx, sy)
    kept: list[np.ndarray] = []
    labels: list[str] = []
    origin: list[_Box] = []
    for b in it.boxes:
        drop = "skipped line" if b.line is not None and b.relative and ids is not None else "dropped box"
        where = "" if b.what == "box" else f"{b.what}: "
        label = b.label
        if isinstance(label, int):
            if ids is None or not 0 <= label < len(ids):
                problems.append(Problem(b.file, b.line, f"{where}class id {label} out of range (0..{len(ids or []) - 1})",
                                        drop, "unknown-class"))
                continue
            label = ids[label]
        name, why = cmap.map(label)
        if name is None:
            problems.append(Problem(b.file, b.line, where + why, drop,
                                    "class-case" if "differs only" in why else "unknown-class"))
            continue
        c = np.asarray(b.coords, dtype=np.float64)
        c = c * (w, h, w, h) if b.relative else c * (scale[0], scale[1], scale[0], scale[1])
        if not np.all(np.isfinite(c)) or c[2] <= c[0] or c[3] <= c[1]:
            problems.append(Problem(b.file, b.line, f"{where}degenerate box {np.round(c, 1).tolist()} on {it.ref}",
                                    drop, "degenerate-box"))
            continue
        cl = c.copy()
        cl[0::2] = cl[0::2].clip(0, w)
        cl[1::2] = cl[1::2].clip(0, h)
        if cl[2] - cl[0] < MIN_BOX_PX or cl[3] - cl[1] < MIN_BOX_PX:
            problems.append(Problem(b.file, b.line, f"{where}box {np.round(c, 1).tolist()} lies outside the "
                                    f"{w}x{h} image {it.ref}", drop, "outside-box"))
            continue
        if np.abs(cl - c).max() > CLIP_TOLERANCE_PX:
            problems.append(Problem(b.file, b.line, f"{where}box {np.round(c, 1).tolist()} extends past the "
                                    f"{w}x{h} image {it.ref}", "clipped box to image", "clipped-box"))
        dup = next((k for k, (kb, kl) in enumerate(zip(kept, labels))
                    if kl == name and _iou(kb, cl) >= DUPLICATE_IOU), None)
        if dup is not None:
            o = origin[dup]
            ref = f"line {o.line}" if o.line is not None and o.line != b.line else o.what
            problems.append(Problem(b.file, b.line, f"{where}duplicate of {ref} ({name})", "dropped box",
                                    "duplicate-box"))
            continue
        kept.append(cl)
        labels.append(name)
        origin.append(b)
    boxes = np.asarray(kept, dtype=np.float32).reshape(-1, 4)
    return Sample(it.image, boxes, tuple(labels))


def _read_trays(csv_path: Path) -> tuple[dict[str, tuple[str, int]], list[Problem]]:
    """image -> (tray, line). An image listed again with another tray keeps its first row's (reported):
    trays decide which photos travel together into validation."""
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: {'is a directory, not a trays CSV' if csv_path.is_dir() else 'trays file not found'}")
    out: dict[str, tuple[str, int]] = {}
    problems = []
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        rows = csv.reader(fh)
        head = [h.strip().lower() for h in next(rows, [])]
        if "image" not in head or "tray" not in head:
            raise DatasetError(f"{csv_path}:1: header must name columns 'image' and 'tray', got {head}")
        ii, ti = head.index("image"), head.index("tray")
        for n, row in enumerate(rows, 2):
            if not any(x.strip() for x in row):
                continue
            if len(row) <= max(ii, ti) or not row[ii].strip() or not row[ti].strip():
                problems.append(Problem(str(csv_path), n, f"bad row {row}", "skipped line", "malformed-line"))
                continue
            image, tray = row[ii].strip().replace("\\", "/"), row[ti].strip()
            if image in out and out[image][0] != tray:
                problems.append(Problem(str(csv_path), n, f"{image} is listed with tray {tray}, and with tray "
                                        f"{out[image][0]} on line {out[image][1]}", "line ignored", "tray-conflict"))
                continue
            out.setdefault(image, (tray, n))
    return out, problems


def load_dataset(path: str | Path, *, trays: str | Path | None = None,
                 classes: Sequence[str] | None = None) -> LabelledData:
    """Read labelled images from a folder or label file in any supported format, checking everything.

    ``classes`` (e.g. a checkpoint's) replaces the dataset's own class list: labels are mapped
    onto it by exact name and everything else is reported and dropped.
    """
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{p}: no such file or folder")
    try:
        raw = _read(p)
    except (TypeError, AttributeError, KeyError, IndexError) as e:  # a JSON/XML of another shape than expected
        raise DatasetError(f"{p}: not laid out as a labelled dataset ({type(e).__name__}: {e})") from e
    log.info("%s: reading %s labels (%d images)", p, raw.format, len(raw.items))
    problems = raw.problems
    _declared_duplicates(raw)
    if classes is not None:
        known = list(dict.fromkeys(str(c) for c in classes))
    else:
        known = list(dict.fromkeys(raw.classes)) if raw.classes is not None else _classes_from_labels(raw)
    cmap = _ClassMap(known)
    samples = [s for it in raw.items if (s := _check_item(it, cmap, raw.ids, problems)) is not None]
    tray_file = Path(trays) if trays is not None else raw.root / "trays.csv"
    if trays is not None or tray_file.is_file():
        rows, tp = _read_trays(tray_file)
        problems.extend(tp)
        groups = {k: tray for k, (tray, _) in rows.items()}

        def rel(image: Path) -> str:
            return image.relative_to(raw.root).as_posix() if image.is_relative_to(raw.root) else image.name

        # an image as found or as its annotation names it (found or not: a missing one is reported already)
        listed = {x for it in raw.items for x in ((rel(it.image), it.image.name) if it.image is not None else ())
                  + (it.ref.replace("\\", "/"), Path(it.ref.replace("\\", "/")).name)}
        reported = {Path(pr.file).stem for pr in problems}  # an image or label file already reported
        problems.extend(Problem(str(tray_file), line, f"{k} is not in the dataset", "line ignored",
                                "tray-unknown-image") for k, (_, line) in rows.items()
                        if k not in listed and Path(k).stem not in reported)
        out = []
        for s in samples:
            g = groups.get(rel(s.image), groups.get(s.image.name))
            if g is None:
                problems.append(Problem(str(s.image), None, f"image not listed in {tray_file.name}",
                                        "kept without a tray (own group)", "no-tray"))
            out.append(Sample(s.image, s.boxes, s.labels, g))
        samples = out
    if not samples:
        first = "; ".join(str(x) for x in problems[:3])
        raise DatasetError(f"{p}: no usable images ({len(problems)} problems{': ' + first if first else ''})")
    if not any(len(s.labels) for s in samples):
        first = "; ".join(str(x) for x in problems[:3])
        raise DatasetError(f"{p}: no usable boxes in {len(samples)} images ({len(problems)} problems"
                           f"{': ' + first if first else ''}{'; ...' if len(problems) > 3 else ''})")
    for pr in problems:
        log.debug("%s", pr)
    if problems:
        log.warning("%s: %d label problems (run `dishtrack check-data --data %s` to list them)", p, len(problems), p)
    return LabelledData(tuple(samples), tuple(known), tuple(problems), raw.format)


# ---------------------------------------------------------------- export


def write_coco(samples: Sequence[Sample], classes: Sequence[str], path: str | Path,
               scores: Sequence[Sequence[float]] | None = None,
               sizes: Sequence[tuple[int, int]] | None = None) -> Path:
    """Write samples as a COCO detection file (file_name relative to its folder; ``score`` per box if given).
    ``sizes``: each image's (w, h) when the caller has them; otherwise each image is decoded for its size."""
    out = Path(path)
    cat = {c: i + 1 for i, c in enumerate(classes)}
    images, anns = [], []
    for i, s in enumerate(samples, 1):
        if sizes is not None:
            width, height = sizes[i - 1]
        else:
            img = cv2.imread(str(s.image), cv2.IMREAD_COLOR)
            if img is None:
                raise DatasetError(f"{s.image}: cannot decode image")
            width, height = img.shape[1], img.shape[0]
        try:
            name = Path(s.image).resolve().relative_to(out.parent.resolve()).as_posix()
        except ValueError:
            name = str(Path(s.image).resolve())
        images.append({"id": i, "file_name": name, "width": width, "height": height})
        for k, (b, lbl) in enumerate(zip(np.asarray(s.boxes, dtype=np.float64), s.labels)):
            if lbl not in cat:
                raise DatasetError(f"{s.image}: label '{lbl}' not in classes {list(classes)}")
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            a = {"id": len(anns) + 1, "image_id": i, "category_id": cat[lbl],
                 "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h, "iscrowd": 0}
            if scores is not None:
                a["score"] = float(scores[i - 1][k])
            anns.append(a)
    doc = {"images": images, "annotations": anns,
           "categories": [{"id": v, "name": c, "supercategory": ""} for c, v in cat.items()]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc))
    return out

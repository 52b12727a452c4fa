"""MOTChallenge text format: read detections / ground truth / seqinfo.ini, a
seeded noise protocol that turns ground truth into detections, run a tracker,
write results. Pure numpy; metrics are computed by callers
(bench/eval_tracking.py with trackeval, bench/eval_mot15.py with motmetrics)."""
from __future__ import annotations

import configparser
import io
import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .tracker import Tracker, TrackerParams
from .types import Detections, TrackState

PERSON = ("person",)
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SeqInfo:
    name: str
    fps: float
    width: int
    height: int
    length: int

    @property
    def image_size(self) -> tuple[int, int]:
        return self.width, self.height


def _readable(p: Path, what: str) -> None:
    """A file, FIFO or device (``<(zcat det.txt.gz)`` works), not a folder or nothing."""
    if p.is_dir():
        raise IsADirectoryError(f"{p}: is a directory, not {what}")
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file ({what})")


def read_seqinfo(path: str | Path) -> SeqInfo:
    """MOTChallenge ``seqinfo.ini`` ([Sequence] name, frameRate, imWidth, imHeight, seqLength);
    a missing or bad key is a ValueError naming the file and the key."""
    p = Path(path)
    _readable(p, "a seqinfo.ini")
    cp = configparser.ConfigParser(interpolation=None)  # a '%' in a name is text
    try:
        cp.read_string(p.read_text(errors="replace"), source=str(p))
    except configparser.Error as e:
        raise ValueError(f"{p}: not a seqinfo.ini ({str(e).splitlines()[0]})") from None
    if "Sequence" not in cp:
        raise ValueError(f"{p}: no [Sequence] section (a MOTChallenge seqinfo.ini has one)")
    s = cp["Sequence"]

    def positive(key: str, kind: type) -> int | float:
        if key not in s:
            raise ValueError(f"{p}: [Sequence] has no {key}")
        try:
            v = kind(s[key])
        except ValueError:
            raise ValueError(f"{p}: [Sequence] {key}={s[key]!r} is not {'a whole number' if kind is int else 'a number'}") from None
        if not (np.isfinite(v) and v > 0):
            raise ValueError(f"{p}: [Sequence] {key}={s[key]} must be > 0")
        return v

    return SeqInfo(s.get("name", p.parent.name), float(positive("frameRate", float)), positive("imWidth", int),
                   positive("imHeight", int), positive("seqLength", int))


def read_mot(path: str | Path, empty_boxes: str = "raise") -> np.ndarray:
    """Rows of frame, id, x, y, w, h, score, ... as float64 (N, >=7); blank lines and ``#`` comments
    are skipped, an empty file has no rows. A bad row is a ValueError naming the file and its line
    (1-based): text that is not a number, too few or a changing number of columns, nan/inf in the
    first seven, a frame that is not a whole number >= 1. A box without positive width and height
    is one too (``empty_boxes="raise"``, detections) or is dropped with a warning (``"drop"``:
    ground truth, whose degenerate rows an evaluation ignores)."""
    p = Path(path)
    _readable(p, "a MOT file")
    text = p.read_text(errors="replace")  # read once: a FIFO cannot be read twice

    def lines() -> list[tuple[int, str]]:  # (line number, text) of the data rows, for error messages
        return [(n, ln) for n, ln in enumerate(text.splitlines(), 1) if ln.split("#", 1)[0].strip()]

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data": an empty file has no rows
            arr = np.loadtxt(io.StringIO(text), delimiter=",", ndmin=2, comments="#")
    except ValueError:
        arr = None
    if arr is None or (arr.size and arr.shape[1] < 7):
        width = None
        for n, ln in lines():  # find the first bad line (the fast path above only says that one is)
            parts = ln.split("#", 1)[0].split(",")
            try:
                vals = [float(x) for x in parts]
            except ValueError:
                raise ValueError(f"{p}:{n}: not comma-separated numbers: {ln[:80]!r}") from None
            if width is None:
                width = len(vals)
                if width < 7:
                    raise ValueError(f"{p}:{n}: {width} columns; a MOT row has at least 7 (frame,id,x,y,w,h,score,...)")
            elif len(vals) != width:
                raise ValueError(f"{p}:{n}: {len(vals)} columns where line {lines()[0][0]} has {width}")
        raise ValueError(f"{p}: not a MOT file")  # loadtxt refused it for a reason not found above
    if not arr.size:
        return np.zeros((0, 7))
    checks = [(~np.isfinite(arr[:, :7]).all(axis=1), "nan or inf in frame,id,x,y,w,h,score"),
              ((arr[:, 0] < 1) | (arr[:, 0] != np.round(arr[:, 0])), "the frame must be a whole number >= 1")]
    empty = (arr[:, 4] <= 0) | (arr[:, 5] <= 0)
    if empty_boxes == "raise":
        checks.append((empty, "the box width and height must be > 0"))
    for mask, why in checks:
        if mask.any():
            i = int(np.flatnonzero(mask)[0])
            n, ln = lines()[i]
            raise ValueError(f"{p}:{n}: {why}: {ln[:80]!r}")
    if empty_boxes == "drop" and empty.any():
        n, _ = lines()[int(np.flatnonzero(empty)[0])]
        log.warning("%s: %d rows without positive width and height dropped (the first at line %d)", p,
                    int(empty.sum()), n)
        arr = arr[~empty]
    return arr


def write_mot(path: str | Path, rows: np.ndarray) -> None:
    """frame,id,x,y,w,h rows -> MOTChallenge result file (conf 1, x/y/z -1)."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 6)
    with open(path, "w") as f:
        for r in rows:
            f.write(f"{int(r[0])},{int(r[1])},{r[2]:.2f},{r[3]:.2f},{r[4]:.2f},{r[5]:.2f},1,-1,-1,-1\n")


@dataclass(frozen=True, slots=True)
class NoiseProtocol:
    """Ground truth -> detections, seeded, identical for every tracker compared:
    objects of ``classes`` (MOT17: 1, pedestrians; None: every class, as in a
    ``make-video`` gt.txt where the class is the dish) with visibility >= min_visibility, a
    ``drop`` share removed at random, box corners jittered by ``jitter`` x the
    box size, ``false_pos`` x as many false boxes added; scores follow
    visibility (so low-score detections are the partly hidden ones) and false
    positives score low."""

    min_visibility: float = 0.25
    drop: float = 0.10
    jitter: float = 0.05
    false_pos: float = 0.05
    seed: int = 0
    classes: tuple[int, ...] | None = (1,)


def noisy_detections(gt: np.ndarray, image_size: tuple[int, int], proto: NoiseProtocol = NoiseProtocol()) -> np.ndarray:
    """MOT ground truth (frame,id,x,y,w,h,flag,class,vis) -> det rows (frame,-1,x,y,w,h,score)."""
    rng = np.random.default_rng(proto.seed)
    if gt.shape[1] != 9:
        raise ValueError("noise protocol needs MOT16/17 ground truth (9 columns: ..., class, visibility)")
    cls = np.ones(len(gt), bool) if proto.classes is None else np.isin(gt[:, 7], proto.classes)
    g = gt[(gt[:, 6] != 0) & cls & (gt[:, 8] >= proto.min_visibility)]
    g = g[rng.random(len(g)) >= proto.drop]
    wh = g[:, 4:6]
    box = np.c_[g[:, 2:4], g[:, 2:4] + wh] + rng.normal(0, proto.jitter, (len(g), 4)) * np.c_[wh, wh]
    score = np.clip(0.35 + 0.6 * g[:, 8] + rng.normal(0, 0.1, len(g)), 0.05, 1.0)
    n_fp = int(round(proto.false_pos * len(g)))
    src = g[rng.integers(0, len(g), n_fp)] if len(g) else np.zeros((0, 9))
    w, h = image_size
    fw, fh = src[:, 4] * rng.uniform(0.7, 1.3, n_fp), src[:, 5] * rng.uniform(0.7, 1.3, n_fp)
    fx, fy = rng.uniform(0, np.maximum(w - fw, 1)), rng.uniform(0, np.maximum(h - fh, 1))
    fp = np.c_[src[:, 0], fx, fy, fx + fw, fy + fh, rng.uniform(0.1, 0.6, n_fp)]
    rows = np.r_[np.c_[g[:, 0], box, score], fp]
    rows = rows[np.lexsort((rows[:, 1], rows[:, 0]))]
    out = np.c_[rows[:, 0], -np.ones(len(rows)), rows[:, 1:3], rows[:, 3:5] - rows[:, 1:3], rows[:, 5]]
    return out


def track_sequence(dets: np.ndarray, params: TrackerParams | None = None, camera_id: str = "mot",
                   image_size: tuple[int, int] | None = None, fps: float = 30.0,
                   n_frames: int | None = None) -> np.ndarray:
    """Run the tracker over MOT detections; returns rows frame,id,x,y,w,h for
    the tracks confirmed (matched) in each frame, as SORT reports them.

    ``image_size`` should come from seqinfo.ini; when unknown it is taken as
    the extent of all detections (never a fixed guess: a too-small image would
    delete every track that coasts outside it). Timestamps are frame / fps."""
    if image_size is None:
        ext = (dets[:, 2:4] + dets[:, 4:6]).max(axis=0) if len(dets) else np.ones(2)
        image_size = (int(np.ceil(ext[0])), int(np.ceil(ext[1])))
    frames = dets[:, 0].astype(int)
    order = np.argsort(frames, kind="stable")
    dets, frames = dets[order], frames[order]
    last = max(int(frames.max()) if len(frames) else 0, n_frames or 0)
    bounds = np.searchsorted(frames, np.arange(1, last + 2))

    def per_frame():
        for f in range(1, last + 1):
            d = dets[bounds[f - 1]:bounds[f]]
            boxes = np.c_[d[:, 2:4], d[:, 2:4] + d[:, 4:6]].astype(np.float32)
            yield Detections(camera_id, f, f / fps, boxes, d[:, 6].astype(np.float32),
                             np.zeros(len(d), np.int64), PERSON, image_size)
    return track_detections(per_frame(), params, camera_id)


def track_detections(frames: Iterable[Detections], params: TrackerParams | None = None,
                     camera_id: str = "mot") -> np.ndarray:
    """Run the tracker over one camera's Detections, one per frame in order
    (``frame_index`` is the MOT frame number written, ``timestamp`` the clock);
    returns rows frame,id,x,y,w,h of the tracks confirmed (matched) in each
    frame. Detections keep what a detector gave (classes, embeddings), so a
    dish checkpoint's output is tracked exactly as the service tracks it."""
    tracker = Tracker(camera_id, params)
    out = []
    for det in frames:
        upd = tracker.update(det)
        for t in upd.tracks:
            if t.state is TrackState.CONFIRMED:
                x1, y1, x2, y2 = t.box
                out.append((det.frame_index, t.track_id, x1, y1, x2 - x1, y2 - y1))
    return np.array(out, dtype=np.float64).reshape(-1, 6)

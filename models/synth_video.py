"""Synthetic checkout videos with ground truth, made from labelled tray photos.

Real checkout video with per-dish labels does not exist here; labelled
top-down tray photos do. Sliding those photos across a procedural counter
(one photo per tray, own speed, small rotation, motion blur, lighting drift,
a hand passing over) gives a video whose receipts and per-frame boxes are
known exactly, so reader -> detector -> tracker -> checkout can be scored
end to end.

Outputs in ``out_dir``: ``checkout.mp4``; ``receipts.json`` (per tray: source
photo, label counts, when its centre crosses the line); ``gt.txt``
(MOTChallenge ``frame,id,x,y,w,h,1,class,visibility``, frames 1-based, class
0-based into ``labels.txt``); ``seqinfo.ini``; ``labels.txt``. Frame numbers in
``receipts.json`` are 0-based video frame indices (``Frame.index`` of a file
reader); ``gt.txt`` frame = index + 1.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .dataset import Sample

log = logging.getLogger(__name__)

VIDEO_NAME = "checkout.mp4"


@dataclass(frozen=True, slots=True)
class SynthSettings:
    width: int = 640
    height: int = 480
    fps: float = 25.0
    seed: int = 0
    speed_px_s: tuple[float, float] = (120.0, 260.0)  # per-tray constant speed, frame pixels per second
    gap_s: tuple[float, float] = (0.3, 2.0)  # previous tray fully in frame -> next tray starts entering
    min_clearance_px: float = 8.0  # trays never come closer than this (no overlap, ever)
    rotation_deg: float = 5.0  # max |rotation|; each tray drifts between two angles within it
    tray_scale: float = 0.7  # tray photo height as a fraction of frame height
    y_jitter: float = 0.05  # tray centre y: frame middle +- this fraction of frame height
    motion_blur: bool = True
    blur_exposure: float = 0.6  # blur length = speed / fps * exposure (shutter open 60% of a frame)
    lighting: float = 0.25  # amplitude of brightness / contrast / colour-temperature drift
    hand_prob: float = 0.5  # chance that a hand/arm passes over a tray
    hand_s: tuple[float, float] = (0.3, 1.0)
    line_x: float = 0.5  # checkout line (normalised x); trays move left_to_right across it
    lead_s: float = 0.5  # empty counter before the first tray and after the last
    codec: str = "mp4v"  # this OpenCV's FFmpeg writer has no avc1 encoder

    def __post_init__(self) -> None:
        if self.width < 32 or self.height < 32 or self.fps <= 0:
            raise ValueError("width/height must be >= 32 and fps > 0")
        for name in ("speed_px_s", "gap_s", "hand_s"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi or (name == "speed_px_s" and lo <= 0):
                raise ValueError(f"{name} must be a range 0 < lo <= hi, got {(lo, hi)}")
        if not 0 < self.tray_scale <= 1 or not 0 <= self.line_x <= 1 or not 0 <= self.hand_prob <= 1:
            raise ValueError("tray_scale in (0,1], line_x and hand_prob in [0,1]")


@dataclass(frozen=True, slots=True)
class TrayReceipt:
    tray: int  # 0-based order of appearance
    source_image: str
    group: str | None
    counts: dict[str, int]
    cross_time_s: float  # the tray centre reaches the line (first frame at or past it)
    cross_frame: int  # 0-based video frame index
    first_frame: int  # first / last frame any part of the tray photo is in view
    last_frame: int
    speed_px_s: float
    gt_ids: tuple[int, ...]  # ids of this tray's dishes in gt.txt
    hand_frames: tuple[int, int] | None  # [first, last] frames with a hand over it


@dataclass(frozen=True, slots=True)
class SynthResult:
    out_dir: Path
    video: Path
    receipts_json: Path
    gt_txt: Path
    seqinfo: Path
    labels_txt: Path
    frames: int
    classes: tuple[str, ...]
    receipts: tuple[TrayReceipt, ...]


@dataclass(slots=True)
class _Tray:
    index: int
    sample: Sample
    image: np.ndarray  # photo resized to tray size, BGR
    alpha: np.ndarray  # float32 0..1, feathered rounded rectangle
    scale: float  # photo pixels -> tray pixels
    speed: float
    t_enter: float  # time its right edge reaches x=0
    y: float
    angle0: float
    angle1: float
    half_w: float  # conservative half extent of the rotated tray along x
    ids: tuple[int, ...]
    hand: "_Hand | None" = None

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[1], self.image.shape[0]

    def x_at(self, t: float) -> float:
        return -self.half_w + self.speed * (t - self.t_enter)

    def t_at_x(self, x: float) -> float:
        return self.t_enter + (x + self.half_w) / self.speed

    def angle_at(self, t: float, t_exit: float) -> float:
        p = min(max((t - self.t_enter) / max(t_exit - self.t_enter, 1e-6), 0.0), 1.0)
        return self.angle0 + (self.angle1 - self.angle0) * p

    def matrix(self, t: float, t_exit: float) -> np.ndarray:
        """2x3 affine from resized-photo pixels to frame pixels at time t."""
        tw, th = self.size
        m = cv2.getRotationMatrix2D((tw / 2, th / 2), self.angle_at(t, t_exit), 1.0)
        m[0, 2] += self.x_at(t) - tw / 2
        m[1, 2] += self.y - th / 2
        return m


@dataclass(frozen=True, slots=True)
class _Hand:
    t0: float
    t1: float
    anchor: tuple[float, float]  # fingertip target in tray pixels (moves with the tray)
    from_top: bool
    slant: float  # x offset of the shoulder end relative to the tip, fraction of frame width
    width: float  # forearm width, pixels
    colour: tuple[float, float, float]


def _feathered_rect(w: int, h: int, radius: float, feather: float) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    r = int(max(1, radius))
    cv2.rectangle(mask, (r, 0), (w - 1 - r, h - 1), 255, -1)
    cv2.rectangle(mask, (0, r), (w - 1, h - 1 - r), 255, -1)
    for cx, cy in ((r, r), (w - 1 - r, r), (r, h - 1 - r), (w - 1 - r, h - 1 - r)):
        cv2.circle(mask, (cx, cy), r, 255, -1, cv2.LINE_AA)
    k = max(1, int(feather)) * 2 + 1
    return cv2.GaussianBlur(mask, (k, k), 0).astype(np.float32) / 255.0


def make_background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A counter top: wood grain or speckled grey laminate, seeded."""
    def smooth_noise(cells_x: int, cells_y: int) -> np.ndarray:
        small = rng.standard_normal((cells_y, cells_x)).astype(np.float32)
        return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if rng.random() < 0.5:  # wood: stretched rings along x
        warp = smooth_noise(4, 3) * 6 + smooth_noise(12, 8) * 1.5
        grain = np.sin(yy / height * rng.uniform(25, 45) + warp) * 0.5 + 0.5
        fine = smooth_noise(width // 3, height // 24) * 0.15
        base = np.array(rng.uniform([60, 100, 140], [90, 135, 185]), np.float32)  # BGR brownish
        shade = 0.78 + 0.22 * grain[..., None] + fine[..., None]
    else:  # grey laminate with speckles
        base = np.full(3, rng.uniform(110, 170), np.float32) + rng.uniform(-8, 8, 3).astype(np.float32)
        speck = rng.standard_normal((height, width)).astype(np.float32) * 0.05
        shade = 0.9 + 0.06 * smooth_noise(6, 4)[..., None] + speck[..., None]
    bg = base[None, None, :] * shade
    vignette = 1 - 0.18 * (((xx - width / 2) / width) ** 2 + ((yy - height / 2) / height) ** 2)[..., None] * 2
    return np.clip(bg * vignette, 0, 255).astype(np.uint8)


def _lighting(t: float, amp: float, phases: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-channel gain (BGR) and contrast at time t: slow drifts, seeded phases."""
    def wave(k: int, period: float) -> float:
        return 0.6 * math.sin(2 * math.pi * t / period + phases[k]) + 0.4 * math.sin(
            2 * math.pi * t / (period * 0.37) + phases[k + 3])

    bright = 1 + 0.5 * amp * wave(0, 11.0)
    contrast = 1 + 0.4 * amp * wave(1, 7.0)
    temp = 0.3 * amp * wave(2, 17.0)  # >0 warmer (more red, less blue)
    return np.array([bright * (1 - temp), bright, bright * (1 + temp)], np.float32), contrast


def _pick_samples(samples: Sequence[Sample], n: int, rng: np.random.Generator) -> list[Sample]:
    """One photo per tray group, different groups; groups repeat only once all were used."""
    groups: dict[str, list[Sample]] = collections.defaultdict(list)
    for i, s in enumerate(samples):
        if len(s.labels):
            groups[s.group if s.group is not None else f"__photo{i}"].append(s)
    if not groups:
        raise ValueError("no labelled samples with boxes to make trays from")
    keys = sorted(groups)
    picked: list[Sample] = []
    while len(picked) < n:
        if picked:
            log.warning("only %d tray groups for %d trays: reusing groups", len(keys), n)
        for k in rng.permutation(len(keys))[: n - len(picked)]:
            g = groups[keys[int(k)]]
            picked.append(g[int(rng.integers(len(g)))])
    return picked


def _schedule(samples: list[Sample], st: SynthSettings, rng: np.random.Generator) -> list[_Tray]:
    trays: list[_Tray] = []
    th = max(8, int(round(st.tray_scale * st.height)))
    next_id = 1
    for i, s in enumerate(samples):
        img = cv2.imread(str(s.image))
        if img is None:
            raise ValueError(f"cannot decode {s.image}")
        h0, w0 = img.shape[:2]
        scale = th / h0
        tw = max(8, int(round(w0 * scale)))
        img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
        a0, a1 = rng.uniform(-st.rotation_deg, st.rotation_deg, 2)
        amax = math.radians(max(abs(a0), abs(a1)))
        half_w = (tw * math.cos(amax) + th * math.sin(amax)) / 2 + 1
        speed = float(rng.uniform(*st.speed_px_s))
        y = st.height / 2 + float(rng.uniform(-st.y_jitter, st.y_jitter)) * st.height
        ids = tuple(range(next_id, next_id + len(s.labels)))
        next_id += len(ids)
        tray = _Tray(i, s, img, _feathered_rect(tw, th, 0.04 * th, 0.01 * th + 1), scale, speed, 0.0, y,
                     float(a0), float(a1), half_w, ids)
        if not trays:
            tray.t_enter = st.lead_s
        else:
            prev = trays[-1]
            # previous tray fully in view with clearance (its rear edge past x=clearance) + gap ...
            t = prev.t_at_x(prev.half_w + st.min_clearance_px) + float(rng.uniform(*st.gap_s))
            # ... and still when the previous one leaves (a faster tray closes the gap)
            t_prev_gone = prev.t_at_x(st.width + prev.half_w)
            t_needed = t_prev_gone - (st.width - st.min_clearance_px) / speed
            tray.t_enter = max(t, t_needed)
        if rng.random() < st.hand_prob:
            t_cross = tray.t_at_x(st.line_x * st.width)
            dur = float(rng.uniform(*st.hand_s))
            t0 = t_cross + float(rng.uniform(-1.5, 0.5))
            tray.hand = _Hand(t0, t0 + dur, (float(rng.uniform(0.2, 0.8) * tw), float(rng.uniform(0.25, 0.75) * th)),
                              bool(rng.random() < 0.5), float(rng.uniform(-0.25, 0.25)),
                              float(rng.uniform(0.09, 0.13) * st.height),
                              tuple(float(c) for c in rng.uniform([95, 130, 175], [150, 180, 230])))
        trays.append(tray)
    return trays


def _hand_layer(hand: _Hand, tip: tuple[float, float], t: float, st: SynthSettings) -> tuple[np.ndarray, np.ndarray]:
    """Arm (capsule) from a frame edge to a hand (ellipse) near ``tip``; reaches in and out.
    Returns (colour BGR float32 HxWx3, alpha float32 HxW)."""
    w, h = st.width, st.height
    p = (t - hand.t0) / max(hand.t1 - hand.t0, 1e-6)
    reach = math.sin(math.pi * min(max(p, 0.0), 1.0)) ** 0.5  # in, hold, out
    shoulder = (tip[0] + hand.slant * w, -0.3 * h if hand.from_top else 1.3 * h)
    tx = shoulder[0] + (tip[0] - shoulder[0]) * reach
    ty = shoulder[1] + (tip[1] - shoulder[1]) * reach
    mask = np.zeros((h, w), np.uint8)
    ss = 4  # sub-pixel shift bits for smooth motion
    pt = lambda x, y: (int(round(x * (1 << ss))), int(round(y * (1 << ss))))  # noqa: E731
    cv2.line(mask, pt(*shoulder), pt(tx, ty), 255, max(2, int(hand.width)), cv2.LINE_AA, ss)
    ang = math.degrees(math.atan2(ty - shoulder[1], tx - shoulder[0]))
    axes = (int(round(hand.width * 0.95 * (1 << ss))), int(round(hand.width * 0.7 * (1 << ss))))
    cv2.ellipse(mask, pt(tx, ty), axes, ang, 0, 360, 255, -1, cv2.LINE_AA, ss)
    if not mask.any():
        return np.zeros((h, w, 3), np.float32), np.zeros((h, w), np.float32)
    dist = cv2.distanceTransform((mask > 127).astype(np.uint8), cv2.DIST_L2, 5)
    shade = 0.55 + 0.45 * np.sqrt(np.clip(dist / max(float(dist.max()), 1e-6), 0, 1))  # rounded look
    colour = np.asarray(hand.colour, np.float32)[None, None, :] * shade[..., None]
    return colour, mask.astype(np.float32) / 255.0


def _box_in_frame(m_photo: np.ndarray, box: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = box
    pts = np.array([[x1, y1, 1], [x2, y1, 1], [x2, y2, 1], [x1, y2, 1]], np.float64) @ m_photo.T
    return np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()])


def make_checkout_video(samples: Sequence[Sample], out_dir: str | Path, n_trays: int,
                        settings: SynthSettings = SynthSettings(),
                        classes: Sequence[str] | None = None) -> SynthResult:
    """Render ``n_trays`` trays (one photo of a different tray group each) sliding left to right
    across the frame, with ground truth. ``classes`` fixes the class index order of gt.txt
    (default: sorted labels of ``samples``)."""
    st = settings
    if n_trays < 1:
        raise ValueError("n_trays must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(st.seed)
    classes = tuple(classes) if classes is not None else tuple(sorted({lbl for s in samples for lbl in s.labels}))
    cls_index = {c: i for i, c in enumerate(classes)}
    missing = {lbl for s in samples for lbl in s.labels} - set(cls_index)
    if missing:
        raise ValueError(f"labels not in classes: {sorted(missing)}")

    background = make_background(st.width, st.height, rng).astype(np.float32)
    phases = rng.uniform(0, 2 * math.pi, 6)
    trays = _schedule(_pick_samples(samples, n_trays, rng), st, rng)
    exits = [tr.t_at_x(st.width + tr.half_w) for tr in trays]
    n_frames = int(math.ceil((max(exits) + st.lead_s) * st.fps))
    line_px = st.line_x * st.width

    writer = cv2.VideoWriter(str(out / VIDEO_NAME), cv2.VideoWriter_fourcc(*st.codec), st.fps, (st.width, st.height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {st.codec} video to {out / VIDEO_NAME}")
    gt_rows: list[str] = []
    first = [None] * len(trays)
    last = [None] * len(trays)
    cross = [None] * len(trays)
    hand_span: list[list[int] | None] = [None] * len(trays)
    try:
        for f in range(n_frames):
            t = f / st.fps
            canvas = background.copy()
            frame_boxes: list[tuple[int, int, np.ndarray]] = []  # (tray, dish k, box) for visibility
            hand_alpha = np.zeros((st.height, st.width), np.float32)
            hand_rgb = None
            for ti, tr in enumerate(trays):
                x = tr.x_at(t)
                if x + tr.half_w <= 0 or x - tr.half_w >= st.width:
                    continue
                m = tr.matrix(t, exits[ti])
                tw, th = tr.size
                corners = np.array([[0, 0, 1], [tw, 0, 1], [tw, th, 1], [0, th, 1]], np.float64) @ m.T
                blur = int(round(tr.speed / st.fps * st.blur_exposure)) if st.motion_blur else 0
                x0 = max(0, int(math.floor(corners[:, 0].min())) - blur - 8)
                y0 = max(0, int(math.floor(corners[:, 1].min())) - 8)
                x1 = min(st.width, int(math.ceil(corners[:, 0].max())) + blur + 8)
                y1 = min(st.height, int(math.ceil(corners[:, 1].max())) + 8)
                if x1 <= x0 or y1 <= y0:
                    continue
                if corners[:, 0].max() > 0 and corners[:, 0].min() < st.width:
                    first[ti] = f if first[ti] is None else first[ti]
                    last[ti] = f
                if cross[ti] is None and x >= line_px:
                    cross[ti] = f
                mr = m.copy()
                mr[:, 2] -= (x0, y0)
                size = (x1 - x0, y1 - y0)
                layer = cv2.warpAffine(tr.image, mr, size, flags=cv2.INTER_LINEAR,
                                       borderMode=cv2.BORDER_CONSTANT).astype(np.float32)
                alpha = cv2.warpAffine(tr.alpha, mr, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
                if blur >= 2:
                    k = np.full((1, blur), 1.0 / blur, np.float32)
                    layer = cv2.filter2D(layer * alpha[..., None], -1, k, borderType=cv2.BORDER_CONSTANT)
                    alpha = cv2.filter2D(alpha, -1, k, borderType=cv2.BORDER_CONSTANT)
                    layer = layer / np.maximum(alpha[..., None], 1e-4)
                roi = canvas[y0:y1, x0:x1]
                # soft contact shadow, then the tray
                shadow = cv2.GaussianBlur(alpha, (0, 0), max(1.0, 0.02 * st.height))
                shift = np.float32([[1, 0, 0.008 * st.width + 1], [0, 1, 0.01 * st.height + 1]])
                shadow = cv2.warpAffine(shadow, shift, size, borderMode=cv2.BORDER_CONSTANT)
                roi *= (1 - 0.35 * shadow)[..., None]
                roi[:] = roi * (1 - alpha[..., None]) + layer * alpha[..., None]
                m_photo = m.copy()
                m_photo[:, :2] *= tr.scale
                for k, box in enumerate(tr.sample.boxes):
                    frame_boxes.append((ti, k, _box_in_frame(m_photo, box)))
                if tr.hand is not None and tr.hand.t0 <= t <= tr.hand.t1:
                    tip = m @ np.array([*tr.hand.anchor, 1.0])
                    colour, a = _hand_layer(tr.hand, (float(tip[0]), float(tip[1])), t, st)
                    if a.any():
                        hand_rgb = colour if hand_rgb is None else np.where(a[..., None] > hand_alpha[..., None],
                                                                            colour, hand_rgb)
                        hand_alpha = np.maximum(hand_alpha, a)
                        span = hand_span[ti]
                        hand_span[ti] = [f, f] if span is None else [span[0], f]
            if hand_rgb is not None:
                canvas = canvas * (1 - hand_alpha[..., None]) + hand_rgb * hand_alpha[..., None]
            gains, contrast = _lighting(t, st.lighting, phases)
            canvas = (canvas - 128.0) * contrast + 128.0
            writer.write(np.clip(canvas * gains[None, None, :], 0, 255).astype(np.uint8))

            for ti, k, b in frame_boxes:
                area = (b[2] - b[0]) * (b[3] - b[1])
                cx1, cy1 = max(b[0], 0.0), max(b[1], 0.0)
                cx2, cy2 = min(b[2], float(st.width)), min(b[3], float(st.height))
                if cx2 - cx1 < 1 or cy2 - cy1 < 1 or area <= 0:
                    continue
                vis = (cx2 - cx1) * (cy2 - cy1) / area
                if hand_rgb is not None:
                    sub = hand_alpha[int(cy1):int(math.ceil(cy2)), int(cx1):int(math.ceil(cx2))]
                    if sub.size:
                        vis *= 1.0 - float(sub.mean())
                tr = trays[ti]
                gt_rows.append(f"{f + 1},{tr.ids[k]},{cx1:.2f},{cy1:.2f},{cx2 - cx1:.2f},{cy2 - cy1:.2f},1,"
                               f"{cls_index[tr.sample.labels[k]]},{vis:.3f}")
    finally:
        writer.release()

    receipts = tuple(
        TrayReceipt(
            tray=tr.index, source_image=str(tr.sample.image), group=tr.sample.group,
            counts=dict(sorted(collections.Counter(tr.sample.labels).items())),
            cross_time_s=round(cross[i] / st.fps, 4), cross_frame=cross[i],
            first_frame=first[i], last_frame=last[i], speed_px_s=round(tr.speed, 2), gt_ids=tr.ids,
            hand_frames=tuple(hand_span[i]) if hand_span[i] else None)
        for i, tr in enumerate(trays))
    result = SynthResult(out, out / VIDEO_NAME, out / "receipts.json", out / "gt.txt", out / "seqinfo.ini",
                         out / "labels.txt", n_frames, classes, receipts)
    _write_ground_truth(result, gt_rows, st)
    log.info("wrote %s: %d trays, %d frames (%.1f s)", result.video, len(trays), n_frames, n_frames / st.fps)
    return result


def _write_ground_truth(res: SynthResult, gt_rows: list[str], st: SynthSettings) -> None:
    res.gt_txt.write_text("\n".join(gt_rows) + "\n")
    res.labels_txt.write_text("".join(f"{i} {c}\n" for i, c in enumerate(res.classes)))
    res.seqinfo.write_text(
        "[Sequence]\nname=checkout\nimDir=img1\n"
        f"frameRate={st.fps:g}\nseqLength={res.frames}\nimWidth={st.width}\nimHeight={st.height}\nimExt=.jpg\n")
    doc = {
        "video": res.video.name, "fps": st.fps, "width": st.width, "height": st.height, "frames": res.frames,
        "line": {"x": st.line_x, "direction": "left_to_right"}, "classes": list(res.classes),
        "frame_numbering": "0-based video frame index (gt.txt uses index + 1)",
        "settings": dataclasses.asdict(st), "trays": [dataclasses.asdict(r) for r in res.receipts],
    }
    res.receipts_json.write_text(json.dumps(doc, indent=1))

"""Seeded image + box augmentation for training, and the aspect-preserving
letterbox used identically at training and inference.

Why these: other capture sessions differ in lighting, white balance and
camera distance, and trays arrive in any orientation under a top-down camera,
so the model must see scale/crop, flips in both axes, small rotations and
colour/brightness changes. Every random draw comes from one numpy Generator,
so a training run is reproducible from its seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True, slots=True)
class AugmentSettings:
    scale: tuple[float, float] = (0.6, 1.3)  # zoom range (1 = image fills the input)
    rotate_deg: float = 5.0  # the box becomes its rotated hull: keep small
    hflip: float = 0.5
    vflip: float = 0.5  # top-down camera: upside down is a valid pose
    brightness: float = 0.3  # multiplicative, +-
    contrast: float = 0.3
    saturation: float = 0.3
    hue_deg: float = 8.0
    white_balance: float = 0.1  # per-channel gain, +-
    blur: float = 0.2  # probability of a small blur (focus / motion)
    min_visible: float = 0.4  # boxes cut to less than this share of their area are dropped


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Resize keeping the aspect ratio so the long side is ``size``; pad bottom/right with black.
    Returns the padded image and the scale (input pixels per image pixel)."""
    h, w = image.shape[:2]
    s = size / max(h, w)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    out = np.zeros((size, size, 3), np.uint8)
    out[:nh, :nw] = cv2.resize(image, (nw, nh), interpolation=interp)
    return out, s


def photometric(img: np.ndarray, a: AugmentSettings, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, saturation, hue and white balance on an RGB uint8 image."""
    x = img.astype(np.float32)
    if a.hue_deg or a.saturation:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float32)
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-a.hue_deg, a.hue_deg) / 2) % 180
        hsv[..., 1] *= 1 + rng.uniform(-a.saturation, a.saturation)
        x = cv2.cvtColor(hsv.clip(0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    mean = x.mean()
    x = (x - mean) * (1 + rng.uniform(-a.contrast, a.contrast)) + mean
    x *= 1 + rng.uniform(-a.brightness, a.brightness)
    x *= 1 + rng.uniform(-a.white_balance, a.white_balance, size=3).astype(np.float32)
    if rng.random() < a.blur:
        k = int(rng.choice([3, 5]))
        x = cv2.GaussianBlur(x, (k, k), 0) if rng.random() < 0.5 else cv2.blur(x, (k, 1))
    return x.clip(0, 255).astype(np.uint8)


def geometric(img: np.ndarray, boxes: np.ndarray, size: int, a: AugmentSettings, rng: np.random.Generator,
              keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Letterbox-equivalent affine with random zoom, shift, rotation and flips into a ``size`` square.

    Returns (image, boxes, index of kept input boxes). Boxes become the axis-aligned hull of
    their rotated corners, clipped; boxes mostly cut off are dropped (their index is not returned).
    """
    h, w = img.shape[:2]
    base = size / max(h, w)
    s = base * rng.uniform(*a.scale)
    ang = np.deg2rad(rng.uniform(-a.rotate_deg, a.rotate_deg))
    # image centre -> a random point such that most of the content stays in view
    cx_out = size / 2 + rng.uniform(-0.25, 0.25) * size * max(0.0, s * max(h, w) / size - 0.5)
    cy_out = size / 2 + rng.uniform(-0.25, 0.25) * size * max(0.0, s * max(h, w) / size - 0.5)
    fx = -1.0 if rng.random() < a.hflip else 1.0
    fy = -1.0 if rng.random() < a.vflip else 1.0
    c, sn = np.cos(ang) * s, np.sin(ang) * s
    lin = np.array([[c, -sn], [sn, c]]) @ np.diag([fx, fy])
    t = np.array([cx_out, cy_out]) - lin @ np.array([w / 2, h / 2])
    m = np.c_[lin, t].astype(np.float32)
    out = cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=(0, 0, 0))
    if len(boxes) == 0:
        return out, boxes.reshape(0, 4).astype(np.float32), np.zeros(0, np.int64)
    corners = np.stack([boxes[:, [0, 1]], boxes[:, [2, 1]], boxes[:, [0, 3]], boxes[:, [2, 3]]], axis=1)  # N,4,2
    tc = corners @ lin.T + t
    nb = np.c_[tc[..., 0].min(1), tc[..., 1].min(1), tc[..., 0].max(1), tc[..., 1].max(1)]
    area = (nb[:, 2] - nb[:, 0]) * (nb[:, 3] - nb[:, 1])
    clipped = nb.clip(0, size)
    carea = (clipped[:, 2] - clipped[:, 0]).clip(0) * (clipped[:, 3] - clipped[:, 1]).clip(0)
    ok = carea >= a.min_visible * np.maximum(area, 1e-6)
    ok &= (clipped[:, 2] - clipped[:, 0] >= 2) & (clipped[:, 3] - clipped[:, 1] >= 2)
    idx = np.nonzero(ok)[0]
    return out, clipped[idx].astype(np.float32), idx

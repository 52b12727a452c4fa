"""Association costs and gated assignment (numpy + scipy's Hungarian solver).

Kept apart from the tracker so each cue (IoU, OC-SORT direction consistency,
appearance) can be read and tested on its own.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from .geometry import centers

INVALID = -1e6


def assign(score: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max-score one-to-one assignment restricted to ``valid`` pairs: (rows, cols)."""
    if score.size == 0 or not valid.any():
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    rows, cols = linear_sum_assignment(-np.where(valid, score, INVALID))
    ok = valid[rows, cols]
    return rows[ok], cols[ok]


def direction_score(track_dir: np.ndarray, last_obs: np.ndarray, boxes: np.ndarray,
                    det_scores: np.ndarray) -> np.ndarray:
    """OC-SORT's observation-centric momentum: reward detections that continue
    the direction the track's own observations were moving in, in [-0.5, 0.5]
    times the detection score. Tracks without a direction (all-zero rows) get 0."""
    d = centers(boxes)[None, :, :] - centers(last_obs)[:, None, :]
    d /= np.maximum(np.linalg.norm(d, axis=2, keepdims=True), 1e-6)
    cos = np.clip(np.einsum("tk,tdk->td", track_dir, d), -1.0, 1.0)
    has_dir = np.any(track_dir != 0, axis=1)[:, None]
    diff = (np.pi / 2.0 - np.abs(np.arccos(cos))) / np.pi
    return np.where(has_dir, diff * det_scores[None, :], 0.0)


def centre_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Centre distance of every a/b pair relative to the diagonal of the ``a`` box."""
    diag = np.hypot(a[:, 2] - a[:, 0], a[:, 3] - a[:, 1])
    dist = np.linalg.norm(centers(a)[:, None, :] - centers(b)[None, :, :], axis=2)
    return dist / np.maximum(diag[:, None], 1e-6)

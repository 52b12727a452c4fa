"""Constant-velocity Kalman filter on a box, state [cx, cy, area, aspect, vcx, vcy, varea]."""
from __future__ import annotations

import numpy as np
from filterpy.kalman import KalmanFilter


def box_to_z(box: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = max(x2 - x1, 1e-3), max(y2 - y1, 1e-3)
    return np.array([[x1 + w / 2.0], [y1 + h / 2.0], [w * h], [w / h]])


def x_to_box(x: np.ndarray) -> np.ndarray:
    cx, cy, s, r = (float(v) for v in np.asarray(x).reshape(-1)[:4])
    s, r = max(s, 1e-6), max(r, 1e-6)
    w = np.sqrt(s * r)
    h = s / w
    return np.array([cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0])


class KalmanBoxFilter:
    """filterpy KalmanFilter set up as in SORT (Bewley et al. 2016)."""

    def __init__(self, box: np.ndarray) -> None:
        kf = KalmanFilter(dim_x=7, dim_z=4)
        kf.F = np.array([
            [1, 0, 0, 0, 1, 0, 0],
            [0, 1, 0, 0, 0, 1, 0],
            [0, 0, 1, 0, 0, 0, 1],
            [0, 0, 0, 1, 0, 0, 0],
            [0, 0, 0, 0, 1, 0, 0],
            [0, 0, 0, 0, 0, 1, 0],
            [0, 0, 0, 0, 0, 0, 1],
        ], dtype=float)
        kf.H = np.zeros((4, 7))
        kf.H[:4, :4] = np.eye(4)
        kf.R[2:, 2:] *= 10.0
        kf.P[4:, 4:] *= 1000.0  # unobserved velocities: high uncertainty
        kf.P *= 10.0
        kf.Q[-1, -1] *= 0.01
        kf.Q[4:, 4:] *= 0.01
        kf.x[:4] = box_to_z(box)
        self._kf = kf

    def predict(self) -> np.ndarray:
        """Advance one frame; returns the predicted xyxy box."""
        if self._kf.x[6] + self._kf.x[2] <= 0:
            self._kf.x[6] = 0.0  # area must stay positive
        self._kf.predict()
        return x_to_box(self._kf.x)

    def correct(self, box: np.ndarray) -> np.ndarray:
        """Fuse a measured box; returns the corrected xyxy box."""
        self._kf.update(box_to_z(box))
        return x_to_box(self._kf.x)

    @property
    def box(self) -> np.ndarray:
        return x_to_box(self._kf.x)

    @property
    def velocity(self) -> tuple[float, float]:
        return float(self._kf.x[4, 0]), float(self._kf.x[5, 0])

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


def boxes_to_z(boxes: np.ndarray) -> np.ndarray:
    """(N,4) xyxy -> (N,4) [cx, cy, area, aspect], as ``box_to_z`` row-wise."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    wh = np.maximum(b[:, 2:] - b[:, :2], 1e-3)
    z = np.empty((len(b), 4))
    z[:, :2] = b[:, :2] + wh / 2.0
    z[:, 2] = wh[:, 0] * wh[:, 1]
    z[:, 3] = wh[:, 0] / wh[:, 1]
    return z


def xs_to_boxes(x: np.ndarray) -> np.ndarray:
    """(N,>=4) states -> (N,4) xyxy, as ``x_to_box`` row-wise."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    s = np.maximum(x[:, 2], 1e-6)
    w = np.sqrt(s * np.maximum(x[:, 3], 1e-6))
    half = np.empty((len(x), 2))
    half[:, 0] = w / 2.0
    half[:, 1] = s / w / 2.0
    return np.concatenate([x[:, :2] - half, x[:, :2] + half], axis=1)


def _sort_matrices() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """F, Q, R, P0 of SORT's filter, taken from the filterpy reference so both stay identical."""
    ref = KalmanBoxFilter(np.array([0.0, 0.0, 1.0, 1.0]))._kf
    return ref.F.copy(), ref.Q.copy(), ref.R.copy(), ref.P.copy(), ref.H.copy()


class BatchKalman:
    """SORT's constant-velocity box filter for all tracks at once.

    State rows ``x`` (N,7) and covariances ``P`` (N,7,7) live in arrays, so a
    frame costs a few batched matrix products instead of one filterpy object
    call per track. Numerically the same as ``KalmanBoxFilter`` (filterpy's
    predict and Joseph-form update), which the tests compare against.
    """

    def __init__(self) -> None:
        self.F, self.Q, self.R, self.P0, self.H = _sort_matrices()
        self.x = np.zeros((0, 7))
        self.P = np.zeros((0, 7, 7))

    def __len__(self) -> int:
        return len(self.x)

    def add(self, boxes: np.ndarray) -> None:
        z = boxes_to_z(boxes)
        x = np.zeros((len(z), 7))
        x[:, :4] = z
        self.x = np.concatenate([self.x, x])
        self.P = np.concatenate([self.P, np.broadcast_to(self.P0, (len(z), 7, 7))])

    def keep(self, mask: np.ndarray) -> None:
        self.x = self.x[mask]
        self.P = self.P[mask]

    def predict(self) -> np.ndarray:
        """Advance every track one frame; returns predicted (N,4) xyxy boxes."""
        if len(self.x):
            bad = self.x[:, 6] + self.x[:, 2] <= 0
            self.x[bad, 6] = 0.0  # area must stay positive
            self.x = self.x @ self.F.T
            self.P = self.F @ self.P @ self.F.T + self.Q
        return self.boxes()

    def update(self, idx: np.ndarray, boxes: np.ndarray, noise_scale: float = 1.0) -> np.ndarray:
        """Fuse measured boxes into rows ``idx``; returns their corrected boxes.
        ``noise_scale`` multiplies the measurement noise R (a weaker measurement
        than a detection, e.g. a box moved by optical flow)."""
        idx = np.asarray(idx, dtype=np.intp)
        if len(idx) == 0:
            return np.zeros((0, 4))
        x, P = correct(self.x[idx], self.P[idx], boxes_to_z(boxes), self.R * noise_scale)
        self.x[idx], self.P[idx] = x, P
        return xs_to_boxes(x)

    def reupdate(self, idx: np.ndarray, x0: np.ndarray, P0: np.ndarray, box0: np.ndarray,
                 box1: np.ndarray, gaps: np.ndarray) -> None:
        """OC-SORT's observation-centric re-update for rows ``idx`` re-found after
        ``gaps`` frames: restart from the state at the last real observation
        ``box0`` (``x0``, ``P0``) and filter over virtual observations on the
        straight line to ``box1``, all rows stepped together; the rows end
        predicted to the current frame, ready for ``update`` with ``box1``."""
        idx = np.asarray(idx, dtype=np.intp)
        if len(idx) == 0:
            return
        x, P = x0.copy(), P0.copy()
        z0, z1 = boxes_to_z(box0), boxes_to_z(box1)
        F, FT, Q = self.F, self.F.T, self.Q
        for step in range(1, int(gaps.max())):
            on = np.flatnonzero(step < gaps)
            xs, Ps = x[on] @ FT, F @ P[on] @ FT + Q
            frac = (step / gaps[on])[:, None]
            x[on], P[on] = correct(xs, Ps, z0[on] + (z1[on] - z0[on]) * frac, self.R)
        self.x[idx], self.P[idx] = x @ FT, F @ P @ FT + Q

    def boxes(self) -> np.ndarray:
        return xs_to_boxes(self.x) if len(self.x) else np.zeros((0, 4))


def correct(x: np.ndarray, P: np.ndarray, z: np.ndarray, R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batched Kalman correction with H = [I 0] (the box is observed directly),
    Joseph form as filterpy's ``update``: (N,7), (N,7,7), (N,4) -> x, P."""
    S = P[:, :4, :4] + R
    K = np.linalg.solve(S, P[:, :4, :]).transpose(0, 2, 1)  # P H^T S^-1 (P, S symmetric)
    x = x + np.einsum("nij,nj->ni", K, z - x[:, :4])
    # Joseph form (I-KH) P (I-KH)^T + K R K^T with H = [I 0] expanded, so only
    # (7x4)(4x7) products are formed
    Kt = K.transpose(0, 2, 1)
    A = P - K @ P[:, :4, :]
    P = A - A[:, :, :4] @ Kt + K @ R @ Kt
    return x, P

"""Box geometry helpers (numpy)."""
from __future__ import annotations

import numpy as np


def _intersections(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairwise intersection areas of xyxy boxes, with both area vectors."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    return inter, (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]), (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between every box in ``a`` (N,4) and ``b`` (M,4), xyxy."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    inter, area_a, area_b = _intersections(a, b)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def side_of_line(p: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    """Signed area: >0 left of a->b, <0 right, 0 on the line (image coords, y down)."""
    return (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])


def segments_intersect(p: tuple[float, float], q: tuple[float, float],
                       a: tuple[float, float], b: tuple[float, float]) -> bool:
    """True when segment p-q crosses segment a-b (touching counts)."""
    d1 = side_of_line(p, a, b)
    d2 = side_of_line(q, a, b)
    d3 = side_of_line(a, p, q)
    d4 = side_of_line(b, p, q)
    return (d1 * d2 <= 0) and (d3 * d4 <= 0) and not (d1 == 0 and d2 == 0)


def ioa_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Share of each box in ``a`` (N,4) covered by each box in ``b`` (M,4), xyxy."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    inter, area_a, _ = _intersections(a, b)
    return inter / np.maximum(area_a[:, None], 1e-12)


def inside_share(boxes: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Share of each xyxy box's area that lies inside the (w, h) image."""
    w, h = image_size
    return ioa_matrix(boxes, np.array([[0.0, 0.0, w, h]]))[:, 0]


def centers(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return (b[:, :2] + b[:, 2:]) * 0.5

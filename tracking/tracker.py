"""Multi-object tracker: Kalman prediction, Hungarian association on IoU,
track states tentative / confirmed / occluded / removed, coasting through
occlusion, and a lifetime class vote per track.

All per-track state lives in ``_TrackState`` objects held by the Tracker and
dropped when a track is removed, so memory is bounded by the number of live
tracks times ``trajectory_len``.
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from .geometry import iou_matrix
from .kalman import KalmanBoxFilter
from .types import Detections, Track, TrackState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TrackerParams:
    iou_threshold: float = 0.3
    min_hits: int = 3
    max_age: int = 30
    tentative_max_age: int = 1
    min_score: float = 0.0
    trajectory_len: int = 64
    # second-chance association for occluded tracks: centre distance relative
    # to the predicted box diagonal (0 disables; on MOT15 TUD it did not help)
    occluded_gate: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> "TrackerParams":
        return cls(iou_threshold=cfg.iou_threshold, min_hits=cfg.min_hits, max_age=cfg.max_age,
                   tentative_max_age=cfg.tentative_max_age, min_score=cfg.min_score,
                   trajectory_len=cfg.trajectory_len, occluded_gate=cfg.occluded_gate)


@dataclass(frozen=True, slots=True)
class TrackUpdate:
    """Result of one ``Tracker.update``: live tracks and the ids removed this frame."""

    camera_id: str
    frame_index: int
    timestamp: float
    tracks: tuple[Track, ...]
    removed: tuple[Track, ...]
    image_size: tuple[int, int]

    @property
    def confirmed(self) -> tuple[Track, ...]:
        return tuple(t for t in self.tracks if t.state is TrackState.CONFIRMED)


class _TrackState:
    __slots__ = ("track_id", "kf", "state", "hits", "hit_streak", "age", "time_since_update",
                 "votes", "score_sum", "trajectory", "box")

    def __init__(self, track_id: int, box: np.ndarray, traj_len: int) -> None:
        self.track_id = track_id
        self.kf = KalmanBoxFilter(box)
        self.state = TrackState.TENTATIVE
        self.hits = 0
        self.hit_streak = 0
        self.age = 0
        self.time_since_update = 0
        self.votes: dict[int, float] = {}  # class id -> summed score; bounded by #classes
        self.score_sum = 0.0
        self.trajectory: collections.deque = collections.deque(maxlen=traj_len)
        self.box = np.asarray(box, dtype=float)

    def observe(self, box: np.ndarray, score: float, class_id: int, ts: float) -> None:
        self.box = self.kf.correct(box)
        self.hits += 1
        self.hit_streak += 1
        self.time_since_update = 0
        self.score_sum += score
        self.votes[class_id] = self.votes.get(class_id, 0.0) + score
        cx, cy = (self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0
        self.trajectory.append((ts, float(cx), float(cy)))

    def snapshot(self, camera_id: str, labels: tuple[str, ...]) -> Track:
        margin = 1.0
        if self.votes:
            cid = max(self.votes, key=self.votes.__getitem__)
            total = max(sum(self.votes.values()), 1e-12)
            share = self.votes[cid] / total
            if len(self.votes) > 1:  # top share minus runner-up share
                margin = share - sorted(self.votes.values())[-2] / total
        else:
            cid, share = -1, 0.0
        label = labels[cid] if 0 <= cid < len(labels) else "unknown"
        return Track(
            track_id=self.track_id, camera_id=camera_id, state=self.state,
            box=tuple(float(v) for v in self.box), class_id=int(cid), label=label,
            confidence=self.score_sum / max(self.hits, 1), class_share=float(share),
            hits=self.hits, age=self.age, time_since_update=self.time_since_update,
            trajectory=tuple(self.trajectory), class_margin=float(margin),
        )


class Tracker:
    """Tracks objects of one camera. ``update`` is called once per frame."""

    def __init__(self, camera_id: str, params: TrackerParams | None = None) -> None:
        self.camera_id = camera_id
        self.params = params or TrackerParams()
        self._tracks: list[_TrackState] = []
        self._next_id = 1
        self._frames = 0

    def __len__(self) -> int:
        return len(self._tracks)

    def update(self, dets: Detections) -> TrackUpdate:
        p = self.params
        self._frames += 1
        keep = dets.scores >= p.min_score
        boxes, scores, cls = dets.boxes[keep], dets.scores[keep], dets.class_ids[keep]

        predicted = np.array([t.kf.predict() for t in self._tracks]).reshape(-1, 4)
        for t, b in zip(self._tracks, predicted):
            t.age += 1
            t.time_since_update += 1
            t.box = b
            if t.time_since_update > 1:
                t.hit_streak = 0

        matches, unmatched_t, unmatched_d = self._associate(predicted, boxes)
        for ti, di in matches:
            self._tracks[ti].observe(boxes[di], float(scores[di]), int(cls[di]), dets.timestamp)

        for di in unmatched_d:
            t = _TrackState(self._next_id, boxes[di], p.trajectory_len)
            self._next_id += 1
            t.observe(boxes[di], float(scores[di]), int(cls[di]), dets.timestamp)
            self._tracks.append(t)

        removed: list[Track] = []
        alive: list[_TrackState] = []
        for t in self._tracks:
            self._advance_state(t, dets.image_size)
            if t.state is TrackState.REMOVED:
                removed.append(t.snapshot(self.camera_id, dets.labels))
            else:
                alive.append(t)
        self._tracks = alive
        return TrackUpdate(
            camera_id=self.camera_id, frame_index=dets.frame_index, timestamp=dets.timestamp,
            tracks=tuple(t.snapshot(self.camera_id, dets.labels) for t in alive),
            removed=tuple(removed), image_size=dets.image_size,
        )

    def _advance_state(self, t: _TrackState, image_size: tuple[int, int]) -> None:
        p = self.params
        if t.time_since_update == 0:
            # SORT's warm-up: in the first min_hits frames a track confirms at once
            if t.state is not TrackState.TENTATIVE or t.hit_streak >= p.min_hits or self._frames <= p.min_hits:
                t.state = TrackState.CONFIRMED
            return
        cx, cy = (t.box[0] + t.box[2]) / 2.0, (t.box[1] + t.box[3]) / 2.0
        left_view = not (0 <= cx <= image_size[0] and 0 <= cy <= image_size[1])
        if t.state is TrackState.TENTATIVE:
            if t.time_since_update >= p.tentative_max_age:
                t.state = TrackState.REMOVED
        elif t.time_since_update > p.max_age or left_view:
            t.state = TrackState.REMOVED  # coasted too long, or its prediction left the image (an exit)
        else:
            t.state = TrackState.OCCLUDED

    def _associate(self, predicted: np.ndarray, boxes: np.ndarray):
        p = self.params
        n_t, n_d = len(predicted), len(boxes)
        if n_t == 0 or n_d == 0:
            return [], list(range(n_t)), list(range(n_d))
        iou = iou_matrix(predicted, boxes)
        rows, cols = linear_sum_assignment(-iou)
        matches = [(r, c) for r, c in zip(rows, cols) if iou[r, c] >= p.iou_threshold]
        mt = {r for r, _ in matches}
        md = {c for _, c in matches}
        # second chance for occluded tracks whose coasted box drifted off the object:
        # nearest centre within a fraction of the predicted box diagonal
        occ = [i for i in range(n_t) if i not in mt and self._tracks[i].state is TrackState.OCCLUDED]
        free = [j for j in range(n_d) if j not in md]
        if occ and free:
            pc = (predicted[occ, :2] + predicted[occ, 2:]) / 2.0
            dc = (boxes[free, :2] + boxes[free, 2:]) / 2.0
            diag = np.hypot(predicted[occ, 2] - predicted[occ, 0], predicted[occ, 3] - predicted[occ, 1])
            dist = np.linalg.norm(pc[:, None, :] - dc[None, :, :], axis=2) / np.maximum(diag[:, None], 1e-6)
            r2, c2 = linear_sum_assignment(dist)
            for r, c in zip(r2, c2):
                if dist[r, c] <= p.occluded_gate:
                    matches.append((occ[r], free[c]))
                    mt.add(occ[r])
                    md.add(free[c])
        return matches, [i for i in range(n_t) if i not in mt], [j for j in range(n_d) if j not in md]

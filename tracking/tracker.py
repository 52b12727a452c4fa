"""Multi-object tracker: batched Kalman prediction, three association passes
(high-score detections on IoU + direction + appearance, ByteTrack's pass for
low-score detections, OC-SORT's recovery on last observations), track states
tentative / confirmed / occluded / removed, coasting measured in seconds and
longer for tracks hidden behind another object, and a lifetime class vote.

Per-track numbers live in arrays indexed by track row (one batched Kalman
step per frame); per-track Python state (class votes, trajectory) lives in
``_Meta`` objects dropped with their row, so memory is bounded by the number
of live tracks times ``trajectory_len``.
"""
from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .association import assign, centre_distance, direction_score
from .geometry import centers, inside_share, ioa_matrix, iou_matrix
from .kalman import BatchKalman, xs_to_boxes
from .types import Detections, Track, TrackState

log = logging.getLogger(__name__)

_TENT, _CONF, _OCC = 0, 1, 2
_STATES = (TrackState.TENTATIVE, TrackState.CONFIRMED, TrackState.OCCLUDED)


@dataclass(frozen=True, slots=True)
class TrackerParams:
    iou_threshold: float = 0.3
    min_hits: int = 3
    # coasting, in seconds of the detections' timestamps: a track that vanished
    # in the open is dropped sooner than one hidden behind another object
    max_coast_s: float = 1.0
    max_coast_occluded_s: float = 3.0
    occlusion_ioa: float = 0.3  # covered share of a coasting box that counts as "hidden"
    max_age: int | None = None  # optional hard cap in frames (legacy)
    tentative_max_age: int = 2  # a tentative track survives one missed frame
    min_score: float = 0.0
    # ByteTrack: detections below high_score only extend existing tracks
    high_score: float = 0.55
    low_iou_threshold: float = 0.5
    # low-score detections extend tracks last matched within this many seconds
    # (ByteTrack uses the tracks of the previous frame only: 0)
    low_score_coast_s: float = 1.0
    # OC-SORT: direction consistency weight, its look-back, re-update after a gap,
    # and recovery matching on the last observed box. Direction and re-update
    # are off by default: on jittered detections (noisy MOT17) both added
    # identity switches (direction from a few noisy boxes is noise; the
    # re-update's straight line fits walkers worse than the coasted state)
    direction_weight: float = 0.0
    delta_t: int = 3
    # direction consistency only for tracks re-found after a gap: on a track
    # matched every frame, a few frames of jittered boxes give a noise direction
    direction_after_gap: bool = True
    observation_reupdate: bool = False
    observation_recovery: bool = True
    # appearance (Detections.embeddings): score weight, min cosine for matching a
    # coasting track beyond IoU, its centre-distance gate (x box diagonal), EMA
    appearance_weight: float = 0.5
    appearance_min_cos: float = 0.7
    appearance_gate: float = 2.0
    appearance_momentum: float = 0.9
    # a hidden track follows the median motion of matched tracks that moved with
    # it (a tray's dishes): neighbours within group_radius x its diagonal whose
    # velocity is >= group_velocity_tol x its diagonal per frame and within 25% of its own
    group_motion: bool = True
    group_radius: float = 1.5
    group_velocity_tol: float = 0.05
    trajectory_len: int = 64
    # a coasting track is removed at once when less than this share of its
    # predicted box is inside the image (it left the view); objects cut by
    # the image border keep their track while most of them is still inside
    exit_visible: float = 0.25
    # second-chance association for occluded tracks: centre distance relative
    # to the predicted box diagonal (0 disables)
    occluded_gate: float = 0.0
    # C-BIoU (Yang et al. 2023) for hidden tracks: a track that coasts behind
    # another object is also matched to the detections left over, with its
    # predicted box and theirs widened by this share of their size on every
    # side, since a walker re-emerges beside the occluder, often just off the
    # coasted box (0 disables; off by default: measured in docs/tracker_accuracy.md)
    buffer_iou: float = 0.0
    # the class vote when detections carry class probabilities (Detections.probs):
    # "soft" sums each frame's probabilities weighted by its score (class = the
    # largest sum, margin = its lead over the runner-up), so a dish that was 55 / 45
    # between two classes every frame gets a small margin and is marked for review;
    # "top" counts each frame's top class only (margin 1 after any number of 55 / 45 frames)
    class_vote: str = "soft"

    def __post_init__(self) -> None:
        if self.class_vote not in ("soft", "top"):
            raise ValueError(f"class_vote {self.class_vote!r}: 'soft' or 'top'")

    @classmethod
    def sort(cls) -> "TrackerParams":
        """Plain SORT (Bewley et al. 2016): one IoU pass, no coasting, no extra cues."""
        return cls(max_age=1, tentative_max_age=1, high_score=0.0, low_score_coast_s=0.0, direction_weight=0.0,
                   observation_reupdate=False, observation_recovery=False, appearance_weight=0.0, group_motion=False)

    @classmethod
    def from_config(cls, cfg) -> "TrackerParams":
        names = [f for f in cls.__dataclass_fields__ if hasattr(cfg, f)]
        return cls(**{n: getattr(cfg, n) for n in names})


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


class _Meta:
    """Per-track state that is not a number: class votes and trajectory."""

    __slots__ = ("votes", "psum", "score_sum", "trajectory", "_traj", "_vote")

    def __init__(self, traj_len: int) -> None:
        self.votes: dict[int, float] = {}  # class id -> summed score; bounded by #classes
        self.psum: np.ndarray | None = None  # score-weighted sum of class probabilities (soft vote)
        self.score_sum = 0.0
        self.trajectory: collections.deque = collections.deque(maxlen=traj_len)
        self._traj: tuple | None = ()
        self._vote: tuple[int, float, float] | None = None

    def move(self, ts: float, cx: float, cy: float) -> None:
        """A position without a detection (motion propagation): trajectory only, no class vote."""
        self.trajectory.append((ts, cx, cy))
        self._traj = None

    def observe(self, score: float, class_id: int, ts: float, cx: float, cy: float,
                probs: np.ndarray | None = None) -> None:
        self.score_sum += score
        self.votes[class_id] = self.votes.get(class_id, 0.0) + score
        if probs is not None:
            if self.psum is None or len(self.psum) != len(probs):
                self.psum = score * probs  # a new array (the frame's row is not kept)
            else:
                self.psum += score * probs
        self.trajectory.append((ts, cx, cy))
        self._traj = None
        self._vote = None

    def vote(self) -> tuple[int, float, float]:
        """(class id, its share, its share minus the runner-up's); cached until the next observation."""
        if self._vote is None:
            self._vote = self._count_vote()
        return self._vote

    def _count_vote(self) -> tuple[int, float, float]:
        if self.psum is not None and len(self.psum) > 1:  # soft vote
            total = float(self.psum.sum())
            if total > 0:
                cid = int(self.psum.argmax())
                top, second = np.partition(self.psum, -2)[-2:].tolist()[::-1]
                return cid, top / total, (top - second) / total
        if not self.votes:
            return -1, 0.0, 0.0
        if len(self.votes) == 1:  # the common case, without the ranking
            return next(iter(self.votes)), 1.0, 1.0
        total = max(sum(self.votes.values()), 1e-12)
        ranked = sorted(self.votes.values(), reverse=True)
        cid = max(self.votes, key=self.votes.__getitem__)
        second = ranked[1] if len(ranked) > 1 else 0.0
        return cid, ranked[0] / total, (ranked[0] - second) / total if len(ranked) > 1 else 1.0

    def traj(self) -> tuple:
        if self._traj is None:
            self._traj = tuple(self.trajectory)
        return self._traj


def _widen(b: np.ndarray, k: float) -> np.ndarray:
    """xyxy boxes grown by k x their width / height on every side."""
    wh = (b[:, 2:] - b[:, :2]) * k
    return np.c_[b[:, :2] - wh, b[:, 2:] + wh]


class Tracker:
    """Tracks objects of one camera. ``update`` is called once per frame."""

    def __init__(self, camera_id: str, params: TrackerParams | None = None) -> None:
        self.camera_id = camera_id
        self.params = params or TrackerParams()
        self._frames = 0
        self._skipped = 0  # frames propagated (detector skipped) since the last update
        self._span = 1  # frames the current update's detections stand for (1 + skipped)
        self._next_id = 1
        self._kf = BatchKalman()
        k = max(self.params.delta_t, 1) + 1  # observations kept for the direction
        self._a = {  # row-aligned per-track arrays
            "id": np.zeros(0, np.int64), "state": np.zeros(0, np.int8),
            "hits": np.zeros(0, np.int64), "streak": np.zeros(0, np.int64),
            "age": np.zeros(0, np.int64), "tsu": np.zeros(0, np.int64),
            "last_ts": np.zeros(0), "hidden": np.zeros(0, bool),
            "box": np.zeros((0, 4)), "obs": np.zeros((0, k, 4)), "nobs": np.zeros(0, np.int64),
            "x_obs": np.zeros((0, 7)), "P_obs": np.zeros((0, 7, 7)),
        }
        self._emb: np.ndarray | None = None  # (N, D) appearance per track, once seen
        self._meta: list[_Meta] = []
        self._labels: tuple[str, ...] = ()  # the detector's label set, for propagate's snapshots

    def __len__(self) -> int:
        return len(self._meta)

    # ---- one frame -------------------------------------------------------

    def update(self, dets: Detections) -> TrackUpdate:
        p, a = self.params, self._a
        self._frames += 1
        self._span, self._skipped = 1 + self._skipped, 0
        self._labels = dets.labels
        keep = dets.scores >= p.min_score
        boxes = dets.boxes[keep].astype(np.float64)
        scores = dets.scores[keep].astype(np.float64)
        cls = dets.class_ids[keep]
        emb = dets.embeddings[keep] if dets.embeddings is not None else None
        probs = dets.probs[keep].astype(np.float64) if dets.probs is not None and p.class_vote == "soft" else None
        high = scores >= p.high_score

        prev_box = a["box"].copy()
        pred = self._kf.predict()
        a["box"] = pred.copy()
        a["age"] += 1
        a["tsu"] += 1
        a["streak"][a["tsu"] > 1] = 0

        mt, md = self._associate(pred, boxes, scores, high, emb, dets.timestamp)
        self._apply_matches(mt, md, boxes, scores, cls, emb, dets.timestamp, probs)
        if p.group_motion:
            self._follow_group(mt, prev_box)

        spawn = high.copy()
        spawn[md] = False
        unmatched_d = np.flatnonzero(spawn)
        self._spawn(unmatched_d, boxes, scores, cls, emb, dets.timestamp, probs)

        removed = self._advance_states(mt, boxes, dets.timestamp, dets.image_size)
        labels = dets.labels
        removed_tracks = self._snapshots(np.flatnonzero(removed), labels)
        if removed.any():
            self._keep(~removed)
        return TrackUpdate(
            camera_id=self.camera_id, frame_index=dets.frame_index, timestamp=dets.timestamp,
            tracks=self._snapshots(np.arange(len(self._meta)), labels),
            removed=removed_tracks, image_size=dets.image_size,
        )

    def propagate(self, frame_index: int, timestamp: float, image_size: tuple[int, int],
                  boxes_by_track: Mapping[int, np.ndarray] | None = None, noise_scale: float = 4.0) -> TrackUpdate:
        """A frame the detector skipped (detection stride): every track advances one
        Kalman step; a track with a motion-measured box (``boxes_by_track``: track id ->
        xyxy, e.g. optical flow inside its last box) is corrected with it, weighted
        ``noise_scale`` times weaker than a detection. Nothing ages: hits, misses,
        states and coasting clocks only change on detection frames, so a stride of k
        never turns a followed track into a missed one. Returns the moved tracks
        (``removed`` is empty: removal is decided when the detector looks again)."""
        a, kf = self._a, self._kf
        self._skipped += 1
        a["box"] = kf.predict().copy()
        a["age"] += 1
        if boxes_by_track and len(a["id"]):
            row = {tid: i for i, tid in enumerate(a["id"].tolist())}
            hits = [(row[t], b) for t, b in boxes_by_track.items() if t in row]
            if hits:
                rows = np.array([r for r, _ in hits], np.intp)
                meas = np.asarray([b for _, b in hits], np.float64).reshape(-1, 4)
                a["box"][rows] = kf.update(rows, meas, noise_scale)
                for i, (cx, cy) in zip(rows.tolist(), centers(a["box"][rows]).tolist()):
                    self._meta[i].move(timestamp, cx, cy)
        return TrackUpdate(camera_id=self.camera_id, frame_index=frame_index, timestamp=timestamp,
                           tracks=self._snapshots(np.arange(len(self._meta)), self._labels),
                           removed=(), image_size=image_size)

    # ---- association -----------------------------------------------------

    def _associate(self, pred, boxes, scores, high, emb, ts) -> tuple[np.ndarray, np.ndarray]:
        """Matched (track rows, detection indices)."""
        p, a = self.params, self._a
        n_t = len(pred)
        if n_t == 0 or len(boxes) == 0:
            return np.zeros(0, np.intp), np.zeros(0, np.intp)
        hi = np.flatnonzero(high)
        lo = np.flatnonzero(~high)
        got_t: list[np.ndarray] = [np.zeros(0, np.intp)]
        got_d: list[np.ndarray] = [np.zeros(0, np.intp)]
        free_t = np.ones(n_t, bool)
        free_d = np.ones(len(boxes), bool)

        def take(pairs, rows, cols):
            t, d = rows[pairs[0]], cols[pairs[1]]
            got_t.append(t)
            got_d.append(d)
            free_t[t] = False
            free_d[d] = False

        # 1. every track vs high-score detections: IoU + direction (+ appearance)
        if len(hi):
            rows = np.arange(n_t)
            iou = iou_matrix(pred, boxes[hi])
            score = iou.copy()
            valid = iou >= p.iou_threshold
            if p.direction_weight > 0:
                ds = direction_score(self._directions(), self._last_obs(), boxes[hi], scores[hi])
                if p.direction_after_gap:
                    ds *= (a["tsu"] > 1)[:, None]
                score += p.direction_weight * ds
            if emb is not None and self._emb is not None and p.appearance_weight > 0:
                cos = self._emb @ emb[hi].T
                seen = np.any(self._emb != 0, axis=1)[:, None]
                score += np.where(seen, p.appearance_weight * cos, 0.0)
                # after an occlusion the coasted box may have drifted off the
                # object: a confident appearance match near it still counts
                lost = (a["tsu"] > 1)[:, None] & seen
                near = centre_distance(pred, boxes[hi]) <= p.appearance_gate
                valid |= lost & near & (cos >= p.appearance_min_cos)
            take(assign(score, valid), rows, hi)
        # 2. ByteTrack: tracks matched last frame vs low-score detections
        if len(lo):
            recent = (a["tsu"] == 1) | (ts - a["last_ts"] <= p.low_score_coast_s + 1e-9)
            rows = np.flatnonzero(free_t & recent)
            if len(rows):
                iou = iou_matrix(pred[rows], boxes[lo])
                take(assign(iou, iou >= p.low_iou_threshold), rows, lo)
        # 3. OC-SORT recovery: the track's last observed box vs what is left
        if p.observation_recovery:
            rows = np.flatnonzero(free_t & (a["nobs"] > 0))
            cols = hi[free_d[hi]]
            if len(rows) and len(cols):
                iou = iou_matrix(self._last_obs()[rows], boxes[cols])
                take(assign(iou, iou >= p.iou_threshold), rows, cols)
        # 3b. buffered IoU for hidden tracks vs the high-score detections left
        if p.buffer_iou > 0:
            rows = np.flatnonzero(free_t & (a["tsu"] > 1) & a["hidden"])
            cols = hi[free_d[hi]]
            if len(rows) and len(cols):
                iou = iou_matrix(_widen(pred[rows], p.buffer_iou), _widen(boxes[cols], p.buffer_iou))
                take(assign(iou, iou >= p.iou_threshold), rows, cols)
        # 4. optional second chance for occluded tracks by centre distance
        if p.occluded_gate > 0:
            rows = np.flatnonzero(free_t & (a["state"] == _OCC))
            cols = hi[free_d[hi]]
            if len(rows) and len(cols):
                dist = centre_distance(pred[rows], boxes[cols])
                take(assign(-dist, dist <= p.occluded_gate), rows, cols)
        return np.concatenate(got_t), np.concatenate(got_d)

    def _last_obs(self) -> np.ndarray:
        a = self._a
        return a["obs"][np.arange(len(a["obs"])), np.maximum(a["nobs"] - 1, 0) % a["obs"].shape[1]] \
            if len(a["obs"]) else np.zeros((0, 4))

    def _directions(self) -> np.ndarray:
        """Unit direction from the oldest kept observation to the latest (OC-SORT's
        velocity over delta_t observations); zero while fewer than two exist."""
        a = self._a
        n, k = len(a["obs"]), a["obs"].shape[1]
        if n == 0:
            return np.zeros((0, 2))
        first = a["obs"][np.arange(n), np.where(a["nobs"] > k, a["nobs"] % k, 0)]
        d = centers(self._last_obs()) - centers(first)
        norm = np.linalg.norm(d, axis=1, keepdims=True)
        return np.where((a["nobs"][:, None] >= 2) & (norm > 1e-6), d / np.maximum(norm, 1e-6), 0.0)

    # ---- state changes ---------------------------------------------------

    def _apply_matches(self, mt, md, boxes, scores, cls, emb, ts, probs=None) -> None:
        p, a, kf = self.params, self._a, self._kf
        if len(mt) == 0:
            return
        gap = a["tsu"][mt]
        if p.observation_reupdate and (gap > 1).any():
            # OC-SORT ORU: rerun the filter over the gap on a straight line of
            # virtual observations from the last real one, so the velocity
            # learned while coasting does not carry the error into the re-found track
            r, d = mt[gap > 1], md[gap > 1]
            kf.reupdate(r, a["x_obs"][r], a["P_obs"][r], self._last_obs()[r], boxes[d], gap[gap > 1])
        a["box"][mt] = kf.update(mt, boxes[md])
        a["x_obs"][mt], a["P_obs"][mt] = kf.x[mt], kf.P[mt]
        k = a["obs"].shape[1]
        a["obs"][mt, a["nobs"][mt] % k] = boxes[md]
        a["nobs"][mt] += 1
        a["hits"][mt] += 1
        # streak counts frames followed without a miss: under a detection stride a match
        # continues the frames propagated since the last detection (``_span``), so
        # min_hits means the same time whatever the stride
        a["streak"][mt] += np.where(a["streak"][mt] > 0, self._span, 1)
        a["tsu"][mt] = 0
        a["last_ts"][mt] = ts
        a["hidden"][mt] = False
        if emb is not None:
            self._blend_embeddings(mt, emb[md])
        meta = self._meta
        rows = probs[md] if probs is not None else itertools.repeat(None)
        for i, sc, cl, (cx, cy), pr in zip(mt.tolist(), scores[md].tolist(), cls[md].tolist(),
                                           centers(a["box"][mt]).tolist(), rows):
            meta[i].observe(sc, cl, ts, cx, cy, pr)

    def _blend_embeddings(self, rows, e) -> None:
        m = self.params.appearance_momentum
        if self._emb is None or self._emb.shape[1] != e.shape[1]:
            self._emb = np.zeros((len(self._meta), e.shape[1]), np.float32)
        old = self._emb[rows]
        seen = np.any(old != 0, axis=1)[:, None]
        new = np.where(seen, m * old + (1 - m) * e, e)
        self._emb[rows] = new / np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)

    def _follow_group(self, mt, prev_box) -> None:
        """A coasting track moves with the matched tracks that were moving with it."""
        p, a, kf = self.params, self._a, self._kf
        n_old = len(prev_box)
        hidden = np.flatnonzero((a["state"][:n_old] != _TENT) & (a["tsu"][:n_old] >= 1))
        if len(hidden) == 0 or len(mt) == 0:
            return
        mt = mt[a["tsu"][mt] == 0]
        mt = mt[mt < n_old]
        if len(mt) == 0:
            return
        near = centre_distance(prev_box[hidden], prev_box[mt]) <= p.group_radius
        vel_h, vel_m = kf.x[hidden, 4:6], kf.x[mt, 4:6]
        speed_m = np.linalg.norm(vel_m, axis=1)
        diag = np.hypot(prev_box[hidden, 2] - prev_box[hidden, 0], prev_box[hidden, 3] - prev_box[hidden, 1])
        speed_h = np.linalg.norm(vel_h, axis=1)
        # moving (not merely standing next to it) and moving the same way; once a
        # hidden track follows a group its velocity is the group's, so it keeps
        # following it while the tray slows down
        moving = np.maximum(speed_m[None, :], speed_h[:, None]) >= p.group_velocity_tol * diag[:, None]
        diff = np.linalg.norm(vel_h[:, None, :] - vel_m[None, :, :], axis=2)
        same = diff <= 0.25 * np.maximum(speed_m[None, :], speed_h[:, None])
        group = near & moving & same
        for r in np.flatnonzero(group.any(axis=1)):
            i = hidden[r]
            move = np.median(vel_m[group[r]], axis=0)
            kf.x[i, 0:2] = centers(prev_box[i:i + 1])[0] + move
            kf.x[i, 4:6] = move
            a["box"][i] = prev_box[i] + np.array([move[0], move[1], move[0], move[1]])

    def _spawn(self, idx, boxes, scores, cls, emb, ts, probs=None) -> None:
        if len(idx) == 0:
            return
        a, n = self._a, len(idx)
        self._kf.add(boxes[idx])
        k = a["obs"].shape[1]
        new = {
            "id": np.arange(self._next_id, self._next_id + n), "state": np.full(n, _TENT, np.int8),
            "hits": np.ones(n, np.int64), "streak": np.ones(n, np.int64), "age": np.zeros(n, np.int64),
            "tsu": np.zeros(n, np.int64), "last_ts": np.full(n, ts), "hidden": np.zeros(n, bool),
            "box": xs_to_boxes(self._kf.x[-n:]), "obs": np.zeros((n, k, 4)), "nobs": np.ones(n, np.int64),
            "x_obs": self._kf.x[-n:].copy(), "P_obs": self._kf.P[-n:].copy(),
        }
        new["obs"][:, 0] = boxes[idx]
        self._next_id += n
        for key, v in new.items():
            a[key] = np.concatenate([a[key], v.astype(a[key].dtype)])
        if self._emb is not None or emb is not None:
            d = emb.shape[1] if emb is not None else self._emb.shape[1]
            if self._emb is None:
                self._emb = np.zeros((len(self._meta), d), np.float32)
            add = emb[idx].astype(np.float32) if emb is not None and emb.shape[1] == d else np.zeros((n, d), np.float32)
            self._emb = np.concatenate([self._emb, add])
        c = centers(boxes[idx])
        for j, d in enumerate(idx):
            m = _Meta(self.params.trajectory_len)
            m.observe(float(scores[d]), int(cls[d]), ts, float(c[j, 0]), float(c[j, 1]),
                      None if probs is None else probs[d])
            self._meta.append(m)

    def _advance_states(self, mt, boxes, ts, image_size) -> np.ndarray:
        """Set each track's state; returns the mask of rows removed this frame."""
        p, a = self.params, self._a
        st, tsu = a["state"], a["tsu"]
        matched = tsu == 0
        # SORT's warm-up: in the first min_hits frames a track confirms at once
        confirm = matched & ((st != _TENT) | (a["streak"] >= p.min_hits) | (self._frames <= p.min_hits))
        st[confirm] = _CONF
        coast = ~matched
        removed = np.zeros(len(st), bool)
        if not coast.any():
            return removed
        rows = np.flatnonzero(coast)
        # hidden: a large share of the coasting box is covered by a detection
        # (any class: another dish, a hand) or by a matched track
        occluders = np.concatenate([boxes, a["box"][matched]])
        cover = ioa_matrix(a["box"][rows], occluders).max(axis=1) if len(occluders) else np.zeros(len(rows))
        a["hidden"][rows] |= cover >= p.occlusion_ioa
        left_view = inside_share(a["box"][rows], image_size) < p.exit_visible
        limit = np.where(a["hidden"][rows], p.max_coast_occluded_s, p.max_coast_s)
        too_old = (ts - a["last_ts"][rows]) > limit + 1e-9
        if p.max_age is not None:
            too_old |= tsu[rows] > p.max_age
        tent = st[rows] == _TENT
        gone = np.where(tent, tsu[rows] >= p.tentative_max_age, too_old | left_view)
        removed[rows[gone]] = True
        st[rows[~gone & ~tent]] = _OCC
        return removed

    def _keep(self, mask: np.ndarray) -> None:
        for k in self._a:
            self._a[k] = self._a[k][mask]
        self._kf.keep(mask)
        if self._emb is not None:
            self._emb = self._emb[mask]
        self._meta = [m for m, k in zip(self._meta, mask) if k]

    def _snapshots(self, rows: np.ndarray, labels: tuple[str, ...]) -> tuple[Track, ...]:
        """Track snapshots of ``rows``; the arrays are read out once, not per track."""
        if len(rows) == 0:
            return ()
        a, meta, cam, n_lab = self._a, self._meta, self.camera_id, len(labels)
        out = []
        for i, tid, st, box, hits, age, tsu in zip(
                rows.tolist(), a["id"][rows].tolist(), a["state"][rows].tolist(), a["box"][rows].tolist(),
                a["hits"][rows].tolist(), a["age"][rows].tolist(), a["tsu"][rows].tolist()):
            m = meta[i]
            cid, share, margin = m.vote()
            out.append(Track(tid, cam, _STATES[st], tuple(box), cid, labels[cid] if 0 <= cid < n_lab else "unknown",
                             m.score_sum / max(hits, 1), share, hits, age, tsu, m.traj(), margin))
        return tuple(out)

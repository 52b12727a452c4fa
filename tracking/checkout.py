"""Checkout logic: tracks crossing a line become crossings; crossings of the
dishes that travel together (one tray) become one CheckoutEvent, whose items
use each track's class vote as of the moment the tray closes."""
from __future__ import annotations

import collections
import uuid
from dataclasses import dataclass

import numpy as np

from .geometry import ioa_matrix, segments_intersect, side_of_line
from .tracker import TrackUpdate
from .types import CheckoutEvent, CheckoutItem, Crossing, Track, TrackState


@dataclass(frozen=True, slots=True)
class LineSpec:
    zone_id: str
    camera_id: str
    p1: tuple[float, float]  # normalised
    p2: tuple[float, float]
    direction: str = "any"
    min_track_hits: int = 3


class LineCrossingCounter:
    """Detects each track's first crossing of a checkout line.

    Per-track state (last centre, whether counted) is pruned when the tracker
    reports the track removed.
    """

    def __init__(self, spec: LineSpec) -> None:
        self.spec = spec
        self._last: dict[int, tuple[float, float]] = {}
        self._counted: set[int] = set()

    def __len__(self) -> int:
        return len(self._last)

    def count(self, update: TrackUpdate) -> list[Crossing]:
        s = self.spec
        w, h = update.image_size
        a = (s.p1[0] * w, s.p1[1] * h)
        b = (s.p2[0] * w, s.p2[1] * h)
        out: list[Crossing] = []
        for t in update.tracks:
            if t.state is not TrackState.CONFIRMED:
                continue  # only measured positions move a track across the line
            c = t.center
            prev = self._last.get(t.track_id)
            self._last[t.track_id] = c
            if prev is None or t.track_id in self._counted or t.hits < s.min_track_hits:
                continue
            if not segments_intersect(prev, c, a, b):
                continue
            before, after = side_of_line(prev, a, b), side_of_line(c, a, b)
            # y grows downwards: for a top-to-bottom line, "left" in the image is positive side
            if s.direction == "left_to_right" and not (before > 0 >= after):
                continue
            if s.direction == "right_to_left" and not (before < 0 <= after):
                continue
            self._counted.add(t.track_id)
            out.append(Crossing(update.camera_id, s.zone_id, t.track_id, update.timestamp, t.label, t.confidence,
                                t.class_share, t.class_margin, t))
        for t in update.removed:
            self._last.pop(t.track_id, None)
            self._counted.discard(t.track_id)
        return out


@dataclass(frozen=True, slots=True)
class TrayParams:
    """How crossings are grouped into trays (see CheckoutAssembler)."""

    gap_s: float = 1.5  # time rule: crossings closer than this are one tray (when motion says nothing)
    max_s: float = 10.0  # hard cap: a tray open this long is closed
    link_gap: float = 1.0  # space rule: box gap to the nearest member, in dish sizes
    speed_tol: float = 0.5  # motion rule: relative velocity difference to the tray's mean
    velocity_window_s: float = 0.5  # trajectory span a velocity is fitted over
    # dishes of one tray keep their distances: a crossing that closed in on every member it was tracked
    # beside (at least rigid_span_s) faster than closing_speed dish sizes per second, steadily over a
    # stretch of 2 x rigid_span_s, is another tray that caught up with this one (0: off)
    closing_speed: float = 0.3
    rigid_span_s: float = 0.75
    review_margin: float = 0.3  # an item whose class vote margin is below this needs review
    # ... or whose track's mean detection score is below this (0: off). A dish detector's scores are
    # calibrated so that each dish's validated threshold reads 0.6: below it, the track was mostly
    # seen under the threshold its dish is counted at
    review_confidence: float = 0.0
    # two crossings named the same dish whose boxes overlap this much (share of the smaller) are one
    # dish counted twice (a bottle boxed whole and by its cap became two tracks); 1: off
    same_dish_overlap: float = 0.3
    line: tuple[tuple[float, float], tuple[float, float]] | None = None  # normalised; enables "parked" trays

    @classmethod
    def from_config(cls, zcfg, calibrated_threshold: float | None = None) -> "TrayParams":
        """``calibrated_threshold``: the detector's score at which a dish is counted, when its scores
        are calibrated to one (a dish checkpoint: 0.6); the zone's ``review_confidence`` defaults to it."""
        rc = zcfg.review_confidence
        if rc is None:
            rc = calibrated_threshold or 0.0
        return cls(gap_s=zcfg.tray_gap_s, max_s=zcfg.tray_max_s, link_gap=zcfg.tray_link_gap,
                   speed_tol=zcfg.tray_speed_tol, velocity_window_s=zcfg.velocity_window_s,
                   closing_speed=zcfg.tray_closing_speed, rigid_span_s=zcfg.tray_rigid_span_s,
                   review_margin=zcfg.review_margin, review_confidence=rc, same_dish_overlap=zcfg.same_dish_overlap,
                   line=(tuple(zcfg.line.p1), tuple(zcfg.line.p2)))


def _slope(t: np.ndarray, v: np.ndarray) -> np.ndarray | None:
    """Least-squares rate of change of ``v`` (N,) or (N, k) over times ``t`` (N,); None when the
    times do not spread (fewer than two distinct)."""
    dt = t - t.mean()
    den = float(dt @ dt)
    if den <= 1e-12:
        return None
    return (dt @ (v - v.mean(axis=0))) / den


def track_velocity(track: Track, window_s: float) -> np.ndarray | None:
    """Least-squares (vx, vy) in px/s over the last ``window_s`` of the
    trajectory; None with fewer than two points or no time span."""
    if len(track.trajectory) < 2:
        return None
    tr = np.asarray(track.trajectory, dtype=float)
    tr = tr[tr[:, 0] >= tr[-1, 0] - window_s]
    return _slope(tr[:, 0], tr[:, 1:])


def _inside(track: Track, wh: tuple[float, float],
            image_size: tuple[int, int] | None) -> dict[float, tuple[float, float]]:
    """A track's trajectory points (time -> centre) where a box of the dish's whole size ``wh`` lay
    wholly in the image: a box cut by the border moves its centre at a fraction of the dish's speed."""
    w, h = wh
    W, H = image_size or (np.inf, np.inf)
    return {t: (x, y) for t, x, y in track.trajectory if w / 2 <= x <= W - w / 2 and h / 2 <= y <= H - h / 2}


def closing_speed(a: Track, b: Track, min_span_s: float, image_size: tuple[int, int] | None = None,
                  whole: tuple[tuple[float, float], tuple[float, float]] | None = None) -> float | None:
    """How fast ``a`` closed in on ``b`` while both were wholly in view (px/s): over any stretch of
    their shared trajectory 2 x ``min_span_s`` long (all of it when shorter), the centre distance's
    least-squares fall in each third of the stretch, the slowest third — the best stretch counts. A
    tray catching up with another closes in steadily, in every third (also when it rode touching the
    other tray afterwards); a hand pushing a dish, or two tracks swapping ids, jump within a third or
    two, and a tray turning as it slides keeps its distances. ``whole``: each dish's whole box size
    (w, h) for the in-view test (default: the present boxes). None when they share less than
    ``min_span_s``, or no stretch has three points in every third."""
    wa, wb = whole or ((a.box[2] - a.box[0], a.box[3] - a.box[1]), (b.box[2] - b.box[0], b.box[3] - b.box[1]))
    pa, pb = _inside(a, wa, image_size), _inside(b, wb, image_size)
    d = np.array([(t, np.hypot(x - pb[t][0], y - pb[t][1])) for t, (x, y) in sorted(pa.items()) if t in pb])
    if len(d) < 9 or d[-1, 0] - d[0, 0] < min_span_s:
        return None
    t = d[:, 0]
    span = min(2.0 * min_span_s, t[-1] - t[0])
    best = None
    for end in t[t >= t[0] + span - 1e-9]:
        third = np.digitize(t, end - span + span / 3 * np.arange(4)) - 1  # 0, 1, 2 inside the stretch
        parts = [d[third == k] for k in range(3)]
        parts[2] = d[(third == 2) | (t == end)]
        if min(len(p) for p in parts) >= 3:
            # each third holds >= 3 distinct frame times, so its slope exists
            fall = max(0.0, min(-float(_slope(p[:, 0], p[:, 1])) for p in parts))
            best = fall if best is None else max(best, fall)
    return best


def _whole(box, at_line) -> tuple[float, float]:
    """A dish's whole box size (w, h): the larger of its box now and at its crossing (a dish leaving
    the image is cut by the border now; at the line it was whole)."""
    w, h = box[2] - box[0], box[3] - box[1]
    if at_line is not None:
        w, h = max(w, at_line[2] - at_line[0]), max(h, at_line[3] - at_line[1])
    return float(w), float(h)


def _size(box) -> float:
    """A dish's size: sqrt of its box area (the unit of the space rules)."""
    return float(np.sqrt(max((box[2] - box[0]) * (box[3] - box[1]), 1.0)))


def _box_gap(a, b) -> float:
    """Euclidean gap between two xyxy boxes (0 when they overlap)."""
    dx = max(0.0, max(a[0], b[0]) - min(a[2], b[2]))
    dy = max(0.0, max(a[1], b[1]) - min(a[3], b[3]))
    return float(np.hypot(dx, dy))


def _point_segment_distance(p, a, b) -> float:
    p, a, b = (np.asarray(v, dtype=float) for v in (p, a, b))
    ab = b - a
    u = float(np.clip((p - a) @ ab / max(float(ab @ ab), 1e-12), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + u * ab)))


class CheckoutAssembler:
    """Groups crossings of one zone into trays.

    Dishes on one tray cross the line close in time *and* move together. A
    crossing joins the open tray when:

    * motion is known (the crossing track and tray members have snapshots):
      its box is within ``link_gap`` dish sizes (size = sqrt(box area), the
      larger of the two dishes, so a cup next to a plate links) of some
      member's box (members extrapolated along their velocity to the crossing
      time), directly or through a chain of dishes on screen that move with
      the tray and have yet to cross (a yogurt and a fruit at opposite edges
      of a tray are linked by the plate between them), and its velocity
      is within ``speed_tol`` of the members' mean velocity (plus half a dish
      size per second, so two nearly stopped dishes count as equal), and it
      did not close in on every member it was tracked beside (``closing_speed``:
      a faster tray that caught up with the one ahead touches it and moves
      at its speed, but its dishes had closed in on the other tray's). A clearly
      separate cluster (e.g. the next tray, a gap behind along the motion)
      starts a new tray even within ``gap_s``; a co-moving dish joins even after
      a longer pause (a tray stopped on the line);
    * motion is unknown: the time rule, crossings closer than ``gap_s``.

    ``tray_max_s`` always caps a tray. Called every frame (``assemble`` with
    the frame's TrackUpdate), an idle tray closes ``gap_s`` after its last
    crossing unless it is *parked*: a live member's box is still within
    ``link_gap`` dish sizes of the line (a dish linked to it may have yet to
    cross: the tray stopped on the line).

    The latest snapshot of each member track is kept while its tray is open
    (also after the track was removed: its final vote); at close each unit
    takes its label, class margin and confidence from it, since the vote keeps
    going after the crossing. State is bounded by the open tray's members and
    dropped at close.
    """

    def __init__(self, zone_id: str, camera_id: str, tray_gap_s: float = 1.5, tray_max_s: float = 10.0,
                 params: TrayParams | None = None) -> None:
        self.zone_id = zone_id
        self.camera_id = camera_id
        self.params = params or TrayParams(gap_s=tray_gap_s, max_s=tray_max_s)
        self._open: list[Crossing] = []
        self._latest: dict[int, tuple[float, Track, bool]] = {}  # track id -> (time, snapshot, live)
        self._on_screen: tuple[Track, ...] = ()  # the latest frame's tracks (possible links between members)
        self._image_size: tuple[int, int] | None = None

    @property
    def pending(self) -> int:
        return len(self._open)

    @property
    def tracked(self) -> int:
        """Member snapshots held (bounded by the open tray)."""
        return len(self._latest)

    def assemble(self, crossings: list[Crossing], now: float, update: TrackUpdate | None = None
                 ) -> list[CheckoutEvent]:
        """Add this frame's crossings; return trays that closed. ``now`` is the
        tray clock (the frame's timestamp); ``update`` refreshes member snapshots."""
        p = self.params
        if update is not None:
            self._observe(update)
        events: list[CheckoutEvent] = []
        for c in sorted(crossings, key=lambda c: c.timestamp):
            if self._open and not self._belongs(c):
                events.append(self._close())
            self._open.append(c)
            if c.track is not None and c.track_id not in self._latest:
                self._latest[c.track_id] = (c.timestamp, c.track, True)
        if self._open and (now - self._open[0].timestamp > p.max_s
                           or (now - self._open[-1].timestamp > p.gap_s and not self._parked(now))):
            events.append(self._close())
        return events

    def flush(self) -> list[CheckoutEvent]:
        """Close the open tray (at shutdown or end of stream) so nothing is lost."""
        return [self._close()] if self._open else []

    # -- grouping
    def _observe(self, update: TrackUpdate) -> None:
        self._image_size = update.image_size
        self._on_screen = tuple(update.tracks)
        if not self._open:
            return
        members = {c.track_id for c in self._open}
        for t in update.tracks:
            if t.track_id in members:
                self._latest[t.track_id] = (update.timestamp, t, True)
        for t in update.removed:
            if t.track_id in members:
                self._latest[t.track_id] = (update.timestamp, t, False)

    def _belongs(self, c: Crossing) -> bool:
        p = self.params
        if c.timestamp - self._open[0].timestamp > p.max_s:
            return False
        together = self._co_moving(c)
        if together is None:
            return c.timestamp - self._open[-1].timestamp <= p.gap_s
        return together

    def _co_moving(self, c: Crossing) -> bool | None:
        """True/False when motion decides, None when it cannot (no snapshots)."""
        p = self.params
        if c.track is None:
            return None
        members = [(ts, t) for ts, t, _ in self._latest.values() if 0 <= c.timestamp - ts <= p.gap_s]
        if not members:
            return None
        boxes, vels = [], []
        for ts, t in members:
            v = track_velocity(t, p.velocity_window_s)
            boxes.append(t.box if v is None else (np.asarray(t.box) + np.tile(v, 2) * (c.timestamp - ts)))
            if v is not None:
                vels.append(v)
        vm = np.mean(vels, axis=0) if vels else None
        if not self._linked(c.track, boxes, vm, {t.track_id for _, t in members}):
            return False
        if self._caught_up(c.track, [t for _, t in members]):
            return False
        cv = track_velocity(c.track, p.velocity_window_s)
        if cv is None or vm is None:
            return True  # co-located, motion unknown
        return self._moves_with(cv, vm, slack=0.5 * _size(c.track.box))

    def _caught_up(self, track: Track, members: list[Track]) -> bool:
        """Tracked beside some members long enough, and closing in on every one of them."""
        p = self.params
        if p.closing_speed <= 0:
            return False
        at_line = {c.track_id: c.track.box for c in self._open if c.track is not None}
        me = _whole(track.box, None)
        judged = []
        for m in members:
            other = _whole(m.box, at_line.get(m.track_id))
            v = closing_speed(track, m, p.rigid_span_s, self._image_size, (me, other))
            if v is not None:  # in dish sizes (sqrt of the whole box's area), the smaller dish's
                judged.append(v > p.closing_speed * np.sqrt(min(me[0] * me[1], other[0] * other[1])))
        return bool(judged) and all(judged)

    def _near(self, box, others, size=max) -> bool:
        """Within ``link_gap`` dish sizes of one of ``others``; ``size`` picks which of the two dishes."""
        return any(_box_gap(box, o) <= self.params.link_gap * size(_size(box), _size(o)) for o in others)

    def _moves_with(self, v: np.ndarray, vm: np.ndarray, slack: float = 0.0) -> bool:
        """Velocity ``v`` within ``speed_tol`` of the tray's ``vm``, plus ``slack`` px/s."""
        diff = float(np.linalg.norm(v - vm))
        return diff <= self.params.speed_tol * max(float(np.linalg.norm(v)), float(np.linalg.norm(vm))) + slack

    def _line_px(self) -> tuple[tuple[float, float], tuple[float, float]] | None:
        """The zone's line in pixels of the latest frame (None: no line, or no frame seen yet)."""
        p = self.params
        if p.line is None or self._image_size is None:
            return None
        w, h = self._image_size
        return (p.line[0][0] * w, p.line[0][1] * h), (p.line[1][0] * w, p.line[1][1] * h)

    def _linked(self, track: Track, boxes: list, vm: np.ndarray | None, members: set[int]) -> bool:
        """``track`` is near a member's box, or near a chain of on-screen dishes of the tray that have
        yet to cross, starting near a member: single linkage. A link is a confirmed track on the
        approach side of the line whose velocity matches the tray's without the size slack (a still
        plate would "move with" any tray) and each chain step spans at most ``link_gap`` times the
        *smaller* dish (a big plate of the next tray must not reach the tray ahead). A (nearly)
        stopped tray has no motion to tell its dishes from anything else on screen: no chain.
        Bounded by the frame's tracks."""
        if self._near(track.box, boxes):
            return True
        line = self._line_px()
        if vm is None or float(np.linalg.norm(vm)) < _size(track.box) or line is None:
            return False
        came_from = tuple(np.asarray(track.center) - vm * 0.5)  # half a second back along the tray's motion
        approach = np.sign(side_of_line(came_from, *line))
        links = []
        for t in self._on_screen:
            if (t.state is not TrackState.CONFIRMED or t.track_id == track.track_id or t.track_id in members
                    or np.sign(side_of_line(t.center, *line)) != approach):
                continue
            v = track_velocity(t, self.params.velocity_window_s)
            if v is not None and self._moves_with(v, vm):
                links.append(t.box)
        reached = list(boxes)
        while links:
            step = [self._near(lb, reached, min) for lb in links]
            grown = [lb for lb, near in zip(links, step) if near]
            if not grown:
                return False
            if self._near(track.box, grown, min):
                return True
            reached += grown
            links = [lb for lb, near in zip(links, step) if not near]
        return False

    def _parked(self, now: float) -> bool:
        p = self.params
        line = self._line_px()
        if line is None:
            return False
        return any(live and now - ts <= p.gap_s
                   and _point_segment_distance(t.center, *line) <= (0.5 + p.link_gap) * _size(t.box)
                   for ts, t, live in self._latest.values())

    # -- receipt
    def _same_dish(self, a: Crossing, b: Crossing) -> bool:
        """Whether two crossings (already named the same dish) are one dish: their boxes at the
        crossings, the earlier moved along its velocity to the later one's time, overlap by at
        least ``same_dish_overlap`` of the smaller box. Two dishes side by side overlap little
        (<= 0.17 on the checkout videos of the kiosk trays); a dish's second track overlaps its
        first by 0.34-0.60 there."""
        thr = self.params.same_dish_overlap
        if thr >= 1.0 or a.track is None or b.track is None:
            return False
        if a.timestamp > b.timestamp:
            a, b = b, a
        box = np.asarray(a.track.box, dtype=float)
        v = track_velocity(a.track, self.params.velocity_window_s)
        if v is not None:
            box = box + np.tile(v, 2) * (b.timestamp - a.timestamp)
        elif b.timestamp > a.timestamp:
            return False  # both boxes were on the line when they crossed: unmoved, any two would overlap
        other = np.asarray(b.track.box, dtype=float)[None]
        cover = ioa_matrix(box[None], other)[0, 0], ioa_matrix(other, box[None])[0, 0]
        return max(cover) >= thr

    def _close(self) -> CheckoutEvent:
        crossings, self._open = self._open, []
        latest, self._latest = self._latest, {}
        votes = []
        for c in crossings:
            snap = latest.get(c.track_id, (0.0, c.track, True))[1]
            label, conf, margin = ((snap.label, snap.confidence, snap.class_margin) if snap is not None
                                   else (c.label, c.confidence, c.class_margin))
            votes.append((conf, margin, label, c))
        # one unit per dish: (confidence, margin, crossing) by label; the surer track of a double counts
        by_label: dict[str, list[tuple[float, float, Crossing]]] = collections.defaultdict(list)
        for conf, margin, label, c in sorted(votes, key=lambda u: -u[0]):
            if not any(self._same_dish(c, k) for _, _, k in by_label[label]):
                by_label[label].append((conf, margin, c))
        units = [u for us in by_label.values() for u in us]
        kept = {id(c) for _, _, c in units}
        rm, rc = self.params.review_margin, self.params.review_confidence
        items = tuple(
            CheckoutItem(label=lbl, count=len(us), confidence=round(sum(u[0] for u in us) / len(us), 4),
                         needs_review=any(u[1] < rm or u[0] < rc for u in us))
            for lbl, us in sorted(by_label.items())
        )
        return CheckoutEvent(
            event_id=uuid.uuid4().hex, camera_id=self.camera_id, zone_id=self.zone_id,
            started_at=crossings[0].timestamp, ended_at=crossings[-1].timestamp, items=items,
            # the counted tracks only (a dish tracked twice is one unit), so evidence crops and
            # corrections line up with the items
            track_ids=tuple(c.track_id for c in crossings if id(c) in kept),
            confidence=round(min(u[0] for u in units), 4),
            needs_review=any(i.needs_review for i in items),
        )

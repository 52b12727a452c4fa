"""Checkout logic: tracks crossing a line become crossings; crossings that
happen close together in time (one tray) become one CheckoutEvent."""
from __future__ import annotations

import collections
import uuid
from dataclasses import dataclass

from .geometry import segments_intersect, side_of_line
from .tracker import TrackUpdate
from .types import CheckoutEvent, CheckoutItem, Crossing, TrackState


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
            out.append(Crossing(update.camera_id, s.zone_id, t.track_id, update.timestamp, t.label, t.confidence))
        for t in update.removed:
            self._last.pop(t.track_id, None)
            self._counted.discard(t.track_id)
        return out


class CheckoutAssembler:
    """Groups crossings of one zone into trays: a tray closes when no crossing
    arrived for ``tray_gap_s`` or when it has been open ``tray_max_s`` (a
    queue with no gaps still yields bounded trays). ``assemble`` is called
    every frame (with or without new crossings) so trays close on time."""

    def __init__(self, zone_id: str, camera_id: str, tray_gap_s: float, tray_max_s: float = 10.0) -> None:
        self.zone_id = zone_id
        self.camera_id = camera_id
        self.tray_gap_s = tray_gap_s
        self.tray_max_s = tray_max_s
        self._open: list[Crossing] = []

    @property
    def pending(self) -> int:
        return len(self._open)

    def assemble(self, crossings: list[Crossing], now: float) -> list[CheckoutEvent]:
        events: list[CheckoutEvent] = []
        for c in sorted(crossings, key=lambda c: c.timestamp):
            if self._open and (c.timestamp - self._open[-1].timestamp > self.tray_gap_s
                               or c.timestamp - self._open[0].timestamp > self.tray_max_s):
                events.append(self._close())
            self._open.append(c)
        if self._open and (now - self._open[-1].timestamp > self.tray_gap_s
                           or now - self._open[0].timestamp > self.tray_max_s):
            events.append(self._close())
        return events

    def flush(self) -> list[CheckoutEvent]:
        """Close the open tray (at shutdown or end of stream) so nothing is lost."""
        return [self._close()] if self._open else []

    def _close(self) -> CheckoutEvent:
        crossings, self._open = self._open, []
        by_label: dict[str, list[float]] = collections.defaultdict(list)
        for c in crossings:
            by_label[c.label].append(c.confidence)
        items = tuple(
            CheckoutItem(label=lbl, count=len(confs), confidence=round(sum(confs) / len(confs), 4))
            for lbl, confs in sorted(by_label.items())
        )
        conf = min(c.confidence for c in crossings)
        return CheckoutEvent(
            event_id=uuid.uuid4().hex, camera_id=self.camera_id, zone_id=self.zone_id,
            started_at=crossings[0].timestamp, ended_at=crossings[-1].timestamp, items=items,
            track_ids=tuple(c.track_id for c in crossings), confidence=round(conf, 4),
        )

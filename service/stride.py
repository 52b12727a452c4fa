"""Detection stride schedule: which camera frames the detector runs on, and the
adaptive k. One k for all cameras (they share one detector); each camera counts
its own frames, so every camera's first frame is detected.

Adaptation is a windowed rule with hysteresis. Over each ``interval_s`` the
detector stage reports its busy time, the frames it took and the frames the
cameras dropped unprocessed, and the age of the frames it detected:

* k rises by one while the detector does not keep up: dropped share above
  ``max_drop_share`` or frame age p90 above ``target_age_ms``;
* k falls by one when the detector would stay below ``busy_low`` of the wall
  time at k-1 (busy share x k / (k-1), detection cost dominating) and frame
  age is below half the target. The gap between the two rules keeps k from
  oscillating around the load where one detector just keeps up.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StrideDecision:
    """One adaptation window's measurements and the k chosen after it."""

    k: int
    busy: float  # detector busy seconds / window seconds
    drop_share: float  # camera frames dropped unprocessed / frames delivered
    age_p90_ms: float
    frames: int


class StrideController:
    """``due(camera)`` per frame the detector stage collects; ``record(...)`` after each
    batch; ``k`` is the stride now. Not thread-safe: the detector stage owns it."""

    def __init__(self, scfg, start: float) -> None:
        self.cfg = scfg
        self.k = scfg.k
        self._count: dict[str, int] = {}
        self._window_start = start
        self._busy = 0.0
        self._frames = 0
        self._ages: list[float] = []
        self._dropped0 = 0  # the cameras' dropped-frame counter at the window start
        self.history: list[StrideDecision] = []  # bounded: the last 64 decisions

    def due(self, camera_id: str) -> bool:
        """Whether this camera's next frame goes to the detector (else: motion only)."""
        n = self._count.get(camera_id, 0)
        self._count[camera_id] = n + 1
        return n % self.k == 0

    def record(self, now: float, busy_s: float, frames: int, ages_s: Iterable[float], dropped_total: int) -> None:
        """One pass of the detector stage: ``busy_s`` seconds of detection for ``frames``
        camera frames (detected or propagated), their ages at detection, and the cameras'
        total dropped-frame counter. Decides a new k once per ``interval_s``."""
        self._busy += busy_s
        self._frames += frames
        self._ages.extend(ages_s)
        span = now - self._window_start
        if not self.cfg.adaptive or span < self.cfg.interval_s:
            return
        dropped = max(dropped_total - self._dropped0, 0)
        busy = self._busy / span
        drop_share = dropped / max(dropped + self._frames, 1)
        age = 1000 * float(np.percentile(self._ages, 90)) if self._ages else 0.0
        c, k = self.cfg, self.k
        if (drop_share > c.max_drop_share or age > c.target_age_ms) and k < c.k_max:
            k += 1
        elif k > c.k_min and busy * k / (k - 1) < c.busy_low and age < c.target_age_ms / 2 \
                and drop_share <= c.max_drop_share:
            k -= 1
        if k != self.k:
            log.info("detection stride %d -> %d (detector busy %.0f%%, dropped %.0f%%, frame age p90 %.0f ms)",
                     self.k, k, 100 * busy, 100 * drop_share, age)
        self.k = k
        self.history = (self.history + [StrideDecision(k, busy, drop_share, age, self._frames)])[-64:]
        self._window_start, self._busy, self._frames, self._ages = now, 0.0, 0, []
        self._dropped0 = dropped_total

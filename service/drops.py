"""Frames dropped because the detector is slower than a camera: said in the log, not only counted.

A realtime source (an RTSP camera, a file paced at its fps) hands the detector its newest frame and
drops the ones it had no time for. A few are harmless; a steady share of them thins every track,
so trays merge into one receipt or dishes are missed (a 2-core machine running the default PyTorch
backend on a 25 fps camera drops about a third). ``/metrics`` counts them; nobody reads it on day one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ADVICE = ("a faster backend (detector.backend: openvino), detector.detect_async or detector.stride lets the "
          "detector keep up (README 'Inference backends', 'Detection stride')")


@dataclass
class DropWatch:
    """``observe`` once per pipeline loop with each camera's counters; a warning when over ``window_s``
    at least ``share`` of the frames read were dropped, at most once per ``quiet_s`` per camera."""

    window_s: float = 30.0
    share: float = 0.2
    quiet_s: float = 300.0
    _start: dict[str, tuple[float, int, int]] = field(default_factory=dict)  # camera -> (t, read, dropped)
    _said: dict[str, float] = field(default_factory=dict)

    def idle(self, camera: str) -> None:
        """The camera is not streaming (reconnecting, stalled): its next window starts when it streams again,
        so an outage does not dilute the rate the warning gives."""
        self._start.pop(camera, None)

    def observe(self, camera: str, now: float, read: int, dropped: int) -> str | None:
        t0, read0, dropped0 = self._start.setdefault(camera, (now, read, dropped))
        if read < read0 or dropped < dropped0:  # counters restarted (camera reopened)
            self._start[camera] = (now, read, dropped)
            return None
        if now - t0 < self.window_s:
            return None
        self._start[camera] = (now, read, dropped)
        n, d = read - read0, dropped - dropped0
        if n == 0 or d / n < self.share or now - self._said.get(camera, -1e18) < self.quiet_s:
            return None
        self._said[camera] = now
        dt = now - t0
        return (f"camera {camera}: {d / n:.0%} of its frames dropped over the last {dt:.0f} s (the detector kept up "
                f"with {(n - d) / dt:.1f} of {n / dt:.1f} frames/s): trays may merge into one receipt and dishes be "
                f"missed; {ADVICE}")

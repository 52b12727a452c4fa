"""Asynchronous detection (``detector.stride.detect_async``): the detector runs beside
the frames instead of in front of them. Every frame goes to tracking at once (moved by
optical flow); whenever the detector is free it takes the newest frame of each camera,
and its detections reach the tracking stage with a later frame of that camera, moved
onto it by the flow (``motion.LateDetections``). So a slow detector sets how often
tracks are corrected, never how late or how many frames are shown: frame age is the
flow's cost, and no frame waits for a forward pass or is dropped behind one."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from dishtrack.tracking.types import Frame

from .motion import LateDetections

log = logging.getLogger(__name__)


class AsyncDetection:
    """One detector worker thread; ``step`` is called by the detector stage with each
    collected batch (one frame per camera) and returns what to hand to tracking with
    it: per frame a ``LateDetections`` that finished since, or None. ``min_gap``: a
    camera's frames between two detections at least (``stride.k``). Not thread-safe: the
    detector stage owns it; only ``detect`` runs on the worker."""

    def __init__(self, detect: Callable[[list[Frame]], list], min_gap: int = 1,
                 on_batch: Callable[[float, int], None] | None = None,
                 on_error: Callable[[], None] | None = None) -> None:
        self._detect = detect
        self.min_gap = min_gap
        self._on_batch = on_batch
        self._on_error = on_error
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detector")
        self._running: tuple[Future, list[Frame]] | None = None
        self._ready: dict[str, LateDetections] = {}  # camera -> newest finished, not yet handed over
        self._last: dict[str, int] = {}  # camera -> frame index last sent to the detector
        self._newest: dict[str, Frame] = {}  # camera -> its newest frame not yet sent (one per camera)
        self.gap: dict[str, int] = {}  # camera -> frames between its last two detections (the stride it got)

    def _timed(self, frames: list[Frame]) -> list:
        t0 = time.perf_counter()
        out = self._detect(frames)
        if self._on_batch is not None:
            self._on_batch(time.perf_counter() - t0, len(frames))
        return out

    def _harvest(self) -> None:
        if self._running is None or not self._running[0].done():
            return
        fut, frames = self._running
        self._running = None
        try:
            dets = fut.result()
        except Exception:  # noqa: BLE001 - one bad batch must not stop the service
            log.exception("detector batch failed")
            if self._on_error is not None:
                self._on_error()
            return
        for f, d in zip(frames, dets):
            self._ready[f.camera_id] = LateDetections(d, f)

    def step(self, frames: list[Frame]) -> list[LateDetections | None]:
        """Hand over finished detections for these frames' cameras; when the detector is
        free, start it on the newest due frame of every camera (also those not in this
        batch: one fuller batch instead of several small ones)."""
        self._harvest()
        out = [self._ready.pop(f.camera_id, None) for f in frames]
        for f in frames:
            self._newest[f.camera_id] = f
        if self._running is None:
            due = [f for f in self._newest.values() if f.camera_id not in self._last  # first, or index restarted
                   or not 0 <= f.index - self._last[f.camera_id] < self.min_gap]
            if due:
                for f in due:
                    del self._newest[f.camera_id]
                    if f.camera_id in self._last:
                        self.gap[f.camera_id] = f.index - self._last[f.camera_id]
                    self._last[f.camera_id] = f.index
                self._running = (self._pool.submit(self._timed, due), due)
        return out

    def close(self, timeout: float = 2.0) -> None:
        """No new batches; waits up to ``timeout`` for one still running (the detector may be
        used again after the stage stops, and shutdown must still end within its deadline)."""
        if self._running is not None:
            wait([self._running[0]], timeout=timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

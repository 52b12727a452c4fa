"""Asynchronous detection (``detector.stride.detect_async``): the detector runs beside
the frames instead of in front of them. Every frame goes to tracking at once (moved by
optical flow); whenever the detector is free it takes the newest frame of each camera,
and its detections reach the tracking stage with a later frame of that camera, moved
onto it by the flow (``motion.LateDetections``). So a slow detector sets how often
tracks are corrected, never how late or how many frames are shown: frame age is the
flow's cost, and no frame waits for a forward pass or is dropped behind one."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from dishtrack.tracking.types import Frame

from .motion import LateDetections

log = logging.getLogger(__name__)
ERROR_BACKOFF_S = 0.1  # after a failed batch, as the synchronous detector stage waits


class AsyncDetection:
    """One daemon detector thread (a forward pass that hangs must not keep the process
    from exiting on SIGTERM). ``step`` is called by the detector stage with each collected
    batch (one frame per camera) and returns what to hand to tracking with it: per frame a
    ``LateDetections`` that finished since, or None. ``min_gap``: a camera's frames between
    two detections at least (``stride.k``). ``step`` and ``close`` belong to the detector
    stage; ``detect``, ``on_batch`` and ``on_error`` run on the detector thread."""

    def __init__(self, detect: Callable[[list[Frame]], list], min_gap: int = 1,
                 on_batch: Callable[[float, int], None] | None = None,
                 on_error: Callable[[], None] | None = None) -> None:
        self._detect = detect
        self.min_gap = min_gap
        self._on_batch = on_batch
        self._on_error = on_error
        self._job: list[Frame] | None = None  # the batch the thread works on (None: idle)
        self._result: tuple[list[Frame], list | None] | None = None  # finished, not yet harvested
        self._wake = threading.Condition()
        self._closed = False
        self._retry_at = 0.0
        self.busy_since: float | None = None  # wall clock the running batch started (health: a hung detector)
        self._ready: dict[str, LateDetections] = {}  # camera -> newest finished, not yet handed over
        self._last: dict[str, int] = {}  # camera -> frame index last sent to the detector
        self._newest: dict[str, Frame] = {}  # camera -> its newest frame not yet sent (one per camera)
        self.gap: dict[str, int] = {}  # camera -> frames between its last two detections (the stride it got)
        self._thread = threading.Thread(target=self._run, name="detector-async", daemon=True)

    def start(self) -> "AsyncDetection":
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._job is None and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                frames = self._job
            t0 = time.perf_counter()
            try:
                dets = self._detect(frames)
                if self._on_batch is not None:
                    self._on_batch(time.perf_counter() - t0, len(frames))
            except Exception:  # noqa: BLE001 - one bad batch must not stop the service
                log.exception("detector batch failed")
                if self._on_error is not None:
                    self._on_error()
                dets = None
            with self._wake:
                self._result, self._job = (frames, dets), None
                self._wake.notify_all()

    def _harvest(self) -> None:
        with self._wake:
            if self._result is None:
                return
            (frames, dets), self._result = self._result, None
        self.busy_since = None
        if dets is None:
            self._retry_at = time.monotonic() + ERROR_BACKOFF_S
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
        if self.busy_since is None and time.monotonic() >= self._retry_at:
            due = [f for f in self._newest.values() if f.camera_id not in self._last  # first, or index restarted
                   or not 0 <= f.index - self._last[f.camera_id] < self.min_gap]
            if due:
                for f in due:
                    del self._newest[f.camera_id]
                    step = f.index - self._last.get(f.camera_id, f.index)
                    if step > 0:
                        self.gap[f.camera_id] = step
                    self._last[f.camera_id] = f.index
                self.busy_since = time.time()
                with self._wake:
                    self._job = due
                    self._wake.notify_all()
        return out

    def close(self, timeout: float = 1.0) -> None:
        """No new batches; waits up to ``timeout`` for one still running (the detector may be
        used again after the stage stops; a hung one is left behind, its thread is a daemon)."""
        with self._wake:
            self._wake.wait_for(lambda: self._job is None, timeout=timeout)
            self._closed = True
            self._wake.notify_all()

"""Hand-over between pipeline stages: bounded queues that drop (and count) instead of
blocking the stage before them, and the annotation stage that draws and JPEG-encodes
only for cameras someone watches, off the detector's path."""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dishtrack.tracking.tracker import TrackUpdate

log = logging.getLogger(__name__)

WATCH_S = 3.0  # a camera whose JPEG was read this recently is "watched" (stream or snapshot)
IDLE_JPEG_FPS = 1.0  # unwatched cameras: one JPEG a second keeps /snapshot.jpg fresh enough


def next_jpeg_due(due: float, now: float, period: float) -> float:
    """When the next stream frame is due, kept on a grid of ``period``: rescheduling from ``now`` lost
    up to a whole frame interval each time, so 12 processed frames/s against a 10 fps stream gave
    every second frame (6 fps, seen on a live camera). Behind by more than a period (idle, unwatched):
    restart from now."""
    nxt = due + period
    return nxt if nxt > now - period else now + period


class DropQueue:
    """Bounded FIFO. A full queue drops its oldest item (counted) unless ``put(block=True)``,
    which waits for room (offline files: every frame counts) until ``abort`` is set.
    ``merge(dropped, next)``, when given, returns what replaces the item next in line after a
    drop: the part of the dropped one that must not be lost rides on with it."""

    def __init__(self, maxsize: int, on_drop: Callable[[], None] | None = None,
                 merge: Callable[[object, object], object] | None = None) -> None:
        self.maxsize = maxsize
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self.dropped = 0
        self._on_drop = on_drop
        self._merge = merge

    def put(self, item, block: bool = False, abort: threading.Event | None = None) -> None:
        with self._cond:
            while block and len(self._items) >= self.maxsize and not (abort and abort.is_set()):
                self._cond.wait(0.05)
            if len(self._items) >= self.maxsize:
                lost = self._items.popleft()
                self.dropped += 1
                if self._on_drop:
                    self._on_drop()
                if self._merge is not None:
                    if self._items:
                        self._items[0] = self._merge(lost, self._items[0])
                    else:
                        item = self._merge(lost, item)
            self._items.append(item)
            self._cond.notify_all()

    def get(self, timeout: float):
        """The oldest item, or None after ``timeout`` seconds."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            if not self._items:
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


@dataclass(frozen=True)
class AnnotateJob:
    """What one annotated frame needs; the image is the decoded frame (never modified)."""

    camera_id: str
    read_at: float  # wall clock the frame was read (stream frame age)
    image: np.ndarray
    update: TrackUpdate | None
    lines: tuple
    caption: str


class AnnotateStage:
    """One thread drawing + encoding the latest job per camera. ``offer`` never blocks: a
    camera's pending job is replaced by a newer one (counted in ``dropped``), so a slow
    encoder or viewer costs stream frames, never detections."""

    def __init__(self, annotate: Callable[[AnnotateJob], tuple], deliver: Callable[..., None],
                 on_drop: Callable[[str], None] | None = None) -> None:
        self._annotate, self._deliver, self._on_drop = annotate, deliver, on_drop
        self._pending: dict[str, AnnotateJob] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.dropped = 0
        self.encoded = 0
        self._thread = threading.Thread(target=self._run, name="annotate", daemon=True)

    def start(self) -> "AnnotateStage":
        self._thread.start()
        return self

    def offer(self, job: AnnotateJob) -> None:
        with self._cond:
            if job.camera_id in self._pending:
                self.dropped += 1
                if self._on_drop:
                    self._on_drop(job.camera_id)
            self._pending[job.camera_id] = job
            self._cond.notify()

    def stop(self, timeout: float = 5.0) -> None:
        """Encodes what is pending, then ends the thread."""
        self._stop.set()
        with self._cond:
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop.is_set():
                    self._cond.wait(0.5)
                jobs, self._pending = list(self._pending.values()), {}
            if not jobs and self._stop.is_set():
                return
            for job in jobs:
                try:
                    self._deliver(*self._annotate(job))
                    self.encoded += 1
                except Exception:  # noqa: BLE001 - a bad frame must not end the stream thread
                    log.exception("annotating %s failed", job.camera_id)


class JpegSlot:
    """Latest annotated JPEG of a camera with a sequence number for waiters. Reading it
    (``get``) marks the camera watched for WATCH_S, which is what asks the pipeline to
    annotate it at the stream rate."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seq = 0
        self.jpeg: bytes | None = None
        self.at = 0.0
        self.read_at = 0.0

    def put(self, jpeg: bytes) -> None:
        with self._lock:
            self.jpeg, self.seq, self.at = jpeg, self.seq + 1, time.time()

    def get(self) -> tuple[int, bytes | None]:
        with self._lock:
            self.read_at = time.time()
            return self.seq, self.jpeg

    def watched(self, now: float) -> bool:
        return now - self.read_at < WATCH_S

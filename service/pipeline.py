"""The processing loop: latest frames of all cameras -> one detector batch ->
per-camera tracker -> line crossings -> trays -> persisted, then published
events; annotated JPEGs for the MJPEG streams."""
from __future__ import annotations

import collections
import logging
import sqlite3
import threading
import time

from dishtrack.config import AppConfig
from dishtrack.tracking.checkout import CheckoutAssembler, LineCrossingCounter, LineSpec, TrayParams
from dishtrack.tracking.menu import Menu
from dishtrack.tracking.tracker import Tracker, TrackerParams, TrackUpdate
from dishtrack.tracking.types import CheckoutEvent

from .annotate import Annotator
from .hub import EventHub
from .ingest import CameraReader, SourceState
from .metrics import Metrics
from .retention import Retention
from .store import EventStore

log = logging.getLogger(__name__)


class JpegSlot:
    """Latest annotated JPEG of a camera with a sequence number for waiters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seq = 0
        self.jpeg: bytes | None = None
        self.at = 0.0

    def put(self, jpeg: bytes) -> None:
        with self._lock:
            self.jpeg, self.seq, self.at = jpeg, self.seq + 1, time.time()

    def get(self) -> tuple[int, bytes | None]:
        with self._lock:
            return self.seq, self.jpeg


class _Zone:
    def __init__(self, zcfg, camera_id: str) -> None:
        self.cfg = zcfg
        self.counter = LineCrossingCounter(LineSpec(zcfg.id, camera_id, tuple(zcfg.line.p1), tuple(zcfg.line.p2),
                                                    zcfg.line.direction, zcfg.min_track_hits))
        self.assembler = CheckoutAssembler(zcfg.id, camera_id, params=TrayParams.from_config(zcfg))


class Pipeline:
    def __init__(self, cfg: AppConfig, detector, store: EventStore, hub: EventHub, metrics: Metrics) -> None:
        self.cfg = cfg
        self.detector = detector
        self.store = store
        self.hub = hub
        self.metrics = metrics
        # a bad menu file fails here, at startup (MenuError names file and field)
        self.menu = Menu.load(cfg.menu.path, cfg.menu.timezone) if cfg.menu else None
        self.readers = {c.id: CameraReader(c) for c in cfg.cameras}
        params = TrackerParams.from_config(cfg.tracker)
        self.trackers = {c.id: Tracker(c.id, params) for c in cfg.cameras}
        self.zones = {c.id: [_Zone(z, c.id) for z in cfg.zones if z.camera == c.id] for c in cfg.cameras}
        self.streams = {c.id: JpegSlot() for c in cfg.cameras}
        self.last_update: dict[str, TrackUpdate] = {}
        self._last_image: dict[str, object] = {}  # one raw frame per camera, for the NO SIGNAL picture
        self._clock: dict[str, tuple[float, float]] = {}  # camera -> last frame's (tray time, wall read time)
        self.annotator = Annotator(cfg.api.mjpeg_quality)
        self._next_jpeg = {c.id: 0.0 for c in cfg.cameras}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipeline", daemon=True)
        self.finished = threading.Event()  # every source ended and the last trays were flushed
        self.events_emitted = 0
        self.loop_at: float | None = None  # wall clock of the last loop iteration (health: stuck loop)
        # the spool: events whose write failed (disk full, read-only, locked), oldest first, retried every
        # _RETRY_S; bounded by storage.spool_max (overflow drops the oldest, counted and logged); health
        # says failing while any wait
        self.unsaved: collections.deque = collections.deque()
        self.spool_max = cfg.storage.spool_max
        self.persist_error: str | None = None
        self._retry_at = 0.0
        self.retention = Retention(store, cfg.storage.retention, metrics)

    _RETRY_S = 1.0

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> "Pipeline":
        for r in self.readers.values():
            r.start()
        self._thread.start()
        self.retention.start()
        return self

    def stop(self, timeout: float = 2.5) -> None:
        """Stop readers and loop within ``timeout`` (SIGTERM must exit in 5 s whatever the
        cameras do), then flush open trays and make a last attempt at unsaved events."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        self.retention.stop(timeout=0.5)
        for r in self.readers.values():
            r.request_stop()  # all at once: a reader blocked on a frozen camera must not delay the others
        self._thread.join(timeout=max(0.1, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning("pipeline loop did not stop within %.1fs (detector busy); flushing trays anyway", timeout)
        for r in self.readers.values():
            r.stop(timeout=max(0.0, deadline - time.monotonic()))
        if not self.finished.is_set():
            self._flush_all()
        self._retry_at = 0.0
        self._retry_unsaved()
        if self.unsaved:
            log.error("%d checkout events could not be persisted at shutdown: %s", len(self.unsaved),
                      self.persist_error)

    # -- loop
    def _run(self) -> None:
        batch_max = self.cfg.detector.batch_max
        while not self._stop.is_set():
            self.loop_at = time.time()
            frames = [f for f in (r.slot.take() for r in self.readers.values()) if f is not None]
            if not frames:
                self._close_idle_trays()
                self._housekeep()
                if all(r.ended for r in self.readers.values()):
                    self._flush_all()
                    if self.unsaved:  # not finished while events wait for their write
                        self._stop.wait(0.1)
                        continue
                    self.finished.set()
                    log.info("all sources ended; pipeline idle")
                    return
                # short nap on one slot; any camera's frame is picked up within 20 ms
                next(iter(self.readers.values())).slot.wait(0.02)
                continue
            try:
                for i in range(0, len(frames), batch_max):
                    self._process(frames[i:i + batch_max])
            except Exception:  # noqa: BLE001 - one bad batch must not stop the service
                self.metrics.pipeline_errors.inc()
                log.exception("pipeline batch failed")
                time.sleep(0.1)
            self._housekeep()  # other cameras may be down while one streams

    def _process(self, frames) -> None:
        t0 = time.perf_counter()
        dets = self.detector.detect(frames)
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)
        self.metrics.batch_size.observe(len(frames))
        for frame, det in zip(frames, dets):
            cam = frame.camera_id
            t1 = time.perf_counter()
            upd = self.trackers[cam].update(det)
            self.metrics.tracker_seconds.observe(time.perf_counter() - t1)
            self.metrics.detections.labels(cam).inc(len(det))
            self.metrics.tracks.labels(cam).set(len(upd.tracks))
            self.last_update[cam] = upd
            self._clock[cam] = (frame.timestamp, frame.read_time)
            for z in self.zones[cam]:
                for ev in z.assembler.assemble(z.counter.count(upd), now=frame.timestamp, update=upd):
                    self._emit(ev)
            now = time.time()
            self._last_image[cam] = frame.image
            if now >= self._next_jpeg[cam]:
                self._next_jpeg[cam] = now + 1.0 / self.cfg.api.mjpeg_fps
                lines = [(z.cfg.line.p1, z.cfg.line.p2) for z in self.zones[cam]]
                caption = f"{cam} frame {frame.index} tracks {len(upd.confirmed)}"
                self.streams[cam].put(self.annotator.annotate(frame.image, upd, lines, caption))
            done = time.time()
            # live streams: age since capture (stream time; frames that sat in a buffer count); files: since read
            captured = frame.timestamp if "://" in self.readers[cam].cfg.source else frame.read_time
            self.metrics.observe_frame(cam, done - captured, done)

    def _emit(self, ev: CheckoutEvent) -> None:
        if self.menu is not None:
            ev = self.menu.apply(ev)
        if self.unsaved:  # keep the order: nothing overtakes an event waiting for its write
            self._spool(ev)
            return
        self._save_and_publish(ev)

    def _save_and_publish(self, ev: CheckoutEvent) -> bool:
        try:
            record = self._write(ev)  # persisted first: a crash after this loses nothing
        except Exception as e:  # noqa: BLE001 - disk full, locked, read-only: keep it and retry
            self.metrics.write_failures.inc()
            if not self.unsaved or self.unsaved[0] is not ev:
                self._spool(ev)
            if self.persist_error is None:
                log.error("cannot persist checkout event %s (kept, retrying): %s", ev.event_id, e)
            self.persist_error = f"{type(e).__name__}: {e}"
            self.metrics.pipeline_errors.inc()
            return False
        if self.persist_error is not None:
            log.warning("events are persisted again")
            self.persist_error = None
        self.metrics.events.labels(ev.camera_id, ev.zone_id).inc()
        self.events_emitted += 1
        log.info("checkout %s %s: %s%s%s", ev.camera_id, ev.zone_id,
                 ", ".join(f"{i.count}x {i.label}" for i in ev.items),
                 "" if ev.total is None else f" = {ev.total:.2f} {ev.currency}",
                 " (needs review)" if ev.needs_review else "")
        self.hub.publish(record)
        return True

    def _write(self, ev: CheckoutEvent) -> dict:
        try:
            return self.store.save(ev)
        except sqlite3.IntegrityError:  # a retried write whose first attempt did land: stored once
            record = self.store.get(ev.event_id)
            if record is None:
                raise
            return record

    def _spool(self, ev: CheckoutEvent) -> None:
        if len(self.unsaved) >= self.spool_max:
            lost = self.unsaved.popleft()
            self.metrics.spool_dropped.inc()
            log.error("event spool full (%d): checkout event %s dropped unsaved", self.spool_max, lost.event_id)
        self.unsaved.append(ev)
        self.metrics.unsaved.set(len(self.unsaved))

    def _retry_unsaved(self) -> None:
        now = time.time()
        if not self.unsaved or now < self._retry_at:
            return
        self._retry_at = now + self._RETRY_S
        while self.unsaved and self._save_and_publish(self.unsaved[0]):
            self.unsaved.popleft()
        self.metrics.unsaved.set(len(self.unsaved))

    def _tray_now(self, cam: str, wall: float) -> float | None:
        """A camera's tray clock while no frame arrives: its last frame time
        plus the wall time since. None for a file read as fast as possible
        (realtime: false): its media time only advances with frames."""
        reader = self.readers[cam]
        if cam not in self._clock or not (reader.cfg.realtime or "://" in reader.cfg.source):
            return None
        ts, read_at = self._clock[cam]
        return ts + (wall - read_at)

    def _close_idle_trays(self) -> None:
        wall = time.time()
        for cam, zones in self.zones.items():
            now = self._tray_now(cam, wall)
            if now is None:
                continue
            for z in zones:
                for ev in z.assembler.assemble([], now=now):
                    self._emit(ev)

    def _flush_all(self) -> None:
        for zones in self.zones.values():
            for z in zones:
                for ev in z.assembler.flush():
                    self._emit(ev)

    def refresh_gauges(self, statuses: dict | None = None) -> None:
        """Copy reader and hub counters into the Prometheus gauges (cheap; also called per scrape)."""
        m = self.metrics
        statuses = statuses or {cam: r.status() for cam, r in self.readers.items()}
        for cam, st in statuses.items():
            m.frames_read.labels(cam).set(st.frames_read)
            m.frames_dropped.labels(cam).set(st.frames_dropped)
            m.reconnects.labels(cam).set(st.reconnects)
            m.stalls.labels(cam).set(st.stalls)
            m.camera_up.labels(cam).set(1 if st.state is SourceState.STREAMING else 0)
        for cam, zones in self.zones.items():
            for z in zones:
                m.open_trays.labels(cam, z.cfg.id).set(z.assembler.pending)
        m.ws_subscribers.set(self.hub.subscribers)
        m.db_bytes.set(self.store.size_bytes())
        m.ws_dropped.set(self.hub.dropped_subscribers)

    def _housekeep(self) -> None:
        """Once per loop: gauges, and NO SIGNAL frames (1/s) for cameras that are down, so
        viewers of their MJPEG stream do not watch a frozen picture."""
        self._retry_unsaved()
        statuses = {cam: r.status() for cam, r in self.readers.items()}
        now = time.time()
        for cam, st in statuses.items():
            if st.state not in (SourceState.STREAMING, SourceState.ENDED) and now - self.streams[cam].at > 1.0:
                self.streams[cam].put(self.annotator.annotate_offline(self._last_image.get(cam), cam, st.state.value))
        self.refresh_gauges(statuses)

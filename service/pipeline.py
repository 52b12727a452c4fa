"""The processing stages: per-camera reader threads (ingest) -> one detector stage
batching the latest frames of all cameras -> tracking, line crossings, trays,
persisted then published events -> annotation + JPEG encoding for watched
cameras. Stages hand over through bounded queues that drop and count; a slow
viewer or encoder never stalls detection."""
from __future__ import annotations

import collections
import logging
import threading
import time

from dishtrack.config import AppConfig
from dishtrack.tracking.checkout import CheckoutAssembler, LineCrossingCounter, LineSpec, TrayParams
from dishtrack.tracking.menu import Menu
from dishtrack.tracking.tracker import Tracker, TrackerParams, TrackUpdate
from dishtrack.tracking.types import CheckoutEvent

from .annotate import Annotator
from .async_detect import AsyncDetection
from .drops import DropWatch
from .evidence import EvidenceKeeper
from .hub import EventHub
from .ingest import CameraReader, LatestFrameSlot, SourceState, is_stream
from .metrics import Metrics
from .motion import FlowParams, FlowPropagator, LateDetections, hand_on, track_frame
from .retention import Retention
from .stages import IDLE_JPEG_FPS, AnnotateJob, AnnotateStage, DropQueue, JpegSlot, next_jpeg_due
from .store import EventStore
from .stride import StrideController

log = logging.getLogger(__name__)

__all__ = ["JpegSlot", "Pipeline"]
TRACK_QUEUE_BATCHES = 4  # detector batches waiting for the tracking stage before the oldest is dropped


class _Zone:
    def __init__(self, zcfg, camera_id: str, calibrated_threshold: float | None = None) -> None:
        self.cfg = zcfg
        self.counter = LineCrossingCounter(LineSpec(zcfg.id, camera_id, tuple(zcfg.line.p1), tuple(zcfg.line.p2),
                                                    zcfg.line.direction, zcfg.min_track_hits))
        self.assembler = CheckoutAssembler(zcfg.id, camera_id, params=TrayParams.from_config(zcfg, calibrated_threshold))


class Pipeline:
    def __init__(self, cfg: AppConfig, detector, store: EventStore, hub: EventHub, metrics: Metrics,
                 publishers=None, corrections=None) -> None:
        self.cfg = cfg
        self.publishers = publishers  # outbox.Outbox (MQTT, webhooks) or None; submit() never blocks
        self.detector = detector
        self.store = store
        self.hub = hub
        self.metrics = metrics
        # a bad menu file fails here, at startup (MenuError names file and field)
        self.menu = Menu.load(cfg.menu.path, cfg.menu.timezone) if cfg.menu else None
        labels = cfg.detector.classes or getattr(detector, "labels", None)
        if self.menu is not None and labels:
            warnings, notes = self.menu.label_problems(labels)
            for w in warnings:
                log.warning("%s", w)
            for n in notes:
                log.info("%s", n)
        for w in cfg.zone_problems():
            log.warning("%s", w)
        self.drop_watch = DropWatch()  # warns when a camera's frames are dropped for a slow detector
        self._arrived = threading.Event()  # set by any camera's slot on a new frame
        self.readers = {c.id: CameraReader(c, LatestFrameSlot(self._arrived)) for c in cfg.cameras}
        params = TrackerParams.from_config(cfg.tracker)
        self.trackers = {c.id: Tracker(c.id, params) for c in cfg.cameras}
        # a dish checkpoint's calibrated threshold: the zones' review_confidence default
        self._calibrated = getattr(detector, "calibrated_threshold", None)
        self.zones = {c.id: [_Zone(z, c.id, self._calibrated) for z in cfg.zones if z.camera == c.id]
                      for c in cfg.cameras}
        self.streams = {c.id: JpegSlot() for c in cfg.cameras}
        self.last_update: dict[str, TrackUpdate] = {}
        self._last_image: dict[str, object] = {}  # one raw frame per camera, for the NO SIGNAL picture
        self._clock: dict[str, tuple[float, float]] = {}  # camera -> last frame's (tray time, wall read time)
        self.annotator = Annotator(cfg.api.mjpeg_quality)
        self._next_jpeg = {c.id: 0.0 for c in cfg.cameras}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipeline", daemon=True)  # tracking stage
        self._detect_thread = threading.Thread(target=self._detect_loop, name="detect", daemon=True)
        # offline files (realtime: false) must not lose a frame: there the queue pushes back instead
        self._offline = all(not c.realtime and not is_stream(c.source) for c in cfg.cameras)
        self._annotate = AnnotateStage(self._draw, self._deliver_jpeg,
                                       on_drop=lambda cam: metrics.stage_dropped.labels("annotate").inc())
        self._detect_at: float | None = None
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
        # detection stride (detector.stride): None at k = 1, not adaptive (every frame detected)
        scfg = cfg.detector.stride
        self.stride = (StrideController(scfg, time.time()) if (scfg.k > 1 or scfg.adaptive) and not scfg.detect_async
                       else None)
        # asynchronous detection: the detector beside the frames, its detections moved onto later frames by flow
        self._async = (AsyncDetection(detector.detect, scfg.k, self._observe_batch, metrics.pipeline_errors.inc)
                       if scfg.detect_async else None)
        if self._async is not None and any(not is_stream(c.source) and not c.realtime for c in cfg.cameras):
            log.warning("detector.stride.detect_async with a file read as fast as possible (realtime: false): "
                        "tracking outruns the detector, results depend on this machine's speed")
        # a dropped batch's detections ride on with the next one (hand_on): under a stride or asynchronous
        # detection they are the only correction the tracks get for several frames (without one, every
        # frame has its own, and a dropped batch is dropped whole)
        self._tracks = DropQueue(TRACK_QUEUE_BATCHES, on_drop=lambda: metrics.stage_dropped.labels("track").inc(),
                                 merge=hand_on if self.stride is not None or self._async is not None else None)
        self._flow = {c.id: self._new_flow() for c in cfg.cameras}
        # evidence crops (tracking stage, off the detector's path) stored with each event for review
        self.corrections = corrections
        self.evidence = (EvidenceKeeper.from_config(cfg.corrections)
                         if corrections is not None and cfg.corrections.evidence else None)
        # cluster (cluster.ClusterMember): ``fence(camera)`` False = another node may hold the camera now,
        # its frames are dropped; None: every camera is local (SQLite, one node)
        self.fence = None
        self._released: collections.deque = collections.deque()  # cameras whose trays to flush, state to reset
        self._reset_at: dict[str, float] = {}  # camera -> wall clock its tracking state was last reset

    def _new_flow(self):
        scfg = self.cfg.detector.stride
        striding = self.stride is not None or self._async is not None
        return FlowPropagator(FlowParams.from_config(scfg)) if striding and scfg.flow else None

    def _observe_batch(self, seconds: float, frames: int) -> None:
        self.metrics.batch_seconds.observe(seconds)
        self.metrics.batch_size.observe(frames)
        self.metrics.frame_detect_seconds.observe(seconds / frames)

    _RETRY_S = 1.0

    @property
    def alive(self) -> bool:
        """Every stage thread runs (the detector stage may have ended with its input)."""
        detect_ok = self._detect_thread.is_alive() or all(r.ended for r in self.readers.values())
        return self._thread.is_alive() and detect_ok

    @property
    def loop_at(self) -> float | None:
        """Wall clock of the least recent stage iteration (health: a stuck stage)."""
        stamps = [self._track_at]
        if self._detect_thread.is_alive():
            stamps.append(self._detect_at)
            if self._async is not None:  # the stage loop runs on; a hung forward pass must still show
                stamps.append(self._async.busy_since)
        stamps = [t for t in stamps if t is not None]
        return min(stamps) if stamps else None

    @loop_at.setter
    def loop_at(self, value: float | None) -> None:
        self._track_at = value

    def start(self) -> "Pipeline":
        for r in self.readers.values():
            if self.fence is None:  # in a cluster cameras start as their leases are won
                r.start()
        self._annotate.start()
        if self._async is not None:
            self._async.start()
        self._detect_thread.start()
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
        self._detect_thread.join(timeout=max(0.1, deadline - time.monotonic()))
        if self._async is not None:  # a running batch gets a share of the deadline, not all of it
            self._async.close(timeout=min(1.0, max(0.0, deadline - time.monotonic()) / 2))
        self._thread.join(timeout=max(0.1, deadline - time.monotonic()))
        if self._thread.is_alive() or self._detect_thread.is_alive():
            log.warning("pipeline loop did not stop within %.1fs (detector busy); flushing trays anyway", timeout)
        self._annotate.stop()
        for r in self.readers.values():
            r.stop(timeout=max(0.0, deadline - time.monotonic()))
        self._apply_released()
        if not self.finished.is_set():
            self._flush_all()
        self._retry_at = 0.0
        self._retry_unsaved()
        if self.unsaved:
            log.error("%d checkout events could not be persisted at shutdown: %s", len(self.unsaved),
                      self.persist_error)

    # -- cluster: cameras started and stopped as leases are won and lost (cluster.ClusterMember's thread)
    def is_local(self, cam: str) -> bool:
        return self.fence is None or self.fence(cam)

    def start_camera(self, cam: str) -> None:
        """Read ``cam`` here (its lease was won): a fresh reader, tracker state reset on release."""
        old = self.readers[cam]
        old.stop(timeout=0.5)
        self.readers[cam] = CameraReader(old.cfg, LatestFrameSlot(self._arrived)).start()

    def stop_camera(self, cam: str, timeout: float = 2.0) -> None:
        """Stop reading ``cam`` (lease lost or handed over); the tracking stage then flushes its open
        trays into the store (nothing seen here is lost) and resets its tracker for a later return."""
        old = self.readers[cam]
        self.readers[cam] = CameraReader(old.cfg, LatestFrameSlot(self._arrived))  # not started: not ours
        old.stop(timeout=timeout)
        self._released.append(cam)

    def _apply_released(self) -> None:
        """Tracking stage: flush and reset cameras given up since the last batch."""
        while self._released:
            cam = self._released.popleft()
            self._flush(cam)
            self.trackers[cam] = Tracker(cam, TrackerParams.from_config(self.cfg.tracker))
            self.zones[cam] = [_Zone(z.cfg, cam, self._calibrated) for z in self.zones[cam]]
            self._flow[cam] = self._new_flow()
            self._reset_at[cam] = time.time()
            self._clock.pop(cam, None)
            self.last_update.pop(cam, None)

    # -- detector stage
    def _collect(self, batch_max: int, wait_s: float) -> list:
        """Latest frame of each camera, one per camera, at most ``batch_max``. When some streaming
        cameras have no new frame yet, wait up to ``wait_s`` for them: one fuller batch costs
        less than two forward passes (and on a GPU much less)."""
        self._arrived.clear()
        frames, seen = [], set()
        deadline = None
        while True:
            for cam, r in self.readers.items():
                if cam not in seen and len(frames) < batch_max:
                    f = r.slot.take()
                    if f is not None:
                        frames.append(f)
                        seen.add(cam)
            if not frames or len(frames) >= batch_max or wait_s <= 0:
                return frames
            waiting = sum(1 for cam, r in self.readers.items() if cam not in seen and not r.ended
                          and r.status().state is SourceState.STREAMING)
            if not waiting:
                return frames
            now = time.monotonic()
            deadline = deadline or now + wait_s
            if now >= deadline:
                return frames
            self._arrived.clear()
            self._arrived.wait(deadline - now)

    def _detect_loop(self) -> None:
        dcfg = self.cfg.detector
        batch_max, wait_s = dcfg.batch_max, dcfg.batch_wait_ms / 1000.0
        while not self._stop.is_set():
            self._detect_at = time.time()
            frames = self._collect(batch_max, wait_s)
            if not frames:
                if all(r.ended for r in self.readers.values()):
                    log.info("all sources ended; detector stage done")
                    return
                self._arrived.wait(0.05)  # woken by any camera's next frame
                continue
            if self._async is not None:
                dets = self._async.step(frames)
                if self._async.gap:
                    self.metrics.detection_stride.set(sum(self._async.gap.values()) / len(self._async.gap))
                self._tracks.put((frames, dets), block=self._offline, abort=self._stop)
                continue
            try:
                t0 = time.perf_counter()
                todo = frames if self.stride is None else [f for f in frames if self.stride.due(f.camera_id)]
                dets = self.detector.detect(todo) if todo else []
                dt = time.perf_counter() - t0
                if todo:
                    self._observe_batch(dt, len(todo))
                if self.stride is not None:
                    dets = self._stride_step(frames, todo, dets, dt)
            except Exception:  # noqa: BLE001 - one bad batch must not stop the service
                self.metrics.pipeline_errors.inc()
                log.exception("detector batch failed")
                time.sleep(0.1)
                continue
            self._tracks.put((frames, dets), block=self._offline, abort=self._stop)

    def _stride_step(self, frames, todo, dets, busy_s: float) -> list:
        """Detection stride: detections aligned with ``frames`` (None = skipped, moved by flow
        in the tracking stage); the load it saw goes to the adaptive k."""
        by_frame = {id(f): d for f, d in zip(todo, dets)}
        now = time.time()
        dropped = sum(r.status().frames_dropped for r in self.readers.values())
        self.stride.record(now, busy_s, len(frames), [now - f.read_time for f in todo], dropped)
        self.metrics.detection_stride.set(self.stride.k)
        return [by_frame.get(id(f)) for f in frames]

    def _track(self, frame, det):
        """Tracker step of one camera frame; ``det`` None: a frame the detector skipped."""
        cam = frame.camera_id
        if self.stride is None and self._async is None:
            return self.trackers[cam].update(det)
        return track_frame(self.trackers[cam], frame, det, self._flow[cam], self.last_update.get(cam),
                           self.cfg.detector.stride.flow_noise)

    # -- tracking stage
    def _run(self) -> None:
        while not self._stop.is_set():
            self.loop_at = time.time()
            item = self._tracks.get(0.05)
            self._apply_released()
            if item is None:
                self._close_idle_trays()
                self._housekeep()
                if not self._detect_thread.is_alive() and not len(self._tracks) \
                        and all(r.ended for r in self.readers.values()):
                    self._flush_all()
                    if self.unsaved:  # not finished while events wait for their write
                        self._stop.wait(0.1)
                        continue
                    self.finished.set()
                    log.info("all sources ended; pipeline idle")
                    return
                continue
            try:
                self._process(*item)
            except Exception:  # noqa: BLE001 - one bad batch must not stop the service
                self.metrics.pipeline_errors.inc()
                log.exception("pipeline batch failed")
            self._housekeep()  # other cameras may be down while one streams

    def _process(self, frames, dets) -> None:
        for frame, det in zip(frames, dets):
            cam = frame.camera_id
            if self.fence is not None and not self.fence(cam):
                continue  # lease lost (or paused past it): another node may be reading this camera now
            if isinstance(det, LateDetections) and (det.source.read_time < self._reset_at.get(cam, 0.0)
                                                    or det.source.index >= frame.index):
                det = None  # detected before the camera's state was reset (lease released, camera restarted)
            t1 = time.perf_counter()
            upd = self._track(frame, det)
            self.metrics.tracker_seconds.observe(time.perf_counter() - t1)
            self.metrics.detections.labels(cam).inc(len(det) if det is not None else 0)
            self.metrics.tracks.labels(cam).set(len(upd.tracks))
            self.last_update[cam] = upd
            if self.evidence is not None and self.zones[cam]:
                self.evidence.observe(frame, upd)
            self._clock[cam] = (frame.timestamp, frame.read_time)
            for z in self.zones[cam]:
                for ev in z.assembler.assemble(z.counter.count(upd), now=frame.timestamp, update=upd):
                    self._emit(ev)
            now = time.time()
            self._last_image[cam] = frame.image
            slot = self.streams[cam]
            # full stream rate for watched cameras; a JPEG a second otherwise (snapshots)
            fps = self.cfg.api.mjpeg_fps if slot.watched(now) else min(IDLE_JPEG_FPS, self.cfg.api.mjpeg_fps)
            if now >= self._next_jpeg[cam] or slot.jpeg is None:
                self._next_jpeg[cam] = next_jpeg_due(self._next_jpeg[cam], now, 1.0 / fps)
                lines = tuple((z.cfg.line.p1, z.cfg.line.p2) for z in self.zones[cam])
                caption = f"{cam} frame {frame.index} tracks {len(upd.confirmed)}"
                self._annotate.offer(AnnotateJob(cam, frame.read_time, frame.image, upd, lines, caption))
            done = time.time()
            # live streams: age since capture (stream time; frames that sat in a buffer count); files: since read
            captured = frame.timestamp if is_stream(self.readers[cam].cfg.source) else frame.read_time
            self.metrics.observe_frame(cam, done - captured, done)

    def _draw(self, job: AnnotateJob) -> tuple[str, bytes, float]:
        return job.camera_id, self.annotator.annotate(job.image, job.update, list(job.lines), job.caption), job.read_at

    def _deliver_jpeg(self, cam: str, jpeg: bytes, read_at: float) -> None:
        self.streams[cam].put(jpeg)
        self.metrics.jpeg_age.labels(cam).observe(time.time() - read_at)

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
        self._keep_evidence(ev)
        self.metrics.events.labels(ev.camera_id, ev.zone_id).inc()
        self.events_emitted += 1
        log.info("checkout %s %s: %s%s%s", ev.camera_id, ev.zone_id,
                 ", ".join(f"{i.count}x {i.label}" for i in ev.items),
                 "" if ev.total is None else f" = {ev.total:.2f} {ev.currency}",
                 " (needs review)" if ev.needs_review else "")
        self.hub.publish(record)
        if self.publishers is not None:
            self.publishers.submit(record)
        return True

    def _keep_evidence(self, ev: CheckoutEvent) -> None:
        """The event's crops into the store, before it is published (the page asks for them then)."""
        if self.evidence is None:
            return
        try:
            self.corrections.save_evidence(ev.event_id, self.evidence.take(ev))
        except Exception:  # noqa: BLE001 - evidence is an aid: the event itself is stored
            log.exception("evidence crops of event %s not stored", ev.event_id)

    def _write(self, ev: CheckoutEvent) -> dict:
        # a retried write whose first attempt did land: the store returns the stored record (stored once)
        return self.store.save(ev)

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
        if cam not in self._clock or not (reader.cfg.realtime or is_stream(reader.cfg.source)):
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
        for cam in self.zones:
            self._flush(cam)

    def _flush(self, cam: str) -> None:
        """Close one camera's open trays now (shutdown, end of stream, camera handed to another node)."""
        for z in self.zones[cam]:
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
        m.ws_dropped.set(self.hub.dropped_subscribers)

    def _housekeep(self) -> None:
        """Once per loop: gauges, and NO SIGNAL frames (1/s) for cameras that are down, so
        viewers of their MJPEG stream do not watch a frozen picture."""
        self._retry_unsaved()
        statuses = {cam: r.status() for cam, r in self.readers.items()}
        now = time.time()
        for cam, st in statuses.items():
            if st.state not in (SourceState.STREAMING, SourceState.ENDED) and now - self.streams[cam].at > 1.0:
                state = st.state.value if self.is_local(cam) else "on another node"
                self.streams[cam].put(self.annotator.annotate_offline(self._last_image.get(cam), cam, state))
        for cam, st in statuses.items():  # one entry per configured camera: bounded
            if st.state is not SourceState.STREAMING:
                self.drop_watch.idle(cam)
            elif w := self.drop_watch.observe(cam, now, st.frames_read, st.frames_dropped):
                log.warning("%s", w)
        self.refresh_gauges(statuses)

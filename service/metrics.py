"""Prometheus metrics in a registry owned by the app (no process-global state)."""
from __future__ import annotations

import collections
import threading

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LAT_BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)


class Metrics:
    def __init__(self, window: int = 512) -> None:
        r = self.registry = CollectorRegistry()
        self.frames = Counter("dishtrack_frames_processed", "frames run through detector+tracker", ["camera"], registry=r)
        self.frames_read = Gauge("dishtrack_frames_read", "frames decoded by the camera reader", ["camera"], registry=r)
        self.frames_dropped = Gauge("dishtrack_frames_dropped", "frames replaced in the latest-frame slot before use",
                                    ["camera"], registry=r)
        self.reconnects = Gauge("dishtrack_camera_reconnects", "camera reconnects", ["camera"], registry=r)
        self.stalls = Gauge("dishtrack_camera_stalls", "camera stalls detected", ["camera"], registry=r)
        self.camera_up = Gauge("dishtrack_camera_up", "1 when the camera is streaming", ["camera"], registry=r)
        self.detections = Counter("dishtrack_detections", "detections kept after NMS", ["camera"], registry=r)
        self.tracks = Gauge("dishtrack_active_tracks", "live tracks", ["camera"], registry=r)
        self.events = Counter("dishtrack_checkout_events", "checkout events persisted", ["camera", "zone"], registry=r)
        self.frame_age = Histogram("dishtrack_frame_age_seconds", "camera read to detected and tracked",
                                   ["camera"], buckets=_LAT_BUCKETS, registry=r)
        self.batch_seconds = Histogram("dishtrack_detector_batch_seconds", "detector forward per batch",
                                       buckets=_LAT_BUCKETS, registry=r)
        self.batch_size = Histogram("dishtrack_detector_batch_size", "frames per detector batch",
                                    buckets=(1, 2, 3, 4, 6, 8, 16, 32), registry=r)
        self.tracker_seconds = Histogram("dishtrack_tracker_update_seconds", "one tracker update",
                                         buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05), registry=r)
        self.frame_detect_seconds = Histogram("dishtrack_detector_frame_seconds", "detector forward per frame "
                                              "(batch time / batch size)", buckets=_LAT_BUCKETS, registry=r)
        self.stage_dropped = Counter("dishtrack_stage_dropped", "items dropped between pipeline stages (track: "
                                     "detector batches the tracking stage had no room for; annotate: stream "
                                     "frames replaced before they were encoded)", ["stage"], registry=r)
        self.jpeg_age = Histogram("dishtrack_stream_frame_age_seconds", "camera read to annotated JPEG ready",
                                  ["camera"], buckets=_LAT_BUCKETS, registry=r)
        for stage in ("track", "annotate"):
            self.stage_dropped.labels(stage)
        self.detection_stride = Gauge("dishtrack_detection_stride", "detector runs on every k-th frame per camera "
                                      "(detector.stride; frames between move by optical flow)", registry=r)
        self.detection_stride.set(1)
        self.pipeline_errors = Counter("dishtrack_pipeline_errors", "exceptions in the pipeline loop", registry=r)
        self.open_trays = Gauge("dishtrack_open_tray_crossings", "crossings in trays not closed yet (flushed at "
                                "shutdown)", ["camera", "zone"], registry=r)
        self.unsaved = Gauge("dishtrack_events_unsaved", "checkout events in the spool waiting for their write",
                             registry=r)
        self.write_failures = Counter("dishtrack_event_write_failures", "failed event writes (retried)", registry=r)
        self.spool_dropped = Counter("dishtrack_events_spool_dropped", "events lost: spool full (storage.spool_max)",
                                     registry=r)
        self.db_bytes = Gauge("dishtrack_db_size_bytes", "event database on disk (file + write-ahead log)",
                              registry=r)
        self.events_pruned = Counter("dishtrack_events_pruned", "events deleted by storage.retention", registry=r)
        self.outbox_rows = Gauge("dishtrack_outbox_rows", "outbox rows per sink (mqtt, webhook:<name>) and status "
                                 "(pending, delivered, failed)", ["sink", "status"], registry=r)
        self.outbox_oldest_pending = Gauge("dishtrack_outbox_oldest_pending_seconds", "age of the oldest event "
                                           "waiting for a sink (0: none)", ["sink"], registry=r)
        self.ws_subscribers = Gauge("dishtrack_ws_subscribers", "connected websocket subscribers", registry=r)
        self.ws_dropped = Gauge("dishtrack_ws_dropped_subscribers", "subscribers cut off for being slow", registry=r)
        self._lock = threading.Lock()
        self._ages: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=window))
        self._proc: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=window))

    def observe_outbox(self, summary: list[dict]) -> None:
        """``Outbox.summary()`` as gauges, per scrape: a sink that stopped delivering shows in Prometheus."""
        for s in summary:
            for status in ("pending", "delivered", "failed"):
                self.outbox_rows.labels(s["sink"], status).set(s[status])
            self.outbox_oldest_pending.labels(s["sink"]).set(s["oldest_pending_s"] or 0.0)

    def observe_frame(self, camera: str, age_s: float, done_at: float) -> None:
        self.frames.labels(camera).inc()
        self.frame_age.labels(camera).observe(age_s)
        with self._lock:
            self._ages[camera].append(age_s)
            self._proc[camera].append(done_at)

    def summary(self, camera: str) -> dict:
        """Rolling fps and frame-age percentiles over the last ``window`` frames."""
        with self._lock:
            ages = np.array(self._ages[camera])
            t = np.array(self._proc[camera])
        fps = (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else 0.0
        p50, p95 = (np.percentile(ages, [50, 95]).tolist() if len(ages) else (None, None))
        return {"fps": round(fps, 2), "frame_age_p50_s": p50, "frame_age_p95_s": p95, "window": len(ages)}

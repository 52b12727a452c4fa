"""Pipelined stages (service/pipeline.py, service/stages.py): the detector stage batches
across cameras, annotation runs off the detector's path and only at the stream rate for
watched cameras, a slow viewer/encoder never stalls detection, drops are counted."""
import os
import threading
import time

import numpy as np
from prometheus_client import generate_latest

from conftest import VIDEO, wait_until
from dishtrack.config import AppConfig
from dishtrack.service.hub import EventHub
from dishtrack.service.metrics import Metrics
from dishtrack.service.pipeline import Pipeline
from dishtrack.service.stages import DropQueue
from dishtrack.service.store import EventStore
from dishtrack.tracking import Frame


def make_pipeline(tmp_path, detector, cams, **api):
    cfg = AppConfig.model_validate({"cameras": cams, "api": {"mjpeg_fps": 25, **api}})
    return Pipeline(cfg, detector, EventStore(os.path.join(tmp_path, "e.sqlite3")), EventHub(), Metrics())


def counter(metrics: Metrics, name: str, **labels) -> float:
    for m in metrics.registry.collect():
        for s in m.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(name)


def test_drop_queue_drops_oldest_and_counts_or_pushes_back():
    drops = []
    q = DropQueue(2, on_drop=lambda: drops.append(1))
    for i in range(5):
        q.put(i)
    assert [q.get(0.01), q.get(0.01), q.get(0.01)] == [3, 4, None]
    assert q.dropped == 3 and len(drops) == 3
    # block=True: the producer waits for room instead of dropping
    q.put("a")
    q.put("b")
    t = threading.Thread(target=q.put, args=("c",), kwargs={"block": True})
    t.start()
    time.sleep(0.2)
    assert t.is_alive() and q.dropped == 3
    assert q.get(0.01) == "a"
    t.join(2)
    assert not t.is_alive() and [q.get(0.01), q.get(0.01)] == ["b", "c"] and q.dropped == 3


def test_drop_queue_hands_what_a_dropped_item_must_keep_to_the_next():
    """``merge``: the dropped item's keepers ride on with the next item in line (or with the
    new one when the queue holds one item); the count of drops is the same."""
    from dishtrack.service.motion import LateDetections, hand_on

    q = DropQueue(1, merge=lambda old, new: old + new)
    for s in ("a", "b", "c"):
        q.put(s)
    assert q.get(0.01) == "abc" and q.dropped == 2
    # two cameras: A's detection goes on with A's next (undetected) frame, B has no frame in the
    # next batch so its dropped frame goes on in front; a frame without detections stays dropped
    img = np.zeros((4, 4, 3), np.uint8)
    fa, fb, fa2 = Frame("A", 1, 0.0, img), Frame("B", 1, 0.0, img), Frame("A", 2, 0.1, img)
    da, db = object(), LateDetections(None, Frame("B", 0, 0.0, img))
    frames, dets = hand_on(([fa, fb], [da, db]), ([fa2], [None]))
    assert frames == [fb, fa2] and dets[0] is db
    assert isinstance(dets[1], LateDetections) and dets[1].detections is da and dets[1].source is fa
    frames, dets = hand_on(([fa], [None]), ([fa2], [None]))
    assert frames == [fa2] and dets == [None]
    newer = object()
    assert hand_on(([fa], [da]), ([fa2], [newer]))[1] == [newer]


def test_slow_viewer_never_stalls_detection(tmp_path, detector):
    """Every frame of an offline file is detected and tracked while the watched stream's
    encoder takes 3 s per JPEG: stream frames are dropped (and counted), detections are not."""
    p = make_pipeline(tmp_path, detector, [{"id": "cam", "source": str(VIDEO), "realtime": False}])
    encoded = []
    orig = p.annotator.annotate

    def slow(image, *a, **kw):  # a viewer link / encoder that takes 3 s per frame
        time.sleep(3.0)
        encoded.append(time.time())
        return orig(image, *a, **kw)

    p.annotator.annotate = slow
    stop = threading.Event()

    def viewer():
        while not stop.is_set():
            p.streams["cam"].get()
            time.sleep(0.05)

    v = threading.Thread(target=viewer, daemon=True)
    v.start()
    t0 = time.time()
    p.start()
    try:
        wait_until(p.finished.is_set, 400, what="file processed")
        took = time.time() - t0
    finally:
        stop.set()
        p.stop()
    assert counter(p.metrics, "dishtrack_frames_processed_total", camera="cam") == 71
    # annotation on the detector's path would encode all 71 and drop none (>= 213 s);
    # here the encoder saw only what it had time for, the rest was replaced (counted)
    assert len(encoded) <= took / 3.0 + 2 and len(encoded) < 71, (took, len(encoded))
    dropped = counter(p.metrics, "dishtrack_stage_dropped_total", stage="annotate")
    assert dropped > 0 and dropped == p._annotate.dropped
    assert b'dishtrack_stage_dropped_total{stage="annotate"}' in generate_latest(p.metrics.registry)
    assert p.streams["cam"].get()[1] is not None


def test_unwatched_cameras_get_one_jpeg_a_second(tmp_path, detector):
    p = make_pipeline(tmp_path, detector, [{"id": "cam", "source": str(VIDEO), "realtime": False}])
    t0 = time.time()
    p.start()
    try:
        wait_until(p.finished.is_set, 240, what="file processed")
    finally:
        p.stop()
    took = time.time() - t0
    assert counter(p.metrics, "dishtrack_frames_processed_total", camera="cam") == 71
    assert 1 <= p._annotate.encoded <= took * 1.0 + 2, (p._annotate.encoded, took)
    assert p.streams["cam"].jpeg is not None  # snapshots still work


def test_detector_stage_batches_across_cameras(tmp_path, detector):
    cams = [{"id": f"c{i}", "source": str(VIDEO), "loop": True} for i in range(3)]
    p = make_pipeline(tmp_path, detector, cams)
    sizes = []
    orig = detector.detect

    class Recording:
        device = detector.device

        def detect(self, frames):
            sizes.append(sorted(f.camera_id for f in frames))
            return orig(frames)

    p.detector = Recording()
    p.start()
    try:
        wait_until(lambda: len(sizes) >= 8, 90, what="8 batches")
    finally:
        p.stop()
    assert all(len(set(s)) == len(s) for s in sizes)  # one frame per camera per batch
    later = sizes[2:]  # once all three readers stream, batches hold every camera
    assert sum(len(s) == 3 for s in later) >= len(later) * 0.7, sizes
    total, n = (counter(p.metrics, f"dishtrack_detector_batch_size_{k}") for k in ("sum", "count"))
    assert n >= 8 and total / n >= 2.2, (total, n)


def test_stream_frames_keep_their_rate_when_processing_is_only_a_little_faster():
    """A live camera processed at 12 frames/s gave a 10 fps MJPEG stream only 6 fps: each JPEG was
    scheduled from the frame that made it, so the next one waited for the frame after its due time
    (RTSP probe). On a grid the stream gets 10 of the 12; faster input is still capped at 10."""
    from dishtrack.service.stages import next_jpeg_due

    def stream_fps(input_fps: float, period: float = 0.1, seconds: float = 10.0) -> float:
        due, n = 0.0, 0
        for i in range(int(input_fps * seconds)):
            now = 1000.0 + i / input_fps
            if now >= due:
                due, n = next_jpeg_due(due, now, period), n + 1
        return n / seconds

    assert 9.5 <= stream_fps(12) <= 10.1  # was 6
    assert 9.5 <= stream_fps(25) <= 10.1 and 9.5 <= stream_fps(30) <= 10.1
    assert stream_fps(5) == 5.0  # slower input: every frame

"""Detection stride with motion propagation (issue 6 item 3): the detector runs on every
k-th frame, tracks move by Kalman prediction + optical flow in between, k adapts to load."""
import os
import time

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from conftest import MOT_DETS, MOT_GT, VIDEO, wait_until
from dishtrack.config import AppConfig, DetectorConfig, StrideConfig
from dishtrack.service.hub import EventHub
from dishtrack.service.metrics import Metrics
from dishtrack.service.motion import FlowPropagator, LateDetections
from dishtrack.service.pipeline import Pipeline
from dishtrack.service.store import EventStore
from dishtrack.service.stride import StrideController
from dishtrack.tracking import Detections, Frame
from dishtrack.tracking.mot import PERSON, read_mot, track_sequence
from dishtrack.tracking.tracker import Tracker
from dishtrack.tracking.geometry import iou_matrix
from dishtrack.tracking.types import Track, TrackState
from eval_mot15 import evaluate, track_video_strided

TUD_DETS = MOT_DETS / "TUD-Campus" / "det" / "det.txt"
TUD_GT = MOT_GT / "TUD-Campus" / "gt.txt"


@pytest.fixture(scope="module")
def tud():
    return read_mot(TUD_DETS), read_mot(TUD_GT)


@pytest.fixture(scope="module")
def tud_frames():
    cap = cv2.VideoCapture(str(VIDEO))
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    return frames


def _dets(rows: np.ndarray, f: int, size=(640, 480)) -> Detections:
    d = rows[rows[:, 0] == f]
    return Detections("mot", f, f / 25.0, np.c_[d[:, 2:4], d[:, 2:4] + d[:, 4:6]].astype(np.float32),
                      d[:, 6].astype(np.float32), np.zeros(len(d), np.int64), PERSON, size)


def test_stride_1_is_todays_tracker_exactly(tud):
    dets, _ = tud
    ref = track_sequence(dets, image_size=(640, 480), fps=25.0)
    got = track_video_strided(dets, VIDEO, k=1)
    assert np.array_equal(ref, got)


def test_stride_3_keeps_identities_on_tud_campus(tud):
    """MOT15 TUD-Campus (SORT's Faster R-CNN detections, 71 real frames): detections only on
    every 3rd frame, flow on the real video between. Identities survive the skipped frames (no
    more ID switches than k = 1) and MOTA / IDF1 stay within 8 / 6 points of k = 1 (measured:
    64.3 / 73.1 at k = 1, 58.2 / 68.9 at k = 3)."""
    dets, gt = tud
    base = evaluate(dets, gt, result=track_video_strided(dets, VIDEO, k=1))
    k3 = evaluate(dets, gt, result=track_video_strided(dets, VIDEO, k=3))
    assert k3["num_switches"] <= base["num_switches"]
    assert k3["mota"] >= base["mota"] - 0.08, (k3["mota"], base["mota"])
    assert k3["idf1"] >= base["idf1"] - 0.06, (k3["idf1"], base["idf1"])
    assert k3["mota"] > 0.5 and k3["idf1"] > 0.6


def _track(tid: int, box) -> Track:
    return Track(tid, "mot", TrackState.CONFIRMED, tuple(float(v) for v in box), 0, "person", 1.0, 1.0, 5, 5, 0, ())


def test_flow_recovers_a_known_shift_of_a_real_frame(tud_frames, tud):
    """A real TUD frame shifted by (+7, -4) px: every person box moves by that within 0.5 px."""
    _, gt = tud
    img = tud_frames[10]
    shifted = cv2.warpAffine(img, np.float32([[1, 0, 7], [0, 1, -4]]), (640, 480), borderMode=cv2.BORDER_REFLECT)
    g = gt[(gt[:, 0] == 11) & (gt[:, 6] != 0)]
    tracks = [_track(int(r[1]), (r[2], r[3], r[2] + r[4], r[3] + r[5])) for r in g]
    fp = FlowPropagator()
    assert fp.measure(Frame("mot", 0, 0.0, img), tracks) == {}  # first frame: nothing to compare with
    moved = fp.measure(Frame("mot", 1, 0.04, shifted), tracks)
    assert len(moved) >= len(tracks) - 1  # a box on the image border may lack points
    for t in tracks:
        if t.track_id in moved:
            d = moved[t.track_id] - np.array(t.box)
            assert np.allclose(d, [7, -4, 7, -4], atol=0.5), (t.track_id, d)


def test_flow_follows_real_walkers(tud_frames, tud):
    """Real motion: TUD walkers from frame 20 to frame 24 (4 frames, as with a skipped
    stretch). The flow-moved box centre is nearer the ground truth at frame 24 than the
    box left where it was, for most walkers, and far nearer on average."""
    _, gt = tud
    g0, g1 = (gt[(gt[:, 0] == f) & (gt[:, 6] != 0)] for f in (20, 24))
    ids = sorted(set(g0[:, 1]) & set(g1[:, 1]))
    box = {int(r[1]): (r[2], r[3], r[2] + r[4], r[3] + r[5]) for r in g0}
    fp = FlowPropagator()
    tracks = [_track(i, box[i]) for i in map(int, ids)]
    fp.measure(Frame("mot", 20, 0.0, tud_frames[19]))
    moved = {}
    for f in range(21, 25):  # frame by frame, as the pipeline does
        moved = fp.measure(Frame("mot", f, f / 25, tud_frames[f - 1]), tracks)
        tracks = [_track(t.track_id, moved.get(t.track_id, t.box)) for t in tracks]
    c = lambda b: np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])  # noqa: E731
    err_flow, err_still = [], []
    for r in g1:
        i = int(r[1])
        if i in box and i in moved:
            truth = c((r[2], r[3], r[2] + r[4], r[3] + r[5]))
            err_flow.append(np.linalg.norm(c(moved[i]) - truth))
            err_still.append(np.linalg.norm(c(box[i]) - truth))
    assert len(err_flow) >= 4
    assert np.mean(err_flow) < 0.7 * np.mean(err_still), (err_flow, err_still)
    assert sum(a < b for a, b in zip(err_flow, err_still)) >= len(err_flow) - 1


def test_propagate_moves_tracks_without_ageing_them(tud):
    """Frames the detector skipped: tracks stay confirmed with their hits, are not removed,
    coast on their Kalman velocity, and follow a motion-measured box."""
    dets, _ = tud
    tr = Tracker("mot")
    for f in range(1, 6):
        upd = tr.update(_dets(dets, f))
    before = {t.track_id: t for t in upd.tracks}
    first = next(t for t in upd.confirmed)
    target = np.array(first.box) + [30, 0, 30, 0]
    for i in range(6):  # longer than tentative_max_age and far more frames than max_age would allow
        upd = tr.propagate(6 + i, (6 + i) / 25, (640, 480), {first.track_id: target})
        assert upd.removed == ()
    assert {t.track_id for t in upd.tracks} == set(before)
    for t in upd.tracks:
        assert t.state is before[t.track_id].state and t.hits == before[t.track_id].hits
        assert t.time_since_update == before[t.track_id].time_since_update
    moved = next(t for t in upd.tracks if t.track_id == first.track_id)
    assert abs(moved.center[0] - (first.center[0] + 30)) < 3  # pulled onto the measured box
    assert len(moved.trajectory) > len(first.trajectory)  # positions recorded, no class votes
    # the next detection frame matches the same people (6 frames of prediction only, one track
    # pulled 30 px off its person): the skipped frames were no misses
    upd = tr.update(_dets(dets, 12))
    assert len({t.track_id for t in upd.confirmed} & set(before)) >= 3


def test_stride_config_defaults_and_validation():
    s = DetectorConfig().stride
    assert s.k == 1 and not s.adaptive  # today's behaviour: every frame detected
    with pytest.raises(ValidationError):
        StrideConfig(k=2, kk=3)
    with pytest.raises(ValidationError):
        StrideConfig(k=5, adaptive=True, k_max=4)
    with pytest.raises(ValidationError):
        StrideConfig(k_min=3, k_max=2)


def test_controller_rule_raises_on_drops_and_lowers_with_slack():
    """The adaptive rule on measured windows: drops raise k one step per window up to
    k_max; slack (busy share at k-1 under busy_low, young frames) lowers it to k_min."""
    c = StrideController(StrideConfig(adaptive=True, k_max=3, interval_s=1.0), start=0.0)
    t, dropped = 0.0, 0
    for _ in range(4):  # 25 fps camera, detector 100 ms: 10 frames taken, 15 dropped a second
        t += 1.0
        dropped += 15
        c.record(t, 1.0, 10, [0.12] * 10, dropped)
    assert c.k == 3 and [d.k for d in c.history] == [2, 3, 3, 3]
    for _ in range(3):  # fast detector: 25 frames a second, 5 % busy, nothing dropped
        t += 1.0
        c.record(t, 0.05, 25, [0.01] * 9, dropped)
    assert c.k == 1
    assert [c.due("a") for _ in range(3)] == [True, True, True]


class SlowMotDetector:
    """The SORT Faster R-CNN detections of TUD-Campus for each frame of the looping TUD video,
    after ``delay`` seconds per batch: a detector whose speed the test sets."""

    labels = PERSON

    def __init__(self, dets: np.ndarray) -> None:
        self.rows = dets
        self.delay = 0.0
        self.calls = 0

    def detect(self, frames):
        time.sleep(self.delay)
        self.calls += 1
        out = []
        for fr in frames:
            d = _dets(self.rows, fr.index % 71 + 1, fr.size)
            out.append(Detections(fr.camera_id, fr.index, fr.timestamp, d.boxes, d.scores, d.class_ids, PERSON,
                                  fr.size))
        return out


def test_adaptive_stride_rises_under_a_slow_detector_and_falls_back(tmp_path, tud):
    """The real pipeline on the real video at 25 fps: a 120 ms detector drops frames, so k
    rises (to 3+); once the detector is fast again, k falls back to 1. Tracks follow meanwhile."""
    dets, _ = tud
    det = SlowMotDetector(dets)
    det.delay = 0.12
    cfg = AppConfig.model_validate({
        "cameras": [{"id": "cam", "source": str(VIDEO), "loop": True, "realtime": True}],
        "detector": {"stride": {"adaptive": True, "k_max": 5, "interval_s": 0.3}}})
    p = Pipeline(cfg, det, EventStore(os.path.join(tmp_path, "e.sqlite3")), EventHub(), Metrics())
    p.start()
    try:
        wait_until(lambda: p.stride.k >= 3, 10.0, 0.05, "stride to rise under the slow detector")
        wait_until(lambda: p.last_update.get("cam") and len(p.last_update["cam"].confirmed) >= 3, 5.0, 0.05,
                   "confirmed tracks while striding")
        det.delay = 0.0
        wait_until(lambda: p.stride.k == 1, 10.0, 0.05, "stride to fall back with a fast detector")
    finally:
        p.stop()
    ks = [d.k for d in p.stride.history]
    assert max(ks) >= 3 and ks[-1] == 1


# -- asynchronous detection (detector.stride.detect_async)

def test_late_detections_move_onto_the_frame_they_arrive_with(tud_frames, tud):
    """Walkers' boxes detected on frame s, handed over with frame s + 3 (a detector three frames
    slow): moved by the flow between the two real images they overlap the walkers' true boxes
    on s + 3 far better than left where they were."""
    _, gt = tud
    fp = FlowPropagator()

    def boxes(f):
        g = gt[(gt[:, 0] == f) & (gt[:, 6] != 0)]
        return {int(r[1]): np.array([r[2], r[3], r[2] + r[4], r[3] + r[5]], np.float32) for r in g}

    moved_iou, still_iou = [], []
    for s in range(5, 60, 5):
        b0, b1 = boxes(s), boxes(s + 3)
        ids = sorted(set(b0) & set(b1))
        d = Detections("mot", s, s / 25, np.array([b0[i] for i in ids]), np.ones(len(ids), np.float32),
                       np.zeros(len(ids), np.int64), PERSON, (640, 480))
        late = LateDetections(d, Frame("mot", s, s / 25, tud_frames[s - 1]))
        out = fp.catch_up(late, Frame("mot", s + 3, (s + 3) / 25, tud_frames[s + 2]))
        assert out.frame_index == s + 3 and out.timestamp == (s + 3) / 25 and len(out) == len(ids)
        truth = np.array([b1[i] for i in ids])
        moved_iou += list(np.diag(iou_matrix(out.boxes, truth)))
        still_iou += list(np.diag(iou_matrix(d.boxes, truth)))
    assert np.mean(moved_iou) > np.mean(still_iou) + 0.1, (np.mean(moved_iou), np.mean(still_iou))


def test_async_detection_tracks_every_frame_behind_a_slow_detector(tmp_path, tud):
    """The real pipeline on the real video at 25 fps with a 150 ms detector (about a sixth of
    the frames it could see): with asynchronous detection the tracking stage still takes
    nearly every frame, the detector runs beside it on a fraction of them, and the walkers are
    tracked with detections moved onto later frames."""
    dets, _ = tud
    det = SlowMotDetector(dets)
    det.delay = 0.15
    cfg = AppConfig.model_validate({
        "cameras": [{"id": "cam", "source": str(VIDEO), "loop": True, "realtime": True}],
        "detector": {"stride": {"detect_async": True}}})
    p = Pipeline(cfg, det, EventStore(os.path.join(tmp_path, "e.sqlite3")), EventHub(), Metrics())
    p.start()
    try:
        wait_until(lambda: p.last_update.get("cam") and p.last_update["cam"].frame_index >= 75, 20.0, 0.05,
                   "three seconds of video tracked")
        wait_until(lambda: len(p.last_update["cam"].confirmed) >= 3, 5.0, 0.05, "confirmed walkers")
        status = p.readers["cam"].status()
        tracked = p.metrics.frames.labels("cam")._value.get()
    finally:
        p.stop()
    assert tracked >= 0.8 * status.frames_read, (tracked, status.frames_read, status.frames_dropped)
    assert det.calls <= 0.5 * tracked, (det.calls, tracked)
    assert p._async.gap.get("cam", 0) >= 2  # the stride it got: frames between two detections


def test_async_detection_config_rules():
    assert StrideConfig(detect_async=True).detect_async
    with pytest.raises(ValidationError, match="exclude each other"):
        StrideConfig(detect_async=True, adaptive=True)
    with pytest.raises(ValidationError, match="needs stride.flow"):
        StrideConfig(detect_async=True, flow=False)


def test_async_detector_errors_back_off_and_later_batches_still_arrive(tud, tud_frames):
    """A detector that raises once: the error is counted, the next batch (after a short
    back-off) is detected and handed over with a later frame; the worker is a daemon thread,
    so a hung forward pass cannot keep the process alive past SIGTERM."""
    from dishtrack.service.async_detect import AsyncDetection

    dets, _ = tud
    real = SlowMotDetector(dets)
    calls, errors = [], []

    def detect(frames):
        calls.append([f.index for f in frames])
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (the test's)")
        return real.detect(frames)

    a = AsyncDetection(detect, on_error=lambda: errors.append(1)).start()
    assert a._thread.daemon
    got, i = [], 0
    try:
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            i += 1
            out = a.step([Frame("cam", i, i / 25, tud_frames[i % 71])])
            got = [x for x in out if x is not None]
            time.sleep(0.01)
    finally:
        a.close()
    assert errors == [1] and len(calls) >= 2
    late = got[0]
    assert late.source.index == calls[1][0] < i and len(late) > 0  # the first batch after the error


def test_late_detections_from_before_a_camera_reset_are_dropped(tmp_path, tud, tud_frames):
    """A lease released and won back (or a camera restarted) resets its tracker: detections
    the detector made on a frame read before that must not start tracks in the new session
    (its frame indices restart at 0); detections of the new session do."""
    dets, _ = tud
    cfg = AppConfig.model_validate({"cameras": [{"id": "cam", "source": str(VIDEO), "realtime": True}],
                                    "detector": {"stride": {"detect_async": True}}})
    det = SlowMotDetector(dets)
    p = Pipeline(cfg, det, EventStore(os.path.join(tmp_path, "e.sqlite3")), EventHub(), Metrics())
    before = Frame("cam", 105, time.time() - 5, tud_frames[33])
    stale = LateDetections(det.detect([before])[0], before)
    assert len(stale) > 0
    p._released.append("cam")
    p._apply_released()  # what the tracking stage does after stop_camera
    now = time.time()
    p._process([Frame("cam", 0, now, tud_frames[0])], [stale])
    assert p.last_update["cam"].tracks == ()
    src = Frame("cam", 1, now + 0.04, tud_frames[1])
    p._process([Frame("cam", 3, now + 0.12, tud_frames[3])], [LateDetections(det.detect([src])[0], src)])
    assert len(p.last_update["cam"].tracks) > 0


@pytest.mark.parametrize("mode", ["async", "stride"])
def test_a_dropped_tracking_batch_hands_its_detections_on(tmp_path, tud, tud_frames, mode):
    """The tracking stage falls behind (a slow tracker or a burst of cameras): the bounded
    queue drops the oldest batch, but not its detections. Asynchronous detection hands each
    detector result over once, with one frame; under a stride only every k-th frame is detected:
    dropped with that batch, the tracks would coast on flow alone until the next detection.
    They ride on with the next batch of the camera (moved onto its frame by the flow)."""
    dets, _ = tud
    stride = {"detect_async": True} if mode == "async" else {"k": 5}
    cfg = AppConfig.model_validate({"cameras": [{"id": "cam", "source": str(VIDEO), "realtime": True}],
                                    "detector": {"stride": stride}})
    det = SlowMotDetector(dets)
    p = Pipeline(cfg, det, EventStore(os.path.join(tmp_path, "e.sqlite3")), EventHub(), Metrics())
    now = time.time()
    frames = [Frame("cam", i, now + i / 25, tud_frames[i]) for i in range(10, 16)]
    source = Frame("cam", 9, now + 9 / 25, tud_frames[9]) if mode == "async" else frames[0]  # async: a frame late
    found = det.detect([source])[0]
    assert len(found) >= 3
    first = LateDetections(found, source) if mode == "async" else found
    batches = [([frames[0]], [first])] + [([f], [None]) for f in frames[1:]]
    for b in batches:  # the tracking stage is busy: 6 batches arrive, 4 fit
        p._tracks.put(b)
    assert p._tracks.dropped == 2 and p.metrics.stage_dropped.labels("track")._value.get() == 2
    seen = []
    while (item := p._tracks.get(0)) is not None:
        seen += [f.index for f in item[0]]
        p._process(*item)
    assert seen == [12, 13, 14, 15]  # dropped frames stay dropped, in order
    upd = p.last_update["cam"]
    assert upd.frame_index == 15
    assert len(upd.tracks) == len(found)  # the walkers were found, and tracked to the last frame
    assert p.metrics.detections.labels("cam")._value.get() == len(found)


def test_late_detections_without_flow_follow_a_change_of_resolution(tud, tud_frames):
    """``flow: false`` under a stride: a detection handed on from a dropped batch lands where it
    was made; when the stream changed resolution in between (a camera reconfigured), its boxes
    are rescaled to the new frame, not left in the old pixels."""
    from dishtrack.service.motion import track_frame

    dets, _ = tud
    src = Frame("cam", 10, 0.4, tud_frames[10])
    found = SlowMotDetector(dets).detect([src])[0]
    small = Frame("cam", 12, 0.48, cv2.resize(tud_frames[12], (320, 240)))
    upd = track_frame(Tracker("cam"), small, LateDetections(found, src), None, None)
    assert upd.image_size == (320, 240) and len(upd.tracks) == len(found)
    got = np.array(sorted(list(t.box) for t in upd.tracks))
    np.testing.assert_allclose(got, np.array(sorted((found.boxes / 2).tolist())), atol=1.0)


def test_without_a_stride_a_dropped_tracking_batch_is_dropped_whole(tmp_path, tud, tud_frames):
    """Every frame detected: the next batches have their own detections, so a dropped batch's
    frames and detections both go (counted), and no batch grows with frames of older ones."""
    dets, _ = tud
    cfg = AppConfig.model_validate({"cameras": [{"id": "a", "source": str(VIDEO), "realtime": True},
                                                {"id": "b", "source": str(VIDEO), "realtime": True}]})
    det = SlowMotDetector(dets)
    p = Pipeline(cfg, det, EventStore(os.path.join(tmp_path, "e.sqlite3")), EventHub(), Metrics())
    now = time.time()
    for i in range(10, 16):  # batches of one camera each, alternating (batch_max 1)
        f = Frame("a" if i % 2 else "b", i, now + i / 25, tud_frames[i])
        p._tracks.put(([f], det.detect([f])))
    assert p._tracks.dropped == 2
    items = []
    while (item := p._tracks.get(0)) is not None:
        items.append([f.index for f in item[0]])
    assert items == [[12], [13], [14], [15]]


def test_a_hung_async_detector_shows_as_a_stuck_stage(tmp_path, tud):
    """With asynchronous detection the detector stage's loop keeps running while the forward
    pass hangs; the pipeline's ``loop_at`` (what /health compares with its stall limit) must
    still report the hung batch's start, not the loop's latest turn."""
    import threading

    dets, _ = tud
    gate = threading.Event()
    inner = SlowMotDetector(dets)

    class Hung:
        labels = PERSON

        def detect(self, frames):
            gate.wait(30)
            return inner.detect(frames)

    cfg = AppConfig.model_validate({
        "cameras": [{"id": "cam", "source": str(VIDEO), "loop": True, "realtime": True}],
        "detector": {"stride": {"detect_async": True}}})
    p = Pipeline(cfg, Hung(), EventStore(os.path.join(tmp_path, "e.sqlite3")), EventHub(), Metrics())
    p.start()
    try:
        wait_until(lambda: p._async.busy_since is not None, 10.0, 0.02, "the detector to start a batch")
        started = p._async.busy_since
        wait_until(lambda: p.last_update.get("cam") and p.last_update["cam"].frame_index >= 10, 10.0, 0.02,
                   "frames tracked meanwhile")
        assert p.loop_at <= started  # frames flow, yet health sees the batch that never ends
    finally:
        gate.set()
        p.stop()

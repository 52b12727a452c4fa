"""Tracker defects and association cues, on real MOT15 / MOT17 data where the
behaviour can be shown there (tray motion has no public ground truth: a
scripted tray is used)."""
import dataclasses
import subprocess

import numpy as np

from conftest import DATA, MOT_DETS, MOT_GT
from dishtrack.tracking import Detections, TrackState, Tracker, iou_matrix
from dishtrack.tracking.kalman import BatchKalman, KalmanBoxFilter, box_to_z as kalman_z
from dishtrack.tracking.mot import NoiseProtocol, noisy_detections, read_mot, read_seqinfo, track_sequence
from dishtrack.tracking.tracker import TrackerParams

MOT17 = DATA / "mot17_train_dev"


def _frame(dets, f, size=(640, 480), extra=None, fps=25.0):
    d = dets[dets[:, 0].astype(int) == f]
    boxes = np.c_[d[:, 2:4], d[:, 2:4] + d[:, 4:6]].astype(np.float32)
    scores = d[:, 6].astype(np.float32)
    if extra is not None:
        boxes = np.r_[boxes, np.asarray(extra, np.float32).reshape(-1, 4)]
        scores = np.r_[scores, np.full(len(boxes) - len(scores), 0.99, np.float32)]
    return Detections("cam", f, f / fps, boxes, scores, np.zeros(len(boxes), np.int64), ("person",), size)


def _mot17(seq="MOT17-04", frames=300):
    info = read_seqinfo(MOT17 / seq / "seqinfo.ini")
    gt = read_mot(MOT17 / seq / "gt" / "gt.txt")
    gt = gt[gt[:, 0] <= frames]
    return info, gt, noisy_detections(gt, info.image_size, NoiseProtocol(seed=0))


def test_track_sequence_without_image_size_does_not_assume_640x480():
    """Defect 1: on 1920x1080 MOT17-04 the old default (640, 480) deleted every
    track coasting right of x=640. Without a size the extent of the detections
    is used, which must give the same result as the real seqinfo size."""
    info, gt, dets = _mot17()
    assert info.image_size == (1920, 1080)
    real = track_sequence(dets, image_size=info.image_size, fps=info.fps)
    inferred = track_sequence(dets, fps=info.fps)
    wrong = track_sequence(dets, image_size=(640, 480), fps=info.fps)
    n_real = len(np.unique(real[:, 1]))
    # the detection extent is a little smaller than the image: only tracks
    # coasting in that thin margin can differ
    assert abs(len(real) - len(inferred)) <= 0.01 * len(real)
    assert len(np.unique(inferred[:, 1])) <= 1.1 * n_real
    # what the old default did: far more identities for the same people
    assert len(np.unique(wrong[:, 1])) > 1.3 * n_real


def test_occluded_gate_zero_disables_second_chance():
    """Defect 2: with occluded_gate 0 the centre-distance pass still ran and
    matched a detection whose centre sat exactly on an occluded track's
    prediction (distance 0 <= 0), whatever its size."""
    dets = read_mot(MOT_DETS / "TUD-Campus/det/det.txt")
    gt = read_mot(MOT_GT / "TUD-Campus/gt.txt")
    tracker = Tracker("cam", TrackerParams(occluded_gate=0.0))
    for f in range(1, 31):
        upd = tracker.update(_frame(dets, f))
    g = gt[(gt[:, 1] == 4) & (gt[:, 0] == 30)][0]
    gbox = np.array([g[2], g[3], g[2] + g[4], g[3] + g[5]])
    occ = [t for t in upd.tracks if t.state is TrackState.OCCLUDED
           and iou_matrix(np.array([t.box]), gbox[None])[0, 0] > 0.4]
    assert len(occ) == 1, upd.tracks  # person 4 is hidden behind another walker here
    t = occ[0]
    cx, cy = t.center
    tiny = [cx - 2, cy - 2, cx + 2, cy + 2]
    upd = tracker.update(_frame(dets, 31, extra=tiny))
    after = {u.track_id: u for u in upd.tracks}[t.track_id]
    assert after.state is TrackState.OCCLUDED and after.time_since_update == t.time_since_update + 1


def test_batch_kalman_equals_filterpy_reference():
    dets = read_mot(MOT_DETS / "TUD-Stadtmitte/det/det.txt")
    boxes = np.c_[dets[:, 2:4], dets[:, 2:4] + dets[:, 4:6]][:40]
    ref = [KalmanBoxFilter(b) for b in boxes]
    bk = BatchKalman()
    bk.add(boxes)
    rng = np.random.default_rng(1)
    for step in range(25):
        np.testing.assert_allclose(bk.predict(), [r.predict() for r in ref], rtol=1e-9, atol=1e-6)
        idx = np.flatnonzero(rng.random(len(ref)) < 0.7)
        z = boxes[idx] + rng.normal(0, 3, (len(idx), 4)) + step
        np.testing.assert_allclose(bk.update(idx, z), [ref[i].correct(b) for i, b in zip(idx, z)], rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(bk.x, np.array([r._kf.x[:, 0] for r in ref]), rtol=1e-9, atol=1e-6)


def _ids_on_person4(params):
    dets = read_mot(MOT_DETS / "TUD-Campus/det/det.txt")
    gt = read_mot(MOT_GT / "TUD-Campus/gt.txt")
    tracker = Tracker("cam", params)
    out = {}
    for f in range(1, 72):
        upd = tracker.update(_frame(dets, f))
        r = gt[(gt[:, 1] == 4) & (gt[:, 0] == f)][0]
        iou = iou_matrix(np.array([[r[2], r[3], r[2] + r[4], r[3] + r[5]]]), np.array([t.box for t in upd.tracks]))[0]
        out[f] = upd.tracks[int(np.argmax(iou))].track_id if iou.size and iou.max() >= 0.4 else None
    return out


def test_hidden_track_coasts_longer_than_one_that_vanished_in_the_open():
    """TUD-Campus person 4 is hidden behind another walker for frames 28-48
    (0.84 s at 25 fps). Open-air coasting of 0.4 s would drop it; because its
    box is covered by the other person it is held for max_coast_occluded_s."""
    p = TrackerParams(max_coast_s=0.4, max_coast_occluded_s=2.0)
    ids = _ids_on_person4(p)
    assert ids[24] is not None and all(ids[f] == ids[24] for f in range(49, 72)), ids
    never_hidden = _ids_on_person4(dataclasses.replace(p, occlusion_ioa=1.01))
    assert never_hidden[49] != never_hidden[24]


def test_track_whose_prediction_leaves_the_image_is_removed_at_once():
    """Removed as soon as less than exit_visible (a quarter) of the predicted
    box is inside the image; a box cut by the border but mostly inside
    (its centre already outside) still coasts."""
    tracker = Tracker("cam", TrackerParams(max_coast_s=10.0, max_coast_occluded_s=10.0))
    size = (176, 100)
    for f in range(10):  # a 40 px box walking right 8 px a frame, towards the right edge
        x = 100 + 8 * f
        b = np.array([[x - 20, 40, x + 20, 60]], np.float32)
        upd = tracker.update(Detections("cam", f, f / 25, b, np.ones(1, np.float32), np.zeros(1, np.int64), ("plate",), size))
    assert len(upd.tracks) == 1 and upd.tracks[0].state is TrackState.CONFIRMED and upd.tracks[0].hits == 10

    def empty(f):
        return Detections("cam", f, f / 25, np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                          np.zeros(0, np.int64), ("plate",), size)

    upd = tracker.update(empty(10))  # predicted x 160..200: 40% inside, centre outside
    assert len(upd.tracks) == 1 and upd.tracks[0].state is TrackState.OCCLUDED and upd.tracks[0].center[0] > size[0]
    upd = tracker.update(empty(11))  # 168..208: 20% inside
    assert not upd.tracks and len(upd.removed) == 1 and len(tracker) == 0


def test_person_cut_by_the_image_border_keeps_its_id_through_a_missed_detection():
    """MOT17-04 person 5 stands at the bottom edge, half of the annotated box
    below the image (centre outside). Their detection is dropped at frame 23;
    the old rule (centre outside the image = left the view) deleted the track
    and a new identity started at frame 24."""
    info, gt, dets = _mot17(frames=10 ** 6)  # the protocol's noise of the whole sequence
    tracker = Tracker("cam", TrackerParams())
    ids = {}
    for f in range(1, 41):
        upd = tracker.update(_frame(dets, f, size=info.image_size, fps=info.fps))
        g = gt[(gt[:, 0] == f) & (gt[:, 1] == 5)][0]
        if f in (22, 23):
            assert g[3] + g[5] / 2 > info.height  # centre below the image
        on = [t.track_id for t in upd.confirmed
              if iou_matrix(np.array([t.box]), np.array([[g[2], g[3], g[2] + g[4], g[3] + g[5]]]))[0, 0] > 0.5]
        ids[f] = on[0] if on else None
    assert ids[20] is not None and ids[30] == ids[20], ids


def _tray_frame(f, boxes, size=(640, 480)):
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    return Detections("cam", f, f / 25, b, np.full(len(b), 0.9, np.float32), np.zeros(len(b), np.int64), ("plate",), size)


def _run_tray(params):
    """Three dishes on a tray slide right 6 px/frame; dish C is hidden (by a hand)
    from frame 10; the tray slows to 3 px/frame at frame 15; C reappears at
    frame 34 under the tray. Returns (id of C before, id of C after)."""
    tracker = Tracker("cam", params)
    dx = 0.0
    before = after = None
    for f in range(1, 41):
        dx += 6.0 if f < 15 else 3.0
        a = [100 + dx, 200, 160 + dx, 260]
        b = [170 + dx, 200, 230 + dx, 260]
        c = [135 + dx, 270, 195 + dx, 330]
        hand = [125 + dx, 305, 205 + dx, 355]  # a hand covering C's lower part (IoU < 0.3)
        boxes = [a, b] + ([c] if not 10 <= f < 34 else [hand])
        upd = tracker.update(_tray_frame(f, boxes))
        on_c = [t for t in upd.tracks if iou_matrix(np.array([t.box]), np.array([c]))[0, 0] > 0.5]
        if f == 9:
            before = on_c[0].track_id
        if f == 36:
            after = on_c[0].track_id if on_c else None
    return before, after


def test_hidden_dish_follows_its_tray():
    before, after = _run_tray(TrackerParams(high_score=0.5))
    assert before is not None and after == before
    before, after = _run_tray(TrackerParams(high_score=0.5, group_motion=False))
    assert after != before  # on its own Kalman velocity it slides on past the tray


def test_appearance_reidentifies_after_occlusion_with_drifted_prediction():
    """A dish hidden for 1 s reappears away from where its coasted box went:
    IoU and the last observation both miss it; its embedding matches."""
    rng = np.random.default_rng(0)
    e_a, e_b = (v / np.linalg.norm(v) for v in rng.normal(size=(2, 64)))

    def run(use_emb):
        tracker = Tracker("cam", TrackerParams(high_score=0.5))
        ids = {}
        for f in range(1, 60):
            a = [100 + 4 * min(f, 20), 100, 160 + 4 * min(f, 20), 160]  # moves then stops
            b = [400, 300, 460, 360]
            boxes, embs = [b], [e_b]
            if f < 20 or f >= 45:
                boxes.append([a[0] - 45 if f >= 45 else a[0], a[1] + 45 if f >= 45 else a[1],
                              a[2] - 45 if f >= 45 else a[2], a[3] + 45 if f >= 45 else a[3]])
                embs.append(e_a)
            d = _tray_frame(f, boxes)
            if use_emb:
                d = dataclasses.replace(d, embeddings=np.array(embs, np.float32))
            upd = tracker.update(d)
            ids[f] = sorted(t.track_id for t in upd.tracks if t.state is TrackState.CONFIRMED)
        return ids

    with_emb, without = run(True), run(False)
    assert with_emb[19] == with_emb[50] == [1, 2]  # same two identities after the occlusion
    assert without[50] != without[19]


def test_class_margin_and_cli_track_writes_mot_results(tmp_path):
    info, gt, dets = _mot17("MOT17-05", frames=120)
    det_path = tmp_path / "det.txt"
    np.savetxt(det_path, np.c_[dets, -np.ones((len(dets), 3))], delimiter=",", fmt="%.3f")
    out = tmp_path / "result.txt"
    r = subprocess.run(["dishtrack", "track", "--dets", str(det_path), "--seqinfo", str(MOT17 / "MOT17-05/seqinfo.ini"),
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = read_mot(out)
    # the same detections as the CLI read them (3 decimals: a score may round across high_score)
    expect = track_sequence(read_mot(det_path), image_size=info.image_size, fps=info.fps, n_frames=info.length)
    np.testing.assert_allclose(res[:, :6], expect, atol=0.01)
    assert res[:, 0].max() <= 120 and len(np.unique(res[:, 1])) >= 5


def test_low_score_detections_extend_a_track_after_a_missed_frame():
    """A dish partly covered by a hand: one frame without a detection, then only
    low-score boxes. ByteTrack's rule (low-score boxes extend only tracks matched
    in the previous frame, low_score_coast_s=0) loses it; within
    low_score_coast_s the track keeps being extended under its id."""
    def run(coast_s):
        tracker = Tracker("cam", TrackerParams(low_score_coast_s=coast_s))
        for f in range(1, 30):
            x = 100 + 3 * f
            box = [[x, 100, x + 60, 160]] if f != 10 else np.zeros((0, 4))
            score = 0.9 if f < 10 else 0.3
            b = np.asarray(box, np.float32).reshape(-1, 4)
            upd = tracker.update(Detections("cam", f, f / 25, b, np.full(len(b), score, np.float32),
                                            np.zeros(len(b), np.int64), ("plate",), (640, 480)))
            if f == 9:
                first = upd.confirmed[0].track_id
        return first, [t.track_id for t in upd.confirmed]

    first, last = run(1.0)
    assert last == [first]
    first, last = run(0.0)
    assert last == []  # the track coasted out; low-score boxes never start a track


def test_batched_observation_reupdate_equals_sequential_reference():
    """BatchKalman.reupdate (all re-found tracks stepped together) equals
    filterpy run track by track over the same virtual observations."""
    dets = read_mot(MOT_DETS / "TUD-Stadtmitte/det/det.txt")
    boxes = np.c_[dets[:, 2:4], dets[:, 2:4] + dets[:, 4:6]][:6]
    rng = np.random.default_rng(3)
    bk = BatchKalman()
    bk.add(boxes)
    for step in range(4):  # some history, so the states differ
        bk.predict()
        z = boxes + rng.normal(0, 2, boxes.shape) + step
        bk.update(np.arange(6), z)
    last = z
    x0, P0 = bk.x.copy(), bk.P.copy()
    gaps = np.array([2, 5, 3, 9, 2, 4])
    new = last + rng.normal(0, 2, last.shape) + 20
    rows = np.array([0, 1, 3, 5])
    bk.reupdate(rows, x0[rows], P0[rows], last[rows], new[rows], gaps[rows])
    # reference: filterpy from the saved states, one track at a time
    for i in rows:
        r = KalmanBoxFilter(boxes[i])
        r._kf.x, r._kf.P = x0[i][:, None].copy(), P0[i].copy()
        z0, z1 = kalman_z(last[i]), kalman_z(new[i])
        for s in range(1, gaps[i]):
            r._kf.predict()
            r._kf.update(z0 + (z1 - z0) * s / gaps[i])
        r._kf.predict()
        np.testing.assert_allclose(bk.x[i], r._kf.x[:, 0], rtol=1e-9, atol=1e-6)
        np.testing.assert_allclose(bk.P[i], r._kf.P, rtol=1e-9, atol=1e-6)
    untouched = np.setdiff1d(np.arange(6), rows)
    np.testing.assert_array_equal(bk.x[untouched], x0[untouched])


def test_appearance_ranking_measures():
    """bench/eval_appearance.rank: rank-1 and mAP of later embeddings of the same object."""
    from eval_appearance import rank

    frames, ids = np.array([0, 0, 10, 10]), np.array([1, 2, 1, 2])
    good = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], float)
    r = rank(frames, ids, good, gap=10)
    assert (r.queries, r.rank1_later, r.map_later, r.rank1_in_view, r.mean_candidates_in_view) == (2, 1.0, 1.0, 1.0, 2.0)
    swapped = np.array([[1, 0], [0, 1], [0.6, 0.8], [0.8, 0.6]])
    r = rank(frames, ids, swapped, gap=10)
    assert (r.rank1_later, r.map_later, r.rank1_in_view) == (0.0, 0.5, 0.0)


def test_switch_causes_on_real_ground_truth():
    """bench/eval_tracking.switch_causes on MOT17-05 ground truth replayed as a
    result: no switches; relabelling one person from frame 50 on (a re-born
    track) and giving another person's id to a third one (taken over) are told apart."""
    from eval_tracking import switch_causes

    info, gt, _ = _mot17("MOT17-05", frames=100)
    keep = (gt[:, 6] != 0) & (gt[:, 7] == 1)
    res = gt[keep][:, :6].copy()
    assert switch_causes(gt, res, 100) == {}
    pid = int(res[res[:, 0] == 50][0, 1])
    res[(res[:, 1] == pid) & (res[:, 0] >= 50), 1] = 10_000  # a new track from frame 50
    alive = res[res[:, 0] == 60][:, 1].astype(int)
    other, taker = (int(v) for v in alive[(alive != pid) & (alive != 10_000)][:2])
    res[(res[:, 1] == other) & (res[:, 0] >= 60), 1] = taker  # taker's id continues on another person
    out = switch_causes(gt, res, 100)
    assert sum(v for k, v in out.items() if k.startswith("new continuous")) == 1, out
    assert sum(v for k, v in out.items() if k.startswith("taken continuous")) == 1, out


def _walker_behind_standing_person(params: TrackerParams) -> tuple[int, set[int]]:
    """Walker A (4 px/frame to the right) passes behind B, who stands still, is
    not detected for 12 frames, and slows to 2 px/frame meanwhile: when A
    re-emerges its box overlaps neither its coasted prediction nor its last
    observation by the IoU threshold (0.21 each), but sits right beside them.
    Returns A's track id before the occlusion and the ids reported on A after."""
    tracker = Tracker("cam", params)
    b = [190.0, 100.0, 230.0, 200.0]
    a_id, after = -1, set()
    for f in range(1, 41):
        x = 100.0 + 4 * (f - 1) if f <= 21 else 180.0 + 2 * (f - 21)
        a = [x, 100.0, x + 40.0, 200.0]
        hidden = 22 <= f <= 33
        boxes = np.array([b] if hidden else [b, a], np.float32)
        upd = tracker.update(Detections("cam", f, f / 25.0, boxes, np.full(len(boxes), 0.9, np.float32),
                                        np.zeros(len(boxes), np.int64), ("person",), (640, 480)))
        seen = [t for t in upd.confirmed if t.time_since_update == 0]
        iou = iou_matrix(np.array([t.box for t in seen]), np.array([a]))[:, 0]
        if f == 21:
            a_id = seen[int(iou.argmax())].track_id
        elif f > 33:
            after |= {t.track_id for t, v in zip(seen, iou) if v > 0.5}
    return a_id, after


def test_buffered_iou_refinds_a_walker_beside_its_occluder():
    """Without the buffered pass the re-emerging walker is matched by nothing
    (IoU pass, ByteTrack pass and the last-observation recovery all miss) and
    is born again under a new id; with buffer_iou its hidden track, widened,
    overlaps the widened detection and keeps the id."""
    a_id, after = _walker_behind_standing_person(TrackerParams())
    assert after and a_id not in after
    a_id, after = _walker_behind_standing_person(TrackerParams(buffer_iou=0.3))
    assert after == {a_id}

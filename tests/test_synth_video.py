"""Synthetic checkout video from the shared tray photos: the video decodes as
stated, and its ground truth (receipts, gt.txt) agrees with the photos and
with what is drawn; receipts scoring on hand-made event lists."""
from __future__ import annotations

import collections
import filecmp
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import DATA

from dishtrack.models.synth_video import SynthSettings, make_checkout_video
from dishtrack.tracking.receipts_eval import EventCounts, GtTray, score_receipts

TRAYS = DATA / "mealtray_kiosk_dev"
SETTINGS = SynthSettings(width=320, height=240, fps=25, seed=3, speed_px_s=(90, 150), hand_prob=1.0)


def _read_yolo_for_tests(path: Path):
    """The CLI's stand-in YOLO+trays.csv reader (one function, swapped for importers.load_dataset later)."""
    from dishtrack.service.cli import _load_tray_photos

    return _load_tray_photos(str(path))


@pytest.fixture(scope="module")
def photos():
    return _read_yolo_for_tests(TRAYS)


@pytest.fixture(scope="module")
def video(photos, tmp_path_factory):
    samples, classes = photos
    return make_checkout_video(samples, tmp_path_factory.mktemp("synth"), 3, SETTINGS, classes=classes)


def _gt(res) -> np.ndarray:
    return np.loadtxt(res.gt_txt, delimiter=",", ndmin=2)


def test_video_decodes_at_stated_size_fps_and_length(video):
    cap = cv2.VideoCapture(str(video.video))
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(25)
    n = 0
    while True:
        ok, img = cap.read()
        if not ok:
            break
        assert img.shape == (240, 320, 3)
        n += 1
    assert n == video.frames
    assert 6 * 25 <= n <= 16 * 25  # 3 trays, roughly 10 s
    doc = json.loads(video.receipts_json.read_text())
    assert doc["frames"] == n and doc["fps"] == 25 and (doc["width"], doc["height"]) == (320, 240)
    ini = video.seqinfo.read_text()
    assert f"seqLength={n}" in ini and "frameRate=25" in ini and "imWidth=320" in ini
    assert video.labels_txt.read_text().splitlines()[0] == "0 Plate"


def test_receipts_equal_the_source_photo_labels_and_trays_differ(video, photos):
    samples, _ = photos
    by_image = {str(s.image): s for s in samples}
    doc = json.loads(video.receipts_json.read_text())
    assert len(doc["trays"]) == 3
    assert len({t["group"] for t in doc["trays"]}) == 3  # one photo per tray, different trays
    for t in doc["trays"]:
        assert t["counts"] == dict(collections.Counter(by_image[t["source_image"]].labels))
        assert sum(t["counts"].values()) == len(t["gt_ids"])
    assert any(t["hand_frames"] for t in doc["trays"])


def test_gt_boxes_inside_frames_and_moving_right(video):
    gt = _gt(video)
    x, y, w, h, vis = gt[:, 2], gt[:, 3], gt[:, 4], gt[:, 5], gt[:, 8]
    assert (x >= 0).all() and (y >= 0).all() and (x + w <= 320 + 1e-6).all() and (y + h <= 240 + 1e-6).all()
    assert (w >= 1).all() and (h >= 1).all() and ((vis >= 0) & (vis <= 1)).all()
    assert (gt[:, 0] >= 1).all() and (gt[:, 0] <= video.frames).all()
    assert (vis < 0.999).any()  # clipped at the edges / under the hand
    doc = json.loads(video.receipts_json.read_text())
    assert {int(i) for i in gt[:, 1]} == {i for t in doc["trays"] for i in t["gt_ids"]}
    for tid in np.unique(gt[:, 1]):
        rows = gt[gt[:, 1] == tid]
        assert (np.diff(rows[:, 0]) == 1).all()  # seen in consecutive frames
        fully = rows[(rows[:, 2] > 0) & (rows[:, 2] + rows[:, 4] < 320)]  # unclipped: centre is meaningful
        assert (np.diff(fully[:, 2] + fully[:, 4] / 2) > 0).all()


def test_each_tray_crosses_the_line_once_at_its_frame(video):
    gt = _gt(video)
    doc = json.loads(video.receipts_json.read_text())
    line = 0.5 * 320
    for t in doc["trays"]:
        f = t["cross_frame"]
        assert t["first_frame"] < f < t["last_frame"]
        assert t["cross_time_s"] == pytest.approx(f / 25)
        rows = gt[np.isin(gt[:, 1], t["gt_ids"])]
        cx = rows[:, 2] + rows[:, 4] / 2
        # before the crossing frame the tray's dishes lie mostly left of the line, after mostly right
        before = cx[rows[:, 0] == f + 1 - 12].mean()
        after = cx[rows[:, 0] == f + 1 + 12].mean()
        at = rows[rows[:, 0] == f + 1]
        assert before < line < after
        assert (at[:, 2] < line).any() or (at[:, 2] + at[:, 4] > line).any()
        # dishes of other trays are never on the line at that frame (trays do not overlap)
        others = gt[(gt[:, 0] == f + 1) & ~np.isin(gt[:, 1], t["gt_ids"])]
        assert not ((others[:, 2] < line) & (others[:, 2] + others[:, 4] > line)).any()
    frames = [(t["first_frame"], t["last_frame"]) for t in doc["trays"]]
    assert [t["cross_frame"] for t in doc["trays"]] == sorted(t["cross_frame"] for t in doc["trays"])
    assert frames == sorted(frames)


def test_same_seed_same_video_other_seed_differs(video, photos, tmp_path):
    samples, classes = photos
    again = make_checkout_video(samples, tmp_path / "a", 3, SETTINGS, classes=classes)
    assert filecmp.cmp(again.gt_txt, video.gt_txt, shallow=False)
    assert again.receipts == video.receipts
    assert filecmp.cmp(again.video, video.video, shallow=False)
    other = make_checkout_video(samples, tmp_path / "b", 2,
                                SynthSettings(width=160, height=120, seed=4, hand_prob=0.0), classes=classes)
    assert [r.source_image for r in other.receipts] != [r.source_image for r in video.receipts][:2]


def test_cli_make_video(tmp_path):
    from dishtrack.service.cli import main

    out = tmp_path / "v"
    assert main(["make-video", "--data", str(TRAYS), "--out", str(out), "--trays", "2", "--seed", "5",
                 "--width", "160", "--height", "120", "--fps", "10"]) == 0
    doc = json.loads((out / "receipts.json").read_text())
    assert len(doc["trays"]) == 2 and doc["fps"] == 10 and (out / "checkout.mp4").stat().st_size > 0


# -- scoring -----------------------------------------------------------------------------------

GT = [GtTray(0, {"Plate": 1, "Bread": 1}, 4.0, 2.0, 6.0),
      GtTray(1, {"Plate": 1, "Drink": 2}, 8.0, 5.5, 10.0),
      GtTray(2, {"Plate": 1}, 12.0, 9.5, 14.0)]


def test_score_exact():
    evs = [EventCounts(4.1, {"Bread": 1, "Plate": 1}), EventCounts(7.9, {"Plate": 1, "Drink": 2}),
           EventCounts(12.2, {"Plate": 1})]
    s = score_receipts(evs, GT)
    assert (s["exact_receipts"], s["exact_receipt_rate"], s["trays_one_event"]) == (3, 1.0, 3)
    assert (s["item_precision"], s["item_recall"], s["events_per_tray"]) == (1.0, 1.0, 1.0)


def test_score_missing_item():
    evs = [EventCounts(4.1, {"Bread": 1, "Plate": 1}), EventCounts(7.9, {"Plate": 1, "Drink": 1}),
           EventCounts(12.2, {"Plate": 1})]
    s = score_receipts(evs, GT)
    assert s["exact_receipts"] == 2 and s["trays_one_event"] == 3
    assert s["item_precision"] == 1.0 and s["item_recall"] == pytest.approx(5 / 6)
    assert [r["exact"] for r in s["per_tray"]] == [True, False, True]
    assert (s["trays_flagged"], s["wrong_flagged"], s["wrong_unflagged"]) == (0, 0, 1)


def test_score_review_flags():
    """A wrong receipt flagged for review is caught; a right one flagged costs a review; a wrong one
    not flagged is charged as it is."""
    evs = [EventCounts(4.1, {"Bread": 1, "Plate": 1}, needs_review=True),   # right, reviewed anyway
           EventCounts(7.9, {"Plate": 1, "Drink": 1}, needs_review=True),   # wrong, caught
           EventCounts(12.2, {"Plate": 2})]                                 # wrong, trusted
    s = score_receipts(evs, GT)
    assert (s["trays_flagged"], s["wrong_flagged"], s["wrong_unflagged"]) == (2, 1, 1)
    assert [r["flagged"] for r in s["per_tray"]] == [True, True, False]


def test_score_split_tray():
    evs = [EventCounts(3.6, {"Plate": 1}), EventCounts(4.5, {"Bread": 1}),
           EventCounts(7.9, {"Plate": 1, "Drink": 2}), EventCounts(12.2, {"Plate": 1})]
    s = score_receipts(evs, GT)
    assert s["exact_receipts"] == 2 and s["trays_split"] == 1 and s["trays_one_event"] == 2
    assert s["item_precision"] == 1.0 and s["item_recall"] == 1.0  # items all there, receipt wrong
    assert s["events_per_tray"] == pytest.approx(4 / 3)


def test_score_merged_pair_and_stray_event():
    # trays 0 and 1 in one event (timed between them, nearer tray 1), and an event with no tray in view
    evs = [EventCounts(6.5, {"Plate": 2, "Bread": 1, "Drink": 2}), EventCounts(12.2, {"Plate": 1}),
           EventCounts(30.0, {"Plate": 1})]
    s = score_receipts(evs, GT)
    assert s["exact_receipts"] == 1 and s["trays_no_event"] == 1 and s["unmatched_events"] == 1
    assert [r["events"] for r in s["per_tray"]] == [0, 1, 1]
    # tray 1 credited Plate 1 + Drink 2, tray 2 Plate 1: tp 4 of 7 predicted, of 6 true
    assert s["item_precision"] == pytest.approx(4 / 7) and s["item_recall"] == pytest.approx(4 / 6)


# -- bench: tracker + checkout on the generated video with the ground-truth detector ------------

def _bench(video, *extra):
    import checkout_video_eval as bench

    p = video.out_dir / f"score{len(extra)}.json"
    assert bench.main([str(video.out_dir), "--oracle", "--json", str(p), *extra]) == 0
    return json.loads(p.read_text())


def test_oracle_direct_gives_one_exact_receipt_per_tray(video):
    s = _bench(video, "--mode", "direct")
    assert s["trays"] == 3 and s["events"] == 3 and s["exact_receipts"] == 3
    assert s["item_precision"] == 1.0 and s["item_recall"] == 1.0
    assert s["setup"]["zone"]["direction"] == "left_to_right"


def test_oracle_realtime_pipeline_gives_one_exact_receipt_per_tray(video):
    """Through Pipeline (file reader paced at the video fps, SQLite store)."""
    s = _bench(video, "--realtime")
    assert s["setup"]["mode"] == "pipeline" and s["events"] == 3 and s["exact_receipts"] == 3


# -- bench/eval_tracking.py on a checkout video: every dish is an object -----------------------

def test_eval_tracking_scores_every_dish_of_a_checkout_video(video):
    """A make-video folder is a sequence of bench/eval_tracking.py: its gt.txt's class column is the
    dish, so every dish counts (the MOTChallenge rule keeps class 1 only: here, Starters), boxes
    less than a quarter visible are ignored, and the noise protocol draws detections of every dish."""
    from eval_tracking import _prepare, load_sequences, mot_considered, run_dishtrack

    from dishtrack.tracking.mot import NoiseProtocol
    from dishtrack.tracking.tracker import TrackerParams

    out = video.out_dir
    (seq,) = load_sequences(out.parent, [out.name], None, NoiseProtocol(seed=0), 25, (320, 240))
    gt = _gt(video)
    assert seq.size == (320, 240) and seq.fps == 25 and seq.detections is None
    assert np.array_equal(seq.considered, gt[:, 8] >= 0.25)
    seen = gt[seq.considered]
    assert len(np.unique(seen[:, 7])) >= 4  # several dishes, not only class 1
    # the ground truth replayed as a result: every considered dish is one object, matched to itself
    res = seen[:, :6]
    data = _prepare(gt, res, seq.n, seq.considered)
    assert data["num_gt_ids"] == len(np.unique(seen[:, 1])) == data["num_tracker_ids"]
    assert data["num_gt_dets"] == len(seen)
    assert all(len(s) == 0 or np.allclose(np.diag(s), 1.0) for s in data["similarity_scores"])
    mot_rule = _prepare(gt, res, seq.n)  # what the MOTChallenge rule would have scored
    assert mot_rule["num_gt_ids"] == len(np.unique(gt[mot_considered(gt), 1])) < data["num_gt_ids"]
    # noisy detections cover every dish class, and the tracker follows them
    det_cls = {int(gt[(gt[:, 0] == d[0])][np.argmax([_iou(d, g) for g in gt[gt[:, 0] == d[0]]]), 7])
               for d in seq.dets if (gt[:, 0] == d[0]).any()}
    assert det_cls >= set(np.unique(seen[:, 7]).astype(int))
    tracked = run_dishtrack(TrackerParams())(seq)
    assert len(tracked) > 0.7 * len(seen)
    with pytest.raises(ValueError, match="--checkpoint"):  # no det/det.txt, no --noise
        load_sequences(out.parent, [out.name], None, None, 25, (320, 240))


def _iou(d, g) -> float:
    a = np.r_[d[2:4], d[2:4] + d[4:6]]
    b = np.r_[g[2:4], g[2:4] + g[4:6]]
    w = np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None)
    inter = w[0] * w[1]
    return inter / (d[4] * d[5] + g[4] * g[5] - inter)


def test_eval_tracking_tracks_a_dish_checkpoints_own_detections(video, tiny_checkpoint, tmp_path):
    """--checkpoint: the dish model runs on every frame as the service runs it, dishtrack gets its
    Detections whole (classes, calibrated scores, embeddings), the baselines the same boxes as MOT
    rows; the raw predictions are cached under the checkpoint's hash and replayed the same."""
    from eval_tracking import load_sequences, run_dishtrack

    from dishtrack.tracking.tracker import TrackerParams

    ck, _ = tiny_checkpoint
    out = video.out_dir
    cache = tmp_path / "{seq}.pkl"
    (seq,) = load_sequences(out.parent, [out.name], None, None, 25, (320, 240), str(ck), str(cache), device="cpu")
    assert (tmp_path / f"{out.name}.pkl").is_file()
    dets = seq.detections
    assert len(dets) == seq.n == json.loads((out / "receipts.json").read_text())["frames"]
    assert [d.frame_index for d in dets] == list(range(1, seq.n + 1))  # MOT frames, 1-based
    n_boxes = sum(len(d.boxes) for d in dets)
    assert n_boxes > 0 and len(seq.dets) == n_boxes
    assert all(d.embeddings is not None and len(d.embeddings) == len(d.boxes) for d in dets)
    # a model of tiny budgets may score every box below the dish thresholds (on one machine: 23 boxes
    # on the video, the best 0.50, none at high_score 0.55): every reported box (>= 0.3) may start a track
    params = TrackerParams(high_score=0.3)
    with_app = run_dishtrack(params)(seq)
    assert len(with_app) and set(with_app[:, 0].astype(int)) <= set(range(1, seq.n + 1))
    (again,) = load_sequences(out.parent, [out.name], None, None, 25, (320, 240), str(ck), str(cache), device="cpu")
    assert np.array_equal(again.dets, seq.dets)
    assert np.array_equal(run_dishtrack(params)(again), with_app)
    # the cache is the checkpoint's predictions on this video: another video does not reuse it
    import hashlib
    import types

    from checkout_video_eval import CachedPredictions, prediction_key

    from dishtrack.config import DetectorConfig

    key = hashlib.sha256(Path(ck).read_bytes()).hexdigest()
    assert prediction_key(DetectorConfig(kind="checkpoint", checkpoint=str(ck))) == key  # earlier caches stay valid
    stub = types.SimpleNamespace(labels=())
    path = tmp_path / f"{out.name}.pkl"
    assert len(CachedPredictions(stub, path, key, out / "checkout.mp4").preds) == seq.n
    assert CachedPredictions(stub, path, key, out / "gt.txt").preds == {}
    assert CachedPredictions(stub, path, "another checkpoint", out / "checkout.mp4").preds == {}
    # nor do predictions at another localiser input side (checkout_video_eval --detector)
    other = prediction_key(DetectorConfig(kind="checkpoint", checkpoint=str(ck), input_size=448))
    assert other != key and CachedPredictions(stub, path, other, out / "checkout.mp4").preds == {}
    assert prediction_key(DetectorConfig(kind="checkpoint", checkpoint=str(ck), backend="openvino")) != key
    assert prediction_key(DetectorConfig(kind="checkpoint", checkpoint=str(ck), max_detections=500)) == key  # 100 max
    assert prediction_key(DetectorConfig(kind="checkpoint", checkpoint=str(ck), device="cpu")) == key

"""The bundled COCO CenterNet (run from its TFJS weights in PyTorch) on the real video."""
import numpy as np
import pytest

from conftest import MOT_GT, read_frames
from dishtrack.config import DetectorConfig
from dishtrack.models.detector import Detector
from dishtrack.tracking import Frame, iou_matrix
from dishtrack.tracking.mot import read_mot


def test_detects_people_in_real_video_against_ground_truth(detector):
    gt = read_mot(MOT_GT / "TUD-Campus" / "gt.txt")
    frames = read_frames(8, start=0)
    dets = detector.detect([Frame("cam", f, 0.0, img) for f, img in frames])
    tp = n_gt = n_det = 0
    for (f, _), d in zip(frames, dets):
        g = gt[gt[:, 0] == f]
        gb = np.c_[g[:, 2:4], g[:, 2:4] + g[:, 4:6]]
        keep = np.array([d.labels[c] == "person" for c in d.class_ids], bool)
        iou = iou_matrix(gb, d.boxes[keep])
        tp += int((iou.max(axis=1) >= 0.5).sum()) if iou.size else 0
        n_gt += len(gb)
        n_det += int(keep.sum())
    recall, precision = tp / n_gt, tp / max(n_det, 1)
    assert recall >= 0.6, (recall, precision)
    assert precision >= 0.6, (recall, precision)


def test_batched_equals_single(detector):
    frames = [Frame("cam", i, 0.0, img) for i, img in read_frames(3, start=30)]
    batched = detector.detect(frames)
    for fr, b in zip(frames, batched):
        s = detector.detect([fr])[0]
        assert len(s) == len(b)
        np.testing.assert_allclose(s.boxes, b.boxes, atol=0.5)
        np.testing.assert_allclose(s.scores, b.scores, atol=1e-3)


def test_boxes_are_in_frame_pixels_for_other_sizes(detector):
    import cv2

    _, img = read_frames(1, start=10)[0]
    big = cv2.resize(img, (1280, 960))
    a = detector.detect([Frame("c", 0, 0.0, img)])[0]
    b = detector.detect([Frame("c", 0, 0.0, big)])[0]
    assert b.image_size == (1280, 960)
    assert len(a) and abs(len(a) - len(b)) <= 1
    assert np.abs(b.boxes.max(axis=0)[2:] / a.boxes.max(axis=0)[2:] - 2.0).max() < 0.1


def test_class_filter_and_unknown_class():
    d = Detector(DetectorConfig(device="cpu", classes=["cup", "bowl"]))
    frames = [Frame("cam", i, 0.0, img) for i, img in read_frames(2)]
    assert all(len(x) == 0 or {x.labels[c] for c in x.class_ids} <= {"cup", "bowl"} for x in d.detect(frames))
    with pytest.raises(ValueError, match="plate"):
        Detector(DetectorConfig(device="cpu", classes=["plate"]))


def test_cuda_requested_without_cuda_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        Detector(DetectorConfig(device="cuda"))


def test_bad_model_files(tmp_path):
    from dishtrack.models.tfjs_graph import GraphFormatError, TFJSGraph

    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(GraphFormatError):
        TFJSGraph(tmp_path / "m.json", ["x"])
    from dishtrack.models.detector import load_checkpoint

    (tmp_path / "ck.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="dishtrack checkpoint"):
        load_checkpoint(tmp_path / "ck.pt")

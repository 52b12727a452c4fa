"""Transfer learning on real labelled frames (TUD-Campus video + MOT ground truth)."""
import numpy as np
import pytest
import torch

from conftest import MOT_GT, VIDEO, read_frames
from dishtrack.config import DetectorConfig
from dishtrack.models.dataset import DatasetError, export_mot_video, read_manifest
from dishtrack.models.detector import Detector, load_checkpoint
from dishtrack.models.train import TrainSettings, train
from dishtrack.tracking import Frame, iou_matrix
from dishtrack.tracking.mot import read_mot


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    n = export_mot_video(VIDEO, MOT_GT / "TUD-Campus" / "gt.txt", out, label="pedestrian", every=2)
    assert n == 36
    return out


def test_manifest_errors_name_the_line(tmp_path, dataset):
    bad = tmp_path / "manifest.jsonl"
    bad.write_text('{"image": "x.jpg", "boxes": [[0,0,1,1]], "labels": []}\n')
    with pytest.raises(DatasetError, match="manifest.jsonl:1"):
        read_manifest(tmp_path)
    assert len(read_manifest(dataset)) == 36


def test_two_stage_training_learns_a_new_label(tmp_path, dataset):
    out = tmp_path / "ck.pt"
    rep = train(TrainSettings(data=str(dataset), out=str(out), epochs_head=6, epochs_finetune=3,
                              input_size=256, batch_size=8, lr_head=2e-3, lr_finetune=5e-4))
    assert rep["classes"] == ["pedestrian"] and rep["seeded_from_coco"] == []
    assert rep["val_loss_after_head"] < rep["val_loss_start"]
    assert rep["val_loss_end"] < rep["val_loss_after_head"]
    lrs = rep["finetune_lrs"]
    assert lrs["trunk0"] < lrs["trunk1"] < lrs["trunk2"] < lrs["trunk3"] < lrs["head"]

    det = Detector(DetectorConfig(kind="checkpoint", checkpoint=str(out), device="cpu", score_threshold=0.2))
    assert det.labels == ("pedestrian",) and det.input_size == 256
    gt = read_mot(MOT_GT / "TUD-Campus" / "gt.txt")
    f, img = read_frames(1, start=66)[0]  # a validation frame (last 20% are held out)
    d = det.detect([Frame("c", f, 0.0, img)])[0]
    g = gt[gt[:, 0] == f]
    iou = iou_matrix(np.c_[g[:, 2:4], g[:, 2:4] + g[:, 4:6]], d.boxes)
    assert iou.size and (iou.max(axis=1) >= 0.5).sum() >= 1


def test_stage_one_freezes_the_pretrained_trunk(tmp_path, dataset):
    out = tmp_path / "frozen.pt"
    train(TrainSettings(data=str(dataset), out=str(out), epochs_head=1, epochs_finetune=0,
                        input_size=256, max_images=8, val_fraction=0))
    from dishtrack.models.detector import CenterNetModel, bundled_weights

    fresh = CenterNetModel(bundled_weights(), num_classes=1)
    trained, _, _ = load_checkpoint(out)
    for (name, a), (_, b) in zip(fresh.graph.state_dict().items(), trained.graph.state_dict().items()):
        assert torch.equal(a, b), name
    assert not torch.equal(fresh.head.cls[1].weight, trained.head.cls[1].weight)

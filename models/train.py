"""Transfer learning for dish detection.

Stage 1: the pretrained CenterNet-MobileNetV3 trunk is frozen and a new head
(class heatmap for the dataset's labels + box edges) is trained. Stage 2: all
weights are fine-tuned with layer-wise learning rates: the head gets
``lr_finetune``, the trunk is split into stages in graph order and each
stage nearer the input gets ``layer_decay`` times the rate of the next.

The new head starts from the pretrained COCO head: box-edge weights are
copied, and a dish label that is also a COCO label starts from that COCO
class channel; other labels start from the CenterNet prior.
"""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import DataLoader

from .dataset import DetectionDataset, read_manifest
from .detector import CenterNetModel, bundled_weights, pick_device, save_checkpoint
from .labels import COCO_LABELS
from .tfjs_graph import read_tfjs_weights

log = logging.getLogger(__name__)
TRUNK_STAGES = 4


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str
    out: str
    epochs_head: int = Field(10, ge=0)
    epochs_finetune: int = Field(5, ge=0)
    lr_head: float = Field(1e-3, gt=0)
    lr_finetune: float = Field(2e-4, gt=0)
    layer_decay: float = Field(0.5, gt=0, le=1)
    batch_size: int = Field(8, ge=1)
    input_size: int = Field(512, ge=128, le=1024, multiple_of=32)
    device: str = "auto"
    val_fraction: float = Field(0.2, ge=0, lt=1)
    seed: int = 0
    max_images: int | None = Field(None, ge=1)


def focal_loss(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss."""
    pred = pred.clamp(1e-4, 1 - 1e-4)
    pos = gt.eq(1).float()
    neg = 1 - pos
    pos_loss = (torch.log(pred) * (1 - pred) ** 2 * pos).sum()
    neg_loss = (torch.log(1 - pred) * pred ** 2 * (1 - gt) ** 4 * neg).sum()
    n = pos.sum()
    return -(pos_loss + neg_loss) / n.clamp(min=1)


def detection_loss(heat: torch.Tensor, ltrb: torch.Tensor, batch: dict) -> torch.Tensor:
    b = ltrb.shape[0]
    pred = ltrb.reshape(b, 4, -1).gather(2, batch["ind"][:, None, :].expand(b, 4, -1)).permute(0, 2, 1)
    m = batch["mask"][..., None]
    l1 = (F.l1_loss(pred * m, batch["ltrb"] * m, reduction="sum") / (m.sum() * 4).clamp(min=1))
    return focal_loss(heat, batch["heat"]) + 0.1 * l1 / 4.0  # edge distances in stride units


def init_head_from_coco(model: CenterNetModel, classes: tuple[str, ...]) -> list[str]:
    """Copy pretrained head weights into the new head; returns the labels seeded from COCO."""
    w = read_tfjs_weights(json.loads(bundled_weights().read_text()), bundled_weights().parent)

    def dw(name):
        a = w[name]  # kh, kw, c, 1
        return torch.from_numpy(a.transpose(2, 3, 0, 1).reshape(a.shape[2], 1, a.shape[0], a.shape[1]).copy())

    def pw(name):
        return torch.from_numpy(w[name].transpose(3, 2, 0, 1).copy())

    head = model.head
    seeded = []
    with torch.no_grad():
        head.wh[0].weight.copy_(dw("CenternetHead/centernet_wh_output/depthwise_weights"))
        head.wh[1].weight.copy_(pw("CenternetHead/centernet_wh_output/pointwise_weights"))
        head.wh[1].bias.copy_(torch.from_numpy(w["CenternetHead/centernet_wh_output/biases"].copy()))
        head.cls[0].weight.copy_(dw("CenternetHead/centernet_cls_output/depthwise_weights"))
        cls_w = pw("CenternetHead/centernet_cls_output/pointwise_weights")
        cls_b = torch.from_numpy(w["CenternetHead/centernet_cls_output/biases"].copy())
        for i, c in enumerate(classes):
            if c in COCO_LABELS:
                j = COCO_LABELS.index(c)
                head.cls[1].weight[i].copy_(cls_w[j])
                head.cls[1].bias[i] = cls_b[j]
                seeded.append(c)
    return seeded


def layerwise_groups(model: CenterNetModel, lr: float, decay: float) -> list[dict]:
    """Head at ``lr``; trunk in TRUNK_STAGES chunks (graph order), earlier = lower lr."""
    trunk = list(model.graph.parameters())
    chunks = np.array_split(np.arange(len(trunk)), TRUNK_STAGES)
    groups = []
    for k, idx in enumerate(chunks):
        stage_lr = lr * decay ** (TRUNK_STAGES - k)
        groups.append({"params": [trunk[i] for i in idx], "lr": stage_lr, "name": f"trunk{k}"})
    groups.append({"params": list(model.head.parameters()), "lr": lr, "name": "head"})
    return groups


def _run_epoch(model, loader, device, opt=None) -> float:
    total, n = 0.0, 0
    model.train(opt is not None)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.set_grad_enabled(opt is not None):
            heat, ltrb = model(batch["image"])
            loss = detection_loss(heat, ltrb, batch)
        if opt is not None:
            opt.zero_grad()
            loss.backward()
            opt.step()
        total += loss.item() * len(batch["image"])
        n += len(batch["image"])
    return total / max(n, 1)


def _fit(model, loader, device, opt, epochs: int, stage: str) -> list[float]:
    losses = []
    for ep in range(epochs):
        t0 = time.time()
        losses.append(_run_epoch(model, loader, device, opt))
        log.info("%s epoch %d/%d loss %.4f (%.1fs)", stage, ep + 1, epochs, losses[-1], time.time() - t0)
    return losses


def train(s: TrainSettings) -> dict:
    random.seed(s.seed)
    np.random.seed(s.seed)
    torch.manual_seed(s.seed)
    samples = read_manifest(s.data)
    if s.max_images:
        samples = samples[: s.max_images]
    classes = tuple(sorted({lbl for smp in samples for lbl in smp.labels}))
    if not classes:
        raise ValueError(f"{s.data}: no labelled boxes")
    n_val = int(round(len(samples) * s.val_fraction))
    # contiguous split: neighbouring video frames must not straddle train/val
    train_s, val_s = samples[: len(samples) - n_val], samples[len(samples) - n_val:]
    device = pick_device(s.device)
    model = CenterNetModel(bundled_weights(), num_classes=len(classes)).to(device)
    seeded = init_head_from_coco(model, classes)
    model.to(device)
    tl = DataLoader(DetectionDataset(train_s, classes, s.input_size, augment=True), batch_size=s.batch_size,
                    shuffle=True, num_workers=0)
    vl = DataLoader(DetectionDataset(val_s, classes, s.input_size), batch_size=s.batch_size) if val_s else None
    report: dict = {"classes": list(classes), "seeded_from_coco": seeded, "train_images": len(train_s),
                    "val_images": len(val_s), "device": str(device)}
    if vl:
        report["val_loss_start"] = _run_epoch(model, vl, device)

    # stage 1: frozen trunk, new head
    for p in model.graph.parameters():
        p.requires_grad_(False)
    report["stage1"] = _fit(model, tl, device, torch.optim.Adam(model.head.parameters(), lr=s.lr_head),
                            s.epochs_head, "stage 1 (frozen trunk)")
    if vl:
        report["val_loss_after_head"] = _run_epoch(model, vl, device)

    # stage 2: everything, layer-wise learning rates
    for p in model.graph.parameters():
        p.requires_grad_(True)
    groups = layerwise_groups(model, s.lr_finetune, s.layer_decay)
    report["finetune_lrs"] = {g["name"]: g["lr"] for g in groups}
    report["stage2"] = _fit(model, tl, device, torch.optim.Adam(groups), s.epochs_finetune, "stage 2 (fine-tune)")
    if vl:
        report["val_loss_end"] = _run_epoch(model, vl, device)
    model.eval()
    Path(s.out).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(s.out, model.cpu(), classes, s.input_size, meta={"report": report})
    report["checkpoint"] = s.out
    return report

"""Batched CNN object detector on PyTorch: the bundled COCO CenterNet-MobileNetV3,
or a checkpoint written by ``dishtrack train`` (same trunk, new dish head).

``Detector.detect(frames)`` takes one frame per camera (any sizes), runs them
as one batch on CUDA when available (else CPU) and returns one Detections per
frame with boxes in that frame's pixels.
"""
from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from dishtrack.tracking.types import Detections, Frame

from .labels import COCO_LABELS
from .tfjs_graph import TFJSGraph

log = logging.getLogger(__name__)

STRIDE = 4  # heatmap cell size in input pixels
WH_SCALE = 16.0  # the graph's tower_0/mul/y: box edge distances are head output * 16
FEATURE_NODE = "tower_0/CenternetHead/mul"  # neck features (stride 4) feeding the heads
HEAT_NODE = "tower_0/keypoints"
WH_NODE = "tower_0/wh"
CENTERNET_FORMAT = "dishtrack-centernet-v1"  # an older checkpoint: a dish head on the bundled CenterNet


def bundled_weights() -> Path:
    return Path(str(resources.files("dishtrack.models").joinpath("weights", "centernet.json")))


def pick_device(pref: str = "auto") -> torch.device:
    if pref == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for (--device / detector.device) but CUDA is not available on "
                         "this machine; use auto or cpu")
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(pref)


class DishHead(nn.Module):
    """CenterNet heads on the neck features: class heatmap + 4 box-edge distances."""

    def __init__(self, in_ch: int, num_classes: int) -> None:
        super().__init__()

        def sep(out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(in_ch, in_ch, 3, padding=1, groups=in_ch, bias=False),
                                 nn.Conv2d(in_ch, out, 1))

        self.cls = sep(num_classes)
        self.wh = sep(4)
        nn.init.constant_(self.cls[1].bias, -2.19)  # prior 0.1, as in CenterNet

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(self.cls(feat)), self.wh(feat) * WH_SCALE


class CenterNetModel(nn.Module):
    """Trunk (TFJS graph) + heads. ``head=None`` uses the pretrained COCO heads in the graph."""

    def __init__(self, graph_json: Path, num_classes: int | None = None) -> None:
        super().__init__()
        if num_classes is None:
            self.graph = TFJSGraph(graph_json, [HEAT_NODE, WH_NODE])
            self.head = None
        else:
            self.graph = TFJSGraph(graph_json, [FEATURE_NODE])
            with torch.no_grad():
                ch = self.graph(torch.zeros(1, 3, 64, 64))[FEATURE_NODE].shape[1]
            self.head = DishHead(ch, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B,3,H,W) RGB 0..255 float. Returns heat (B,C,H/4,W/4) in 0..1, ltrb (B,4,H/4,W/4) pixels."""
        out = self.graph(x)
        if self.head is None:
            return out[HEAT_NODE], out[WH_NODE]
        return self.head(out[FEATURE_NODE])


def decode(heat: torch.Tensor, ltrb: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CenterNet decoding: 3x3 peak picking then top-k over classes x positions.
    Returns boxes (B,k,4) in input pixels, scores (B,k), classes (B,k)."""
    b, c, h, w = heat.shape
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    k = min(k, c * h * w)
    scores, idx = peaks.reshape(b, -1).topk(k)
    cls = idx // (h * w)
    pos = idx % (h * w)
    ys, xs = (pos // w).float() * STRIDE, (pos % w).float() * STRIDE
    d = ltrb.reshape(b, 4, h * w).gather(2, pos[:, None, :].expand(b, 4, k))
    boxes = torch.stack([xs - d[:, 0], ys - d[:, 1], xs + d[:, 2], ys + d[:, 3]], dim=2)
    return boxes, scores, cls


class ImageInput(nn.Module):
    """A model that takes (B,H,W,3) uint8 RGB as decoded: the layout change and cast to the
    weights' dtype happen inside, so exported graphs take camera pixels as they are and a
    GPU receives a quarter of the bytes of float input."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        dtype = next(self.model.parameters()).dtype
        return self.model(images.permute(0, 3, 1, 2).to(dtype))


class Detector:
    """Stage object: frames in, detections out. The forward pass runs on the configured
    inference backend (``models/backends.py``); decoding is the same for all of them."""

    def __init__(self, cfg, device: torch.device | None = None) -> None:
        from .backends import BackendSettings, ModelSpec, make_backend

        self.cfg = cfg
        if cfg.kind == "checkpoint":
            self.model, self.labels, self.input_size = load_checkpoint(cfg.checkpoint)
        else:
            self.model, self.labels, self.input_size = CenterNetModel(bundled_weights()), COCO_LABELS, cfg.input_size or 512
        if cfg.input_size and cfg.kind == "checkpoint":
            self.input_size = cfg.input_size
        check_classes(cfg.classes, self.labels)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        settings = BackendSettings.from_config(cfg, device)
        s = self.input_size
        spec = ModelSpec(ImageInput(self.model), (np.zeros((2, s, s, 3), np.uint8),), ("images",), ("heat", "ltrb"),
                         f"centernet-{cfg.kind}-{s}")
        self.backend = make_backend(spec, settings, self._calibration)
        self.device = self.backend.device
        self._keep = (torch.tensor([lbl in cfg.classes for lbl in self.labels], device=self.device)
                      if cfg.classes else None)
        log.info("detector %s on %s (%s), %d labels, input %d", cfg.kind, self.device, self.backend.name,
                 len(self.labels), self.input_size)

    def preprocess(self, images: list[np.ndarray]) -> np.ndarray:
        """BGR frames of any size -> (B,s,s,3) uint8 RGB."""
        s = self.input_size
        return np.stack([cv2.cvtColor(cv2.resize(im, (s, s), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
                         for im in images])

    def _calibration(self) -> list[tuple[np.ndarray, ...]]:
        """int8 calibration batches: the images in ``detector.calibration_images``."""
        return [(self.preprocess([im]),) for im in read_calibration_images(self.cfg.calibration_images)]

    @torch.inference_mode()
    def detect(self, frames: list[Frame]) -> list[Detections]:
        if not frames:
            return []
        cfg = self.cfg
        heat, ltrb = self.backend.run(self.preprocess([f.image for f in frames]))
        if self._keep is not None:
            heat = heat * self._keep[None, :, None, None]
        boxes, scores, cls = decode(heat, ltrb, cfg.max_detections)
        out = []
        for i, f in enumerate(frames):
            w, h = f.size
            keep = scores[i] >= cfg.score_threshold
            b, s, c = boxes[i][keep], scores[i][keep], cls[i][keep]
            b = b * torch.tensor([w / self.input_size, h / self.input_size] * 2, device=b.device)
            b[:, 0::2] = b[:, 0::2].clamp(0, w)
            b[:, 1::2] = b[:, 1::2].clamp(0, h)
            valid = (b[:, 2] - b[:, 0] >= 1) & (b[:, 3] - b[:, 1] >= 1)
            b, s, c = b[valid], s[valid], c[valid]
            nms = torchvision.ops.batched_nms(b, s, c, cfg.nms_iou)
            out.append(Detections(
                camera_id=f.camera_id, frame_index=f.index, timestamp=f.timestamp,
                boxes=b[nms].float().cpu().numpy(), scores=s[nms].float().cpu().numpy(),
                class_ids=c[nms].cpu().numpy().astype(np.int64), labels=self.labels, image_size=(w, h)))
        return out


def read_calibration_images(folder: str | Path | None, limit: int = 64) -> list[np.ndarray]:
    """Up to ``limit`` BGR images (jpg/png) from a folder, in name order, for int8 calibration."""
    if not folder:
        raise ValueError("detector.precision=int8 needs detector.calibration_images (a folder of camera images)")
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:limit]
    images = [im for im in (cv2.imread(str(p)) for p in paths) if im is not None]
    if not images:
        raise ValueError(f"detector.calibration_images: no readable images in {folder}")
    return images


def load_detector(cfg, device: torch.device | None = None):
    """The detector backend a config asks for: the bundled COCO CenterNet, or a checkpoint
    (a two-stage dish detector written by ``dishtrack train``, or an older CenterNet head)."""
    if cfg.kind == "checkpoint":
        from .backends import BackendSettings
        from .dish_detector import FORMAT, NMS_IOU, DishDetector, dish_model_from_checkpoint, read_checkpoint

        ck = read_checkpoint(cfg.checkpoint)  # read once: the format decides, then the weights are used
        if ck["format"] == FORMAT:
            model = dish_model_from_checkpoint(ck, cfg.checkpoint)
            if cfg.input_size:
                model.spec = type(model.spec)(**{**model.spec.__dict__, "loc_size": cfg.input_size})
            if cfg.nms_iou != NMS_IOU:
                log.warning("detector.nms_iou %.2f: the checkpoint's per-dish thresholds were chosen at the "
                            "localiser's NMS IoU %.2f (train); counts may differ from its validation", cfg.nms_iou,
                            NMS_IOU)
            det = DishDetector(model, device or "cpu", nms_iou=cfg.nms_iou,
                               max_detections=min(cfg.max_detections, 100), classes=cfg.classes,
                               backend=BackendSettings.from_config(cfg, device),
                               calibration_images=cfg.calibration_images)
            log.info("dish detector %s on %s (%s): %s, localiser input %d", cfg.checkpoint, det.device,
                     det.backend_name, ", ".join(det.labels), det.input_size)
            return det
    return Detector(cfg, device)


def detector_labels(cfg) -> tuple[str, ...]:
    """The labels the configured detector reports, read without building it (no backend export,
    nothing written): what ``check-config`` checks ``detector.classes`` and the menu against. Raises
    what ``load_detector`` raises for a missing or foreign checkpoint and for unknown classes."""
    labels: tuple[str, ...] = COCO_LABELS
    if cfg.kind == "checkpoint":
        from .dish_detector import FORMAT, read_checkpoint

        ck = read_checkpoint(cfg.checkpoint)
        if ck["format"] not in (FORMAT, CENTERNET_FORMAT):
            raise ValueError(f"{cfg.checkpoint}: checkpoint format {ck['format']!r}, expected {FORMAT!r} or "
                             f"{CENTERNET_FORMAT!r}")
        labels = tuple(ck["classes" if ck["format"] == FORMAT else "labels"])
    check_classes(cfg.classes, labels)
    return labels


def check_classes(classes: list[str] | None, labels: tuple[str, ...]) -> None:
    """``detector.classes`` may only narrow what the model reports: a name it lacks (a typo, a dish
    not trained yet) would silently never be reported."""
    unknown = sorted(set(classes or []) - set(labels))
    if unknown:
        raise ValueError(f"detector.classes names labels the model does not have: {unknown} (it has {list(labels)})")


def save_checkpoint(path: str | Path, model: CenterNetModel, labels: tuple[str, ...], input_size: int,
                    meta: dict | None = None) -> None:
    if model.head is None:
        raise ValueError("only models with a trained dish head are saved as checkpoints")
    torch.save({"format": CENTERNET_FORMAT, "labels": list(labels), "input_size": input_size,
                "state_dict": model.state_dict(), "meta": meta or {}}, path)


def load_checkpoint(path: str | Path) -> tuple[CenterNetModel, tuple[str, ...], int]:
    from .dish_detector import read_checkpoint

    ck = read_checkpoint(path)
    if ck["format"] != CENTERNET_FORMAT:
        raise ValueError(f"{path}: checkpoint format {ck['format']!r}, expected {CENTERNET_FORMAT!r}")
    labels = tuple(ck["labels"])
    model = CenterNetModel(bundled_weights(), num_classes=len(labels))
    model.load_state_dict(ck["state_dict"])
    return model, labels, int(ck["input_size"])

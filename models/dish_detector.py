"""Two-stage dish detector: class-agnostic localiser (CenterNet trunk, one
"dish" class) + crop classifier (fine-tuned EfficientNet-Lite0).

Chosen by measurement (README "Train on your dishes"): telling dishes apart
across capture sessions is the hard part, and a classifier on square context
crops with box geometry does it better than a multi-class heatmap on the
shared trunk; it also yields an appearance embedding per box for the tracker,
and a new dish can be enrolled by retraining only the classifier.
"""
from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from dishtrack.tracking.types import Detections, Frame

from .augment import letterbox
from .detector import CenterNetModel, bundled_weights, decode, pick_device
from .dish_classifier import DishClassifier, box_geometry, crop
from .evaluate import threshold_array
from .exemplars import Exemplars

log = logging.getLogger(__name__)
FORMAT = "dishtrack-dish-v1"
# A reported confidence of 0.6 is the dish's own validation threshold: just above the tracker's
# ByteTrack split (tracker.high_score 0.55), so every dish validation would count can start a
# track, and boxes down to half the threshold (LOW_CONFIDENCE) only extend tracks.
CALIBRATED_THRESHOLD = 0.6
LOW_CONFIDENCE = CALIBRATED_THRESHOLD / 2


@dataclass(frozen=True)
class DishModelSpec:
    """What a dish checkpoint needs besides weights to rebuild the detector."""

    classes: tuple[str, ...]
    loc_size: int = 384
    crop_size: int = 128
    crop_long_side: int = 512  # frames are scaled to this long side before cropping (as in training)
    freeze_blocks: int = 8
    loc_threshold: float = 0.15  # localiser peak score kept for classification
    thresholds: dict[str, float] = field(default_factory=dict)  # per dish, chosen on validation
    # two boxes named the same dish are one dish when they overlap this much (IoU, or the share
    # of the smaller covered): the localiser puts a second box on a bottle's cap or on a bread
    # bag's half, and every such box was an extra item on the receipt (``suppress_same_dish``; 1: off)
    same_dish_iou: float = 0.3
    same_dish_ioa: float = 0.6


class DishModel(torch.nn.Module):
    def __init__(self, spec: DishModelSpec, pretrained: bool = True, exemplars: Exemplars | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.localiser = CenterNetModel(bundled_weights(), num_classes=1)
        self.classifier = DishClassifier(len(spec.classes), spec.crop_size, pretrained=pretrained,
                                         freeze_blocks=spec.freeze_blocks)
        self.exemplars = exemplars  # labelled training boxes, voted next to the head (models/exemplars.py)


def suppress_same_dish(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, iou: float,
                       ioa: float) -> np.ndarray:
    """Keep mask: a box is dropped when a higher-scoring box of the same dish overlaps it by IoU
    >= ``iou`` or covers >= ``ioa`` of the smaller of the two (a threshold >= 1 turns its test off).
    Different dishes may overlap (bread on a plate) as far as the localiser's class-agnostic NMS
    lets them (IoU < 0.5). Measured on the kiosk folder's out-of-fold predictions: exact tray
    receipts 61.3% -> 67.7%, mAP@0.5 -0.004; on their checkout videos 35 -> 39 of 62 trays."""
    from dishtrack.tracking.geometry import ioa_matrix, iou_matrix

    keep = np.ones(len(boxes), bool)
    if len(boxes) < 2 or (iou >= 1 and ioa >= 1):
        return keep
    ov = np.zeros((len(boxes), len(boxes)), bool)
    if iou < 1:
        ov |= iou_matrix(boxes, boxes) >= iou
    if ioa < 1:
        cover = ioa_matrix(boxes, boxes)
        ov |= np.maximum(cover, cover.T) >= ioa
    ov &= class_ids[:, None] == class_ids[None, :]
    order = np.argsort(-scores, kind="stable")
    for n, i in enumerate(order):
        if keep[i]:
            later = order[n + 1:]
            keep[later[ov[i, later]]] = False
    return keep


NMS_IOU = 0.5  # the localiser's class-agnostic NMS as train validates (and chooses thresholds) with


def localise(model, batch, scales: list[float], sizes: list[tuple[int, int]],
             threshold: float, k: int = 50, nms_iou: float = NMS_IOU) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Letterboxed batch -> per image (boxes in its own pixels, scores), class-agnostic NMS.
    ``model``: a CenterNetModel on a float NCHW batch, or a backend's ``run`` on uint8 NHWC."""
    heat, ltrb = model(batch)
    boxes, scores, _ = decode(heat, ltrb, k)
    out = []
    for i, (s, (w, h)) in enumerate(zip(scales, sizes)):
        keep = scores[i] >= threshold
        b, sc = boxes[i][keep] / s, scores[i][keep]
        b[:, 0::2] = b[:, 0::2].clamp(0, w)
        b[:, 1::2] = b[:, 1::2].clamp(0, h)
        ok = (b[:, 2] - b[:, 0] >= 2) & (b[:, 3] - b[:, 1] >= 2)
        b, sc = b[ok], sc[ok]
        nms = torchvision.ops.nms(b, sc, nms_iou)
        out.append((b[nms], sc[nms]))
    return out


def classify(clf: DishClassifier, images: list[torch.Tensor], boxes: list[torch.Tensor], sizes: list[tuple[int, int]],
             crop_size: int, run=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of ``boxes`` (in ``images`` pixels; frames are (w,h) ``sizes``) -> class probs (N, C+1), embeddings.
    ``run(crops, geometry) -> (logits, embeddings)`` replaces ``clf``'s forward (an inference backend)."""
    n = sum(len(b) for b in boxes)
    if n == 0:
        return torch.zeros(0, clf.fc.out_features), torch.zeros(0, clf.fc.in_features - 32)
    crops = torch.cat([crop(im[None], [b], crop_size) for im, b in zip(images, boxes)])
    geo_boxes = torch.cat(boxes)
    fs = torch.cat([torch.tensor([sz], dtype=torch.float32).expand(len(b), 2) for sz, b in zip(sizes, boxes)])
    logits, emb = (run or clf)(crops, box_geometry(geo_boxes, fs.to(geo_boxes.device)))
    return F.softmax(logits.float(), dim=1), F.normalize(emb.float(), dim=1)


class DishDetector:
    """Stage object: frames in, dish detections (with appearance embeddings) out."""

    # its scores are calibrated: every dish is counted from this score up (checkout review rule)
    calibrated_threshold = CALIBRATED_THRESHOLD

    def __init__(self, model: DishModel, device: torch.device | str = "cpu", nms_iou: float = NMS_IOU,
                 max_detections: int = 50, classes: list[str] | None = None, backend=None,
                 calibration_images: str | None = None, low_confidence: float = LOW_CONFIDENCE) -> None:
        """``backend``: BackendSettings (None: torch on ``device``). Localiser and classifier each get one."""
        from .backends import BackendSettings, ModelSpec, make_backend
        from .detector import ImageInput, check_classes

        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.spec = model.spec
        self.labels = self.spec.classes
        self.input_size = self.spec.loc_size
        self.nms_iou = nms_iou
        self.max_detections = max_detections
        self.low_confidence = low_confidence
        check_classes(classes, self.labels)
        # per-dish thresholds from validation; a dish left out of detector.classes is never reported
        self._thr = threshold_array(self.spec.thresholds, self.labels)
        self._allowed = np.array([not classes or c in classes for c in self.labels])
        settings = backend or BackendSettings(backend="torch", device=torch.device(device).type, precision="fp32")
        s, c = self.spec.loc_size, self.spec.crop_size
        self._calibration_images = calibration_images
        self.loc_backend = make_backend(
            ModelSpec(ImageInput(model.localiser), (np.zeros((2, s, s, 3), np.uint8),), ("images",), ("heat", "ltrb"),
                      f"dish-localiser-{s}"), settings, self._calibration)
        # the classifier runs on crops of the localised boxes: kept fp32 (int8 is for the per-frame localiser)
        cls_settings = BackendSettings(**{**settings.__dict__,
                                          "precision": "auto" if settings.precision == "int8" else settings.precision})
        self.cls_backend = make_backend(
            ModelSpec(model.classifier, (np.zeros((2, 3, c, c), np.float32), np.zeros((2, 3), np.float32)),
                      ("crops", "geometry"), ("logits", "embeddings"), f"dish-classifier-{c}"), cls_settings)
        self.device = self.loc_backend.device
        self.backend_name = self.loc_backend.name

    def _calibration(self) -> list[tuple[np.ndarray, ...]]:
        from .detector import read_calibration_images

        return [(self._letterbox([im]),) for im in read_calibration_images(self._calibration_images)]

    def _letterbox(self, images_bgr: list[np.ndarray]) -> np.ndarray:
        return np.stack([letterbox(cv2.cvtColor(im, cv2.COLOR_BGR2RGB), self.spec.loc_size)[0] for im in images_bgr])

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto") -> "DishDetector":
        model = load_dish_checkpoint(path)
        return cls(model, pick_device(device))

    def _crop_sources(self, images_rgb: list[np.ndarray]) -> tuple[list[torch.Tensor], list[float]]:
        out, scales = [], []
        for im in images_rgb:
            h, w = im.shape[:2]
            f = min(1.0, self.spec.crop_long_side / max(h, w))
            small = cv2.resize(im, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA) if f < 1 else im
            out.append(torch.from_numpy(small).permute(2, 0, 1).float().to(self.device))
            scales.append(f)
        return out, scales

    @torch.inference_mode()
    def predict(self, images_bgr: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Raw per-image predictions before per-dish thresholds: boxes, scores, class ids, probs, embeddings."""
        if not images_bgr:
            return []
        rgb = [cv2.cvtColor(im, cv2.COLOR_BGR2RGB) for im in images_bgr]
        lb = [letterbox(im, self.spec.loc_size) for im in rgb]
        batch = np.stack([x for x, _ in lb])
        sizes = [(im.shape[1], im.shape[0]) for im in images_bgr]
        found = localise(self.loc_backend.run, batch, [s for _, s in lb], sizes, self.spec.loc_threshold,
                         self.max_detections, self.nms_iou)
        srcs, fs = self._crop_sources(rgb)
        probs, emb = classify(self.model.classifier, srcs, [b * f for (b, _), f in zip(found, fs)],
                              [(round(w * f), round(h * f)) for (w, h), f in zip(sizes, fs)], self.spec.crop_size,
                              run=self.cls_backend.run)
        probs, emb = probs.cpu(), emb.cpu()
        if self.model.exemplars is not None and len(self.model.exemplars) and self.model.exemplars.weight > 0:
            probs = self.model.exemplars.blend(probs, emb)
        out, k = [], 0
        c = len(self.labels)
        for b, sc in found:
            p = probs[k:k + len(b)]
            e = emb[k:k + len(b)]
            k += len(b)
            pc, cls = p[:, :c].max(dim=1)
            boxes, scores = b.cpu().numpy().astype(np.float32), (sc.cpu() * pc).numpy().astype(np.float32)
            cls = cls.numpy().astype(np.int64)
            keep = suppress_same_dish(boxes, scores, cls, self.spec.same_dish_iou, self.spec.same_dish_ioa)
            out.append({"boxes": boxes[keep], "scores": scores[keep], "class_ids": cls[keep],
                        "probs": p.numpy()[keep], "embeddings": e.numpy().astype(np.float32)[keep],
                        "loc_scores": sc.cpu().numpy()[keep]})
        return out

    @torch.inference_mode()
    def embed_boxes(self, image_bgr: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
        """Unit appearance embeddings (N, 1280) of given boxes (image pixels), computed exactly as
        ``predict`` computes them for the boxes it finds (exemplars, appearance checks)."""
        rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
        (src,), (f,) = self._crop_sources([rgb])
        h, w = rgb.shape[:2]
        b = torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4)) * f
        _, emb = classify(self.model.classifier, [src], [b.to(self.device)], [(round(w * f), round(h * f))],
                          self.spec.crop_size, run=self.cls_backend.run)
        return emb.cpu()

    def detect(self, frames: list[Frame]) -> list[Detections]:
        return [self.to_detections(f, p) for f, p in zip(frames, self.predict([f.image for f in frames]))]

    def calibrate(self, scores: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
        """Raw scores -> confidence on one scale for every dish: each dish's validation threshold
        maps to ``CALIBRATED_THRESHOLD`` (0.6), linear on either side. Dishes differ a lot in raw
        score (a glass bottle localises at 0.2, a plate at 0.8), and the tracker's ByteTrack split
        and the receipts' confidence need one meaning of "sure"."""
        thr = self._thr[class_ids].clip(1e-6, 1 - 1e-6)
        t = CALIBRATED_THRESHOLD
        return np.where(scores >= thr, t + (1 - t) * (scores - thr) / (1 - thr), t * scores / thr).astype(np.float32)

    def to_detections(self, frame: Frame, p: dict[str, np.ndarray]) -> Detections:
        """Raw predictions of one frame -> Detections with calibrated scores. Below-threshold
        boxes down to ``low_confidence`` are kept: the tracker uses them only to extend tracks
        it already has (a dish that blurs for a few frames keeps its identity)."""
        cal = self.calibrate(p["scores"], p["class_ids"]) if len(p["scores"]) else np.zeros(0, np.float32)
        keep = (cal >= self.low_confidence) & self._allowed[p["class_ids"]]
        return Detections(camera_id=frame.camera_id, frame_index=frame.index, timestamp=frame.timestamp,
                          boxes=p["boxes"][keep], scores=cal[keep], class_ids=p["class_ids"][keep],
                          labels=self.labels, image_size=frame.size, embeddings=p["embeddings"][keep],
                          # dishes outside detector.classes get no share of a track's vote
                          probs=(p["probs"][keep][:, :len(self.labels)] * self._allowed).astype(np.float32))


def save_dish_checkpoint(path: str | Path, model: DishModel, meta: dict | None = None) -> None:
    s = model.spec
    tmp = Path(str(path) + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "classes": list(s.classes), "loc_size": s.loc_size, "crop_size": s.crop_size,
                "crop_long_side": s.crop_long_side, "freeze_blocks": s.freeze_blocks,
                "loc_threshold": s.loc_threshold, "thresholds": dict(s.thresholds),
                "same_dish_iou": s.same_dish_iou, "same_dish_ioa": s.same_dish_ioa,
                "localiser": model.localiser.state_dict(), "classifier": model.classifier.state_dict(),
                "exemplars": model.exemplars.to_state() if model.exemplars is not None else None,
                "meta": meta or {}}, tmp)
    tmp.replace(path)  # never a half-written checkpoint


def checkpoint_file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot hold a checkpoint, or None: checked before torch reads it, whose own errors
    are cryptic (a checkpoint is the zip archive torch.save writes). Callers name the path their way
    (``detector.checkpoint X does not exist``, ``X: is a directory ...``)."""
    p = Path(path)
    if p.is_dir():
        return "is a directory, not a checkpoint file"
    if not p.exists():
        return "does not exist"
    if not p.is_file():  # a FIFO or device: torch.load would block on it
        return "is not a regular file"
    if not zipfile.is_zipfile(p):
        return ("is not a dishtrack checkpoint (" + ("empty file" if p.stat().st_size == 0 else
                "not a PyTorch zip archive: truncated, or another kind of file") + ")")
    return None


def read_checkpoint(path: str | Path) -> dict:
    if (why := checkpoint_file_problem(path)) is not None:
        raise (FileNotFoundError if why == "does not exist" else ValueError)(f"detector checkpoint {path} {why}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a corrupt file
        raise ValueError(f"{path}: not a readable dishtrack checkpoint ({e})") from e
    if not isinstance(ck, dict) or "format" not in ck:
        raise ValueError(f"{path}: not a dishtrack checkpoint")
    return ck


def load_dish_checkpoint(path: str | Path) -> DishModel:
    return dish_model_from_checkpoint(read_checkpoint(path), path)


def dish_model_from_checkpoint(ck: dict, path: str | Path) -> DishModel:
    """A checkpoint already read (``read_checkpoint``) -> the model; ``path`` names it in errors."""
    if ck["format"] != FORMAT:
        raise ValueError(f"{path}: checkpoint format {ck['format']!r}, expected {FORMAT!r}")
    spec = DishModelSpec(classes=tuple(ck["classes"]), loc_size=int(ck["loc_size"]), crop_size=int(ck["crop_size"]),
                         crop_long_side=int(ck["crop_long_side"]), freeze_blocks=int(ck["freeze_blocks"]),
                         loc_threshold=float(ck["loc_threshold"]), thresholds=dict(ck["thresholds"]),
                         # checkpoints from before these existed get today's defaults
                         **{k: float(ck[k]) for k in ("same_dish_iou", "same_dish_ioa") if k in ck})
    ex = ck.get("exemplars")  # None: a checkpoint from before exemplars (head only)
    model = DishModel(spec, pretrained=False, exemplars=Exemplars.from_state(ex) if ex else None)
    model.localiser.load_state_dict(ck["localiser"])
    model.classifier.load_state_dict(ck["classifier"])
    return model

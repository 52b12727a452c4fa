"""``dishtrack train``: labelled tray photos -> two-stage dish detector checkpoint.

Transfer learning as the seeds teach it, in three phases, each validated
every epoch on trays held out whole (photos of one tray never straddle the
split), best weights kept, stopped early when validation stops improving:

1. localiser head: the bundled CenterNet trunk frozen, a new one-class "dish"
   head (box edges copied from the COCO head, the heatmap from COCO "bowl");
2. localiser fine-tune: all weights, layer-wise learning rates (earlier trunk
   stages get ``layer_decay`` times the next);
3. classifier: ImageNet EfficientNet-Lite0, its first ``freeze_blocks`` blocks
   frozen, computed once on ``cls_views`` augmented views of every box (so the
   expensive high-resolution layers do not run every epoch on 2 CPU cores),
   the remaining blocks fine-tuned with layer-wise rates + a new head.

Then per-dish score thresholds are chosen on the validation trays and stored
in the checkpoint, and the validation report (mAP, receipts) is written with
loss/metric curves as PNG. A ``.state`` file next to the output holds the
finished epochs: ``--resume`` continues an interrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from dishtrack.tracking.geometry import ioa_matrix, iou_matrix

from .augment import AugmentSettings, letterbox, photometric
from .detector import CenterNetModel, bundled_weights, pick_device
from .dish_classifier import box_geometry, crop, rotate_crops
from .dish_detector import DishDetector, DishModel, DishModelSpec, localise, read_checkpoint, save_dish_checkpoint
from .evaluate import choose_thresholds, drop_on_boxes, evaluate_predictions
from .exemplars import embed_labelled_boxes
from .importers import LabelledData, load_dataset
from .localiser import ImageCache, LocaliserDataset, average_precision
from .sample import DatasetError, Sample
from .train_settings import TrainSettings

log = logging.getLogger(__name__)
TRUNK_STAGES = 4


# ---------------------------------------------------------------- data
def split_by_group(samples: list[Sample], val_fraction: float, seed: int,
                   fold: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Hold out whole trays (``Sample.group``); photos without a group are their own group.
    ``fold`` k holds out the k-th of ``n_folds`` equal blocks of the shuffled trays, so folds
    0 .. ``n_folds(...)`` - 1 hold out every tray once (cross-validation)."""
    groups: dict[str, list[Sample]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.group if s.group is not None else f"__photo{i}", []).append(s)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    if fold < 0:
        raise ValueError(f"val_fold {fold}: folds count from 0")
    if fold == 0:
        val_keys = set(keys[:_n_val(len(keys), val_fraction)])
    else:
        k = n_folds(len(keys), val_fraction)
        if fold >= k:
            raise ValueError(f"val_fold {fold}: val_fraction {val_fraction} makes {k} folds (0 .. {k - 1})")
        val_keys = set(keys[round(fold * len(keys) / k):round((fold + 1) * len(keys) / k)])
    train = [s for k in keys if k not in val_keys for s in groups[k]]
    val = [s for k in keys if k in val_keys for s in groups[k]]
    return train, val


def _n_val(n_groups: int, val_fraction: float) -> int:
    n_val = int(round(n_groups * val_fraction))
    return 1 if val_fraction > 0 and n_val == 0 and n_groups > 1 else n_val


def n_folds(n_groups: int, val_fraction: float) -> int:
    """How many disjoint validation folds ``split_by_group`` makes (1/``val_fraction``, a whole
    number: fold 0 is then the same split as ever, ``round(n_groups * val_fraction)`` trays)."""
    k = round(1 / val_fraction) if val_fraction > 0 else 1
    if val_fraction > 0 and (abs(k * val_fraction - 1) > 1e-9 or k > n_groups):
        raise ValueError(f"cross-validation folds need 1/val_fraction to be a whole number of at most "
                         f"{n_groups} (the trays); val_fraction {val_fraction} is not")
    return k


# ---------------------------------------------------------------- resumable phases
class RunState:
    """Finished epochs of every phase, persisted after each epoch (atomic replace)."""

    def __init__(self, path: Path, settings: TrainSettings, resume: bool) -> None:
        self.path = path
        self.fingerprint = settings.model_dump(exclude={"resume", "progress", "out"})
        self.data: dict = {"fingerprint": self.fingerprint, "phases": {}}
        if resume and path.is_file():
            d = torch.load(path, map_location="cpu", weights_only=False)
            if TrainSettings.as_saved(d.get("fingerprint") or {}, self.fingerprint) != self.fingerprint:
                raise ValueError(f"{path}: saved with other settings; drop --resume or delete it")
            self.data = d
            log.info("resuming from %s: %s", path,
                     {k: len(v["history"]) for k, v in self.data["phases"].items()})

    def phase(self, name: str) -> dict:
        return self.data["phases"].setdefault(name, {"history": [], "best": None, "best_state": None,
                                                     "state": None, "opt": None, "done": False})

    def save(self) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        torch.save(self.data, tmp)
        tmp.replace(self.path)


def run_phase(name: str, epochs: int, module: torch.nn.Module, opt: torch.optim.Optimizer, sched,
              train_epoch, validate, state: RunState, patience: int) -> dict:
    """Train ``epochs`` epochs with early stopping; keep (and finally load) the best weights.
    ``validate`` returns (score, metrics dict); higher score is better."""
    ph = state.phase(name)
    if ph["state"] is not None:  # resume
        module.load_state_dict(ph["state"])
        opt.load_state_dict(ph["opt"])
        if sched is not None and ph.get("sched"):
            sched.load_state_dict(ph["sched"])
    start = len(ph["history"])
    if ph["done"]:
        start = epochs
    for ep in range(start, epochs):
        t0 = time.time()
        loss = train_epoch(ep)
        score, metrics = validate()
        rec = {"epoch": ep + 1, "loss": loss, "score": score, **metrics, "seconds": round(time.time() - t0, 1)}
        ph["history"].append(rec)
        if ph["best"] is None or score > ph["best"]:
            ph["best"] = score
            ph["best_state"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        ph["state"] = module.state_dict()
        ph["opt"] = opt.state_dict()
        ph["sched"] = sched.state_dict() if sched is not None else None
        log.info("%s epoch %d/%d: training loss %.4f, validation score %.4f (higher is better; the best epoch "
                 "is kept) %s (%.0fs)", name, ep + 1, epochs, loss, score,
                 {k: round(v, 4) for k, v in metrics.items()}, rec["seconds"])
        best_ep = max(range(len(ph["history"])), key=lambda i: ph["history"][i]["score"])
        if len(ph["history"]) - 1 - best_ep >= patience:
            log.info("%s: no validation gain for %d epochs, stopping early", name, patience)
            break
        state.save()
    ph["done"] = True
    if ph["best_state"] is not None:
        module.load_state_dict(ph["best_state"])
    ph["state"], ph["opt"] = None, None  # the best weights are what later phases start from
    state.save()
    return ph


def one_cycle(opt: torch.optim.Optimizer, max_lr, total_steps: int, pct_start: float, **kw):
    """torch's OneCycleLR, except for the one length it divides by zero on: a warm-up of exactly one
    step (``pct_start * total_steps == 1``, e.g. ``enrol --epochs 5`` on two batches); that warm-up is
    made 1.5 steps."""
    total_steps = max(1, total_steps)
    if abs(pct_start * total_steps - 1.0) < 1e-9:
        pct_start = 1.5 / total_steps
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start, **kw)


# ---------------------------------------------------------------- localiser
def focal_loss(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss."""
    pred = pred.clamp(1e-4, 1 - 1e-4)
    pos = gt.eq(1).float()
    pos_loss = (torch.log(pred) * (1 - pred) ** 2 * pos).sum()
    neg_loss = (torch.log(1 - pred) * pred ** 2 * (1 - gt) ** 4 * (1 - pos)).sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp(min=1)


def detection_loss(heat: torch.Tensor, ltrb: torch.Tensor, batch: dict) -> torch.Tensor:
    b = ltrb.shape[0]
    pred = ltrb.reshape(b, 4, -1).gather(2, batch["ind"][:, None, :].expand(b, 4, -1)).permute(0, 2, 1)
    m = batch["mask"][..., None]
    # GIoU-like scale invariance: L1 on edge distances relative to the box size
    size = (batch["ltrb"][..., 0:1] + batch["ltrb"][..., 2:3] + batch["ltrb"][..., 1:2] + batch["ltrb"][..., 3:4]) / 2
    l1 = (F.l1_loss(pred * m, batch["ltrb"] * m, reduction="none") / size.clamp(min=1)).sum() / (m.sum() * 4).clamp(min=1)
    return focal_loss(heat, batch["heat"]) + 5.0 * l1


def init_localiser_head(model: CenterNetModel) -> None:
    """New one-class head from the COCO head: edges copied, heatmap from COCO 'bowl'."""
    from .labels import COCO_LABELS
    from .tfjs_graph import read_tfjs_weights

    w = read_tfjs_weights(json.loads(bundled_weights().read_text()), bundled_weights().parent)

    def dw(name):
        a = w[name]
        return torch.from_numpy(a.transpose(2, 3, 0, 1).reshape(a.shape[2], 1, a.shape[0], a.shape[1]).copy())

    def pw(name):
        return torch.from_numpy(w[name].transpose(3, 2, 0, 1).copy())

    head, j = model.head, COCO_LABELS.index("bowl")
    with torch.no_grad():
        head.wh[0].weight.copy_(dw("CenternetHead/centernet_wh_output/depthwise_weights"))
        head.wh[1].weight.copy_(pw("CenternetHead/centernet_wh_output/pointwise_weights"))
        head.wh[1].bias.copy_(torch.from_numpy(w["CenternetHead/centernet_wh_output/biases"].copy()))
        head.cls[0].weight.copy_(dw("CenternetHead/centernet_cls_output/depthwise_weights"))
        head.cls[1].weight[0].copy_(pw("CenternetHead/centernet_cls_output/pointwise_weights")[j])
        head.cls[1].bias[0] = torch.from_numpy(w["CenternetHead/centernet_cls_output/biases"].copy())[j]


def layerwise_groups(model: CenterNetModel, lr: float, decay: float) -> list[dict]:
    trunk = list(model.graph.parameters())
    groups = []
    for k, idx in enumerate(np.array_split(np.arange(len(trunk)), TRUNK_STAGES)):
        groups.append({"params": [trunk[i] for i in idx], "lr": lr * decay ** (TRUNK_STAGES - k)})
    groups.append({"params": list(model.head.parameters()), "lr": lr})
    return groups


def _bar(total: int, desc: str, s: TrainSettings):
    return tqdm(total=total, desc=desc, unit="batch", disable=not s.progress, leave=False, dynamic_ncols=True)


def train_localiser(s: TrainSettings, model: CenterNetModel, train_c: ImageCache, val_c: ImageCache,
                    device: torch.device, state: RunState) -> list[dict]:
    aug = AugmentSettings()
    tl = DataLoader(LocaliserDataset(train_c, s.loc_size, aug, seed=s.seed), batch_size=s.batch_size, shuffle=True,
                    num_workers=0, generator=torch.Generator().manual_seed(s.seed))
    vds = LocaliserDataset(val_c, s.loc_size, None)

    def train_epoch(desc, opt, sched=None):
        def run(ep):
            model.train()
            if not any(p.requires_grad for p in model.graph.parameters()):
                model.graph.eval()  # frozen trunk: keep its batch-norm statistics
            total, n = 0.0, 0
            with _bar(len(tl), f"{desc} {ep + 1}", s) as bar:
                for batch in tl:
                    batch = {k: v.to(device) for k, v in batch.items()}
                    heat, ltrb = model(batch["image"])
                    loss = detection_loss(heat, ltrb, batch)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    if sched is not None:
                        sched.step()
                    total += loss.item() * len(batch["image"])
                    n += len(batch["image"])
                    bar.set_postfix(loss=f"{total / n:.3f}")
                    bar.update()
            return total / max(n, 1)
        return run

    @torch.inference_mode()
    def validate():
        model.eval()
        preds, gts, losses = [], [], []
        for i in range(0, len(vds), s.batch_size):
            items = [vds[j] for j in range(i, min(i + s.batch_size, len(vds)))]
            batch = {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}
            heat, ltrb = model(batch["image"])
            losses.append(detection_loss(heat, ltrb, batch).item())
            sizes = [(s.loc_size, s.loc_size)] * len(items)
            for (b, sc), it in zip(localise(model, batch["image"], [1.0] * len(items), sizes, 0.05, 50), items):
                preds.append((b.cpu().numpy(), sc.cpu().numpy()))
                gts.append(_targets_to_boxes(it))
        ap50 = average_precision(preds, gts, 0.5)
        ap75 = average_precision(preds, gts, 0.75)
        return (ap50 + ap75) / 2, {"val_loss": float(np.mean(losses)), "ap50": ap50, "ap75": ap75}

    hist = []
    # phase 1: frozen trunk
    for p in model.graph.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.head.parameters(), lr=s.loc_lr_head, weight_decay=1e-4)
    ph = run_phase("localiser-head", s.loc_epochs_head, model, opt, None, train_epoch("localiser head", opt),
                   validate, state, s.patience)
    hist += [{"phase": "localiser-head", **h} for h in ph["history"]]
    # phase 2: everything, layer-wise rates
    if s.loc_epochs_finetune:
        groups = layerwise_groups(model, s.loc_lr_finetune, s.layer_decay)
        # the earliest stages would move at 1/16 of the rate anyway; frozen, they cost no backward pass
        for g in groups[:s.loc_frozen_stages]:
            for p in g["params"]:
                p.requires_grad_(False)
        groups = groups[s.loc_frozen_stages:]
        for g in groups:
            for p in g["params"]:
                p.requires_grad_(True)
        opt = torch.optim.AdamW(groups, weight_decay=1e-4)
        # short warm-up, then cosine decay: the last epochs settle instead of hopping around
        sched = one_cycle(opt, [g["lr"] for g in groups], s.loc_epochs_finetune * len(tl), 0.1,
                          div_factor=10.0, final_div_factor=100.0)
        ph = run_phase("localiser-finetune", s.loc_epochs_finetune, model, opt, sched,
                       train_epoch("localiser fine-tune", opt, sched), validate, state, s.patience)
        hist += [{"phase": "localiser-finetune", **h} for h in ph["history"]]
    for p in model.parameters():
        p.requires_grad_(False)
    return hist


def _targets_to_boxes(item: dict) -> np.ndarray:
    """Ground-truth boxes back from CenterNet targets (exact: centre cell + edge distances)."""
    from .detector import STRIDE

    m = item["mask"].numpy() > 0
    ind, ltrb = item["ind"].numpy()[m], item["ltrb"].numpy()[m]
    out = item["heat"].shape[-1]
    px, py = (ind % out) * STRIDE, (ind // out) * STRIDE
    return np.c_[px - ltrb[:, 0], py - ltrb[:, 1], px + ltrb[:, 2], py + ltrb[:, 3]].astype(np.float32)


# ---------------------------------------------------------------- classifier
class CropViews:
    """Augmented crop views of every labelled box (+ background boxes), passed through the
    frozen lower trunk once. Augmentation: colour/brightness/white balance on the photo,
    box jitter (the localiser is not exact), any top-down rotation and flips, blur, and a
    random camera distance applied to the size features."""

    def __init__(self, model, cache: ImageCache, labels: list[list[int]], n_classes: int, views: int, augment: bool,
                 seed: int, progress: bool, desc: str, proposals: list[np.ndarray] | None = None,
                 pooled: bool = False) -> None:
        """``labels`` entries < 0 mark boxes to ignore (neither a dish nor background: a dish held
        out of training); ``pooled``: keep the whole trunk's pooled embedding (N, 1280) instead of
        the frozen blocks' feature maps (to train only the head)."""
        rng = np.random.default_rng(seed)
        g = torch.Generator().manual_seed(seed)
        aug = AugmentSettings()
        feats, geos, ys, owner = [], [], [], []
        trunk = model.trunk
        with torch.no_grad(), tqdm(total=len(cache) * views, desc=desc, unit="photo", disable=not progress,
                                   leave=False, dynamic_ncols=True) as bar:
            for i, (img, boxes) in enumerate(zip(cache.images, cache.boxes)):
                # the same for every view: the localiser's boxes on this photo, labelled by overlap
                pb, py = (proposal_crops(proposals[i], boxes, labels[i], n_classes) if proposals is not None
                          else (None, None))
                for _ in range(views):
                    b = torch.from_numpy(boxes).float()
                    y = torch.tensor(labels[i], dtype=torch.long)
                    im = img
                    h, w = img.shape[:2]
                    if augment:
                        im = photometric(img, aug, rng)
                        bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
                        b = b + torch.from_numpy(rng.uniform(-0.08, 0.08, (len(b), 4))).float() * torch.stack(
                            [bw, bh, bw, bh], 1)
                        bg = _background_box(boxes, w, h, rng)
                        if bg is not None:
                            b = torch.cat([b, bg])
                            y = torch.cat([y, torch.tensor([n_classes])])
                        if pb is not None:
                            b = torch.cat([b, torch.from_numpy(pb)])
                            y = torch.cat([y, torch.from_numpy(py)])
                    if len(b) == 0:
                        bar.update()
                        continue
                    t = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float()[None]
                    c = crop(t, [b], model.crop_size)
                    if augment:
                        c = rotate_crops(c, 12.0, g)
                    geo = box_geometry(b, torch.tensor([[w, h]], dtype=torch.float32).expand(len(b), 2))
                    if augment:
                        geo = geo * torch.tensor([rng.uniform(0.8, 1.25), 1.0, 1.0], dtype=torch.float32)
                    keep = y >= 0
                    if not keep.all():
                        c, geo, y = c[keep], geo[keep], y[keep]
                    if len(y) == 0:
                        bar.update()
                        continue
                    feats.append(trunk.upper(trunk.lower(c)).mean(dim=(2, 3)) if pooled else trunk.lower(c))
                    geos.append(geo)
                    ys.append(y)
                    owner += [i] * len(y)
                    bar.update()
        self.x = torch.cat(feats) if feats else torch.zeros(0)
        self.geo = torch.cat(geos) if geos else torch.zeros(0, 3)
        self.y = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.long)
        self.owner = torch.tensor(owner)


def _is_background(cand: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Candidate boxes that show no dish: little overlap with every labelled box, and not a
    part of one either (a small box inside a plate has low IoU but shows food)."""
    if len(boxes) == 0:
        return np.ones(len(cand), bool)
    return (iou_matrix(cand, boxes).max(1) < 0.2) & (ioa_matrix(cand, boxes).max(1) < 0.3)


def _background_box(boxes: np.ndarray, w: int, h: int, rng: np.random.Generator) -> torch.Tensor | None:
    """A random box that shows no dish: tray, napkin, cutlery, hands — what the localiser may propose."""
    for _ in range(10):
        side = rng.uniform(0.1, 0.4) * min(w, h)
        x, y = rng.uniform(0, max(1.0, w - side)), rng.uniform(0, max(1.0, h - side))
        bb = np.array([[x, y, x + side, y + side * rng.uniform(0.6, 1.6)]], dtype=np.float32)
        if _is_background(bb, boxes)[0]:
            return torch.from_numpy(bb)
    return None


def proposal_crops(proposals: np.ndarray, boxes: np.ndarray, labels: list[int], background: int,
                   near_gt: float = 0.85) -> tuple[np.ndarray, np.ndarray]:
    """The localiser's own boxes on a training photo, labelled for the classifier: a box on a dish
    (IoU >= 0.5) takes its dish's label, so the classifier learns the localiser's real box errors;
    a box on no dish is a hard negative (background); ambiguous ones are left out."""
    if len(proposals) == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    if len(boxes) == 0:
        return proposals.astype(np.float32), np.full(len(proposals), background, np.int64)
    iou = iou_matrix(proposals, boxes)
    best = iou.argmax(1)
    on = iou.max(1) >= 0.5
    bg = _is_background(proposals, boxes)
    keep = (on & (iou.max(1) < near_gt)) | bg  # a box the same as the label adds nothing new
    y = np.where(on, np.asarray(labels, np.int64)[best], background)
    return proposals[keep].astype(np.float32), y[keep]


def class_weights(y: torch.Tensor, n: int, power: float = 0.5) -> torch.Tensor:
    """Loss weights (median count / count) ** power: a dish on few trays (dessert, fruit) is not
    drowned by the plate on every tray, without trusting a handful of examples too much."""
    counts = torch.bincount(y, minlength=n).float()
    med = counts[counts > 0].median() if (counts > 0).any() else torch.tensor(1.0)
    w = (med / counts.clamp(min=1)) ** power
    return w.clamp(0.5, 3.0)


def localiser_proposals(model: CenterNetModel, cache: ImageCache, size: int, threshold: float,
                        progress: bool) -> list[np.ndarray]:
    """The trained localiser's boxes on every training photo (in the cache's pixels)."""
    model.eval()
    out = []
    with torch.inference_mode():
        for img in tqdm(cache.images, desc="localiser proposals", unit="photo", disable=not progress, leave=False):
            x, f = letterbox(img, size)
            t = torch.from_numpy(x).permute(2, 0, 1).float()[None]
            (b, _), = localise(model, t, [f], [(img.shape[1], img.shape[0])], threshold)
            out.append(b.numpy())
    return out


def train_classifier(s: TrainSettings, model: DishModel, classes: tuple[str, ...], train_c: ImageCache,
                     train_labels, val_c: ImageCache, val_labels, state: RunState) -> list[dict]:
    clf = model.classifier
    clf.eval()
    c = len(classes)
    props = localiser_proposals(model.localiser, train_c, model.spec.loc_size, model.spec.loc_threshold, s.progress)
    tv = CropViews(clf, train_c, train_labels, c, s.cls_views, True, s.seed, s.progress, "classifier views",
                   proposals=props)
    vv = CropViews(clf, val_c, val_labels, c, 1, False, s.seed, s.progress, "classifier val crops")
    log.info("classifier: %d training crop views, %d validation crops", len(tv.y), len(vv.y))
    stages = clf.trunk.tuned_stages()
    groups = [{"params": list(clf.fc.parameters()) + list(clf.geo.parameters()), "lr": 2 * s.cls_lr}]
    for i, ps in enumerate(stages):
        groups.append({"params": ps, "lr": s.cls_lr * 0.8 ** (len(stages) - 1 - i)})
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    bs = 64
    steps_per_epoch = max(1, math.ceil(len(tv.y) / bs))
    sched = one_cycle(opt, [g["lr"] for g in groups], max(1, s.cls_epochs) * steps_per_epoch, 0.15)
    gen = torch.Generator().manual_seed(s.seed)
    weights = class_weights(tv.y, c + 1)
    log.info("classifier loss weights %s", {n: round(float(w), 2) for n, w in zip((*classes, "background"), weights)})

    def train_epoch(ep):
        clf.train()
        total = 0.0
        perm = torch.randperm(len(tv.y), generator=gen)
        with _bar(steps_per_epoch, f"classifier {ep + 1}", s) as bar:
            for i in range(0, len(tv.y), bs):
                j = perm[i:i + bs]
                logits = clf.head(clf.trunk.upper(tv.x[j]).mean(dim=(2, 3)), tv.geo[j])
                loss = F.cross_entropy(logits, tv.y[j], weight=weights, label_smoothing=0.05)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item()
                bar.set_postfix(loss=f"{total / (i // bs + 1):.3f}")
                bar.update()
        return total / steps_per_epoch

    @torch.inference_mode()
    def validate():
        clf.eval()
        if len(vv.y) == 0:
            return 0.0, {}
        logits = torch.cat([clf.head(clf.trunk.upper(vv.x[i:i + 128]).mean(dim=(2, 3)), vv.geo[i:i + 128])
                            for i in range(0, len(vv.y), 128)])
        pred = logits[:, :c].argmax(1)
        acc = (pred == vv.y).float().mean().item()
        exact = []
        for i in range(len(val_labels)):
            m = vv.owner == i
            exact.append(sorted(pred[m].tolist()) == sorted(vv.y[m].tolist()))
        return acc + float(np.mean(exact)), {"crop_acc": acc, "photo_exact_gt_boxes": float(np.mean(exact))}

    ph = run_phase("classifier", s.cls_epochs, clf, opt, sched, train_epoch, validate, state, s.patience)
    return [{"phase": "classifier", **h} for h in ph["history"]]


# ---------------------------------------------------------------- curves
def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = list(dict.fromkeys(h["phase"] for h in history))
    fig, axes = plt.subplots(1, len(phases), figsize=(4.2 * len(phases), 3.4), squeeze=False)
    for ax, ph in zip(axes[0], phases):
        hs = [h for h in history if h["phase"] == ph]
        ep = [h["epoch"] for h in hs]
        ax.plot(ep, [h["loss"] for h in hs], "o-", label="train loss")
        if "val_loss" in hs[0]:
            ax.plot(ep, [h["val_loss"] for h in hs], "o-", label="val loss")
        ax2 = ax.twinx()
        for key in ("ap50", "ap75", "crop_acc", "photo_exact_gt_boxes"):
            if key in hs[0]:
                ax2.plot(ep, [h[key] for h in hs], "s--", label=key)
        ax2.set_ylim(0, 1.02)
        ax.set_title(ph)
        ax.set_xlabel("epoch")
        lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
        ax.legend(lines, labels, fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- entry point
def load_training_data(s: TrainSettings) -> LabelledData:
    data = load_dataset(s.data, trays=s.trays)
    for p in data.problems:
        log.warning("%s", p)
    if data.problems:
        log.warning("%d problem(s) in %s (listed above; `dishtrack check-data` shows them too)",
                    len(data.problems), s.data)
    return data


def train(s: TrainSettings) -> dict:
    t_start = time.time()
    random.seed(s.seed)
    np.random.seed(s.seed)
    torch.manual_seed(s.seed)
    data = load_training_data(s)
    samples = list(data.samples)
    if s.max_images:
        samples = samples[: s.max_images]
    classes = data.classes
    if not any(len(x.labels) for x in samples):
        raise DatasetError(f"{s.data}: no labelled boxes")
    train_s, val_s = split_by_group(samples, s.val_fraction, s.seed, s.val_fold)
    if not val_s:
        log.warning("no validation trays (val_fraction=0): best-epoch selection and thresholds use training photos")
        val_s = train_s
    device = pick_device(s.device)
    log.info("%d classes, %d training photos, %d validation photos (%d trays held out), device %s",
             len(classes), len(train_s), len(val_s), len({x.group for x in val_s}), device)
    out = Path(s.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = RunState(out.with_name(out.name + ".state"), s, s.resume)

    spec = DishModelSpec(classes=classes, loc_size=s.loc_size, crop_size=s.crop_size, crop_long_side=s.crop_long_side,
                         freeze_blocks=s.freeze_blocks)
    model = DishModel(spec)
    if s.localiser:
        reuse_localiser(model, s, val_s)
    else:
        init_localiser_head(model.localiser)
    long_side = max(model.spec.loc_size, s.crop_long_side)
    train_c, val_c = ImageCache(train_s, long_side), ImageCache(val_s, long_side)
    cidx = {c: i for i, c in enumerate(classes)}
    train_labels = [[cidx[lbl] for lbl in x.labels] for x in train_s]
    val_labels = [[cidx[lbl] for lbl in x.labels] for x in val_s]

    history = []
    if not s.localiser:
        model.localiser.to(device)
        history = train_localiser(s, model.localiser, train_c, val_c, device, state)
        model.localiser.cpu()
    history += train_classifier(s, model, classes, train_c, train_labels, val_c, val_labels, state)
    if val_s is train_s:
        log.warning("thresholds are chosen on training photos whose boxes are in the exemplar memory: "
                    "every box finds itself, so they and the report are optimistic")
    # exemplars, thresholds per dish on validation trays, then the validation report with them
    preds = finish_model(model, train_s, train_labels, val_s, val_labels, device, s.progress, s.exemplar_weight)
    thresholds = model.spec.thresholds
    report = evaluate_predictions(val_s, classes, preds, thresholds,
                                  confusion_png=out.with_name(out.stem + "_confusion.png"), heldout_thresholds=True)
    curves = out.with_name(out.stem + "_curves.png")
    plot_curves(history, curves)
    meta = {"classes": list(classes), "train_photos": len(train_s), "val_photos": len(val_s),
            "val_trays": sorted({str(x.group) for x in val_s}), "history": history,
            # eval warns when it is given these (its numbers would be optimistic)
            "train_images": sorted({x.image.name for x in train_s}),
            "validation": {k: v for k, v in report.items() if k != "confusion"},
            "settings": s.model_dump(), "seconds": round(time.time() - t_start, 1), "device": str(device),
            "data_problems": len(data.problems)}
    model.cpu()
    save_dish_checkpoint(out, model, meta=meta)
    state.path.unlink(missing_ok=True)  # finished: nothing to resume
    report_json = out.with_name(out.stem + "_report.json")  # what the checkpoint's meta holds, readable
    report_json.write_text(json.dumps({"checkpoint": str(out), "curves": str(curves),
                                       "confusion_png": str(out.with_name(out.stem + "_confusion.png")), **meta},
                                      indent=2, default=float))
    held = (f" ({report['receipt_exact_tray_heldout']:.1%} with each tray's thresholds chosen on the other trays)"
            if "receipt_exact_tray_heldout" in report else "")
    log.info("wrote %s (curves %s) in %.0fs: val mAP@0.5 %.3f, exact receipts %.1f%% of trays%s", out, curves,
             meta["seconds"], report["map50"], 100 * report["receipt_exact_tray"], held)
    return {"checkpoint": str(out), "curves": str(curves), "report": str(report_json),
            "confusion_png": str(out.with_name(out.stem + "_confusion.png")), **meta}


def reuse_localiser(model: DishModel, s: TrainSettings, val_s: list[Sample]) -> None:
    """``--localiser CKPT``: its trained localiser (and input size) into ``model``, so only the
    classifier is trained. A localiser that saw this run's validation trays would flatter the
    report, so a different split is warned about."""
    try:
        ck = read_checkpoint(s.localiser)
        if "localiser" not in ck:
            raise ValueError(f"{s.localiser}: not a dish checkpoint of `dishtrack train` (it has no localiser)")
        model.localiser.load_state_dict(ck["localiser"])
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"localiser: {e}") from e
    model.spec = DishModelSpec(**{**model.spec.__dict__, "loc_size": int(ck["loc_size"]),
                                  "loc_threshold": float(ck["loc_threshold"])})
    theirs = set(ck.get("meta", {}).get("val_trays", []))
    ours = {str(x.group) for x in val_s}
    if theirs != ours:
        log.warning("localiser %s was validated on other trays (%d of this run's %d validation trays): "
                    "it may have trained on this run's validation photos", s.localiser, len(theirs & ours), len(ours))
    log.info("localiser from %s (input %d): training the classifier only", s.localiser, model.spec.loc_size)


def attach_exemplars(model: DishModel, samples: list[Sample], labels, device="cpu", weight: float = 0.0) -> None:
    """``model.exemplars``: every labelled box of ``samples`` embedded by the trained classifier
    (models/exemplars.py), voting with ``weight``. Training photos only: a validation box would find itself."""
    t0 = time.time()
    ex = embed_labelled_boxes(DishDetector(model, device), samples, labels)
    model.exemplars = dataclasses.replace(ex, weight=weight)
    log.info("exemplars: %d labelled boxes in %.0fs", len(model.exemplars), time.time() - t0)


def finish_model(model: DishModel, train_s: list[Sample], train_labels, val_s: list[Sample], val_labels,
                 device="cpu", progress: bool = False, exemplar_weight: float = 0.0) -> list[dict]:
    """What ``train`` does once the classifier is trained: the exemplar memory from the training
    boxes, then per-dish thresholds chosen on the validation photos (into ``model.spec``).
    Returns the validation predictions."""
    attach_exemplars(model, train_s, train_labels, device, exemplar_weight)
    preds, thr = validation_thresholds(DishDetector(model, device), val_s, val_labels, model.spec.classes, progress)
    model.spec = DishModelSpec(**{**model.spec.__dict__, "thresholds": thr})
    return preds


def validation_thresholds(det: DishDetector, samples: list[Sample], labels, classes: tuple[str, ...],
                          progress: bool = True) -> tuple[list[dict], dict[str, float]]:
    """The detector's predictions on labelled validation photos and each dish's score threshold chosen
    on them (``evaluate.choose_thresholds``). Boxes labelled < 0 (a dish held out of the labels) are
    left out, and so are the predictions on them: what the model calls a dish it was never taught
    is neither right nor wrong (counted as extras, they raised the thresholds of the dishes it was
    mistaken for, and those stayed high once the dish was enrolled)."""
    preds = predict_samples(det, samples, progress)
    return preds, choose_thresholds(*threshold_inputs(samples, labels, preds), classes)


def threshold_inputs(samples: list[Sample], labels, preds: list[dict]) -> tuple[list, list]:
    """(ground truth, raw predictions) per photo for ``choose_thresholds``, without the boxes labelled
    < 0 and the predictions on them (``validation_thresholds``)."""
    gt, raw = [], []
    for x, lb, p in zip(samples, labels, preds):
        b, c = np.asarray(x.boxes, np.float32).reshape(-1, 4), np.asarray(lb, np.int64)
        gt.append((b[c >= 0], c[c >= 0]))
        raw.append(drop_on_boxes((p["boxes"], p["scores"], p["class_ids"]), b[c < 0]))
    return gt, raw


def predict_samples(det: DishDetector, samples: list[Sample], progress: bool = True) -> list[dict]:
    """Raw detector predictions on labelled photos (full resolution, read from disk)."""
    import cv2

    out = []
    for x in tqdm(samples, desc="predicting", unit="photo", disable=not progress, leave=False):
        img = cv2.imread(str(x.image))
        if img is None:
            raise DatasetError(f"cannot decode image {x.image}")
        p = det.predict([img])[0]
        p["size"] = (img.shape[1], img.shape[0])
        out.append(p)
    return out

"""Enrol a new dish (or refresh known ones) in minutes: retrain only the classifier's head.

Why: a full ``dishtrack train`` takes about 13 minutes on 2 cores and a canteen adds dishes
from a handful of corrected examples. The localiser is class-agnostic and the classifier's
fine-tuned trunk already tells food apart, so only its last layer (and the box-size features)
learns the new dish, from pooled trunk embeddings computed once per crop view. The trunk is
untouched, so the tracker's appearance embeddings mean the same as before.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .dish_classifier import DishClassifier
from .dish_detector import (DishDetector, DishModel, DishModelSpec, load_dish_checkpoint, read_checkpoint,
                            save_dish_checkpoint)
from .evaluate import evaluate_predictions
from .exemplars import embed_labelled_boxes
from .importers import DatasetError, LabelledData, label_key, load_dataset
from .localiser import ImageCache
from .sample import Sample
from .train import CropViews, class_weights, localiser_proposals, one_cycle, split_by_group, validation_thresholds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedCrops:
    """Pooled trunk embeddings of crop views, with box geometry, label and the photo they came from."""

    emb: torch.Tensor  # (N, 1280)
    geo: torch.Tensor  # (N, 3)
    y: torch.Tensor  # (N,) class index; the last index is background
    owner: torch.Tensor  # (N,) index of the photo


def embed_crops(model: DishModel, samples: Sequence[Sample], labels: Sequence[Sequence[int]], n_classes: int,
                views: int, augment: bool, seed: int, progress: bool, desc: str,
                proposals: bool | list[np.ndarray] = True, cache: ImageCache | None = None) -> EmbeddedCrops:
    """Labelled boxes (labels < 0: ignored) as ``views`` crop views through the whole trunk; with
    ``proposals`` the localiser's own boxes on each photo too (its box errors, and hard negatives;
    a list: those boxes, already found, in ``cache`` pixels)."""
    model.eval()
    cache = cache or ImageCache(list(samples), max(model.spec.loc_size, model.spec.crop_long_side))
    if proposals is True:
        props = localiser_proposals(model.localiser, cache, model.spec.loc_size, model.spec.loc_threshold, progress)
    else:
        props = proposals or None
    v = CropViews(model.classifier, cache, [list(x) for x in labels], n_classes, views, augment, seed, progress, desc,
                  proposals=props, pooled=True)
    return EmbeddedCrops(v.x.reshape(len(v.y), -1), v.geo, v.y, v.owner)


def extend_head(clf: DishClassifier, old: Sequence[str], new: Sequence[str]) -> None:
    """Resize the output layer from ``old`` to ``new`` classes (+ background), keeping the rows of
    classes present in both; a new class starts from zero weights."""
    fc = nn.Linear(clf.fc.in_features, len(new) + 1)
    with torch.no_grad():
        fc.weight.zero_()
        fc.bias.fill_(-2.0)
        for j, name in enumerate(list(new) + [None]):
            i = len(old) if name is None else (old.index(name) if name in old else None)
            if i is not None:
                fc.weight[j] = clf.fc.weight[i]
                fc.bias[j] = clf.fc.bias[i]
    clf.fc = fc


def train_head(clf: DishClassifier, data: EmbeddedCrops, epochs: int = 40, lr: float = 3e-3, seed: int = 0,
               batch_size: int = 128, few_shot: Sequence[int] = (), fixed: Sequence[int] = ()) -> float:
    """Fit the head (output layer + box-geometry layer) on fixed embeddings; returns the last epoch's loss.
    With ``fixed`` rows only the other rows are fitted (the box-geometry layer stays too). ``few_shot`` classes (a dish enrolled from a handful of boxes) are weighted up to the median
    class's total weight (capped at 8x), not only the usual square-root balance: otherwise five
    boxes among thousands barely move the loss."""
    n_out = clf.fc.out_features
    # ``fixed`` output rows (the known dishes, when only a new one is fitted) and the box-size layer
    # keep their values: restored after every step (AdamW's decay moves them even without a gradient)
    params = list(clf.fc.parameters()) + ([] if len(fixed) else list(clf.geo.parameters()))
    rows = torch.tensor(list(fixed), dtype=torch.long)
    keep_w, keep_b = clf.fc.weight.detach()[rows].clone(), clf.fc.bias.detach()[rows].clone()
    for p in params:  # a model that served as a DishDetector has every parameter frozen
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-3)
    n = len(data.y)
    steps = max(1, math.ceil(n / batch_size))
    sched = one_cycle(opt, lr, max(1, epochs) * steps, 0.1)
    weights = class_weights(data.y, n_out)
    if len(few_shot):
        counts = torch.bincount(data.y, minlength=n_out).float()
        med = counts[counts > 0].median()
        for k in few_shot:
            if counts[k] > 0:
                weights[k] = max(float(weights[k]), min(8.0, float(med / counts[k])))
    gen = torch.Generator().manual_seed(seed)
    clf.train()
    loss_sum = 0.0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        loss_sum = 0.0
        for i in range(0, n, batch_size):
            j = perm[i:i + batch_size]
            loss = F.cross_entropy(clf.head(data.emb[j], data.geo[j]), data.y[j], weight=weights,
                                   label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if len(fixed):
                with torch.no_grad():
                    clf.fc.weight[rows] = keep_w
                    clf.fc.bias[rows] = keep_b
            loss_sum += loss.item()
    clf.eval()
    return loss_sum / steps


@torch.no_grad()
def imprint(clf: DishClassifier, data: EmbeddedCrops, classes: Sequence[int]) -> None:
    """Start each new class's output row at the direction of its examples' mean head input, scaled
    like the trained rows (weight imprinting, Qi et al. 2018): from zero weights a class seen five
    times never outscores the trained ones within a few epochs."""
    clf.eval()
    z = torch.cat([data.emb, clf.geo(data.geo)], dim=1)
    old = [k for k in range(clf.fc.out_features) if k not in set(classes)]
    norm = clf.fc.weight[old].norm(dim=1).mean()
    bias = clf.fc.bias[old].mean()
    for k in classes:
        m = z[data.y == k].mean(0)
        if torch.isfinite(m).all() and m.norm() > 0:
            clf.fc.weight[k] = m / m.norm() * norm
            clf.fc.bias[k] = bias


def concat(a: EmbeddedCrops, b: EmbeddedCrops) -> EmbeddedCrops:
    return EmbeddedCrops(torch.cat([a.emb, b.emb]), torch.cat([a.geo, b.geo]), torch.cat([a.y, b.y]),
                         torch.cat([a.owner, b.owner]))


def merged_classes(old: Sequence[str], datasets: Sequence[LabelledData]) -> tuple[str, ...]:
    """The checkpoint's classes, then each dataset's new ones in order. A label that differs from a
    known dish only by case or spaces (``label_key``, as corrections and importers compare names)
    is an error: it would silently become a second dish."""
    out = list(old)
    folded = {label_key(c): c for c in out}
    for d in datasets:
        for c in d.classes:
            if c in out:
                continue
            twin = folded.get(label_key(c))
            if twin is not None:
                where = "the checkpoint's" if twin in old else "an earlier dataset's"
                raise DatasetError(f"class '{c}' differs from {where} '{twin}' only by case or spaces: "
                                   f"rename it in the labels")
            out.append(c)
            folded[label_key(c)] = c
    return tuple(out)


def enrol_model(model: DishModel, classes: Sequence[str], train_s: Sequence[Sample], train_labels, views: int = 4,
                epochs: int = 40, seed: int = 0, progress: bool = True, shot_views: int = 24,
                few_shot: bool = True, exemplars: bool = True, exemplar_weight: float | None = 0.0,
                keep_old: bool = False) -> EmbeddedCrops:
    """In place: ``model``'s classifier head now names ``classes`` (old ones keep their weights as a start).
    Boxes of a new dish get ``shot_views`` augmented views in all (a handful of corrections are
    the only examples of it), the rest ``views``; new rows are imprinted, then fitted with the rest,
    weighted up (``few_shot=False``: none of the three, the plain head refit, for comparison).
    The given boxes join the exemplars (``exemplars=False``: the old ones are kept as they are,
    for comparison), which vote with ``exemplar_weight`` (None: the checkpoint's; measured, 0.5
    names a new dish in no more of its next trays than the few-shot head alone, docs/dish_accuracy.md).
    ``keep_old``: only the new dishes' rows are fitted, the known dishes' rows and the box-size layer
    stay as they were (their logits do not move; their probabilities only lose the new rows' share;
    measured in docs/dish_accuracy.md)."""
    torch.manual_seed(seed)
    old = list(model.spec.classes)
    old_exemplars = model.exemplars
    extend_head(model.classifier, old, list(classes))
    model.spec = DishModelSpec(**{**model.spec.__dict__, "classes": tuple(classes)})
    data = embed_crops(model, train_s, train_labels, len(classes), views, True, seed, progress, "enrol crop views")
    new = [k for k, c in enumerate(classes) if c not in old]
    photos = [i for i, lb in enumerate(train_labels) if any(k in new for k in lb)]
    if few_shot and photos and shot_views > views:
        more = embed_crops(model, [train_s[i] for i in photos],
                           [[k if k in new else -1 for k in train_labels[i]] for i in photos], len(classes),
                           shot_views - views, True, seed + 1, progress, "enrol: more views of the new dishes",
                           proposals=False)
        keep = more.y != len(classes)  # its background boxes add nothing the first pass lacks
        more = EmbeddedCrops(more.emb[keep], more.geo[keep], more.y[keep],
                             torch.tensor(photos, dtype=torch.long)[more.owner[keep]])
        data = concat(data, more)
    log.info("enrol: %d crop views of %d photos (%d of new dishes); fitting the head", len(data.y), len(train_s),
             int(sum((data.y == k).sum() for k in new)) if new else 0)
    if few_shot:
        imprint(model.classifier, data, new)
    fixed = [k for k in range(len(classes) + 1) if k not in new] if keep_old and new else []
    train_head(model.classifier, data, epochs=epochs, seed=seed, few_shot=new if few_shot else (), fixed=fixed)
    # the trunk is unchanged, so the old exemplars keep their meaning; the given boxes join them
    # (a new dish's handful of corrections are then its nearest neighbours, not only a fresh head row)
    if old_exemplars is not None:  # by name: an old dish keeps its exemplars wherever it now sits
        model.exemplars = old_exemplars.relabelled([list(classes).index(c) if c in classes else -1 for c in old])
    if exemplars:
        # a checkpoint from before exemplars gets a memory of the given boxes alone: the vote only
        # shares out the head's probability among the dishes it holds (Exemplars.blend)
        given = embed_labelled_boxes(DishDetector(model, "cpu"), train_s, train_labels)
        model.exemplars = model.exemplars.merged(given) if model.exemplars is not None else given
        log.info("enrol: %d exemplars (%d boxes given)", len(model.exemplars), len(given))
    if model.exemplars is not None and exemplar_weight is not None:
        model.exemplars = dataclasses.replace(model.exemplars, weight=exemplar_weight)
    return data


def thresholds_for(model: DishModel, val_s: Sequence[Sample], val_labels, old: dict[str, float],
                   progress: bool, keep: Sequence[str] = ()) -> tuple[dict[str, float], list[dict]]:
    """Per-dish thresholds on the validation photos; a dish without validation boxes keeps its old
    threshold, a new one takes the median of the others (nothing to choose it on). ``keep``: dishes
    whose old threshold stays even with validation boxes (their rows were not refitted: the old one
    was chosen on the training run's validation trays, not on an enrolment's few photos)."""
    classes = model.spec.classes
    default = float(np.median(list(old.values()))) if old else 0.3
    if not val_s:
        return {c: old.get(c, default) for c in classes}, []
    preds, chosen = validation_thresholds(DishDetector(model, "cpu"), list(val_s), val_labels, classes, progress)
    seen = {classes[k] for lb in val_labels for k in lb}
    return {c: (chosen[c] if c in seen and not (c in keep and c in old) else old.get(c, default))
            for c in classes}, preds


def enrol(checkpoint: str | Path, data: Sequence[str | Path], out: str | Path, val_fraction: float = 0.2,
          views: int = 4, epochs: int = 40, seed: int = 0, progress: bool = True, shot_views: int = 24,
          exemplar_weight: float = 0.0, keep_old: bool = True) -> dict:
    """``dishtrack enrol``: checkpoint + labelled photos (old dishes and new) -> a checkpoint that
    also names the new dishes. Validation holds out whole trays, as ``train`` does. ``keep_old``:
    with new dishes, only their rows are fitted (the known dishes' rows as trained)."""
    t0 = time.time()
    model = load_dish_checkpoint(checkpoint)
    old_classes = list(model.spec.classes)
    sets = [load_dataset(p) for p in data]
    for d, p in zip(sets, data):
        for pr in d.problems:
            log.warning("%s", pr)
    classes = merged_classes(old_classes, sets)
    samples = [x for d in sets for x in d.samples]
    cidx = {c: i for i, c in enumerate(classes)}
    train_s, val_s = split_by_group(samples, val_fraction, seed)
    counts = {c: sum(lb == c for x in train_s for lb in x.labels) for c in classes}
    missing = [c for c in classes if c not in old_classes and counts[c] == 0]
    if missing:
        raise DatasetError(f"no training boxes of the new dish(es) {missing}: every photo of them fell into "
                           f"validation (use --val-fraction 0 with very few photos)")
    new = [c for c in classes if c not in old_classes]
    log.info("enrol: %d classes (%d new: %s), %d training photos, %d validation photos", len(classes), len(new),
             new, len(train_s), len(val_s))
    lab = lambda xs: [[cidx[lb] for lb in x.labels] for x in xs]  # noqa: E731
    enrol_model(model, classes, train_s, lab(train_s), views, epochs, seed, progress, shot_views,
                exemplar_weight=exemplar_weight, keep_old=keep_old)
    thresholds, preds = thresholds_for(model, val_s, lab(val_s), dict(model.spec.thresholds), progress,
                                       keep=old_classes if keep_old and new else ())
    model.spec = DishModelSpec(**{**model.spec.__dict__, "thresholds": thresholds})
    report = ({k: v for k, v in evaluate_predictions(val_s, classes, preds, thresholds).items() if k != "confusion"}
              if val_s else {})
    base_trained = read_checkpoint(checkpoint).get("meta", {}).get("train_images", [])
    meta = {"classes": list(classes), "enrolled_from": str(checkpoint), "new_classes": new,
            "train_boxes": counts, "train_photos": len(train_s), "val_photos": len(val_s),
            "val_trays": sorted({str(x.group) for x in val_s}),
            # the base model's training photos and these: eval warns about both (models/train.py)
            "train_images": sorted(set(base_trained) | {x.image.name for x in train_s}),
            "validation": report, "seconds": round(time.time() - t0, 1)}
    save_dish_checkpoint(out, model, meta=meta)
    log.info("wrote %s in %.0fs (new dishes %s)%s", out, meta["seconds"], new,
             f": val mAP@0.5 {report['map50']:.3f}, exact receipts {report['receipt_exact_tray']:.1%} of trays"
             if report else "")
    return {"checkpoint": str(out), **meta}

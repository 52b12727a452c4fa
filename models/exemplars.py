"""Exemplar memory: the trunk embeddings of labelled training boxes, voted by nearest neighbours
next to the classifier's head.

Why: a linear head trained on a dish seen on three trays (Cheese: 15 boxes in the kiosk folder)
gives it a weak row; its nearest training boxes still name it. Cross-validated on the kiosk folder
(5 folds, fold models unchanged, out-of-fold boxes): Cheese boxes named right 47% -> 73%, mAP@0.5
+0.01, exact tray receipts on photos up to +1 tray of 62 beyond same-dish suppression, but -4 trays
on the checkout videos and no gain for an enrolled dish (docs/dish_accuracy.md). So checkpoints keep the memory
with its vote off (``weight`` 0) unless ``--exemplar-weight`` asks for it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .backbone import FEATURE_DIM


@dataclass(frozen=True)
class Exemplars:
    """Unit-length embeddings (N, D) of labelled boxes with their class indices (N,)."""

    embeddings: torch.Tensor  # float16 on save, float32 in use
    labels: torch.Tensor  # int64 class indices (never background)
    k: int = 10
    temperature: float = 0.05  # cosine similarities -> softmax-like neighbour weights
    weight: float = 0.5  # share of the neighbour vote in the blended dish probabilities

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2 or len(self.embeddings) != len(self.labels):
            raise ValueError(f"exemplars: {tuple(self.embeddings.shape)} embeddings for {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def vote(self, emb: torch.Tensor, n_classes: int) -> torch.Tensor:
        """Unit embeddings (M, D) -> (M, n_classes) class shares among the k nearest exemplars,
        each weighted by exp(cosine / temperature)."""
        if len(self) == 0 or len(emb) == 0:
            return torch.full((len(emb), n_classes), 1.0 / n_classes)
        sim = emb.float() @ self.embeddings.float().T
        k = min(self.k, len(self))
        top, idx = sim.topk(k, dim=1)
        w = torch.exp((top - top[:, :1]) / self.temperature)  # shifted by the best: no overflow
        out = torch.zeros(len(emb), n_classes)
        out.scatter_add_(1, self.labels[idx], w)
        return out / out.sum(1, keepdim=True)

    def blend(self, probs: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Head probabilities (M, C+1; last = background) -> the same with the dish part blended
        with the neighbour vote; the background share stays the head's (exemplars are dishes only).
        Only dishes the memory holds are blended, within the head's share for them: a dish with
        no exemplars (all its boxes were validation boxes) keeps the head's probability instead of
        losing the vote's weight to dishes that have some."""
        c = probs.shape[1] - 1
        bg = probs[:, c:]
        dish = probs[:, :c] / probs[:, :c].sum(1, keepdim=True).clamp(min=1e-12)
        has = torch.bincount(self.labels, minlength=c)[:c] > 0
        if self.weight > 0 and has.any():
            share = dish[:, has].sum(1, keepdim=True)
            vote = self.vote(emb, c)[:, has]
            dish = dish.clone()
            dish[:, has] = (1 - self.weight) * dish[:, has] + self.weight * share * vote
        return torch.cat([dish * (1 - bg), bg], dim=1)

    def relabelled(self, index: list[int]) -> "Exemplars":
        """Class indices mapped through ``index`` (old index -> new index, -1: the dish is gone)."""
        m = torch.tensor(index, dtype=torch.long)[self.labels] if len(self) else self.labels
        keep = m >= 0
        return Exemplars(self.embeddings[keep], m[keep], self.k, self.temperature, self.weight)

    def merged(self, other: "Exemplars", same: float = 0.999) -> "Exemplars":
        """These exemplars plus ``other``'s. A box of ``other`` that repeats one already held
        (cosine >= ``same``: the same box given twice, e.g. the training folder passed again) is
        not added; if its label differs it is a correction, and the held one takes its label."""
        labels = self.labels.clone()
        if len(self) and len(other):
            sim, idx = (other.embeddings.float() @ self.embeddings.float().T).max(1)
            dup = sim >= same
            labels[idx[dup]] = other.labels[dup]
            other = Exemplars(other.embeddings[~dup], other.labels[~dup])
        return Exemplars(torch.cat([self.embeddings.float(), other.embeddings.float()]),
                         torch.cat([labels, other.labels]), self.k, self.temperature, self.weight)

    def to_state(self) -> dict:
        return {"embeddings": self.embeddings.half().contiguous(), "labels": self.labels.long().contiguous(),
                "k": int(self.k), "temperature": float(self.temperature), "weight": float(self.weight)}

    @classmethod
    def from_state(cls, d: dict) -> "Exemplars":
        return cls(d["embeddings"].float(), d["labels"].long(), int(d["k"]), float(d["temperature"]),
                   float(d["weight"]))


def embed_labelled_boxes(det, samples, labels) -> Exemplars:
    """Exemplars of labelled photos: every box (labels < 0 left out) embedded exactly as
    ``det`` (a ``DishDetector``) embeds the boxes it finds. No augmentation: the memory holds
    what the dishes looked like."""
    import cv2

    embs, ys = [], []
    for x, lb in zip(samples, labels):
        lb = np.asarray(lb, np.int64)
        boxes = np.asarray(x.boxes, np.float32).reshape(-1, 4)[lb >= 0]
        if not len(boxes):
            continue
        img = cv2.imread(str(x.image))
        if img is None:
            raise ValueError(f"cannot decode image {x.image}")
        embs.append(det.embed_boxes(img, boxes))
        ys.append(torch.from_numpy(lb[lb >= 0]))
    if not embs:
        return Exemplars(torch.zeros(0, FEATURE_DIM), torch.zeros(0, dtype=torch.long))
    return Exemplars(torch.cat(embs), torch.cat(ys))

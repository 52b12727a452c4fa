"""Learning curve: which trays to label next — random, diverse, or diverse and uncertain.

Simulated on the kiosk photos: start with 5 labelled training trays (random), then rounds of 5
more chosen by (a) random, (b) diversity: greedy k-center on tray embeddings (mean of the
detector trunk's embeddings of the localiser's boxes on the tray's photos), (c) diversity x
(1 + uncertainty): the current classifier's mean normalised entropy on the tray's boxes, (d)
coverage: greedy facility location on the dishes' embeddings (the tray whose dishes bring the
most unlabelled pool dishes closer to a labelled one), (e) coverage with each pool dish weighted
by 1 + its entropy, (f) as (e), each pool dish also weighted by how rare its predicted dish is among
the labelled boxes (sqrt of the commonest dish's labelled count over its own). After
each round the classifier head is refit on the labelled trays and scored on the fixed tray-split
validation (mAP@0.5, exact receipts per photo and per photo-voted tray). Seeds averaged.

What is fixed, so a round costs seconds rather than a 13-minute ``train``: the localiser (the
class-agnostic one of ``--localiser``, trained on every training tray's boxes) and the
classifier trunk (ImageNet EfficientNet-Lite0, not fine-tuned: labels reach only the head).
Absolute rates are therefore below a full ``train``'s; the curve compares label budgets and
strategies under one model.

    python bench/learning_curve.py --localiser runs/bench2/dishes.pt --png docs/learning_curve.png

Cross-validated (every tray a validation tray once; each fold with its own localiser, trained by
``bench/dish_cv.py`` without that fold's trays); the rates are averaged over the folds, each
weighted by its validation trays, and over the seeds:

    python bench/learning_curve.py --localiser 'runs/cv/fold{fold}/dishes.pt' --folds all
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dishtrack.models.dish_classifier import DishClassifier, box_geometry, crop
from dishtrack.models.dish_detector import DishModelSpec, load_dish_checkpoint, localise
from dishtrack.models.enrol import EmbeddedCrops, embed_crops, train_head
from dishtrack.models.evaluate import choose_thresholds, evaluate_predictions
from dishtrack.models.importers import load_dataset
from dishtrack.models.localiser import ImageCache
from dishtrack.models.sample import Sample
from dishtrack.models.shots import greedy_coverage
from dishtrack.models.train import split_by_group
from dishtrack.models.augment import letterbox
from dish_cv import fold_checkpoints  # bench/ is on sys.path when a benchmark runs

log = logging.getLogger("learning_curve")
STRATEGIES = ("random", "diversity", "diversity+uncertainty", "coverage", "coverage+uncertainty", "coverage+rarity")


@torch.inference_mode()
def localised(model, cache: ImageCache) -> list[tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]]:
    """Per photo: localiser boxes and scores (cache pixels), and the trunk embedding + geometry of each box."""
    clf = model.classifier.eval()
    out = []
    for img in cache.images:
        x, f = letterbox(img, model.spec.loc_size)
        (b, sc), = localise(model.localiser.eval(), torch.from_numpy(x).permute(2, 0, 1).float()[None], [f],
                            [(img.shape[1], img.shape[0])], model.spec.loc_threshold)
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()[None]
        if len(b):
            emb = clf.features(crop(t, [b], model.spec.crop_size))
            geo = box_geometry(b, torch.tensor([[img.shape[1], img.shape[0]]], dtype=torch.float32).expand(len(b), 2))
        else:
            emb, geo = torch.zeros(0, clf.fc.in_features - 32), torch.zeros(0, 3)
        out.append((b.numpy(), sc.numpy(), emb, geo))
    return out


@torch.inference_mode()
def predictions(clf: DishClassifier, loc, n_classes: int) -> list[dict]:
    """What ``DishDetector.predict`` returns, from cached localiser boxes and trunk embeddings."""
    clf.eval()
    out = []
    for b, sc, emb, geo in loc:
        p = F.softmax(clf.head(emb, geo), dim=1).numpy() if len(b) else np.zeros((0, n_classes + 1), np.float32)
        pc, cls = p[:, :n_classes].max(1), p[:, :n_classes].argmax(1)
        out.append({"boxes": b, "scores": (sc * pc).astype(np.float32), "class_ids": cls.astype(np.int64), "probs": p})
    return out


def tray_uncertainty(preds: list[dict], photo_tray: list[str], min_loc: float = 0.3) -> dict[str, float]:
    """Mean normalised entropy of the dish probabilities of a tray's boxes."""
    acc: dict[str, list[float]] = {}
    for p, t in zip(preds, photo_tray):
        q = p["probs"]
        if len(q) == 0:
            continue
        ent = -(q * np.log(q.clip(1e-9))).sum(1) / np.log(q.shape[1])
        acc.setdefault(t, []).extend(ent.tolist())
    return {t: float(np.mean(v)) for t, v in acc.items()}


def pick(strategy: str, pool: list[str], labelled: list[str], feats: dict[str, np.ndarray],
         unc: dict[str, float], n: int, rng: random.Random) -> list[str]:
    """Next ``n`` trays from ``pool``: random, or greedy k-center from the labelled ones (times 1 + uncertainty)."""
    left = [t for t in pool if t not in labelled]
    if strategy == "random":
        return rng.sample(left, min(n, len(left)))
    x = {t: feats[t] for t in pool}
    chosen = list(labelled)
    out = []
    for _ in range(min(n, len(left))):
        cand = [t for t in left if t not in out]
        dmin = np.array([min(1.0 - float(x[t] @ x[c]) for c in chosen) for t in cand])
        if strategy == "diversity+uncertainty":
            dmin = dmin * (1.0 + np.array([unc.get(t, 0.0) for t in cand]))
        k = cand[int(np.argmax(dmin))]
        out.append(k)
        chosen.append(k)
    return out


def box_uncertainty(preds: list[dict]) -> np.ndarray:
    """Normalised entropy of every pool box's dish probabilities, in photo then box order."""
    out = []
    for p in preds:
        q = p["probs"]
        if len(q):
            out.append(-(q * np.log(q.clip(1e-9))).sum(1) / np.log(q.shape[1]))
    return np.concatenate(out) if out else np.zeros(0)


def pick_coverage(pool: list[str], labelled: list[str], sim: np.ndarray, box_tray: np.ndarray, n: int,
                  weight: np.ndarray | None) -> list[str]:
    """Next ``n`` trays by greedy facility location on dish embeddings (``shots.greedy_coverage``, what
    ``dishtrack shots`` does with frames): the tray whose dishes most reduce the (weighted) distance
    of every pool dish to its nearest labelled dish. Unlike k-center on tray means it favours trays
    that stand for many dishes, not outliers."""
    lab = np.isin(box_tray, labelled)
    cover = (1.0 - sim[:, lab].max(1)) if lab.any() else None
    left = [t for t in pool if t not in labelled and (box_tray == t).any()]
    if not left:
        return []
    dist = np.stack([1.0 - sim[:, box_tray == t].max(1) for t in left])  # tray -> every pool dish
    return [left[k] for k in greedy_coverage(dist, n, None if weight is None else 1.0 + weight, cover)]


def rarity(pred_cls: np.ndarray, labelled_y: np.ndarray, n_classes: int) -> np.ndarray:
    """Per pool dish: sqrt((labelled boxes of the commonest dish + 1) / (labelled boxes of its predicted
    dish + 1)), so trays with dishes the labels have few of count more (an exact receipt needs every
    dish); the +1 keeps a dish with no labelled box yet finite."""
    counts = np.bincount(labelled_y, minlength=n_classes + 1)[:n_classes].astype(np.float64)
    return np.sqrt((counts.max() + 1.0) / (counts[pred_cls] + 1.0))


def subset(data: EmbeddedCrops, photos: set[int]) -> EmbeddedCrops:
    m = torch.tensor([int(o) in photos for o in data.owner])
    return EmbeddedCrops(data.emb[m], data.geo[m], data.y[m], data.owner[m])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/mealtray_kiosk_dev"))
    ap.add_argument("--localiser", required=True, help="a dish checkpoint trained on the same split (its localiser); "
                    "with --folds a pattern with {fold}, e.g. runs/cv/fold{fold}/dishes.pt (bench/dish_cv.py)")
    ap.add_argument("--folds", help="cross-validation folds (train --val-fold), 'all' or e.g. 0,1: the curve is "
                    "averaged over their validation trays (every tray once with 'all')")
    ap.add_argument("--start", type=int, default=5)
    ap.add_argument("--step", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--views", type=int, default=3)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--png", default="learning_curve.png")
    ap.add_argument("--json")
    ap.add_argument("--strategies", default=",".join(STRATEGIES),
                    help=f"comma-separated, of {', '.join(STRATEGIES)} (random always runs: the baseline)")
    args = ap.parse_args()
    chosen = [x.strip() for x in args.strategies.split(",") if x.strip()]
    if bad := [x for x in chosen if x not in STRATEGIES]:
        ap.error(f"--strategies: unknown {bad}; choose from {', '.join(STRATEGIES)}")
    args.strategies = tuple(x for x in STRATEGIES if x in chosen or x == "random")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    t0 = time.time()
    data = load_dataset(args.data)
    try:  # no --folds: the default split (fold 0)
        folds = [k or 0 for k in fold_checkpoints(args.folds, args.localiser, data.samples, 0.2, args.split_seed)]
    except ValueError as e:
        ap.error(str(e))
    runs = [run_split(args, data, args.localiser.format(fold=k), k) for k in folds]
    n_val = [r["val_trays"] for r in runs]
    if len({len(r["budgets"]) for r in runs}) > 1:  # folds differ by a tray or so: the same rounds, else refuse
        raise SystemExit(f"folds have different label budgets {[r['budgets'] for r in runs]}: use --step so that "
                         "every fold's training trays give the same number of rounds")
    budgets = runs[0]["budgets"]
    n_train = budgets[-1]
    # every (fold, seed) run weighted by its validation trays
    mean = {s: {b: {k: float(np.average([np.mean([x[k] for x in r["results"][s][i]]) for r in runs],
                                        weights=n_val)) for k in METRICS}
                for i, b in enumerate(budgets)} for s in args.strategies}
    full = {k: float(np.mean([mean[s][budgets[-1]][k] for s in args.strategies])) for k in METRICS}
    print(f"{n_train} training trays, {sum(n_val)} validation trays ({len(folds)} fold(s): {folds}), {args.seeds} seeds; "
          f"full-data: mAP@0.5 {full['map50']:.3f}, exact photos {full['receipt_exact_photo']:.1%}, "
          f"trays {full['receipt_exact_tray']:.1%} ({time.time() - t0:.0f} s)")
    print("| labelled trays | " + " | ".join(f"{s} mAP / photos / trays" for s in args.strategies) + " |")
    print("|---|" + "---|" * len(args.strategies))
    for b in budgets:
        print(f"| {b} ({b / n_train:.0%}) | " + " | ".join(
            f"{mean[s][b]['map50']:.3f} / {mean[s][b]['receipt_exact_photo']:.1%} / {mean[s][b]['receipt_exact_tray']:.1%}"
            for s in args.strategies) + " |")
    plot(mean, budgets, full, args.png, n_train)
    if args.json:
        Path(args.json).write_text(json.dumps({"folds": folds, "runs": runs, "mean": mean, "full": full}, indent=1))


METRICS = ("map50", "receipt_exact_photo", "receipt_exact_tray")


def run_split(args, data, localiser: str, fold: int) -> dict:
    """One tray split (``fold``; its localiser): every strategy and seed, results per budget."""
    t0 = time.time()
    classes = data.classes
    cidx = {c: i for i, c in enumerate(classes)}
    tr, va = split_by_group(list(data.samples), 0.2, args.split_seed, fold)
    model = load_dish_checkpoint(localiser)
    torch.manual_seed(0)
    model.classifier = DishClassifier(len(classes), model.spec.crop_size, pretrained=True, freeze_blocks=16)
    model.spec = DishModelSpec(**{**model.spec.__dict__, "classes": classes, "thresholds": {}})
    long_side = max(model.spec.loc_size, model.spec.crop_long_side)
    tc, vc = ImageCache(tr, long_side), ImageCache(va, long_side)
    pool_loc, val_loc = localised(model, tc), localised(model, vc)
    crops = embed_crops(model, tr, [[cidx[lb] for lb in x.labels] for x in tr], len(classes), args.views, True, 0,
                        False, "views", proposals=[b for b, *_ in pool_loc], cache=tc)
    log.info("embedded %d training crop views, %d pool boxes, %d validation boxes in %.0fs", len(crops.y),
             sum(len(b) for b, *_ in pool_loc), sum(len(b) for b, *_ in val_loc), time.time() - t0)
    # validation in cache pixels (mAP and receipts do not depend on the scale)
    va_c = [Sample(x.image, b, x.labels, x.group) for x, b in zip(va, vc.boxes)]
    sizes = [(im.shape[1], im.shape[0]) for im in vc.images]
    gt = [(b, np.array([cidx[lb] for lb in x.labels], np.int64)) for x, b in zip(va, vc.boxes)]
    photo_tray = [x.group for x in tr]
    trays = sorted(set(photo_tray))
    feats = {}
    for t in trays:
        e = torch.cat([F.normalize(emb, dim=1) for (b, sc, emb, geo), pt in zip(pool_loc, photo_tray)
                       if pt == t and len(b)]).mean(0)
        feats[t] = F.normalize(e, dim=0).numpy()

    box_emb = torch.cat([F.normalize(emb, dim=1) for (b, sc, emb, geo) in pool_loc if len(b)]).numpy()
    box_tray = np.array([pt for (b, *_), pt in zip(pool_loc, photo_tray) for _ in range(len(b))])
    sim = box_emb @ box_emb.T

    def fit_and_score(labelled: list[str], seed: int):
        photos = {i for i, t in enumerate(photo_tray) if t in labelled}
        torch.manual_seed(seed)
        clf = model.classifier
        clf.fc.reset_parameters()
        for m in clf.geo:
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        train_head(clf, subset(crops, photos), epochs=40, seed=seed)
        preds = predictions(clf, val_loc, len(classes))
        for p, sz in zip(preds, sizes):
            p["size"] = sz
        thr = choose_thresholds(gt, [(p["boxes"], p["scores"], p["class_ids"]) for p in preds], classes)
        rep = evaluate_predictions(va_c, classes, preds, thr)
        pool_preds = predictions(clf, pool_loc, len(classes))
        pred_cls = np.concatenate([p["class_ids"] for p in pool_preds if len(p["boxes"])])
        rare = rarity(pred_cls, subset(crops, photos).y.numpy(), len(classes))
        return rep, (tray_uncertainty(pool_preds, photo_tray), box_uncertainty(pool_preds), rare)

    budgets = list(range(args.start, len(trays), args.step)) + [len(trays)]
    results = {s: [[] for _ in budgets] for s in args.strategies}
    for seed in range(args.seeds):
        init = random.Random(1000 + seed).sample(trays, args.start)
        for strat in args.strategies:
            rng = random.Random(seed)
            labelled = list(init)
            unc: tuple = ()  # the current classifier's uncertainties: set by each round, read by the next pick
            for i, b in enumerate(budgets):
                if len(labelled) < b and strat.startswith("coverage"):
                    weight = {"coverage": None, "coverage+uncertainty": unc[1],
                              "coverage+rarity": (1.0 + unc[1]) * unc[2] - 1.0}[strat]
                    labelled += pick_coverage(trays, labelled, sim, box_tray, b - len(labelled), weight)
                elif len(labelled) < b:
                    labelled += pick(strat, trays, labelled, feats, unc[0], b - len(labelled), rng)
                rep, unc = fit_and_score(labelled, seed)
                results[strat][i].append({k: rep[k] for k in METRICS})
                log.info("fold %d seed %d %-22s %2d trays: mAP %.3f photos %.3f trays %.3f", fold, seed, strat, b,
                         rep["map50"], rep["receipt_exact_photo"], rep["receipt_exact_tray"])
    log.info("fold %d done in %.0fs", fold, time.time() - t0)
    return {"fold": fold, "budgets": budgets, "val_trays": len({x.group for x in va}), "results": results}


def plot(mean, budgets, full, path, n_trays) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (k, name) in zip(axes, [("receipt_exact_photo", "exact receipts, photos"),
                                    ("receipt_exact_tray", "exact receipts, trays (photos voted)"),
                                    ("map50", "mAP@0.5")]):
        for s in mean:
            ax.plot(budgets, [mean[s][b][k] for b in budgets], marker="o", label=s)
        ax.axhline(0.98 * full[k], color="grey", ls="--", lw=1, label="98% of full data")
        ax.axvline(0.4 * n_trays, color="grey", ls=":", lw=1, label="40% of the labels")
        ax.set_xlabel("labelled training trays")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()

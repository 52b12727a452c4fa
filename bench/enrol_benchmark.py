"""Enrol a dish the model has never seen from <= N corrected examples, then score its next trays.

For each ``--dish``: the classifier is trained (as ``dishtrack train``'s classifier phase, on the
localiser of ``--localiser``) on the training trays with that dish held out — its boxes are
neither a dish nor background, as if it were not on the menu yet. Then ``dishtrack enrol``'s
head-only retrain adds it from the first ``--shots`` boxes of it met in the training trays (a
cashier's corrections) and the held-out validation trays are the "next trays": a tray with the
dish counts as recognised when its photo-voted receipt has the right number of that dish.
The reference is ``--localiser``'s own classifier, trained with every label.

    python bench/enrol_benchmark.py --localiser runs/bench2/dishes.pt --dish Fruit --dish Dessert

The localiser is class-agnostic but was trained on the same training trays' boxes (all dishes).
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from dishtrack.models.dish_classifier import DishClassifier
from dishtrack.models.dish_detector import DishDetector, DishModelSpec, load_dish_checkpoint, save_dish_checkpoint
from dishtrack.models.enrol import enrol_model
from dishtrack.models.evaluate import evaluate_predictions
from dishtrack.models.importers import load_dataset
from dishtrack.models.localiser import ImageCache
from dishtrack.models.train import RunState, finish_model, predict_samples, split_by_group, train_classifier
from dishtrack.models.train_settings import TrainSettings

log = logging.getLogger("enrol_benchmark")


def tray_counts(samples, preds, classes, thresholds, dish):
    """Per validation tray with ``dish``: (labelled count, photo-voted predicted count)."""
    k = classes.index(dish)
    thr = np.array([thresholds.get(c, 0.3) for c in classes])
    by_tray = collections.defaultdict(list)
    for s, p in zip(samples, preds):
        kept = p["class_ids"][p["scores"] >= thr[p["class_ids"]]]
        by_tray[s.group].append((s.labels.count(dish), int(np.sum(kept == k))))
    out = {}
    for t, rows in by_tray.items():
        if rows[0][0] == 0:
            continue
        out[t] = (rows[0][0], collections.Counter(r[1] for r in rows).most_common(1)[0][0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/mealtray_kiosk_dev"))
    ap.add_argument("--localiser", required=True, help="a dish checkpoint trained on the same split (seed)")
    ap.add_argument("--dish", action="append", required=True)
    ap.add_argument("--shots", type=int, default=5, help="boxes of the new dish given (corrections)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/enrol", help="base checkpoints are kept here and reused")
    ap.add_argument("--json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    s = TrainSettings(data=args.data, out=str(work / "x.pt"), progress=False, seed=args.seed)
    data = load_dataset(args.data)
    tr, va = split_by_group(list(data.samples), s.val_fraction, s.seed)
    ref = load_dish_checkpoint(args.localiser)
    if ref.exemplars is None:  # trained before exemplars existed: as train now ends (exemplars, then thresholds)
        ridx = {c: i for i, c in enumerate(ref.spec.classes)}
        rlab = lambda xs: [[ridx[lb] for lb in x.labels] for x in xs]  # noqa: E731
        finish_model(ref, tr, rlab(tr), va, rlab(va))
    ref_det = DishDetector(ref, "cpu")
    ref_preds = predict_samples(ref_det, va, False)
    rows = []
    for dish in args.dish:
        t0 = time.time()
        classes = tuple(c for c in data.classes if c != dish)
        cidx = {c: i for i, c in enumerate(classes)}
        lab = lambda xs: [[cidx.get(lb, -1) for lb in x.labels] for x in xs]  # noqa: E731 - the dish: ignored
        base_path = work / f"base_without_{dish}_seed{args.seed}.pt"
        if base_path.exists():
            model = load_dish_checkpoint(base_path)
            if model.exemplars is None:  # saved before exemplars existed: as train now ends
                finish_model(model, tr, lab(tr), va, lab(va))
                save_dish_checkpoint(base_path, model)
        else:
            model = load_dish_checkpoint(args.localiser)
            model.spec = DishModelSpec(**{**model.spec.__dict__, "classes": classes, "thresholds": {}})
            model.classifier = DishClassifier(len(classes), s.crop_size, pretrained=True, freeze_blocks=s.freeze_blocks)
            long_side = max(s.loc_size, s.crop_long_side)
            train_classifier(s, model, classes, ImageCache(tr, long_side), lab(tr), ImageCache(va, long_side), lab(va),
                             RunState(work / f"base_{dish}.state", s, False))
            finish_model(model, tr, lab(tr), va, lab(va))  # as train ends (the localiser checkpoint's were its own)
            save_dish_checkpoint(base_path, model)
        base_s = time.time() - t0
        # the corrections: the first boxes of the dish met in the training trays, in a random tray order
        trays = sorted({x.group for x in tr})
        random.Random(args.seed).shuffle(trays)
        given, shots = set(), 0
        for t in trays:
            for i, x in enumerate(tr):
                if x.group == t and dish in x.labels and shots < args.shots:
                    given.add(i)
                    shots += x.labels.count(dish)
                    break
        full = classes + (dish,)
        fidx = {c: i for i, c in enumerate(full)}
        tl = [[fidx[lb] if (lb != dish or i in given) else -1 for lb in x.labels] for i, x in enumerate(tr)]
        old_thr = dict(model.spec.thresholds)
        ref_rep = evaluate_predictions(va, ref.spec.classes, ref_preds, ref.spec.thresholds)
        ref_got = tray_counts(va, ref_preds, ref.spec.classes, ref.spec.thresholds, dish)
        for variant, few_shot, ex, w in (("plain head refit", False, False, 0.0), ("few-shot head", True, False, 0.0),
                                         ("few-shot head + exemplars voting 0.5", True, True, 0.5)):
            m = copy.deepcopy(model)
            t1 = time.time()
            enrol_model(m, full, tr, tl, views=4, epochs=40, seed=args.seed, progress=False, few_shot=few_shot,
                        exemplars=ex, exemplar_weight=w)
            thr = {**old_thr, dish: float(np.median(list(old_thr.values())))}
            m.spec = DishModelSpec(**{**m.spec.__dict__, "thresholds": thr})
            enrol_s = time.time() - t1
            preds = predict_samples(DishDetector(m, "cpu"), va, False)
            rep = evaluate_predictions(va, full, preds, thr)
            got = tray_counts(va, preds, full, thr, dish)
            row = {"dish": dish, "variant": variant, "shots": shots, "photos_given": len(given),
                   "val_trays_with_dish": len(got),
                   "recognised_trays": sum(p == g for g, p in got.values()),
                   "named_at_all_trays": sum(p > 0 for g, p in got.values()),
                   "reference_recognised_trays": sum(p == g for g, p in ref_got.values()),
                   "reference_named_trays": sum(p > 0 for g, p in ref_got.values()),
                   "ap50_dish": rep["ap50_per_class"].get(dish),
                   "reference_ap50_dish": ref_rep["ap50_per_class"].get(dish),
                   "map50": rep["map50"], "reference_map50": ref_rep["map50"],
                   "receipt_exact_tray": rep["receipt_exact_tray"],
                   "reference_receipt_exact_tray": ref_rep["receipt_exact_tray"],
                   "threshold": thr[dish], "enrol_seconds": round(enrol_s, 1), "base_seconds": round(base_s, 1)}
            log.info("%s", row)
            rows.append(row)
    print("| new dish | enrol | boxes given | val trays with it | recognised (count exact) | named at all | "
          "reference (all labels): exact / named | AP@0.5 enrolled / reference | all-tray exact enrolled / reference "
          "| enrol time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        n = r["val_trays_with_dish"]
        print(f"| {r['dish']} | {r['variant']} | {r['shots']} | {n} | {r['recognised_trays']}/{n} | "
              f"{r['named_at_all_trays']}/{n} | {r['reference_recognised_trays']}/{n} / {r['reference_named_trays']}/{n} | {r['ap50_dish']:.2f} / {r['reference_ap50_dish']:.2f} | "
              f"{r['receipt_exact_tray']:.1%} / {r['reference_receipt_exact_tray']:.1%} | {r['enrol_seconds']:.0f} s |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

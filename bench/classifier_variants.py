"""Classifier settings side by side on one trained localiser: retrain only the crop classifier
(``dishtrack train``'s classifier phase, same split and seed) per variant and score each on the
validation trays. Saves the localiser phases (about 8 of 13 minutes) when only the classifier
changes.

    python bench/classifier_variants.py --localiser runs/bench2/dishes.pt \
        --variant '{"crop_long_side": 512}' --variant '{"crop_long_side": 1024}'
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from dishtrack.models.dish_classifier import DishClassifier
from dishtrack.models.dish_detector import DishModelSpec, load_dish_checkpoint, save_dish_checkpoint
from dishtrack.models.evaluate import evaluate_predictions
from dishtrack.models.importers import load_dataset
from dishtrack.models.localiser import ImageCache
from dishtrack.models.train import RunState, finish_model, split_by_group, train_classifier
from dishtrack.models.train_settings import TrainSettings

log = logging.getLogger("classifier_variants")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/mealtray_kiosk_dev"))
    ap.add_argument("--localiser", required=True, help="a dish checkpoint trained on the same split (seed)")
    ap.add_argument("--variant", action="append", required=True, help="JSON: TrainSettings fields to change")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/variants")
    ap.add_argument("--json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.data)
    classes = data.classes
    cidx = {c: i for i, c in enumerate(classes)}
    rows = []
    for v in args.variant:
        change = json.loads(v)
        tag = "_".join(f"{k}{val}" for k, val in change.items())
        s = TrainSettings(data=args.data, out=str(work / f"{tag}.pt"), progress=False, seed=args.seed, **change)
        tr, va = split_by_group(list(data.samples), s.val_fraction, s.seed, s.val_fold)
        t0 = time.time()
        model = load_dish_checkpoint(args.localiser)
        model.spec = DishModelSpec(**{**model.spec.__dict__, "classes": classes, "thresholds": {},
                                      "crop_size": s.crop_size, "crop_long_side": s.crop_long_side,
                                      "freeze_blocks": s.freeze_blocks})
        torch.manual_seed(s.seed)
        model.classifier = DishClassifier(len(classes), s.crop_size, pretrained=True, freeze_blocks=s.freeze_blocks)
        long_side = max(s.loc_size, s.crop_long_side)
        lab = lambda xs: [[cidx[lb] for lb in x.labels] for x in xs]  # noqa: E731
        train_classifier(s, model, classes, ImageCache(tr, long_side), lab(tr), ImageCache(va, long_side), lab(va),
                         RunState(work / f"{tag}.state", s, False))
        preds = finish_model(model, tr, lab(tr), va, lab(va))  # as train ends (the loaded exemplars were its own)
        thr = model.spec.thresholds
        rep = evaluate_predictions(va, classes, preds, thr, confusion_png=work / f"{tag}_confusion.png")
        save_dish_checkpoint(work / f"{tag}.pt", model)
        row = {"variant": change, "map50": rep["map50"], "map50_95": rep["map50_95"],
               "receipt_exact_photo": rep["receipt_exact_photo"], "receipt_exact_tray": rep["receipt_exact_tray"],
               "ap50_per_class": rep["ap50_per_class"], "seconds": round(time.time() - t0, 1)}
        log.info("%s", row)
        rows.append(row)
    print("| classifier variant | mAP@0.5 | mAP@0.5:0.95 | exact photos | exact trays | AP@0.5 per dish | time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ap_ = ", ".join(f"{k} {v:.2f}" for k, v in r["ap50_per_class"].items() if v is not None)
        print(f"| {json.dumps(r['variant'])} | {r['map50']:.3f} | {r['map50_95']:.3f} | {r['receipt_exact_photo']:.1%} | "
              f"{r['receipt_exact_tray']:.1%} | {ap_} | {r['seconds']:.0f} s |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

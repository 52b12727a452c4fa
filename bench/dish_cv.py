"""Cross-validated dish accuracy: ``dishtrack train`` once per tray fold (``--val-fold``), so every
tray of the folder is a validation tray once. One 12-tray split moves by 8 points per tray; pooled
over all trays (59 in the shared folder) the rates are worth comparing.

    python bench/dish_cv.py --out runs/cv [--folds 0,1] [--set '{"crop_size": 224}'] [--json cv.json]

Per fold: its validation report as ``train`` wrote it (thresholds chosen on its own trays), and
the receipts with each tray's thresholds chosen on the fold's other trays (by today's rule). Pooled: COCO mAP over every fold's out-of-fold predictions, and
the receipts of all trays (each fold's thresholds; held out: chosen on the fold's other trays).
A fold whose checkpoint and predictions exist is read back, not retrained (``--retrain`` to redo).
"""
from __future__ import annotations

import argparse
import json
import logging
import pickle
import time
from pathlib import Path

import numpy as np

from dishtrack.models.dish_detector import DishDetector, read_checkpoint
from dishtrack.models.evaluate import coco_map, heldout_threshold_receipts, receipt_agreement
from dishtrack.models.importers import load_dataset
from dishtrack.models.train import n_folds, predict_samples, split_by_group, train
from dishtrack.models.train_settings import TrainSettings

log = logging.getLogger("dish_cv")
RARE = ("Dessert", "Fruit", "Cheese")


def run_fold(args, k: int, change: dict) -> tuple[dict, list[dict]]:
    """Train fold ``k`` (or read it back) -> (its validation report, its out-of-fold predictions)."""
    fold_dir = Path(args.out) / f"fold{k}"
    ck, preds_file = fold_dir / "dishes.pt", fold_dir / "val_predictions.pkl"
    s = TrainSettings(data=args.data, out=str(ck), val_fold=k, seed=args.seed, progress=False, **change)
    data = load_dataset(s.data, trays=s.trays)
    _, val_s = split_by_group(list(data.samples), s.val_fraction, s.seed, k)
    if args.retrain or not (ck.is_file() and preds_file.is_file()):
        fold_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        train(s)
        log.info("fold %d trained in %.1f min", k, (time.time() - t0) / 60)
        det = DishDetector.from_checkpoint(ck, "cpu")
        preds = predict_samples(det, val_s, progress=False)
        with open(preds_file, "wb") as f:
            pickle.dump(preds, f)
    meta = read_checkpoint(ck)["meta"]
    skip = ("out", "progress", "resume")
    if {k: v for k, v in meta["settings"].items() if k not in skip} != {
            k: v for k, v in s.model_dump().items() if k not in skip and (k in meta["settings"] or k != "val_fold")}:
        log.warning("fold %d: %s was trained with other settings than asked (pass --retrain)", k, ck)
    with open(preds_file, "rb") as f:
        preds = pickle.load(f)
    return {**meta["validation"], "seconds": meta["seconds"], "thresholds": meta["validation"]["thresholds"]}, \
        [dict(p, group=x.group, gt_labels=list(x.labels), gt_boxes=np.asarray(x.boxes, np.float32).reshape(-1, 4))
         for p, x in zip(preds, val_s)]


def fold_heldout(classes, preds: list[dict]) -> dict:
    """A fold's receipts with each tray's thresholds chosen (by today's rule) on the fold's other trays."""
    cidx = {c: i for i, c in enumerate(classes)}
    gt = [(p["gt_boxes"], np.array([cidx[lbl] for lbl in p["gt_labels"]], np.int64)) for p in preds]
    return heldout_threshold_receipts(gt, [(p["boxes"], p["scores"], p["class_ids"]) for p in preds],
                                      [p["group"] for p in preds], classes)


def pooled(classes, folds: list[tuple[dict, list[dict]]]) -> dict:
    """Out-of-fold predictions of every fold scored together."""
    cidx = {c: i for i, c in enumerate(classes)}
    gt, raw, sizes, groups, kept = [], [], [], [], []
    held_ok_trays = held_ok_photos = 0.0
    for rep, preds in folds:
        thr = np.array([rep["thresholds"][c] for c in classes], np.float32)
        fgt, fraw = [], []
        for p in preds:
            g = (p["gt_boxes"], np.array([cidx[lbl] for lbl in p["gt_labels"]], np.int64))
            r = (p["boxes"], p["scores"], p["class_ids"])
            fgt.append(g)
            fraw.append(r)
            kept.append(list(p["class_ids"][p["scores"] >= thr[p["class_ids"]]]))
            sizes.append(p["size"])
            groups.append(p["group"])
        h = fold_heldout(classes, preds)
        n_trays = len({p["group"] for p in preds})
        held_ok_trays += h["receipt_exact_tray_heldout"] * n_trays
        held_ok_photos += h["receipt_exact_photo_heldout"] * len(preds)
        gt += fgt
        raw += fraw
    out = coco_map(gt, raw, classes, sizes)
    rec = receipt_agreement([list(c) for _, c in gt], kept, groups)
    out.update(rec)
    out["receipt_exact_tray_heldout"] = held_ok_trays / rec["trays"]
    out["receipt_exact_photo_heldout"] = held_ok_photos / rec["photos"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/mealtray_kiosk_dev"))
    ap.add_argument("--out", default="runs/cv")
    ap.add_argument("--folds", default="all", help="'all' or fold numbers, e.g. 0,1")
    ap.add_argument("--set", default="{}", help="JSON: TrainSettings fields to change, e.g. '{\"crop_size\": 224}'")
    ap.add_argument("--seed", type=int, default=0, help="tray shuffle (and training) seed")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        change = json.loads(args.set)
        TrainSettings(data=args.data, out="x", **change)
    except (ValueError, TypeError) as e:
        ap.error(f"--set {args.set!r}: {e}")
    data = load_dataset(args.data)
    groups = {x.group for x in data.samples}
    k_all = n_folds(len(groups), TrainSettings(data=args.data, out="x", **change).val_fraction)
    try:
        folds = list(range(k_all)) if args.folds == "all" else [int(f) for f in args.folds.split(",")]
    except ValueError:
        ap.error(f"--folds {args.folds!r}: 'all' or comma-separated fold numbers")
    if bad := [f for f in folds if not 0 <= f < k_all]:
        ap.error(f"--folds: {bad} outside 0 .. {k_all - 1} ({len(groups)} trays make {k_all} folds)")
    results = [run_fold(args, k, change) for k in folds]
    classes = data.classes
    print(f"\n{len(groups)} trays, {k_all} folds, settings changed: {change or 'none (defaults)'}\n")
    print("| fold | val trays | mAP@0.5 | mAP@0.5:0.95 | exact photos | exact trays | exact trays, held-out thresholds | "
          + " | ".join(f"{c} AP" for c in RARE) + " | train min |")
    print("|" + "---|" * (8 + len(RARE)))
    for k, (rep, preds) in zip(folds, results):
        ap_ = rep["ap50_per_class"]
        print(f"| {k} | {rep['trays']} | {rep['map50']:.3f} | {rep['map50_95']:.3f} | {rep['receipt_exact_photo']:.1%} | "
              f"{rep['receipt_exact_tray']:.1%} | {fold_heldout(classes, preds)['receipt_exact_tray_heldout']:.1%} | "
              + " | ".join(f"{ap_.get(c, float('nan')):.2f}" for c in RARE) + f" | {rep['seconds'] / 60:.1f} |")
    pool = pooled(classes, results)
    maps = np.array([r["map50"] for r, _ in results])
    ap_ = pool["ap50_per_class"]
    print(f"| pooled | {pool['trays']} | {pool['map50']:.3f} (folds {maps.mean():.3f} ± {maps.std(ddof=1) if len(maps) > 1 else 0:.3f})"
          f" | {pool['map50_95']:.3f} | {pool['receipt_exact_photo']:.1%} | {pool['receipt_exact_tray']:.1%} | "
          f"{pool['receipt_exact_tray_heldout']:.1%} | " + " | ".join(f"{ap_.get(c, float('nan')):.2f}" for c in RARE)
          + f" | {sum(r['seconds'] for r, _ in results) / 60:.1f} |")
    print("\npooled AP@0.5 per dish: " + ", ".join(f"{c} {v:.2f}" for c, v in ap_.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings_changed": change, "folds": folds,
                                               "per_fold": [r for r, _ in results], "pooled": pool}, indent=1,
                                              default=float))


if __name__ == "__main__":
    main()

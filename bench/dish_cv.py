"""Cross-validated dish accuracy: ``dishtrack train`` once per tray fold (``--val-fold``), so every
tray of the folder is a validation tray once. One 12-tray split moves by 8 points per tray; pooled
over all trays (62 in the shared folder) the rates are worth comparing.

    python bench/dish_cv.py --out runs/cv [--folds 0,1] [--set '{"crop_size": 224}'] [--json cv.json]

Per fold: mAP from its validation report; receipts by today's threshold rule, with thresholds
chosen on the fold's validation trays (as ``train`` does) and, per tray, on the fold's other trays
(held out: what a new tray gets). Pooled: COCO mAP over every fold's out-of-fold predictions, and
the receipts of all trays (each fold's thresholds; held out: chosen on the fold's other trays).
A fold whose checkpoint and predictions exist is read back, not retrained (``--retrain`` to redo);
``--refresh`` predicts its validation photos again with today's inference (a checkpoint from before
exemplars existed first gets them from its fold's training photos, as ``train`` now attaches them:
the trained weights are the same).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pickle
import sys
import time
from pathlib import Path

import numpy as np

from dishtrack.models.dish_detector import (DishDetector, DishModelSpec, dish_model_from_checkpoint, read_checkpoint,
                                            save_dish_checkpoint)
from dishtrack.models.evaluate import (choose_thresholds, coco_map, evaluate_predictions, heldout_threshold_receipts,
                                       receipt_agreement)
from dishtrack.models.importers import load_dataset
from dishtrack.models.train import (attach_exemplars, n_folds, predict_samples, split_by_group, train,
                                    validation_thresholds)
from dishtrack.models.train_settings import TrainSettings

log = logging.getLogger("dish_cv")
RARE = ("Dessert", "Fruit", "Cheese")


def fold_numbers(spec: str, k_all: int) -> list[int]:
    """``--folds``: 'all' or comma-separated fold numbers of ``k_all`` (ValueError names what is wrong)."""
    try:
        folds = list(range(k_all)) if spec == "all" else [int(f) for f in spec.split(",")]
    except ValueError:
        raise ValueError(f"--folds {spec!r}: 'all' or comma-separated fold numbers") from None
    if bad := [f for f in folds if not 0 <= f < k_all]:
        raise ValueError(f"--folds: {bad} outside 0 .. {k_all - 1} (the trays make {k_all} folds)")
    return folds


def fold_checkpoints(spec: str | None, pattern: str, samples, val_fraction: float, seed: int) -> list[int | None]:
    """``--folds`` and ``--localiser`` of the benches that reuse trained checkpoints: the folds (None:
    no ``--folds``, the default split and ``pattern`` as it is), each checkpoint checked before any
    work: it exists, and it was validated on the trays this bench's split holds out (``dish_cv``'s
    ``runs/cv/fold{fold}/dishes.pt``; a bench seed or split other than the checkpoint's would score
    trays its localiser has seen). ValueError naming what is wrong."""
    samples = list(samples)
    if spec is None:
        folds: list[int | None] = [None]
    else:
        folds = fold_numbers(spec, n_folds(len({x.group for x in samples}), val_fraction))
        if "{fold}" not in pattern:
            raise ValueError("--folds needs --localiser with {fold} (each fold's checkpoint never saw its "
                             "validation trays)")
        if missing := [pattern.format(fold=k) for k in folds if not Path(pattern.format(fold=k)).is_file()]:
            raise ValueError(f"--localiser: no checkpoint {missing} (bench/dish_cv.py trains them)")
    for k in folds:
        checkpoint = pattern.format(fold=k or 0)
        theirs = set(read_checkpoint(checkpoint).get("meta", {}).get("val_trays", []))
        ours = {str(x.group) for x in split_by_group(samples, val_fraction, seed, k or 0)[1]}
        if theirs and theirs != ours:  # a checkpoint that does not record them: nothing to check
            raise ValueError(f"--localiser: {checkpoint} was validated on trays {sorted(theirs)}, this split holds "
                             f"out {sorted(ours)} (another --seed or split than the one it was trained with)")
    return folds


def run_fold(args, fold: int, change: dict, data) -> dict:
    """Train ``fold`` (or read it back) -> its validation report (as train wrote it) and its
    out-of-fold predictions with their labels."""
    fold_dir = Path(args.out) / f"fold{fold}"
    ck, preds_file = fold_dir / "dishes.pt", fold_dir / "val_predictions.pkl"
    s = fold_settings(change, args.data, args.seed, fold, out=str(ck), val_fold=fold, progress=False)
    train_s, val_s = split_by_group(list(data.samples)[: s.max_images], s.val_fraction, s.seed, fold)
    trained = args.retrain or not (ck.is_file() and preds_file.is_file())
    if trained:
        fold_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        train(s)
        log.info("fold %d trained in %.1f min", fold, (time.time() - t0) / 60)
    elif args.refresh:  # as train ends: exemplars (if missing), thresholds and report on the validation trays
        ckd = read_checkpoint(ck)
        model = dish_model_from_checkpoint(ckd, ck)
        cidx = {c: i for i, c in enumerate(model.spec.classes)}
        lab = lambda xs: [[cidx[lb] for lb in x.labels] for x in xs]  # noqa: E731
        if model.exemplars is None:
            attach_exemplars(model, train_s, lab(train_s), weight=s.exemplar_weight)
        inf = dict(args.inference)
        if "exemplar_weight" in inf:
            model.exemplars = dataclasses.replace(model.exemplars, weight=float(inf.pop("exemplar_weight")))
        model.spec = DishModelSpec(**{**model.spec.__dict__, **inf})
        preds, thr = validation_thresholds(DishDetector(model, "cpu"), val_s, lab(val_s), model.spec.classes, False)
        model.spec = DishModelSpec(**{**model.spec.__dict__, "thresholds": thr})
        rep = evaluate_predictions(val_s, model.spec.classes, preds, thr, heldout_thresholds=True)
        save_dish_checkpoint(ck, model, meta={**ckd["meta"], "validation": {
            k: v for k, v in rep.items() if k != "confusion"}})
    if trained:
        preds = predict_samples(DishDetector.from_checkpoint(ck, "cpu"), val_s, progress=False)
    if trained or args.refresh:  # refresh: the predictions its thresholds were chosen on
        with open(preds_file, "wb") as f:
            pickle.dump([dict(p, image=str(x.image)) for p, x in zip(preds, val_s)], f)
    meta = read_checkpoint(ck)["meta"]
    skip = {"out", "progress", "resume", "exemplar_weight"}  # inference: --refresh --inference sets it
    asked = {key: v for key, v in s.model_dump().items() if key not in skip}
    # a setting added since the checkpoint was trained reads as its default (val_fold: the default split)
    have = TrainSettings.as_saved({key: v for key, v in meta["settings"].items() if key not in skip}, asked)
    if have != asked:
        diff = {key: (have.get(key), asked[key]) for key in asked if have.get(key) != asked[key]}
        raise SystemExit(f"fold {fold}: {ck} was trained with other settings (trained, asked): {diff}; "
                         "pass --retrain or another --out")
    with open(preds_file, "rb") as f:
        preds = pickle.load(f)
    if sorted(meta["val_trays"]) != sorted({str(x.group) for x in val_s}) or len(preds) != len(val_s) or any(
            "image" in p and p["image"] != str(x.image) for p, x in zip(preds, val_s)):
        raise SystemExit(f"fold {fold}: {preds_file} does not hold this fold's validation photos "
                         "(the data folder changed?); pass --retrain")
    return {"report": meta["validation"], "seconds": meta["seconds"],
            "photos": [dict(p, group=x.group, gt_labels=list(x.labels),
                            gt_boxes=np.asarray(x.boxes, np.float32).reshape(-1, 4)) for p, x in zip(preds, val_s)]}


def settings_change(text: str, data: str, seed: int) -> tuple[dict, TrainSettings]:
    """``--set`` JSON -> (the TrainSettings fields it changes, the settings of fold 0). ValueError or
    pydantic's ValidationError (a ValueError) names what is wrong; '{fold}' is the only placeholder."""
    change = json.loads(text)
    if not isinstance(change, dict):
        raise ValueError("a JSON object of TrainSettings fields")
    for v in change.values():
        if isinstance(v, str):
            try:
                v.format(fold=0)
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"{v!r}: only '{{fold}}' may stand in braces ({e!r})") from None
    return change, fold_settings(change, data, seed)


def fold_settings(change: dict, data: str, seed: int, fold: int = 0, **fields) -> TrainSettings:
    """The settings ``change`` makes for ``fold`` ('{fold}' in a text value is its number, e.g. its
    localiser's path); ``fields``: other TrainSettings fields (``out`` defaults to a placeholder)."""
    return TrainSettings(data=data, seed=seed, **{"out": "x", **fields},
                         **{k: v.format(fold=fold) if isinstance(v, str) else v for k, v in change.items()})


def fold_arrays(classes, photos: list[dict]) -> tuple[list, list, list]:
    """A fold's photos (``run_fold``) as the evaluation functions take them: ground truth
    (boxes, class ids), raw predictions (boxes, scores, class ids) and tray per photo."""
    cidx = {c: i for i, c in enumerate(classes)}
    gt = [(p["gt_boxes"], np.array([cidx[lbl] for lbl in p["gt_labels"]], np.int64)) for p in photos]
    raw = [(p["boxes"], p["scores"], p["class_ids"]) for p in photos]
    return gt, raw, [p["group"] for p in photos]


def score_fold(classes, photos: list[dict]) -> dict:
    """A fold's receipts by today's threshold rule: thresholds chosen on the fold's validation trays
    (as train does; in-sample) and, per tray, on the fold's other trays (held out)."""
    gt, raw, groups = fold_arrays(classes, photos)
    thr = choose_thresholds(gt, raw, classes)
    t = np.array([thr[c] for c in classes], np.float32)
    kept = [list(c[s >= t[c]]) for _, s, c in raw]
    return {"gt": gt, "raw": raw, "kept": kept, "groups": groups, "thresholds": thr,
            **coco_map(gt, raw, classes, [p["size"] for p in photos]),
            **receipt_agreement([list(c) for _, c in gt], kept, groups),
            **heldout_threshold_receipts(gt, raw, groups, classes)}


def pooled(classes, folds: list[dict], scored: list[dict]) -> dict:
    """Out-of-fold predictions of every fold scored together (mAP ranks the five models' boxes
    together; receipts use each fold's own thresholds)."""
    gt = [g for sc in scored for g in sc["gt"]]
    out = coco_map(gt, [r for sc in scored for r in sc["raw"]], classes,
                   [p["size"] for f in folds for p in f["photos"]])
    out.update(receipt_agreement([list(c) for _, c in gt], [k for sc in scored for k in sc["kept"]],
                                 [g for sc in scored for g in sc["groups"]]))
    held = [sc for sc in scored if "receipt_exact_tray_heldout" in sc]
    if held:
        out["receipt_exact_tray_heldout"] = (sum(sc["receipt_exact_tray_heldout"] * sc["trays"] for sc in held)
                                             / sum(sc["trays"] for sc in held))
        out["receipt_exact_photo_heldout"] = (sum(sc["receipt_exact_photo_heldout"] * sc["photos"] for sc in held)
                                              / sum(sc["photos"] for sc in held))
    return out


def fold_videos(args, folds: list[int], data, base: TrainSettings) -> list[dict]:
    """Each fold's model on a checkout video of its validation trays (``make-video``; direct mode:
    detector -> tracker -> checkout with video time), then all trays pooled: the video target is
    about these receipts, one event per tray with the exact dishes."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import checkout_video_eval

    from dishtrack.models.synth_video import SynthSettings, make_checkout_video

    scores = []
    for k in folds:
        _, val_s = split_by_group(list(data.samples)[: base.max_images], base.val_fraction, base.seed, k)
        vdir = Path(args.videos) / f"fold{k}"
        if not (vdir / "receipts.json").is_file():
            make_checkout_video(val_s, vdir, len({x.group for x in val_s}), SynthSettings(seed=100 + k, tray_scale=0.85),
                                classes=data.classes)
        ck = Path(args.out) / f"fold{k}" / "dishes.pt"
        s = checkout_video_eval.evaluate(checkout_video_eval.parse_args(
            [str(vdir), "--checkpoint", str(ck), "--mode", "direct",
             "--predictions", str(Path(args.out) / f"fold{k}" / "video_predictions.pkl")]))
        scores.append({"fold": k, **{key: v for key, v in s.items() if not isinstance(v, (dict, list))}})
    trays = sum(s["trays"] for s in scores)
    print("\n| fold | video trays | trays with one event | exact receipts | item precision | item recall | "
          "flagged for review (wrong among them) | wrong, not flagged |")
    print("|---|---|---|---|---|---|---|---|")
    for s in scores:
        print(f"| {s['fold']} | {s['trays']} | {s['trays_one_event']} | {s['exact_receipts']} "
              f"({s['exact_receipt_rate']:.1%}) | {s['item_precision']:.3f} | {s['item_recall']:.3f} | "
              f"{s['trays_flagged']} ({s['wrong_flagged']}) | {s['wrong_unflagged']} |")
    one, exact = sum(s["trays_one_event"] for s in scores), sum(s["exact_receipts"] for s in scores)
    prec = sum(s["item_precision"] * s["trays"] for s in scores) / max(trays, 1)
    rec = sum(s["item_recall"] * s["trays"] for s in scores) / max(trays, 1)
    flagged, caught, trusted = (sum(s[k] for s in scores) for k in ("trays_flagged", "wrong_flagged", "wrong_unflagged"))
    print(f"| all | {trays} | {one} ({one / max(trays, 1):.1%}) | {exact} ({exact / max(trays, 1):.1%}) | "
          f"{prec:.3f} | {rec:.3f} | {flagged} ({caught}) | {trusted} ({trusted / max(trays, 1):.1%}) |")
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/mealtray_kiosk_dev"))
    ap.add_argument("--out", default="runs/cv")
    ap.add_argument("--folds", default="all", help="'all' or fold numbers, e.g. 0,1")
    ap.add_argument("--set", default="{}", help="JSON: TrainSettings fields to change, e.g. '{\"crop_size\": 224}'; "
                    "'{fold}' in a text value is the fold number, e.g. a classifier variant on the default folds' "
                    "localisers: '{\"localiser\": \"runs/cv/fold{fold}/dishes.pt\", \"cls_epochs\": 6}'")
    ap.add_argument("--seed", type=int, default=0, help="tray shuffle (and training) seed")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--refresh", action="store_true", help="predict the validation photos again (today's inference)")
    ap.add_argument("--inference", default="{}", help="with --refresh, JSON: inference settings stored in the fold "
                    "checkpoints, e.g. the inference before exemplars and same-dish suppression: "
                    "'{\"exemplar_weight\": 0, \"same_dish_iou\": 1, \"same_dish_ioa\": 1}'; they are saved in them "
                    "(a later --refresh keeps them): refresh a copy of the fold folders")
    ap.add_argument("--videos", help="also score each fold's model on a checkout video of its validation trays "
                    "(made once into this folder, seed 100 + fold; direct mode, predictions cached per fold)")
    ap.add_argument("--json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        change, base = settings_change(args.set, args.data, args.seed)
        data = load_dataset(args.data)
        groups = {x.group for x in list(data.samples)[: base.max_images]}
        k_all = n_folds(len(groups), base.val_fraction)
    except (ValueError, TypeError) as e:
        ap.error(f"--set {args.set!r}: {e}")
    try:
        folds = fold_numbers(args.folds, k_all)
        args.inference = json.loads(args.inference)
        inference_keys = {f.name for f in dataclasses.fields(DishModelSpec)} - {"classes", "thresholds"}
        if unknown := sorted(set(args.inference) - inference_keys - {"exemplar_weight"}):
            raise ValueError(f"--inference: unknown keys {unknown}")
        if args.inference and not args.refresh:
            raise ValueError("--inference changes the fold checkpoints: give --refresh")
    except ValueError as e:
        ap.error(str(e))
    results = [run_fold(args, k, change, data) for k in folds]
    classes = data.classes
    scored = [score_fold(classes, r["photos"]) for r in results]
    nan = float("nan")
    print(f"\n{len(groups)} trays, {k_all} folds, settings changed: {change or 'none (defaults)'}\n")
    print("| fold | val trays | mAP@0.5 | mAP@0.5:0.95 | exact photos | exact trays | exact trays, held-out thresholds | "
          + " | ".join(f"{c} AP" for c in RARE) + " | train min |")
    print("|" + "---|" * (8 + len(RARE)))
    for k, r, sc in zip(folds, results, scored):
        ap_ = sc["ap50_per_class"]
        print(f"| {k} | {sc['trays']} | {sc['map50']:.3f} | {sc['map50_95']:.3f} | {sc['receipt_exact_photo']:.1%} | "
              f"{sc['receipt_exact_tray']:.1%} | {sc.get('receipt_exact_tray_heldout', nan):.1%} | "
              + " | ".join(f"{ap_.get(c, nan):.2f}" for c in RARE) + f" | {r['seconds'] / 60:.1f} |")
    pool = pooled(classes, results, scored)
    maps = np.array([sc["map50"] for sc in scored])
    ap_ = pool["ap50_per_class"]
    print(f"| pooled | {pool['trays']} | {pool['map50']:.3f} (folds {maps.mean():.3f} ± {maps.std(ddof=1) if len(maps) > 1 else 0:.3f})"
          f" | {pool['map50_95']:.3f} | {pool['receipt_exact_photo']:.1%} | {pool['receipt_exact_tray']:.1%} | "
          f"{pool.get('receipt_exact_tray_heldout', nan):.1%} | " + " | ".join(f"{ap_.get(c, nan):.2f}" for c in RARE)
          + f" | {sum(r['seconds'] for r in results) / 60:.1f} |")
    print("\npooled AP@0.5 per dish: " + ", ".join(f"{c} {v:.2f}" for c, v in ap_.items()))
    videos = fold_videos(args, folds, data, base) if args.videos else []
    if args.json:
        per_fold = [{"fold": k, **{key: v for key, v in sc.items() if key not in ("gt", "raw", "kept", "groups")},
                     "seconds": r["seconds"]}
                    for k, r, sc in zip(folds, results, scored)]
        Path(args.json).write_text(json.dumps({"settings_changed": change, "folds": folds, "per_fold": per_fold,
                                               "pooled": pool, "videos": videos}, indent=1, default=float))


if __name__ == "__main__":
    main()

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
Cross-validated (``--folds``, each fold's checkpoint from ``bench/dish_cv.py``; its localiser never
saw the fold's validation trays): every tray with the dish is a "next tray" once, and the summary
pools the folds' counts:

    python bench/enrol_benchmark.py --localiser 'runs/cv_supponly/fold{fold}/dishes.pt' --folds all \
        --dish Fruit --dish Dessert --work runs/enrol_cv
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
from dishtrack.models.evaluate import evaluate_predictions, threshold_array
from dishtrack.models.importers import load_dataset
from dishtrack.models.localiser import ImageCache
from dishtrack.models.train import RunState, finish_model, predict_samples, split_by_group, train_classifier
from dishtrack.models.train_settings import TrainSettings
from dish_cv import fold_checkpoints  # bench/ is on sys.path when a benchmark runs

log = logging.getLogger("enrol_benchmark")


def tray_counts(samples, preds, classes, thresholds, dish):
    """Per validation tray with ``dish``: (labelled count, photo-voted predicted count)."""
    k = classes.index(dish)
    thr = threshold_array(thresholds, classes)
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
    ap.add_argument("--pick", choices=("first", "diverse"), default="first",
                    help="which photos' boxes are given: the first met (one per tray, random tray order), or "
                    "the most varied looks: farthest-first on the base model's embeddings of the dish's boxes, "
                    "one photo per tray (what `dishtrack shots` would put in front of the cashier)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/enrol", help="base checkpoints are kept here and reused")
    ap.add_argument("--folds", help="cross-validation folds (train --val-fold), 'all' or e.g. 0,1; --localiser "
                    "then has {fold} (bench/dish_cv.py's fold checkpoints)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if bad := [v for v in args.variants if v not in VARIANTS]:
        ap.error(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.data)
    try:
        folds = fold_checkpoints(args.folds, args.localiser, data.samples,
                                 TrainSettings(data=args.data, out="x").val_fraction, args.seed)
    except ValueError as e:
        ap.error(str(e))
    rows = []
    for fold in folds:
        rows += run_split(args, data, work, fold)
    print("| new dish | enrol | fold | boxes given | val trays with it | recognised (count exact) | named at all | "
          "reference (all labels): exact / named | AP@0.5 enrolled / reference | all-tray exact enrolled / reference "
          "| enrol time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        n = r["val_trays_with_dish"]
        print(f"| {r['dish']} | {r['variant']} | {'–' if r['fold'] is None else r['fold']} | {r['shots']} | {n} | {r['recognised_trays']}/{n} | "
              f"{r['named_at_all_trays']}/{n} | {r['reference_recognised_trays']}/{n} / {r['reference_named_trays']}/{n} | "
              f"{fmt(r['ap50_dish'])} / {fmt(r['reference_ap50_dish'])} | "
              f"{r['receipt_exact_tray']:.1%} / {r['reference_receipt_exact_tray']:.1%} | {r['enrol_seconds']:.0f} s |")
    if len(folds) > 1:
        print("\nPooled over the folds (every tray with the dish once):")
        print("| new dish | enrol | val trays with it | recognised | named at all | reference: recognised / named |")
        print("|---|---|---|---|---|---|")
        for dish, variant in dict.fromkeys((r["dish"], r["variant"]) for r in rows):
            sel = [r for r in rows if r["dish"] == dish and r["variant"] == variant]
            n = sum(r["val_trays_with_dish"] for r in sel)
            tot = {k: sum(r[k] for r in sel) for k in ("recognised_trays", "named_at_all_trays",
                                                       "reference_recognised_trays", "reference_named_trays")}
            print(f"| {dish} | {variant} | {n} | {tot['recognised_trays']}/{n} ({tot['recognised_trays'] / max(n, 1):.0%}) | "
                  f"{tot['named_at_all_trays']}/{n} | {tot['reference_recognised_trays']}/{n} "
                  f"({tot['reference_recognised_trays'] / max(n, 1):.0%}) / {tot['reference_named_trays']}/{n} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


VARIANTS = ("plain head refit", "few-shot head", "few-shot head + exemplars voting 0.5", "few-shot head (old rows kept)")


def fmt(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def pick_examples(args, tr: list, dish: str, base) -> tuple[set[int], int]:
    """The training photos whose ``dish`` boxes are given as the cashier's corrections (at most
    ``--shots`` boxes, one photo per tray): ``first`` the first photo of each tray in a random tray
    order; ``diverse`` starts there, then farthest-first (k-center, cosine) on the mean embedding of
    each photo's dish boxes under ``base`` (which never saw the dish)."""
    trays = sorted({x.group for x in tr})
    random.Random(args.seed).shuffle(trays)
    first = [next(i for i, x in enumerate(tr) if x.group == t and dish in x.labels) for t in trays
             if any(x.group == t and dish in x.labels for x in tr)]
    if args.pick == "first":
        order = first
    else:
        import cv2

        det = DishDetector(base, "cpu")
        cand = [i for i, x in enumerate(tr) if dish in x.labels]
        emb = []
        for i in cand:
            x = tr[i]
            boxes = np.asarray(x.boxes, np.float32)[[lb == dish for lb in x.labels]]
            e = det.embed_boxes(cv2.imread(str(x.image)), boxes).mean(0)
            emb.append((e / e.norm()).numpy())
        emb = np.stack(emb)
        pos = {i: k for k, i in enumerate(cand)}
        order = [first[0]]
        dist = 1 - emb @ emb[pos[first[0]]]
        while len(order) < len(cand):
            used = {tr[i].group for i in order}
            free = [k for k, i in enumerate(cand) if tr[i].group not in used]
            if not free:
                break
            k = max(free, key=lambda k: dist[k])
            order.append(cand[k])
            dist = np.minimum(dist, 1 - emb @ emb[k])
    given, shots = set(), 0
    for i in order:
        if shots >= args.shots:
            break
        given.add(i)
        shots += tr[i].labels.count(dish)
    return given, shots


def run_split(args, data, work: Path, fold: int | None) -> list[dict]:
    """Every ``--dish`` on one tray split (``fold``; None: the default split of ``--seed``)."""
    s = TrainSettings(data=args.data, out=str(work / "x.pt"), progress=False, seed=args.seed)
    tr, va = split_by_group(list(data.samples), s.val_fraction, s.seed, fold or 0)
    ckpt = args.localiser.format(fold=fold) if fold is not None else args.localiser
    tag = "" if fold is None else f"_fold{fold}"
    ref = load_dish_checkpoint(ckpt)
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
        base_path = work / f"base_without_{dish}_seed{args.seed}{tag}.pt"
        if base_path.exists():
            model = load_dish_checkpoint(base_path)
            if model.exemplars is None:  # saved before exemplars existed: as train now ends
                finish_model(model, tr, lab(tr), va, lab(va))
                save_dish_checkpoint(base_path, model)
        else:
            model = load_dish_checkpoint(ckpt)
            model.spec = DishModelSpec(**{**model.spec.__dict__, "classes": classes, "thresholds": {}})
            model.classifier = DishClassifier(len(classes), s.crop_size, pretrained=True, freeze_blocks=s.freeze_blocks)
            long_side = max(s.loc_size, s.crop_long_side)
            train_classifier(s, model, classes, ImageCache(tr, long_side), lab(tr), ImageCache(va, long_side), lab(va),
                             RunState(work / f"base_{dish}{tag}.state", s, False))
            finish_model(model, tr, lab(tr), va, lab(va))  # as train ends (the localiser checkpoint's were its own)
            save_dish_checkpoint(base_path, model)
        base_s = time.time() - t0
        given, shots = pick_examples(args, tr, dish, model)
        full = classes + (dish,)
        fidx = {c: i for i, c in enumerate(full)}
        tl = [[fidx[lb] if (lb != dish or i in given) else -1 for lb in x.labels] for i, x in enumerate(tr)]
        old_thr = dict(model.spec.thresholds)
        ref_rep = evaluate_predictions(va, ref.spec.classes, ref_preds, ref.spec.thresholds)
        ref_got = tray_counts(va, ref_preds, ref.spec.classes, ref.spec.thresholds, dish)
        for variant, few_shot, ex, w, keep in zip(VARIANTS, (False, True, True, True), (False, False, True, False),
                                                  (0.0, 0.0, 0.5, 0.0), (False, False, False, True)):
            if variant not in args.variants:
                continue
            m = copy.deepcopy(model)
            t1 = time.time()
            enrol_model(m, full, tr, tl, views=4, epochs=40, seed=args.seed, progress=False, few_shot=few_shot,
                        exemplars=ex, exemplar_weight=w, keep_old=keep)
            thr = {**old_thr, dish: float(np.median(list(old_thr.values())))}
            m.spec = DishModelSpec(**{**m.spec.__dict__, "thresholds": thr})
            enrol_s = time.time() - t1
            preds = predict_samples(DishDetector(m, "cpu"), va, False)
            rep = evaluate_predictions(va, full, preds, thr)
            got = tray_counts(va, preds, full, thr, dish)
            row = {"dish": dish, "variant": variant, "fold": fold, "shots": shots, "photos_given": len(given),
                   "pick": args.pick,
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
    return rows


if __name__ == "__main__":
    main()

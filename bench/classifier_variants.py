"""Classifier settings side by side on one trained localiser: ``dishtrack train --localiser``
(the classifier phase only, same split and seed) per variant, each scored on the validation trays
in one table. Saves the localiser phases when only the classifier changes; ``bench/dish_cv.py
--set '{"localiser": "runs/cv/fold{fold}/dishes.pt", ...}'`` does the same on every fold.

    python bench/classifier_variants.py --localiser runs/bench2/dishes.pt \
        --variant '{"crop_long_side": 512}' --variant '{"crop_long_side": 1024}'
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from dishtrack.models.train import train
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
    rows = []
    for v in args.variant:
        change = json.loads(v)
        tag = "_".join(f"{k}{val}" for k, val in change.items())
        rep = train(TrainSettings(data=args.data, out=str(work / f"{tag}.pt"), progress=False, seed=args.seed,
                                  localiser=args.localiser, **change))
        val = rep["validation"]
        row = {"variant": change, **{k: val[k] for k in ("map50", "map50_95", "receipt_exact_photo",
                                                         "receipt_exact_tray", "ap50_per_class")},
               "seconds": rep["seconds"]}
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

"""Dish recognition benchmark: train (timed) -> validation trays (mAP, receipts)
-> checkout videos made from the validation trays only -> the real pipeline ->
exact-receipt rate, item precision/recall, events per tray. One printed table.

    python bench/dish_benchmark.py [--data ../shared/data/mealtray_kiosk_dev] [--checkpoint runs/dishes.pt]
                                   [--videos 2] [--out runs/dish_bench]

Without --checkpoint it runs `dishtrack train` with its defaults first (that is
the "default train on 2 CPU cores" time). The videos use only photos of trays
the model never saw in training.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import checkout_video_eval  # noqa: E402

from dishtrack.models.dish_detector import read_checkpoint  # noqa: E402
from dishtrack.models.importers import load_dataset  # noqa: E402
from dishtrack.models.synth_video import SynthSettings, make_checkout_video  # noqa: E402
from dishtrack.models.train import TrainSettings, train  # noqa: E402

log = logging.getLogger("dish_benchmark")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mealtray_kiosk_dev"))
    p.add_argument("--checkpoint", help="skip training, use this checkpoint (its validation trays are reused)")
    p.add_argument("--out", default=str(ROOT / "runs" / "dish_bench"))
    p.add_argument("--videos", type=int, default=2, help="checkout videos (different photos of the val trays)")
    p.add_argument("--mode", choices=["pipeline", "direct"], default="pipeline")
    p.add_argument("--json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str]] = []
    if args.checkpoint:
        ck = Path(args.checkpoint)
        meta = read_checkpoint(ck)["meta"]
    else:
        ck = out / "dishes.pt"
        t0 = time.time()
        meta = train(TrainSettings(data=args.data, out=str(ck), progress=False))
        rows.append(("default train, wall time", f"{(time.time() - t0) / 60:.1f} min ({torch.get_num_threads()} threads)"))
    v = meta["validation"]
    rows += [("validation photos / trays", f"{v['photos']} / {v['trays']}"),
             ("mAP@0.5", f"{v['map50']:.3f}"), ("mAP@0.5:0.95", f"{v['map50_95']:.3f}"),
             ("AP@0.5 per dish", ", ".join(f"{k} {x:.2f}" for k, x in v["ap50_per_class"].items())),
             ("exact receipts, photos", f"{v['receipt_exact_photo']:.1%}"),
             ("exact receipts, trays (photos voted)", f"{v['receipt_exact_tray']:.1%}")]
    val_trays = set(meta["val_trays"])
    data = load_dataset(args.data)
    val = [s for s in data.samples if str(s.group) in val_trays]
    scores = []
    for k in range(args.videos):
        vdir = out / f"video{k}"
        if not (vdir / "receipts.json").is_file():
            make_checkout_video(val, vdir, len(val_trays), SynthSettings(seed=100 + k, tray_scale=0.85), classes=data.classes)
        s = checkout_video_eval.evaluate(checkout_video_eval.parse_args(
            [str(vdir), "--checkpoint", str(ck), "--mode", args.mode, "--predictions", str(vdir / "predictions.pkl")]))
        checkout_video_eval.print_table(s)
        scores.append(s)
    trays = sum(s["trays"] for s in scores)
    one = sum(s["trays_one_event"] for s in scores)
    exact = sum(s["exact_receipts"] for s in scores)
    events = sum(s["events"] for s in scores)
    prec = sum(s["item_precision"] * s["trays"] for s in scores) / max(trays, 1)
    rec = sum(s["item_recall"] * s["trays"] for s in scores) / max(trays, 1)
    rows += [("checkout videos: trays", f"{trays} ({args.videos} videos, val trays only, {args.mode})"),
             ("trays with exactly one event", f"{one} ({one / max(trays, 1):.1%})"),
             ("exact receipts on video", f"{exact} ({exact / max(trays, 1):.1%})"),
             ("item precision / recall", f"{prec:.3f} / {rec:.3f}"),
             ("events per tray", f"{events / max(trays, 1):.2f}")]
    print("\n| measure | value |\n| --- | --- |")
    for k, x in rows:
        print(f"| {k} | {x} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "videos": scores}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

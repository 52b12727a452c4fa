"""Which trays are wrong, on photos and on video, and how: the cross-validated fold models of
``bench/dish_cv.py`` compared tray by tray.

    python bench/tray_misses.py --out runs/cv_supponly --videos runs/cv_videos [--set JSON] [--json misses.json]

Per tray: the labels, the receipt its photos vote for (each tray's thresholds chosen on its fold's
other trays, as ``dish_cv.py``'s held-out rate) and the receipt of its pass in the fold's checkout
video (direct replay of the cached per-frame predictions, as ``dish_cv.py --videos``). Prints every
tray that is wrong on either, as label differences (``Plate+1``: one Plate more than labelled), and
the two-by-two count. A miss on both with the same difference is the model's; one on video alone
comes from the video frames (smaller, blurred dishes) or the tracker and checkout; one on photos
alone was outvoted by the frames of a pass. Needs ``dish_cv.py --videos`` run first (it reads the
fold checkpoints, their validation predictions and the videos' prediction caches); folds trained with
``dish_cv.py --set JSON`` are read with the same ``--set``.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkout_video_eval  # noqa: E402
import dish_cv  # noqa: E402

from dishtrack.models.evaluate import heldout_threshold_labels  # noqa: E402
from dishtrack.models.importers import load_dataset  # noqa: E402
from dishtrack.models.train import n_folds  # noqa: E402


def photo_receipts(fold: dict, classes) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """Each validation tray's photo-voted receipt (the most frequent among its photos), and its
    labels as ``receipt_agreement`` reads them (its first photo's)."""
    photos = fold["photos"]
    gt, raw, groups = dish_cv.fold_arrays(classes, photos)
    groups = [str(g) for g in groups]
    votes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    truth: dict[str, dict[str, int]] = {}
    for g, p, kept in zip(groups, photos, heldout_threshold_labels(gt, raw, groups, classes)):
        votes[g][tuple(sorted(collections.Counter(classes[i] for i in kept).items()))] += 1
        truth.setdefault(g, dict(collections.Counter(p["gt_labels"])))
    return {g: dict(v.most_common(1)[0][0]) for g, v in votes.items()}, truth


def difference(truth: dict[str, int], got: dict[str, int]) -> str:
    parts = [f"{c}{got.get(c, 0) - truth.get(c, 0):+d}" for c in sorted(set(truth) | set(got))
             if got.get(c, 0) != truth.get(c, 0)]
    return " ".join(parts) or "exact"


def compare(out: str, videos: str, data_dir: str, seed: int = 0, change: dict | None = None) -> list[dict]:
    """``change``: the ``dish_cv.py --set`` fields the folds were trained with."""
    change = change or {}
    data = load_dataset(data_dir)
    args = argparse.Namespace(out=out, data=data_dir, seed=seed, retrain=False, refresh=False, inference={})
    rows = []
    base = dish_cv.fold_settings(change, data_dir, seed)
    for k in range(n_folds(len({x.group for x in list(data.samples)[: base.max_images]}), base.val_fraction)):
        vdir = Path(videos) / f"fold{k}"
        ck, cache = Path(out) / f"fold{k}" / "dishes.pt", Path(out) / f"fold{k}" / "video_predictions.pkl"
        if not (ck.is_file() and (vdir / "receipts.json").is_file() and cache.is_file()):
            raise SystemExit(f"fold {k}: {ck}, {vdir}/receipts.json or {cache} is missing; run "
                             f"bench/dish_cv.py --out {out} --videos {videos} first")
        photo, photo_truth = photo_receipts(dish_cv.run_fold(args, k, change, data), data.classes)
        doc = json.loads((vdir / "receipts.json").read_text())
        in_video = {str(t["group"]) for t in doc["trays"]}
        if in_video != set(photo):
            raise SystemExit(f"fold {k}: {vdir} holds trays {sorted(in_video - set(photo))} that are not this "
                             f"fold's validation trays, or lacks {sorted(set(photo) - in_video)} (a video made "
                             "with another --seed or data folder?)")
        s = checkout_video_eval.evaluate(checkout_video_eval.parse_args(
            [str(vdir), "--checkpoint", str(ck), "--mode", "direct", "--predictions", str(cache)]))
        for t, r in zip(doc["trays"], s["per_tray"]):
            truth = {c: int(n) for c, n in r["gt"].items() if int(n)}
            g = str(t["group"])
            got_photo = photo[g]
            rows.append({"fold": k, "tray": g, "labels": truth, "photos": got_photo,
                         "video": {c: int(n) for c, n in r["pred"].items() if int(n)}, "video_events": r["events"],
                         "photos_exact": got_photo == photo_truth[g], "video_exact": bool(r["exact"]),
                         "video_flagged": bool(r["flagged"])})
    return rows


def print_report(rows: list[dict]) -> None:
    print("| fold | tray | labels | photos (held-out thresholds) | video | video events | flagged |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["photos_exact"] and r["video_exact"]:
            continue
        labels = ", ".join(f"{c} {n}" for c, n in sorted(r["labels"].items()))
        print(f"| {r['fold']} | {r['tray']} | {labels} | {difference(r['labels'], r['photos'])} | "
              f"{difference(r['labels'], r['video']) if r['video_events'] == 1 else 'split/missing'} | "
              f"{r['video_events']} | {'yes' if r['video_flagged'] else ''} |")
    both = sum(r["photos_exact"] and r["video_exact"] for r in rows)
    photo_only = sum(r["photos_exact"] and not r["video_exact"] for r in rows)
    video_only = sum(r["video_exact"] and not r["photos_exact"] for r in rows)
    neither = len(rows) - both - photo_only - video_only
    same = sum(not r["photos_exact"] and not r["video_exact"] and r["photos"] == r["video"] for r in rows)
    print(f"\n{len(rows)} trays: exact on both {both}, exact on photos only {photo_only}, exact on video only "
          f"{video_only}, on neither {neither} (the same receipt on both: {same})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/mealtray_kiosk_dev"))
    ap.add_argument("--out", default="runs/cv", help="dish_cv.py --out (the fold checkpoints)")
    ap.add_argument("--videos", required=True, help="dish_cv.py --videos")
    ap.add_argument("--seed", type=int, default=0, help="dish_cv.py --seed")
    ap.add_argument("--set", default="{}", help="dish_cv.py --set the folds were trained with (JSON)")
    ap.add_argument("--json", help="write every tray's row here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        change, _ = dish_cv.settings_change(args.set, args.data, args.seed)
    except ValueError as e:
        ap.error(f"--set {args.set!r}: {e}")
    rows = compare(args.out, args.videos, args.data, args.seed, change)
    print_report(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

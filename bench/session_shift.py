"""How the dish model holds up when the next capture session differs from the training one:
darker or brighter light, another white balance, a camera mounted higher (dishes smaller in the
frame), a softer or more compressed camera image, the tray turned round.

The shared folder is one capture session, so its held-out trays share the training trays'
light and camera; the product is judged on other sessions. This replays each cross-validation
fold's model (``bench/dish_cv.py``) on its own validation photos under one controlled change at a
time and scores them as ``dish_cv.py`` does: COCO mAP@0.5 pooled over the folds, and exact tray
receipts with each tray's thresholds chosen on the other trays' *unchanged* photos (thresholds
are validated on the training session and then meet the new one).

    python bench/session_shift.py --out runs/cv [--shifts none,dark,warm,zoom_out] [--json shift.json]

The training augmentation's ranges (``models/augment.py``: brightness x0.7-1.3, white balance +-10 %
per channel, the localiser's zoom 0.6-1.3 of its input, the classifier's size features x0.8-1.25)
say which shifts the model was taught; the others show how far beyond them it still works.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from tqdm import tqdm

from dishtrack.models.dish_detector import DishDetector
from dishtrack.models.evaluate import coco_map, heldout_threshold_labels, receipt_agreement
from dishtrack.models.importers import load_dataset
from dishtrack.models.train import split_by_group

log = logging.getLogger("session_shift")

Shift = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]  # (BGR image, boxes) -> both changed


def gain(b: float, g: float, r: float) -> Shift:
    """Per-channel gain: overall light (all three) or white balance (red against blue)."""
    k = np.array([b, g, r], np.float32)
    return lambda img, boxes: (np.clip(img.astype(np.float32) * k, 0, 255).astype(np.uint8), boxes)


def zoom_out(f: float) -> Shift:
    """The camera mounted 1/f times higher: the scene shrunk by f about the centre, the new
    border filled by repeating the edge (no new dishes appear)."""
    def apply(img, boxes):
        h, w = img.shape[:2]
        m = np.array([[f, 0, (1 - f) * w / 2], [0, f, (1 - f) * h / 2]], np.float32)
        out = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)
        b = boxes.copy()
        b[:, 0::2] = b[:, 0::2] * f + (1 - f) * w / 2
        b[:, 1::2] = b[:, 1::2] * f + (1 - f) * h / 2
        return out, b
    return apply


def jpeg(quality: int) -> Shift:
    def apply(img, boxes):
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
        return cv2.imdecode(buf, cv2.IMREAD_COLOR), boxes
    return apply


def blur(sigma: float) -> Shift:
    return lambda img, boxes: (cv2.GaussianBlur(img, (0, 0), sigma), boxes)


def rotate180(img, boxes):
    h, w = img.shape[:2]
    b = boxes.copy()
    b[:, [0, 2]] = w - boxes[:, [2, 0]]
    b[:, [1, 3]] = h - boxes[:, [3, 1]]
    return cv2.rotate(img, cv2.ROTATE_180), b


SHIFTS: dict[str, tuple[str, Shift]] = {
    "none": ("the photos as taken", lambda img, boxes: (img, boxes)),
    "dark": ("light x0.6", gain(0.6, 0.6, 0.6)),
    "bright": ("light x1.4", gain(1.4, 1.4, 1.4)),
    "warm": ("white balance: red x1.2, blue x0.8", gain(0.8, 1.0, 1.2)),
    "cool": ("white balance: red x0.8, blue x1.2", gain(1.2, 1.0, 0.8)),
    "zoom_out": ("camera 1.25x higher: scene x0.8", zoom_out(0.8)),
    "zoom_out_far": ("camera 1.5x higher: scene x0.67", zoom_out(2 / 3)),
    "jpeg": ("JPEG quality 20", jpeg(20)),
    "blur": ("Gaussian blur sigma 2 px (of 1024)", blur(2.0)),
    "rot180": ("tray turned round (180 degrees)", rotate180),
}


def predict(det: DishDetector, samples, shift: Shift, cidx: dict[str, int], desc: str) -> list[dict]:
    out = []
    for x in tqdm(samples, desc=desc, unit="photo", leave=False):
        img = cv2.imread(str(x.image))
        if img is None:
            raise SystemExit(f"cannot decode image {x.image}")
        img, boxes = shift(img, np.asarray(x.boxes, np.float32).reshape(-1, 4))
        p = det.predict([img])[0]
        out.append({"gt": (boxes, np.array([cidx[lb] for lb in x.labels], np.int64)),
                    "raw": (p["boxes"], p["scores"], p["class_ids"]), "size": (img.shape[1], img.shape[0]),
                    "group": str(x.group)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/mealtray_kiosk_dev"))
    ap.add_argument("--out", default="runs/cv", help="bench/dish_cv.py's folder of fold checkpoints")
    ap.add_argument("--folds", default="0,1,2,3,4")
    ap.add_argument("--shifts", default=",".join(SHIFTS), help=f"comma-separated, of: {', '.join(SHIFTS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    names = [s for s in args.shifts.split(",") if s]
    if unknown := [s for s in names if s not in SHIFTS]:
        ap.error(f"--shifts: unknown {unknown}; known: {list(SHIFTS)}")
    if "none" not in names:
        names.insert(0, "none")  # the thresholds' reference
    data = load_dataset(args.data)
    classes = data.classes
    cidx = {c: i for i, c in enumerate(classes)}
    folds = [int(k) for k in args.folds.split(",")]
    per_shift: dict[str, list[dict]] = {n: [] for n in names}
    labels: dict[str, list[list[int]]] = {n: [] for n in names}
    t0 = time.time()
    for k in folds:
        ck = Path(args.out) / f"fold{k}" / "dishes.pt"
        if not ck.is_file():
            raise SystemExit(f"{ck}: no fold checkpoint (run bench/dish_cv.py --out {args.out} first)")
        det = DishDetector.from_checkpoint(ck, "cpu")
        _, val_s = split_by_group(list(data.samples), args.val_fraction, args.seed, k)
        preds = {n: predict(det, val_s, SHIFTS[n][1], cidx, f"fold {k} {n}") for n in names}
        for n in names:
            per_shift[n] += preds[n]
            ref = preds["none"]  # thresholds per tray chosen on the other trays' unchanged photos
            labels[n] += heldout_threshold_labels([p["gt"] for p in ref], [p["raw"] for p in ref],
                                                  [p["group"] for p in ref], classes,
                                                  apply_to=[p["raw"] for p in preds[n]])
        log.info("fold %d done (%.1f min)", k, (time.time() - t0) / 60)
    rows = []
    for n in names:
        ps = per_shift[n]
        m = coco_map([p["gt"] for p in ps], [p["raw"] for p in ps], classes, [p["size"] for p in ps])
        r = receipt_agreement([list(p["gt"][1]) for p in ps], labels[n], [p["group"] for p in ps])
        rows.append({"shift": n, "what": SHIFTS[n][0], **m, **r,
                     "exact_trays": round(r["receipt_exact_tray"] * r["trays"])})
    print(f"\nfolds {folds} of {args.out}: {rows[0]['trays']} trays, {rows[0]['photos']} photos; thresholds chosen "
          "per tray on the other trays' unchanged photos\n")
    print("| shift | what | mAP@0.5 | mAP@0.5:0.95 | exact photos | exact trays | " +
          " | ".join(f"{c} AP" for c in classes) + " |")
    print("|" + "---|" * (6 + len(classes)))
    for r in rows:
        print(f"| {r['shift']} | {r['what']} | {r['map50']:.3f} | {r['map50_95']:.3f} | {r['receipt_exact_photo']:.1%} | "
              f"{r['exact_trays']} ({r['receipt_exact_tray']:.1%}) | " +
              " | ".join(f"{r['ap50_per_class'].get(c, float('nan')):.2f}" for c in classes) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"out": args.out, "folds": folds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

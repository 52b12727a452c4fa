"""``dishtrack`` command line: run the service, check a config, train a dish head, make a synthetic checkout video."""
from __future__ import annotations

import argparse
import logging
import sys

from dishtrack.config import ConfigError, load_config

log = logging.getLogger("dishtrack")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_run(args) -> int:
    cfg = load_config(args.config)
    overrides = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if overrides:
        cfg = cfg.model_copy(update={"api": cfg.api.model_copy(update=overrides)})
    import uvicorn

    from .api import build_runtime, create_app

    app = create_app(build_runtime(cfg))
    log.info("serving on http://%s:%d (cameras: %s)", cfg.api.host, cfg.api.port,
             ", ".join(c.id for c in cfg.cameras))
    uvicorn.run(app, host=cfg.api.host, port=cfg.api.port, log_level=args.log_level.lower())
    return 0


def cmd_check_config(args) -> int:
    cfg = load_config(args.config)
    print(cfg.model_dump_json(indent=2))  # the command's output is the resolved config
    return 0


def cmd_train(args) -> int:
    from dishtrack.models.train import TrainSettings, train

    settings = TrainSettings(
        data=args.data, out=args.out, epochs_head=args.epochs_head, epochs_finetune=args.epochs_finetune,
        lr_head=args.lr_head, lr_finetune=args.lr_finetune, layer_decay=args.layer_decay,
        batch_size=args.batch_size, input_size=args.input_size, device=args.device,
        val_fraction=args.val_fraction, seed=args.seed, max_images=args.max_images)
    report = train(settings)
    log.info("trained: %s", report)
    return 0


def cmd_export_mot(args) -> int:
    from dishtrack.models.dataset import export_mot_video

    n = export_mot_video(args.video, args.gt, args.out, label=args.label, every=args.every)
    log.info("wrote %d labelled frames to %s", n, args.out)
    return 0


def cmd_check_data(args) -> int:
    """Exit 0: clean; 1: problems but usable; 2: nothing usable."""
    import json
    from collections import Counter
    from pathlib import Path

    from dishtrack.models.importers import load_dataset
    from dishtrack.models.sample import DatasetError

    try:
        data = load_dataset(args.data, trays=args.trays)
    except DatasetError as e:
        print(f"unusable: {e}")
        if args.json:
            Path(args.json).write_text(json.dumps({"usable": False, "error": str(e)}, indent=2))
        return 2
    per_class = data.boxes_per_class()
    trays = {s.group for s in data.samples if s.group is not None}
    kinds = Counter(p.kind for p in data.problems)
    print(f"format:   {data.format}")
    print(f"images:   {len(data.samples)}")
    print(f"boxes:    {sum(per_class.values())}")
    print(f"trays:    {len(trays) if trays else 'none (no trays.csv)'}")
    print("boxes per class:")
    for c, n in per_class.items():
        print(f"  {c:<24} {n:>6}")
    print(f"problems: {len(data.problems)}")
    for k, n in kinds.most_common():
        print(f"  {k:<24} {n:>6}")
    for p in data.problems:
        print(p)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "usable": True, "format": data.format, "images": len(data.samples), "classes": list(data.classes),
            "boxes_per_class": per_class, "trays": len(trays), "problem_kinds": dict(kinds),
            "problems": [{"file": p.file, "line": p.line, "message": p.message, "action": p.action, "kind": p.kind}
                         for p in data.problems]}, indent=2))
    return 1 if data.problems else 0


def _load_tray_photos(path: str):
    """Any labelled folder/file the importers read -> (samples, classes); problems are logged."""
    from dishtrack.models.importers import load_dataset

    data = load_dataset(path)
    for p in data.problems:
        log.warning("%s", p)
    return list(data.samples), data.classes


def cmd_make_video(args) -> int:
    from dishtrack.models.synth_video import SynthSettings, make_checkout_video

    samples, classes = _load_tray_photos(args.data)
    settings = SynthSettings(width=args.width, height=args.height, fps=args.fps, seed=args.seed)
    res = make_checkout_video(samples, args.out, args.trays, settings, classes=classes)
    print(f"{res.video}: {len(res.receipts)} trays, {res.frames} frames; ground truth in {res.out_dir}")

def cmd_track(args) -> int:
    """The configured tracker on MOT-format detections -> MOT-format results."""
    from dishtrack.tracking.mot import read_mot, read_seqinfo, track_sequence, write_mot
    from dishtrack.tracking.tracker import TrackerParams

    params = TrackerParams.from_config(load_config(args.config).tracker)
    info = read_seqinfo(args.seqinfo)
    rows = track_sequence(read_mot(args.dets), params, camera_id=info.name, image_size=info.image_size,
                          fps=info.fps, n_frames=info.length)
    write_mot(args.out, rows)
    log.info("%s: %d frames, %d tracks -> %s", info.name, info.length, len(set(rows[:, 1].tolist())), args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dishtrack", description=__doc__)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run the service (default config: bundled sample video + model + SQLite)")
    r.add_argument("--config", help="YAML config; default: the bundled one")
    r.add_argument("--host")
    r.add_argument("--port", type=int)
    r.set_defaults(fn=cmd_run)

    c = sub.add_parser("check-config", help="validate a config and print it resolved")
    c.add_argument("--config")
    c.set_defaults(fn=cmd_check_config)

    t = sub.add_parser("train", help="transfer-learn a dish head: frozen trunk, then layer-wise fine-tune")
    t.add_argument("--data", required=True, help="labelled dataset: a manifest.jsonl (see README)")
    t.add_argument("--out", required=True, help="checkpoint file to write")
    t.add_argument("--epochs-head", type=int, default=10)
    t.add_argument("--epochs-finetune", type=int, default=5)
    t.add_argument("--lr-head", type=float, default=1e-3)
    t.add_argument("--lr-finetune", type=float, default=2e-4)
    t.add_argument("--layer-decay", type=float, default=0.5, help="lr factor per trunk stage going back to the input")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--input-size", type=int, default=512)
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--val-fraction", type=float, default=0.2)
    t.add_argument("--max-images", type=int, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("export-mot", help="turn a video + MOT gt.txt into a labelled dataset for `train`")
    e.add_argument("--video", required=True)
    e.add_argument("--gt", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--label", default="person")
    e.add_argument("--every", type=int, default=1, help="keep every Nth frame")
    e.set_defaults(fn=cmd_export_mot)

    d = sub.add_parser("check-data", help="load labelled data (YOLO, COCO, CVAT XML, Label Studio, manifest) "
                       "and list every problem; exit 0 clean, 1 problems, 2 unusable")
    d.add_argument("--data", required=True, help="dataset folder or label file")
    d.add_argument("--trays", help="CSV image,tray (default: trays.csv in the dataset folder)")
    d.add_argument("--json", help="also write the summary and problems as JSON here")
    d.set_defaults(fn=cmd_check_data)


    v = sub.add_parser("make-video", help="synthetic checkout video + ground truth from labelled tray photos")
    v.add_argument("--data", required=True, help="YOLO folder: labelled/*.jpg+*.txt, obj.names, trays.csv")
    v.add_argument("--out", required=True, help="output directory (checkout.mp4, receipts.json, gt.txt, ...)")
    v.add_argument("--trays", type=int, required=True)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--width", type=int, default=640)
    v.add_argument("--height", type=int, default=480)
    v.add_argument("--fps", type=float, default=25.0)
    v.set_defaults(fn=cmd_make_video)

    k = sub.add_parser("track", help="run the configured tracker on MOT-format detections, write MOT results")
    k.add_argument("--dets", required=True, help="MOT det.txt (frame,-1,x,y,w,h,score,...)")
    k.add_argument("--seqinfo", required=True, help="seqinfo.ini: frame rate, image size, length")
    k.add_argument("--out", required=True)
    k.add_argument("--config", default=None, help="YAML whose tracker section is used (default: built-in)")
    k.set_defaults(fn=cmd_track)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``dishtrack`` command line: run the service, check a config, train a dish head, make a synthetic checkout video."""
from __future__ import annotations

import argparse
import logging
import sys

from dishtrack.config import ConfigError, load_config

from .cli_args import input_file, int_at_least, made_parent, non_empty, number_in, output_dir, output_file

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
    if overrides:  # validated like the file (model_copy(update=) would skip validation)
        from dishtrack.config import AppConfig

        try:
            cfg = AppConfig.model_validate({**cfg.model_dump(), "api": {**cfg.api.model_dump(), **overrides}})
        except ValueError as e:
            raise ConfigError(f"invalid command line: {e}") from e
    if args.allow_open:
        cfg = cfg.model_copy(update={"auth": cfg.auth.model_copy(update={"allow_open": True})})
    check_listen(cfg.api.host, cfg.api.port)  # before the cameras start and the model loads
    from .auth import build_policy

    build_policy(cfg)  # refuses to serve a public address open: fail before the model loads
    from .api import build_runtime, create_app
    from .serve import serve

    app = create_app(build_runtime(cfg))
    log.info("serving on http://%s:%d (cameras: %s)", cfg.api.host, cfg.api.port,
             ", ".join(c.id for c in cfg.cameras))
    serve(app, cfg.api.host, cfg.api.port, args.log_level.lower(), cfg.api.shutdown_grace_s, cfg.api.nice)
    return 0


def check_listen(host: str, port: int) -> None:
    """ConfigError when the API could not listen on host:port (a host that does not resolve, an address
    not on this machine, a port in use or privileged): said at once, naming the setting, instead of
    uvicorn's bare errno after the cameras have started and the model has loaded."""
    import socket

    try:
        fam, kind, proto, _, addr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                       flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ConfigError(f"api.host {host!r}: cannot be resolved ({e.strerror})") from None
    with socket.socket(fam, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(addr)
        except OSError as e:
            raise ConfigError(f"api.host {host!r} / api.port {port}: cannot listen there ({e.strerror})") from None


def cmd_check_config(args) -> int:
    """Exit 0: ready to run; 1: runs, with warnings (a camera file that is not there, dishes without a
    price); 2: `run` would refuse its settings or files. Opens what the config points to, as `run`
    does at startup, except the event store (opening it would create it)."""
    import json

    from .admin import redacted_config

    cfg = load_config(args.config)
    warnings, notes = preflight(cfg, check_model=not args.no_model)
    # the command's output is the resolved config, with the secrets masked as GET /config masks them
    print(json.dumps(redacted_config(cfg), indent=2))
    for n in notes:
        log.info("%s", n)
    for w in warnings:
        log.warning("%s", w)
    if warnings:
        log.warning("%s: runs, with %d warning(s) above (exit 1)", args.config or "the bundled default config",
                    len(warnings))
    else:
        log.info("%s: ready to run", args.config or "the bundled default config")
    return 1 if warnings else 0


def preflight(cfg, check_model: bool = True) -> tuple[list[str], list[str]]:
    """What `run` checks at startup, without serving: auth (tokens file, public bind), the menu file,
    the detector checkpoint and detector.classes against its labels (read from the checkpoint: no
    model is built, no backend export written); raises what `run` would raise. Returns (warnings,
    notes): cameras no zone names, camera files missing, not regular files or not video; menu labels
    against the detector's; an MQTT broker that does not accept a connection. A PostgreSQL store that
    does not is an error, as for run."""
    from dishtrack.tracking.menu import Menu

    from .auth import build_policy
    from .ingest import is_stream, redact, source_file_problem, stream_endpoint_problem, tcp_problem

    build_policy(cfg)
    menu = Menu.load(cfg.menu.path, cfg.menu.timezone) if cfg.menu else None
    warnings: list[str] = cfg.zone_problems()
    notes: list[str] = []
    if cfg.detector.kind == "checkpoint":  # also with --no-model: a checkpoint that is not there fails run
        from dishtrack.models.dish_detector import checkpoint_file_problem

        if (why := checkpoint_file_problem(ck := cfg.detector.checkpoint)) is not None:
            raise FileNotFoundError(f"detector.checkpoint {ck} {why}")
    if check_model:
        from dishtrack.models.detector import detector_labels

        labels = detector_labels(cfg.detector)
        if menu is not None:
            w, n = menu.label_problems(cfg.detector.classes or labels)
            warnings += w
            notes += n
    for cam in cfg.cameras:
        if not is_stream(cam.source) and (why := source_file_problem(cam.source)):
            warnings.append(f"camera {cam.id}: source {cam.source} {why}")
        elif is_stream(cam.source) and (why := stream_endpoint_problem(cam.source)):  # run retries it
            warnings.append(f"camera {cam.id}: source {redact(cam.source)}: {why}")
    if cfg.storage.url:  # run refuses to start without it; connecting writes nothing (SQLite would be created)
        from .store_pg import check_reachable

        check_reachable(cfg.storage.url)
    if (mq := cfg.integrations.mqtt) is not None and (why := tcp_problem(mq.host, mq.port, 3.0)):
        # run starts anyway: events wait in the outbox
        warnings.append(f"integrations.mqtt {mq.host}:{mq.port}: cannot connect ({why}); events will wait in "
                        "the outbox until it can")
    return warnings, notes


def cmd_hash_token(args) -> int:
    """A new random token (or one read from stdin with ``--token -``) and its config lines."""
    from .auth import MIN_TOKEN_LEN, hash_token, new_token

    if args.token not in (None, "-"):  # a token typed on the command line stays in the shell's history
        raise ConfigError("--token takes only '-' (read the token from stdin: `printf %s \"$TOKEN\" | dishtrack "
                          "hash-token --name NAME --token -`); omit it to generate a token")
    token = sys.stdin.readline().strip() if args.token == "-" else new_token()
    if len(token) < MIN_TOKEN_LEN:
        raise ConfigError(f"a token must be at least {MIN_TOKEN_LEN} characters (it is stored as an unsalted "
                          "SHA-256, safe only for random tokens); omit --token to generate one")
    h = hash_token(token)
    from dishtrack.config import TokenConfig

    try:
        TokenConfig(name=args.name, role=args.role, hash=h)
    except ValueError as e:
        raise ConfigError(f"--name {args.name!r}: letters, digits, '_', '.', '-' only (1..64)") from e
    print(f"token: {token}")  # the command's output: shown once, give it to the client
    print(f"config (auth.tokens or tokens file): - {{name: {args.name}, role: {args.role}, hash: \"{h}\"}}")
    print(f"env (DISHTRACK_AUTH_TOKENS): {args.name}:{args.role}:{h}")
    return 0


def ap_per_dish(rep: dict) -> str:
    """The line train, enrol and eval print from an evaluation report."""
    return "AP@0.5 per dish: " + ", ".join(f"{k} {a:.3f}" for k, a in rep["ap50_per_class"].items())


def print_unlabelled(rep: dict) -> None:
    """The trays whose labels probably miss a dish (``evaluate.unlabelled_dishes``)."""
    found = rep.get("unlabelled_dishes") or []
    if not found:
        return
    print(f"labels to check: {len(found)} tray(s) where most photos show a dish with no label (the model finds it "
          "confidently where nothing is labelled; their receipts count as wrong):")
    for u in found:
        print(f"  tray {u['tray']}: {', '.join(u['dishes']) or '?'} in {u['photos_with_unlabelled']} of "
              f"{u['photos']} photos ({', '.join(u['images'][:3])}{', ...' if len(u['images']) > 3 else ''})")


def cmd_train(args) -> int:
    from pydantic import ValidationError

    from dishtrack.models.train import TrainSettings, train

    fields = {k: getattr(args, k) for k in TrainSettings.model_fields if getattr(args, k, None) is not None}
    try:
        settings = TrainSettings(**fields)
    except ValidationError as e:
        raise ConfigError("; ".join((f"--{str(err['loc'][0]).replace('_', '-')}: " if err["loc"] else "") + err["msg"]
                                    for err in e.errors())) from None
    report = train(settings)
    v = report["validation"]
    print(f"checkpoint: {report['checkpoint']}  report: {report['report']}")
    print(f"curves: {report['curves']}  confusion matrix: {report['confusion_png']}")
    print(f"validation ({report['val_photos']} photos, {len(report['val_trays'])} trays): mAP@0.5 {v['map50']:.3f}  "
          f"mAP@0.5:0.95 {v['map50_95']:.3f}  exact receipts: photos {v['receipt_exact_photo']:.1%}, "
          f"trays {v['receipt_exact_tray']:.1%}  ({report['seconds']:.0f} s)")
    if "receipt_exact_tray_heldout" in v:
        print(f"  thresholds were chosen on these trays; chosen leaving each tray out: photos "
              f"{v['receipt_exact_photo_heldout']:.1%}, trays {v['receipt_exact_tray_heldout']:.1%} "
              f"(what a new tray gets; `dishtrack eval` on other photos measures it directly)")
    print(ap_per_dish(v))
    print_unlabelled(v)
    print(f"next: `dishtrack eval --data PHOTOS_OF_ANOTHER_DAY --checkpoint {report['checkpoint']}`, then the "
          "checkpoint and a menu in the site config (README 'Train on your dishes', step 5)")
    return 0


def cmd_enrol(args) -> int:
    from dishtrack.models.enrol import enrol

    r = enrol(args.checkpoint, args.data, args.out, val_fraction=args.val_fraction, views=args.views,
              shot_views=args.shot_views, epochs=args.epochs, seed=args.seed, progress=not args.no_progress,
              exemplar_weight=args.exemplar_weight, keep_old=not args.refit_all)
    print(f"checkpoint: {r['checkpoint']}  dishes: {', '.join(r['classes'])}  new: {', '.join(r['new_classes']) or '-'}"
          f"  ({r['seconds']:.0f} s)")
    v = r["validation"]
    if v:
        print(f"validation ({r['val_photos']} photos, {len(r['val_trays'])} trays): mAP@0.5 {v['map50']:.3f}  "
              f"exact receipts: photos {v['receipt_exact_photo']:.1%}, trays {v['receipt_exact_tray']:.1%}")
        print(ap_per_dish(v))
    return 0


def cmd_eval(args) -> int:
    import json
    from pathlib import Path

    from dishtrack.models.dish_detector import DishDetector, read_checkpoint
    from dishtrack.models.evaluate import evaluate_predictions
    from dishtrack.models.importers import load_dataset
    from dishtrack.models.train import predict_samples

    det = DishDetector.from_checkpoint(args.checkpoint, args.device)
    data = load_dataset(args.data, trays=args.trays, classes=det.labels)
    for p in data.problems:
        log.warning("%s", p)
    trained_on = set(read_checkpoint(args.checkpoint).get("meta", {}).get("train_images", []))
    seen = sum(s.image.name in trained_on for s in data.samples)
    if seen:
        log.warning("%d of these %d photos trained this checkpoint: their numbers are optimistic (it has seen "
                    "them); evaluate on photos it was not trained on, e.g. another day's", seen, len(data.samples))
    preds = predict_samples(det, list(data.samples), progress=not args.no_progress)
    png = args.confusion or (str(Path(args.json).with_suffix("")) + "_confusion.png" if args.json else None)
    if png:
        made_parent(png)
    rep = evaluate_predictions(list(data.samples), det.labels, preds, det.spec.thresholds, confusion_png=png)
    rep.update({"checkpoint": args.checkpoint, "data": args.data, "data_problems": len(data.problems),
                "confusion_png": png, "photos_trained_on": seen})
    print(f"{rep['photos']} photos, {rep['trays']} trays: mAP@0.5 {rep['map50']:.3f}  mAP@0.5:0.95 {rep['map50_95']:.3f}")
    print(ap_per_dish(rep))
    print(f"exact receipts: photos {rep['receipt_exact_photo']:.1%}, trays {rep['receipt_exact_tray']:.1%}")
    print_unlabelled(rep)
    if png:
        print(f"confusion matrix: {png}")
    if args.json:
        made_parent(args.json).write_text(json.dumps(rep, indent=2))
    return 0


def cmd_propose(args) -> int:
    from dishtrack.models.dish_detector import DishDetector
    from dishtrack.models.propose import propose

    det = DishDetector.from_checkpoint(args.checkpoint, args.device)
    from pathlib import Path

    res = propose(det, args.images, args.out, args.format, min_score=args.min_score, progress=not args.no_progress,
                  model_version=Path(args.checkpoint).name)
    n = sum(len(p.labels) for p in res.proposals)
    files = ", ".join(str(f) for f in res.files[:2])
    print(f"{len(res.proposals)} photos, {n} proposed boxes ({args.format}): {files}")
    return 0


def cmd_shots(args) -> int:
    from dishtrack.models.dish_detector import DishDetector
    from dishtrack.models.shots import pick_shots

    det = DishDetector.from_checkpoint(args.checkpoint, args.device)
    shots = pick_shots(det, args.source, args.out, args.n, every=args.every, max_frames=args.max_frames,
                       uncertainty_weight=args.uncertainty_weight, dedup_distance=args.dedup_distance,
                       progress=not args.no_progress)
    empty = sum(s.detections == 0 for s in shots)
    print(f"{len(shots)} frames -> {args.out}/images, manifest.csv, manifest.json"
          + (f" ({empty} with no dish found: the counter as the camera sees it; label them empty)" if empty else ""))
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

    from dishtrack.models.importers import load_dataset
    from dishtrack.models.sample import DatasetError

    try:
        data = load_dataset(args.data, trays=args.trays)
    except DatasetError as e:
        print(f"unusable: {e}")
        if args.json:
            made_parent(args.json).write_text(json.dumps({"usable": False, "error": str(e)}, indent=2))
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
        made_parent(args.json).write_text(json.dumps({
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
    return 0


def cmd_track(args) -> int:
    """The configured tracker on MOT-format detections -> MOT-format results."""
    from dishtrack.tracking.mot import read_mot, read_seqinfo, track_sequence, write_mot
    from dishtrack.tracking.tracker import TrackerParams

    params = TrackerParams.from_config(_tracker_config(args.config))
    info = read_seqinfo(args.seqinfo)
    dets = read_mot(args.dets)
    if len(dets) and dets[:, 0].max() > info.length:
        raise ValueError(f"{args.dets}: frame {int(dets[:, 0].max())} is beyond seqLength={info.length} of "
                         f"{args.seqinfo}")
    rows = track_sequence(dets, params, camera_id=info.name, image_size=info.image_size,
                          fps=info.fps, n_frames=info.length)
    write_mot(made_parent(args.out), rows)
    log.info("%s: %d frames, %d tracks -> %s", info.name, info.length, len(set(rows[:, 1].tolist())), args.out)
    return 0


def _tracker_config(path: str | None):
    """The tracker section of a full config, or of a YAML holding only ``tracker:`` (tuning files)."""
    from dishtrack.config import TrackerConfig

    if path is None:
        return load_config(None).tracker
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if isinstance(raw, dict) and set(raw) == {"tracker"}:
        try:
            return TrackerConfig.model_validate(raw["tracker"] or {})
        except ValueError as e:
            raise ConfigError(f"{path}: invalid tracker section: {e}") from None
    return load_config(path).tracker


def _add_train_args(t: argparse.ArgumentParser) -> None:
    """One flag per TrainSettings field, defaults and help from the settings model."""
    from dishtrack.models.train_settings import TrainSettings

    for name, f in TrainSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_ = f.description or ""
        if name in ("data", "out"):
            t.add_argument(flag, required=True, type=output_file if name == "out" else str, help={"data": "labelled tray photos: YOLO folder, COCO JSON, CVAT XML, "
                                                       "Label Studio JSON or manifest.jsonl", "out": "checkpoint to write"}[name])
        elif f.annotation is bool:
            t.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{help_} (default {f.default})")
        else:
            typ = {int: int, float: float}.get(f.annotation, None)
            if typ is None:
                typ = int if "int" in str(f.annotation) else float if "float" in str(f.annotation) else str
            t.add_argument(flag, type=typ, default=None, help=f"{help_} (default {f.default})")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is out of range 0..65535")
    return port


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dishtrack", description=__doc__)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run the service (default config: bundled sample video + model + SQLite)")
    r.add_argument("--config", help="YAML config; default: the bundled one")
    r.add_argument("--host")
    r.add_argument("--port", type=_port, help="0..65535")
    r.add_argument("--allow-open", action="store_true",
                   help="serve without authentication even on a non-loopback --host (auth.allow_open)")
    r.set_defaults(fn=cmd_run)

    h = sub.add_parser("hash-token", help="generate an API token and print its hash line for auth.tokens")
    h.add_argument("--name", required=True, help="who holds the token (letters, digits, _ . -)")
    h.add_argument("--role", default="viewer", choices=["viewer", "admin"])
    h.add_argument("--token", help="'-': read an existing token (>= 32 characters) from stdin instead")
    h.set_defaults(fn=cmd_hash_token)

    c = sub.add_parser("check-config", help="validate a config and what it points to (menu, tokens file, detector, camera files) and print it resolved; exit 0 ready, 1 warnings, 2 invalid")
    c.add_argument("--config")
    c.add_argument("--no-model", action="store_true", help="do not read the detector checkpoint's labels "
                   "(detector.classes and the menu's labels are then not checked against them)")
    c.set_defaults(fn=cmd_check_config)

    t = sub.add_parser("train", help="train a dish detector (localiser + classifier) on labelled tray photos")
    _add_train_args(t)
    t.set_defaults(fn=cmd_train)

    en = sub.add_parser("enrol", help="add new dishes to a checkpoint in minutes (retrains only the classifier's "
                        "last layer on its trunk's embeddings)")
    en.add_argument("--checkpoint", required=True, help="a file written by `dishtrack train` (or an earlier enrol)")
    en.add_argument("--data", required=True, action="append",
                    help="labelled photos, old dishes and new (repeat for several folders, e.g. the training "
                         "data and the corrections dataset)")
    en.add_argument("--out", required=True, type=output_file, help="the new checkpoint")
    en.add_argument("--val-fraction", type=number_in(0, 1, high_open=True), default=0.2,
                    help="share of trays held out to choose thresholds (default: %(default)s)")
    en.add_argument("--views", type=int_at_least(1), default=4,
                    help="augmented views of every box (default: %(default)s)")
    en.add_argument("--shot-views", type=int_at_least(1), default=24,
                    help="augmented views of each box of a new dish (it has only a few; default: %(default)s)")
    en.add_argument("--epochs", type=int_at_least(1), default=40,
                    help="epochs of the last layer's training (default: %(default)s)")
    en.add_argument("--exemplar-weight", type=number_in(0, 1), default=0.0,
                    help="share of the exemplar memory's vote (the given boxes join it either way); measured "
                         "(docs/dish_accuracy.md): 0.5 names an enrolled dish in no more of its next trays than the head "
                         "alone (default: %(default)s)")
    en.add_argument("--refit-all", action="store_true",
                    help="refit every dish's output row, not only the new dishes' (by default the known dishes' "
                         "rows stay as trained: measured (docs/dish_accuracy.md), their receipts suffer less)")
    en.add_argument("--seed", type=int, default=0, help="augmentation and split seed (default: %(default)s)")
    en.add_argument("--no-progress", action="store_true")
    en.set_defaults(fn=cmd_enrol)

    ev = sub.add_parser("eval", help="mAP, AP per dish, confusion matrix and receipt agreement of a checkpoint")
    ev.add_argument("--data", required=True, help="labelled photos (any format check-data reads)")
    ev.add_argument("--checkpoint", required=True, help="a file written by `dishtrack train`")
    ev.add_argument("--trays", help="CSV image,tray (default: trays.csv in the dataset folder)")
    ev.add_argument("--json", type=output_file,
                    help="write the report (map50, map50_95, ap50_per_class, receipt_exact_*) here")
    ev.add_argument("--confusion", type=output_file, help="confusion-matrix PNG (default: next to --json)")
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(fn=cmd_eval)

    pr = sub.add_parser("propose", help="pre-label photos with a dish checkpoint for Label Studio, CVAT, COCO or "
                        "YOLO (correct instead of draw; the corrected export goes back into `train --data`)")
    pr.add_argument("--checkpoint", required=True, help="a file written by `dishtrack train`")
    pr.add_argument("--images", required=True, help="folder of photos (searched recursively)")
    pr.add_argument("--out", required=True, type=output_dir,
                    help="output folder (label files; OUT/images links to --images)")
    pr.add_argument("--format", default="labelstudio", choices=["labelstudio", "cvat", "coco", "yolo"])
    pr.add_argument("--min-score", type=number_in(0, 1), default=0.6,
                    help="calibrated score a box needs (0.6 = the dish's own validation threshold)")
    pr.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(fn=cmd_propose)

    sh = sub.add_parser("shots", help="pick the N frames of a video or camera most worth labelling "
                        "(diverse by the model's own embeddings, uncertain, no near-duplicates)")
    sh.add_argument("--source", required=True, help="video file or rtsp:// URL")
    sh.add_argument("--n", type=int_at_least(1), required=True, help="frames to pick")
    sh.add_argument("--out", required=True, type=output_dir, help="output folder (images/, manifest.csv, manifest.json)")
    sh.add_argument("--checkpoint", required=True, help="a dish checkpoint (its classifier embeds the frames)")
    sh.add_argument("--every", type=int_at_least(1), default=5, help="score every Nth frame")
    sh.add_argument("--max-frames", type=int_at_least(1), default=2000,
                    help="most frames scored (a camera: stop after these)")
    sh.add_argument("--uncertainty-weight", type=number_in(0), default=1.0,
                    help="0: diversity only; distance x (1 + w x uncertainty)")
    sh.add_argument("--dedup-distance", type=number_in(0, 1), default=0.02,
                    help="cosine distance under which a frame is a near-duplicate of a picked one")
    sh.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sh.add_argument("--no-progress", action="store_true")
    sh.set_defaults(fn=cmd_shots)

    e = sub.add_parser("export-mot", help="turn a video + MOT gt.txt into a labelled dataset for `train`")
    e.add_argument("--video", required=True, type=input_file)
    e.add_argument("--gt", required=True, type=input_file, help="MOT gt.txt (frame,id,x,y,w,h,flag,...)")
    e.add_argument("--out", required=True, type=output_dir)
    e.add_argument("--label", default="person", type=non_empty)
    e.add_argument("--every", type=int_at_least(1), default=1, help="keep every Nth frame")
    e.set_defaults(fn=cmd_export_mot)

    d = sub.add_parser("check-data", help="load labelled data (YOLO, COCO, CVAT XML, Label Studio, manifest) "
                       "and list every problem; exit 0 clean, 1 problems, 2 unusable")
    d.add_argument("--data", required=True, help="dataset folder or label file")
    d.add_argument("--trays", help="CSV image,tray (default: trays.csv in the dataset folder)")
    d.add_argument("--json", type=output_file, help="also write the summary and problems as JSON here")
    d.set_defaults(fn=cmd_check_data)


    v = sub.add_parser("make-video", help="synthetic checkout video + ground truth from labelled tray photos")
    v.add_argument("--data", required=True, help="YOLO folder: labelled/*.jpg+*.txt, obj.names, trays.csv")
    v.add_argument("--out", required=True, type=output_dir,
                   help="output directory (checkout.mp4, receipts.json, gt.txt, ...)")
    v.add_argument("--trays", type=int_at_least(1), required=True)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--width", type=int_at_least(32), default=640)
    v.add_argument("--height", type=int_at_least(32), default=480)
    v.add_argument("--fps", type=number_in(1, 240), default=25.0)
    v.set_defaults(fn=cmd_make_video)

    k = sub.add_parser("track", help="run the configured tracker on MOT-format detections, write MOT results")
    k.add_argument("--dets", required=True, type=input_file, help="MOT det.txt (frame,-1,x,y,w,h,score,...)")
    k.add_argument("--seqinfo", required=True, type=input_file, help="seqinfo.ini: frame rate, image size, length")
    k.add_argument("--out", required=True, type=output_file)
    k.add_argument("--config", default=None, type=input_file,
                   help="a dishtrack config, or a YAML with only a tracker: section; its tracker section is used "
                        "(default: built-in)")
    k.set_defaults(fn=cmd_track)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return args.fn(args)
    except (ConfigError, ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError,
            PermissionError) as e:  # bad input; other errors (a full disk, a port in use) keep their traceback
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

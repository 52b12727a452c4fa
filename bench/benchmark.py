"""dishtrack benchmark: one table inference backend x cameras (1, 3, 8) -> processed
fps per camera, frame age p50/p95, CPU %, detector ms per frame and per batch, stage
drops, and an accuracy column (MOTA of detector + tracker on MOT15 TUD-Campus against
its ground truth, so speed is never bought with silent accuracy loss); tracker Hz;
with the GStreamer RTSP test server, glass-to-annotated-frame latency on a live
camera whose frames carry their capture time.

    python bench/benchmark.py [--seconds 15] [--backends torch,onnxruntime,openvino,int8]
                              [--cameras 1,3,8] [--repeat 1] [--shared ../shared]

Numbers from a run are copied into README.md ("Benchmarks").
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import resource
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dishtrack.config import AppConfig, DetectorConfig
from dishtrack.models.backends import available
from dishtrack.models.detector import Detector
from dishtrack.service.hub import EventHub
from dishtrack.service.metrics import Metrics
from dishtrack.service.pipeline import Pipeline
from dishtrack.service.store import EventStore
from dishtrack.tracking import Frame
from dishtrack.tracking.mot import read_mot, track_sequence

log = logging.getLogger("benchmark")
ROOT = Path(__file__).resolve().parents[1]


def bench_tracker(shared: Path) -> None:
    dets = read_mot(shared / "data/mot15_sort_frcnn_dets/data/train/TUD-Stadtmitte/det/det.txt")
    n_frames = len(np.unique(dets[:, 0]))
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        track_sequence(dets)
    dt = time.perf_counter() - t0
    log.info("tracker: %.0f updates/s (MOT15 TUD-Stadtmitte, %d frames, %.1f dets/frame)",
             reps * n_frames / dt, n_frames, len(dets) / n_frames)


def bench_detector(det: Detector, video: Path) -> None:
    import cv2

    cap = cv2.VideoCapture(str(video))
    imgs = [cap.read()[1] for _ in range(8)]
    for bs in (1, 3, 8):
        frames = [Frame(f"c{i}", i, 0.0, imgs[i]) for i in range(bs)]
        det.detect(frames)  # warm-up
        t0 = time.perf_counter()
        n = 5
        for _ in range(n):
            det.detect(frames)
        dt = (time.perf_counter() - t0) / n
        log.info("detector: batch %d: %.0f ms/batch, %.1f frames/s (%s on %s, input %d)", bs, dt * 1000, bs / dt,
                 det.backend.name, det.device, det.input_size)


def _run_pipeline(cfg: AppConfig, det: Detector, seconds: float, tap=None) -> Pipeline:
    tmp = tempfile.mkdtemp()
    metrics = Metrics(window=4096)
    p = Pipeline(cfg, det, EventStore(os.path.join(tmp, "e.sqlite3")), EventHub(), metrics)
    if tap:
        orig = p.annotator.annotate

        def annotate(image, *a, **kw):
            out = orig(image, *a, **kw)
            tap(image, time.time())
            return out

        p.annotator.annotate = annotate
    p.start()
    end = time.time() + seconds
    while time.time() < end:  # a viewer on every stream: annotated at the stream rate
        for slot in p.streams.values():
            slot.get()
        time.sleep(0.2)
    p.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    return p


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _hist(h, **labels) -> tuple[float, float]:
    """(sum, count) of a prometheus Histogram (optionally one label set)."""
    child = h.labels(**labels) if labels else h
    total = count = 0.0
    for metric in child.collect():
        for smp in metric.samples:
            if smp.name.endswith("_sum"):
                total = smp.value
            elif smp.name.endswith("_count"):
                count = smp.value
    return total, count


def bench_cameras(det: Detector, video: Path, n_cams: int, seconds: float, batch_wait_ms: float = 5.0,
                  stride: dict | None = None) -> dict:
    """``n_cams`` cameras playing the sample video at 25 fps (looped); one viewer watches cam0's stream.
    ``stride``: a detector.stride section (detection stride, optical flow between)."""
    cfg = AppConfig.model_validate({
        "cameras": [{"id": f"cam{i}", "source": str(video), "loop": True, "realtime": True} for i in range(n_cams)],
        "api": {"mjpeg_fps": 10}, "detector": {"batch_wait_ms": batch_wait_ms, "stride": stride or {}},
    })
    tmp = tempfile.mkdtemp()
    p = Pipeline(cfg, det, EventStore(os.path.join(tmp, "e.sqlite3")), EventHub(), Metrics(window=100000))
    p.start()
    warm = min(3.0, seconds / 4)
    time.sleep(warm)  # decoders and first batches; then measure
    c0, w0 = _cpu_s(), time.time()
    b0 = _hist(p.metrics.batch_seconds)
    n0 = {c: len(p.metrics._ages[c]) for c in p.readers}
    end = time.time() + seconds
    while time.time() < end:
        p.streams["cam0"].get()  # a viewer
        time.sleep(0.2)
    c1, w1 = _cpu_s(), time.time()
    b1 = _hist(p.metrics.batch_seconds)
    ages = np.concatenate([np.array(p.metrics._ages[c])[n0[c]:] for c in p.readers])
    fps = [(len(p.metrics._ages[c]) - n0[c]) / (w1 - w0) for c in p.readers]
    ks = [d.k for d in p.stride.history] if p.stride is not None else []
    if p._async is not None:  # asynchronous detection: the frames between two detections it got, per camera
        ks = list(p._async.gap.values())
    p.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    n_batches = b1[1] - b0[1]
    batch_ms = 1000 * (b1[0] - b0[0]) / max(n_batches, 1)
    frames = sum(len(p.metrics._ages[c]) - n0[c] for c in p.readers)
    return {"cams": n_cams, "fps": float(np.mean(fps)), "fps_min": float(np.min(fps)),
            "age_p50": 1000 * float(np.percentile(ages, 50)) if len(ages) else float("nan"),
            "age_p95": 1000 * float(np.percentile(ages, 95)) if len(ages) else float("nan"),
            "cpu": 100 * (c1 - c0) / (w1 - w0), "batch_ms": batch_ms,
            "frame_ms": 1000 * (b1[0] - b0[0]) / max(frames, 1), "batch": frames / max(n_batches, 1),
            "dropped_read": sum(r.status().frames_dropped for r in p.readers.values()),
            "dropped_stream": p._annotate.dropped,
            "k": p.stride.k if p.stride is not None else (round(float(np.mean(ks))) if ks else 1),
            "k_mean": float(np.mean(ks)) if ks else float("nan")}


def detector_mota(det: Detector, shared: Path) -> tuple[float, float]:
    """Detector + default tracker on every frame of MOT15 TUD-Campus (71 frames) against its
    ground truth: MOTA and IDF1 in %. Persons only, score >= the detector's threshold."""
    from eval_mot15 import evaluate

    gt = read_mot(shared / "data/motmetrics_pkg_data/motmetrics/data/TUD-Campus/gt.txt")
    m = evaluate(person_detections(det, shared / "data/video/tud_campus_640x480_25fps_h264.mp4"), gt)
    return 100 * m["mota"], 100 * m["idf1"]


def person_detections(det: Detector, video: Path, k: int = 1) -> np.ndarray:
    """The detector's person boxes on every k-th frame of ``video`` as MOT rows frame,-1,x,y,w,h,score."""
    import cv2

    cap = cv2.VideoCapture(str(video))
    rows, idx = [], 0
    while True:
        ok, img = cap.read()
        if not ok:
            break
        idx += 1
        if (idx - 1) % k:
            continue
        d = det.detect([Frame("mot", idx, idx / 25.0, img)])[0]
        for b, s, c in zip(d.boxes, d.scores, d.class_ids):
            if d.labels[c] == "person":
                rows.append([idx, -1, b[0], b[1], b[2] - b[0], b[3] - b[1], s])
    return np.array(rows, dtype=np.float64).reshape(-1, 7)


def detector_mota_strided(det: Detector, shared: Path, k: int, latency: int = 0) -> tuple[float, float]:
    """As ``detector_mota`` with a detection stride: the detector runs on every k-th frame of
    the TUD-Campus video, tracks move by Kalman prediction + optical flow between (the
    pipeline's ``service.motion``). k = 1 is ``detector_mota`` exactly. ``latency`` > 0:
    asynchronous detection whose detections arrive ``latency`` frames late."""
    from eval_mot15 import evaluate, track_video_strided

    gt = read_mot(shared / "data/motmetrics_pkg_data/motmetrics/data/TUD-Campus/gt.txt")
    video = shared / "data/video/tud_campus_640x480_25fps_h264.mp4"
    dets = person_detections(det, video, 1 if latency else k)
    m = evaluate(dets, gt, result=track_video_strided(dets, video, 1 if latency else k, latency=latency))
    return 100 * m["mota"], 100 * m["idf1"]


def bench_strides(args, shared: Path, video: Path) -> None:
    """Detection stride table: k = 1, 2, 3 and adaptive (k_max 4) x cameras on the first
    backend: processed fps per camera, frame age, detector ms, and MOTA / IDF1 on TUD-Campus
    with the same stride (adaptive: at the k its run ended on)."""
    name = args.backends.split(",")[0]
    if args.checkpoint:  # a dish checkpoint on a checkout video: speed only (accuracy: checkout_video_eval.py)
        from dishtrack.models.detector import load_detector

        det = load_detector(DetectorConfig(kind="checkpoint", checkpoint=args.checkpoint, backend=name,
                                           device=args.device, cache_dir=args.cache_dir))
        video = Path(args.video or video)
    else:
        det = make_detector(name, args.device, args.input_size, calibration_folder(video), args.cache_dir)
    acc: dict[tuple[int, int], tuple[float, float]] = {}
    rows = []
    for label in args.strides.split(","):
        stride = ({"adaptive": True, "k_max": 4} if label == "adaptive" else {"detect_async": True}
                  if label == "async" else {"k": int(label)})
        for n in (int(c) for c in args.cameras.split(",")):
            r = bench_cameras(det, video, n, args.seconds, stride=stride)
            # async: accuracy with detections arriving as many frames late as the run's detector was slow
            key = (r["k"], r["k"] if label == "async" else 0)
            if key not in acc:
                acc[key] = (float("nan"),) * 2 if args.checkpoint else detector_mota_strided(det, shared, *key)
            r.update(stride=label, mota=acc[key][0], idf1=acc[key][1])
            rows.append(r)
            log.info("stride %s x %d cams: %.1f fps/cam, age p50 %.0f p95 %.0f ms, cpu %.0f%%, det %.0f ms/batch, "
                     "k end %d (mean %.1f)", label, n, r["fps"], r["age_p50"], r["age_p95"], r["cpu"], r["batch_ms"],
                     r["k"], r["k_mean"])
    log.info("\n| stride k (%s) | cams | fps/cam (min) | frame age p50 / p95 ms | CPU %% | detector ms/batch | "
             "frames dropped at read | k at end (mean) | MOTA / IDF1 TUD-Campus |", name)
    log.info("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        log.info("| %s | %d | %.1f (%.1f) | %.0f / %.0f | %.0f | %.0f | %d | %d (%s) | %.1f / %.1f |", r["stride"],
                 r["cams"], r["fps"], r["fps_min"], r["age_p50"], r["age_p95"], r["cpu"], r["batch_ms"],
                 r["dropped_read"], r["k"], "-" if np.isnan(r["k_mean"]) else f"{r['k_mean']:.1f}", r["mota"],
                 r["idf1"])


def make_detector(name: str, device: str, input_size: int | None, calib: Path, cache: str | None) -> Detector:
    kw = {"device": device, "input_size": input_size, "cache_dir": cache}
    if name == "int8":
        kw.update(backend="onnxruntime", precision="int8", calibration_images=str(calib))
    else:
        kw["backend"] = name
    return Detector(DetectorConfig(**kw))


def calibration_folder(video: Path) -> Path:
    """Every 10th frame of the sample video (the int8 calibration set: the camera's own images)."""
    import cv2

    out = Path(tempfile.mkdtemp()) / "calib"
    out.mkdir()
    cap = cv2.VideoCapture(str(video))
    i = 0
    while True:
        ok, img = cap.read()
        if not ok:
            break
        if i % 10 == 5:
            cv2.imwrite(str(out / f"{i:03d}.jpg"), img)
        i += 1
    return out


def bench_table(args, shared: Path, video: Path) -> Detector | None:
    cams = [int(c) for c in args.cameras.split(",")]
    calib = calibration_folder(video)
    rows, fastest = [], (None, 0.0)
    for name in args.backends.split(","):
        pkg = "onnxruntime" if name == "int8" else name
        if pkg != "torch" and not available(pkg):
            log.info("backend %s: not installed, skipped", name)
            continue
        det = make_detector(name, args.device, args.input_size, calib, args.cache_dir)
        mota, idf1 = detector_mota(det, shared)
        for rep in range(args.repeat):
            for n in cams:
                r = bench_cameras(det, video, n, args.seconds)
                r.update(backend=name, device=str(det.device), mota=mota, idf1=idf1, rep=rep)
                rows.append(r)
                log.info("%s x %d cams (run %d): %.1f fps/cam, age p50 %.0f p95 %.0f ms, cpu %.0f%%, "
                         "det %.0f ms/frame %.0f ms/batch (%.1f frames)", name, n, rep + 1, r["fps"], r["age_p50"],
                         r["age_p95"], r["cpu"], r["frame_ms"], r["batch_ms"], r["batch"])
                if n == 1 and r["fps"] > fastest[1]:
                    fastest = (det, r["fps"])
    log.info("\n| backend | cams | fps/cam (min) | frame age p50 / p95 ms | CPU %% | detector ms/frame | "
             "ms/batch (frames) | frames dropped at read / stream | MOTA / IDF1 TUD-Campus |")
    log.info("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        log.info("| %s | %d | %.1f (%.1f) | %.0f / %.0f | %.0f | %.0f | %.0f (%.1f) | %d / %d | %.1f / %.1f |",
                 r["backend"], r["cams"], r["fps"], r["fps_min"], r["age_p50"], r["age_p95"], r["cpu"],
                 r["frame_ms"], r["batch_ms"], r["batch"], r["dropped_read"], r["dropped_stream"], r["mota"],
                 r["idf1"])
    if args.repeat > 1:  # run-to-run noise: spread of fps/cam and p95 per configuration
        keys = sorted({(r["backend"], r["cams"]) for r in rows}, key=lambda k: (k[0], k[1]))
        for b, n in keys:
            rs = [r for r in rows if r["backend"] == b and r["cams"] == n]
            f = [r["fps"] for r in rs]
            a = [r["age_p95"] for r in rs]
            log.info("noise %s x %d: fps/cam %.1f..%.1f, p95 %.0f..%.0f ms over %d runs", b, n, min(f), max(f),
                     min(a), max(a), len(rs))
    return fastest[0]


def _decode_stamp(img: np.ndarray) -> int:
    """The live RTSP test source writes wall-clock ms as 40 16x16 black/white blocks in the top rows."""
    row = img[4:12, :640].mean(axis=(0, 2))
    bits = [(row[i * 16 + 4:i * 16 + 12].mean() > 128) for i in range(40)]
    return int("".join("1" if b else "0" for b in bits), 2)


def bench_live_latency(det: Detector, shared: Path, seconds: float) -> None:
    server = shared / "rtsp_test_server.py"
    if not (Path("/usr/bin/python3").exists() and server.exists()):
        log.info("live latency: skipped (no GStreamer RTSP test server)")
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["/usr/bin/python3", str(server), str(port), "live"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        proc.stdout.readline()
        cfg = AppConfig.model_validate({"cameras": [{"id": "live", "source": f"rtsp://127.0.0.1:{port}/cam"}],
                                        "api": {"mjpeg_fps": 60}})
        lat: list[float] = []

        def tap(image, t_out):
            stamp = _decode_stamp(image)
            # 40 bits of milliseconds wrap (2**40 ms ~ 35 years): compare modulo
            delay = (int(t_out * 1000) - stamp) % (1 << 40)
            if delay < 60_000:
                lat.append(delay)

        p = _run_pipeline(cfg, det, seconds, tap)
        if lat:
            a = np.array(lat[5:] or lat)
            s = p.metrics.summary("live")
            log.info("live RTSP camera (640x480 @25fps, H.264): glass-to-annotated-frame p50 %.0f ms, p95 %.0f ms, "
                     "max %.0f ms over %d frames; processed %.1f fps", np.percentile(a, 50), np.percentile(a, 95),
                     a.max(), len(a), s["fps"])
        else:
            log.info("live latency: no decodable frames")
    finally:
        proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15.0, help="measured seconds per configuration")
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--backends", default="torch,onnxruntime,openvino,int8",
                    help="comma list of torch, onnxruntime, openvino, int8 (onnxruntime static int8)")
    ap.add_argument("--cameras", default="1,3,8")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration (reports the spread)")
    ap.add_argument("--input-size", type=int, default=None, help="detector input side (default 512)")
    ap.add_argument("--cache-dir", default=None, help="ONNX export cache (default: the user cache dir)")
    ap.add_argument("--skip-live", action="store_true", help="no live RTSP latency run")
    ap.add_argument("--strides", default=None, help="only the detection-stride table, e.g. 1,2,3,adaptive,async "
                    "(first of --backends, --cameras)")
    ap.add_argument("--checkpoint", help="stride table: a `dishtrack train` checkpoint instead of the bundled "
                    "detector (speed only; its accuracy on video: bench/checkout_video_eval.py --stride/--latency)")
    ap.add_argument("--video", help="stride table with --checkpoint: the cameras' video (e.g. a make-video output)")
    args = ap.parse_args()
    if args.strides:
        bad = [x for x in args.strides.split(",") if x not in ("adaptive", "async") and not (x.isdigit() and int(x) >= 1)]
        if bad:
            ap.error(f"--strides {','.join(bad)}: each is a k (1, 2, ...), adaptive or async")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        ap.error(f"--checkpoint {args.checkpoint}: no such file")
    if args.video and not Path(args.video).is_file():
        ap.error(f"--video {args.video}: no such file")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("dishtrack").setLevel(logging.WARNING)
    shared = Path(args.shared)
    video = ROOT / "service" / "assets" / "sample_tud_campus.mp4"
    log.info("machine: %s, %d CPUs (load avg %.1f), torch %s (%d threads), CUDA %s",
             platform.processor() or platform.machine(), os.cpu_count(), os.getloadavg()[0], torch.__version__,
             torch.get_num_threads(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
    if args.strides:
        bench_strides(args, shared, video)
        return
    bench_tracker(shared)
    det = bench_table(args, shared, video)
    if det is not None:
        bench_detector(det, video)
        if not args.skip_live:
            bench_live_latency(det, shared, args.seconds)
    log.info("peak RSS: %.0f MiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


if __name__ == "__main__":
    main()

"""dishtrack benchmark: prints per-camera fps, frame age p50/p95, tracker Hz,
detector batch timings and, with the GStreamer RTSP test server, glass-to-
annotated-frame latency on a live camera whose frames carry their capture time.

    python bench/benchmark.py [--seconds 20] [--shared ../shared]

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
        log.info("detector: batch %d: %.0f ms/batch, %.1f frames/s (%s, input %d)", bs, dt * 1000, bs / dt,
                 det.device, det.input_size)


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
    time.sleep(seconds)
    p.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    return p


def bench_cameras(det: Detector, video: Path, n_cams: int, seconds: float) -> None:
    cfg = AppConfig.model_validate({
        "cameras": [{"id": f"cam{i}", "source": str(video), "loop": True, "realtime": True} for i in range(n_cams)],
        "api": {"mjpeg_fps": 25},
    })
    p = _run_pipeline(cfg, det, seconds)
    for cid, r in p.readers.items():
        s = p.metrics.summary(cid)
        st = r.status()
        log.info("pipeline %d cam(s) @25fps source: %s processed %.1f fps, frame age p50 %.0f ms p95 %.0f ms, "
                 "read %d dropped %d", n_cams, cid, s["fps"], 1000 * s["frame_age_p50_s"],
                 1000 * s["frame_age_p95_s"], st.frames_read, st.frames_dropped)


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
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("dishtrack").setLevel(logging.WARNING)
    shared = Path(args.shared)
    video = ROOT / "service" / "assets" / "sample_tud_campus.mp4"
    log.info("machine: %s, %d CPUs, torch %s (%d threads), CUDA %s", platform.processor() or platform.machine(),
             os.cpu_count(), torch.__version__, torch.get_num_threads(),
             torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
    bench_tracker(shared)
    det = Detector(DetectorConfig(device=args.device))
    bench_detector(det, video)
    for n in (1, 3):
        bench_cameras(det, video, n, args.seconds)
    bench_live_latency(det, shared, args.seconds)
    log.info("peak RSS: %.0f MiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


if __name__ == "__main__":
    main()

"""What API load does to pipeline throughput (issue 7.4).

Starts ``dishtrack run`` on the sample video (looping, paced at 25 fps; the
detector is the bottleneck, so processed fps is the pipeline's throughput),
measures processed frames/s from ``/metrics`` unloaded, then while a load
generator in another process sends a fixed rate of API requests (a mix of
/health, /events, /cameras, /cameras/cam0/tracks, /metrics, /readyz over
keep-alive connections), and prints the table:

    python bench/api_load.py [--rate 500] [--seconds 20] [--service-cpus 0] [--load-cpus 1] [--cycles 1]

``--cycles N`` alternates N unloaded and N loaded windows (then one more unloaded),
and also rates each loaded window against the mean of the unloaded windows just
before and after it: on a machine shared with other jobs their load drifts over
a minute as much as the effect measured, and bracketing cancels slow drift.

``--service-cpus`` / ``--load-cpus`` pin the two processes (taskset lists) so the
generator does not simply take the service's CPU: what is measured is the
contention inside the service process. Numbers go to README.md ("API load").
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VIDEO = "builtin:sample_tud_campus.mp4"  # the shipped sample (MOT15 TUD-Campus, 640x480, 25 fps)
# the generator is one client of its own (per-client rate limits: rate_limit.*), the fps probe another
LOAD_ADDR = "127.0.0.2"
PATHS = ["/health", "/events?limit=50", "/cameras", "/cameras/cam0/tracks", "/metrics", "/readyz"]


def processed(base: str) -> float:
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith('dishtrack_frames_processed_total{camera="cam0"}'))


def cpu_seconds(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, all threads


def measure_fps(base: str, seconds: float, cpu: list[float] | None = None, pid: int | None = None) -> float:
    """Processed frames/s over ``seconds``; the service's CPU use (cores) over it is appended to ``cpu``:
    pinned to an otherwise idle core it is ~1.0, and less means other jobs shared that core."""
    n0, t0, c0 = processed(base), time.monotonic(), cpu_seconds(pid) if pid else 0.0
    time.sleep(seconds)
    took = time.monotonic() - t0
    if cpu is not None and pid:
        cpu.append((cpu_seconds(pid) - c0) / took)
    return (processed(base) - n0) / took


async def _load(port: int, rate: float, seconds: float, conns: int) -> dict:
    """Open-loop: request k starts at t0 + k/rate (late ones at once), over ``conns`` keep-alive sockets."""
    t0 = time.monotonic() + 0.2
    total = int(rate * seconds)
    next_k = 0
    lat: list[float] = []
    status: dict[int, int] = {}
    errors = 0

    async def worker() -> None:
        nonlocal next_k, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(LOAD_ADDR, 0))
        while next_k < total:
            k = next_k
            next_k += 1
            delay = t0 + k / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            path = PATHS[k % len(PATHS)]
            start = time.monotonic()
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                code = int(head.split(b" ", 2)[1])
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError, StopIteration, ValueError):
                errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(LOAD_ADDR, 0))
                continue
            lat.append(time.monotonic() - start)
            status[code] = status.get(code, 0) + 1
        writer.close()

    await asyncio.gather(*(worker() for _ in range(conns)))
    took = time.monotonic() - t0
    lat.sort()
    return {"sent": total, "done": len(lat), "errors": errors, "seconds": took, "status": status, "lat": lat}


def _load_proc(port: int, rate: float, seconds: float, conns: int, cpus: str | None, out) -> None:
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    out.put(asyncio.run(_load(port, rate, seconds, conns)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=500.0, help="API requests per second")
    ap.add_argument("--seconds", type=float, default=20.0, help="measurement window per phase")
    ap.add_argument("--conns", type=int, default=32, help="keep-alive connections of the load generator")
    ap.add_argument("--service-cpus", help="taskset CPU list for the service, e.g. 0")
    ap.add_argument("--load-cpus", help="CPU list for the load generator, e.g. 1")
    ap.add_argument("--python", default=sys.executable, help="python whose dishtrack is run (compare builds)")
    ap.add_argument("--config", help="extra YAML merged over the bench config (e.g. detector settings)")
    ap.add_argument("--cycles", type=int, default=1, help="unloaded/loaded window pairs (bracketed ratio)")
    args = ap.parse_args()

    import yaml

    tmp = Path(tempfile.mkdtemp(prefix="api_load_"))
    port = int(os.environ.get("API_LOAD_PORT", "18931"))
    cfg = {"cameras": [{"id": "cam0", "source": VIDEO, "loop": True, "realtime": True}],
           "detector": {"device": "cpu"},
           "zones": [{"id": "z0", "camera": "cam0", "line": {"p1": [0.5, 0.0], "p2": [0.5, 1.0]}}],
           "storage": {"sqlite_path": str(tmp / "events.sqlite3")}, "api": {"port": port}}
    if args.config:
        for k, v in yaml.safe_load(Path(args.config).read_text()).items():
            cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [args.python, "-m", "dishtrack.service.cli", "--log-level", "WARNING", "run", "--config", str(tmp / "config.yaml")]
    if args.service_cpus:
        cmd = ["taskset", "-c", args.service_cpus] + cmd
    log = open(tmp / "service.log", "w")
    svc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if processed(base) >= 20:
                    break
            except Exception:  # noqa: BLE001 - not up yet
                if svc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"service did not start; see {tmp / 'service.log'}")
            time.sleep(0.5)
        unloaded, loaded, loads = [], [], []
        cpu_u: list[float] = []
        cpu_l: list[float] = []
        for _ in range(args.cycles):
            unloaded.append(measure_fps(base, args.seconds, cpu_u, svc.pid))
            q: mp.Queue = mp.Queue()
            gen = mp.Process(target=_load_proc, args=(port, args.rate, args.seconds + 4, args.conns, args.load_cpus, q))
            gen.start()
            time.sleep(2.0)  # let the load reach its rate
            loaded.append(measure_fps(base, args.seconds, cpu_l, svc.pid))
            loads.append(q.get(timeout=args.seconds + 120))
            gen.join()
        after = measure_fps(base, min(args.seconds, 10) if args.cycles == 1 else args.seconds, cpu_u, svc.pid)
    finally:
        svc.terminate()
        svc.wait(30)
    around = unloaded[1:] + [after]  # the unloaded window after each loaded one
    bracketed = [lo / ((u0 + u1) / 2) for lo, u0, u1 in zip(loaded, unloaded, around)]
    # one cycle: against the unloaded phase before (as before --cycles); more: bracketed, mean over cycles
    ratio = (loaded[0] / unloaded[0] if unloaded[0] else float("nan")) if args.cycles == 1 \
        else sum(bracketed) / len(bracketed)
    lat = sorted(x for ld in loads for x in ld["lat"])
    status: dict[int, int] = {}
    for ld in loads:
        for code, n in ld["status"].items():
            status[code] = status.get(code, 0) + n
    rate = sum(ld["done"] for ld in loads) / sum(ld["seconds"] for ld in loads)
    print(f"API load bench: {os.cpu_count()} CPUs, service on CPUs {args.service_cpus or 'all'}, "
          f"load generator on CPUs {args.load_cpus or 'all'}, {args.seconds:g} s per window, {args.cycles} cycle(s)")
    print("| phase | pipeline fps | API req/s done | API p50 / p99 ms | API errors |")
    print("|---|---|---|---|---|")
    print(f"| unloaded | {sum(unloaded) / len(unloaded):.2f} | 0 | - | - |")
    print(f"| {args.rate:g} req/s offered | {sum(loaded) / len(loaded):.2f} ({ratio:.0%}) | {rate:.0f} | "
          f"{1000 * lat[len(lat) // 2]:.1f} / {1000 * lat[int(len(lat) * 0.99)]:.1f} | "
          f"{sum(ld['errors'] for ld in loads)} |")
    print(f"| after the load | {after:.2f} | 0 | - | - |")
    print("status codes:", json.dumps(status))
    print("windows: unloaded", " ".join(f"{u:.2f}" for u in unloaded + [after]),
          "| loaded", " ".join(f"{lo:.2f}" for lo in loaded))
    print("service CPU (cores): unloaded", " ".join(f"{c:.2f}" for c in cpu_u),
          "| loaded", " ".join(f"{c:.2f}" for c in cpu_l))
    print("loaded / mean of the unloaded windows around it:", " ".join(f"{b:.0%}" for b in bracketed),
          f"(mean {sum(bracketed) / len(bracketed):.0%})")
    return 0 if ratio >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())

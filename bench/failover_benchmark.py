"""Failover time of camera sharding (issue 9 target: a dead node's cameras picked up <= 15 s).

Three real ``dishtrack run`` nodes share one config (3 file cameras: the shared TUD video,
looped in real time; PostgreSQL started from the Debian package unless --pg-url). Each cycle
SIGKILLs the node holding the next camera, measures until every camera is held by a live
node and the moved cameras deliver frames there, restarts the killed node and waits until
the cameras are spread again. At the end: events stored, and that their ids are unique.

    python bench/failover_benchmark.py [--cycles 5] [--lease 10] [--heartbeat 3]
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
VIDEO = Path(os.environ.get("DISHTRACK_SHARED", ROOT.parent / "shared")) / "data/video/tud_campus_640x480_25fps_h264.mp4"
CAMS = ["c0", "c1", "c2"]


class Node:
    def __init__(self, name: str, cfg: dict, workdir: Path) -> None:
        import servers

        self.name, self.dir = name, workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = servers.free_port()
        cfg = {**cfg, "api": {"port": self.port, "cache_s": 0},
               "cluster": {**cfg["cluster"], "node_id": name}}
        (self.dir / "config.yaml").write_text(yaml.safe_dump(cfg))
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Node":
        self.proc = subprocess.Popen(["dishtrack", "run", "--config", str(self.dir / "config.yaml")],
                                     stdout=open(self.dir / "service.log", "a"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        return self

    def cameras(self) -> list[dict] | None:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/cameras", timeout=2).json()
        except httpx.HTTPError:
            return None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def view(nodes: list[Node]) -> tuple[dict, dict]:
    """(camera -> holder, camera -> frames read on its holder) from the live nodes' /cameras."""
    holder, frames = {}, {}
    for n in nodes:
        for c in n.cameras() or []:
            if c["state"] != "remote" and c["node"] == n.name:
                holder[c["camera_id"]], frames[c["camera_id"]] = n.name, c["frames_read"]
    return holder, frames


def wait(pred, timeout: float, step: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (v := pred()):
            return v
        time.sleep(step)
    raise TimeoutError


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--lease", type=float, default=10.0)
    ap.add_argument("--heartbeat", type=float, default=3.0)
    ap.add_argument("--pg-url")
    args = ap.parse_args()
    pg = None
    url = args.pg_url
    if url is None:
        import servers

        pg = servers.PgServer().start()
        url = pg.create_db("failover")
    work = Path(tempfile.mkdtemp(prefix="dishtrack-failover-"))
    cfg = {"cameras": [{"id": c, "source": str(VIDEO), "realtime": True, "loop": True} for c in CAMS],
           "zones": [{"id": f"z{c}", "camera": c, "line": {"p1": [0.5, 0.0], "p2": [0.5, 1.0]},
                      "tray_gap_s": 0.3, "tray_max_s": 2.0} for c in CAMS],
           "storage": {"url": url}, "detector": {"device": "cpu", "input_size": 320},
           "cluster": {"lease_s": args.lease, "heartbeat_s": args.heartbeat}}
    nodes = [Node(f"n{i}", cfg, work).start() for i in (1, 2, 3)]
    times = []
    try:
        wait(lambda: sorted(view(nodes)[0].values()) == ["n1", "n2", "n3"], 240, 0.5)
        for k in range(args.cycles):
            holder, _ = view(nodes)
            victim = next(n for n in nodes if n.name == holder[CAMS[k % 3]])
            moved = [c for c, h in holder.items() if h == victim.name]
            live = [n for n in nodes if n is not victim]
            victim.kill()
            t0 = time.monotonic()

            def done():
                h, f = view(live)
                return set(h) == set(CAMS) and all(f.get(c, 0) > 0 for c in moved)

            wait(done, 4 * args.lease)
            dt = time.monotonic() - t0
            times.append(dt)
            print(f"cycle {k + 1}: killed {victim.name} holding {moved}: taken over and reading in {dt:.2f}s "
                  f"({view(live)[0]})", flush=True)
            victim.start()
            wait(lambda: sorted(view(nodes)[0].values()) == ["n1", "n2", "n3"], 240, 0.5)
    finally:
        for n in nodes:
            n.stop()
        with psycopg.connect(url) as c:
            total, distinct = c.execute("SELECT COUNT(*), COUNT(DISTINCT event_id) FROM events").fetchone()
            per_cam = dict(c.execute("SELECT camera_id, COUNT(*) FROM events GROUP BY 1 ORDER BY 1").fetchall())
        if pg is not None:
            pg.cleanup()
    print(f"lease_s={args.lease:g} heartbeat_s={args.heartbeat:g} (bound {args.lease + args.heartbeat:g}s): "
          f"failover min {min(times):.2f}s median {statistics.median(times):.2f}s max {max(times):.2f}s "
          f"over {len(times)} kills; events {total} (unique ids {distinct}), per camera {per_cam}")


if __name__ == "__main__":
    main()

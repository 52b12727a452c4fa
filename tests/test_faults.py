"""Fault scenarios of issue 7 (run with ``-m faults``): SIGTERM with viewers connected,
a full or read-only filesystem under the SQLite store, a frozen RTSP camera, retention.
Real ``dishtrack run`` subprocesses, the real GStreamer RTSP server, real SQLite on
real (tmpfs) filesystems, real HTTP and websocket clients."""
from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import VIDEO, free_port, wait_until

pytestmark = pytest.mark.faults


def metric(svc, name: str, labels: str = "") -> float:
    for line in svc.get("/metrics").text.splitlines():
        if line.startswith(name + (labels and "{" + labels + "}")) and not line.startswith("#"):
            head, value = line.rsplit(" ", 1)
            if head.split("{")[0] == name:
                return float(value)
    return 0.0


def stored_events(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT COUNT(*) FROM events").fetchone()[0]


class MjpegViewer(threading.Thread):
    """Reads an MJPEG stream until the server ends it; records parts and how it ended."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.parts, self.ended, self.error = url, 0, threading.Event(), None

    def run(self) -> None:
        try:
            with httpx.stream("GET", self.url, timeout=httpx.Timeout(10, read=30)) as r:
                for chunk in r.iter_bytes():
                    self.parts += chunk.count(b"\xff\xd8")
        except Exception as e:  # noqa: BLE001 - how it ended is the observation
            self.error = repr(e)
        self.ended.set()


class WsClient(threading.Thread):
    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.connected, self.ended, self.close_code = url, threading.Event(), threading.Event(), None

    def run(self) -> None:
        from websockets.sync.client import connect

        try:
            with connect(self.url, open_timeout=10) as ws:
                self.connected.set()
                try:
                    while True:
                        ws.recv(timeout=30)
                except Exception:  # noqa: BLE001 - ConnectionClosed carries the code
                    self.close_code = ws.close_code
        except Exception:  # noqa: BLE001
            pass
        self.ended.set()


# -- (1) SIGTERM with viewers connected -----------------------------------------------------------------------

def test_sigterm_with_mjpeg_and_websocket_clients_exits_fast_and_stores_the_open_tray(service, tmp_path):
    """Issue 7.1: one MJPEG viewer kept `dishtrack run` alive after SIGTERM and the open tray was lost.
    Trays here never close by time (gap 600 s), so any event in the store was flushed at shutdown."""
    db = tmp_path / "events.sqlite3"
    svc = service({
        "cameras": [{"id": "cam0", "source": str(VIDEO), "loop": True, "realtime": True}],
        "detector": {"device": "cpu", "input_size": 384},
        "zones": [{"id": "z0", "camera": "cam0", "line": {"p1": [0.5, 0.0], "p2": [0.5, 1.0]},
                   "tray_gap_s": 600, "tray_max_s": 600, "min_track_hits": 2}],
        "storage": {"sqlite_path": str(db)},
    })
    viewer = MjpegViewer(svc.base + "/cameras/cam0/stream.mjpg")
    ws = WsClient(f"ws://127.0.0.1:{svc.port}/ws/events")
    viewer.start()
    ws.start()
    assert ws.connected.wait(20)
    wait_until(lambda: viewer.parts >= 3, 60, what="MJPEG parts")
    wait_until(lambda: metric(svc, "dishtrack_open_tray_crossings") >= 1, 90, what="an open tray")
    assert stored_events(db) == 0  # nothing closed yet: the tray is open

    t0 = time.monotonic()
    svc.proc.send_signal(signal.SIGTERM)
    try:
        rc = svc.proc.wait(5.0)
    except subprocess.TimeoutExpired:
        svc.proc.kill()
        pytest.fail(f"still running 5 s after SIGTERM:\n{svc.log_path.read_text()[-3000:]}")
    took = time.monotonic() - t0
    print(f"SIGTERM -> exit in {took:.2f} s")
    assert rc in (0, -signal.SIGTERM), svc.log_path.read_text()
    assert took <= 5.0
    assert viewer.ended.wait(5) and ws.ended.wait(5)
    assert ws.close_code in (1001, 1012)  # going away / service restart: a close, not a dropped connection
    log = svc.log_path.read_text()
    assert "Traceback" not in log, log
    assert stored_events(db) >= 1, log  # the open tray was flushed and persisted

"""Shared fixtures. Real data comes from ../shared/data (MOT15 detections and
ground truth, a real video); the RTSP server is ../shared/rtsp_test_server.py
on Debian's GStreamer (installed by .ci/run / tests/run.sh)."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

import servers

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DISHTRACK_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
MOT_DETS = DATA / "mot15_sort_frcnn_dets" / "data" / "train"
MOT_GT = DATA / "motmetrics_pkg_data" / "motmetrics" / "data"
VIDEO = DATA / "video" / "tud_campus_640x480_25fps_h264.mp4"
RTSP_SERVER = SHARED / "rtsp_test_server.py"
sys.path.insert(0, str(ROOT / "bench"))


# session fixtures that train a model: whichever test asks first pays the training inside its own
# pytest-timeout (setup counts), and on a loaded 2-core runner that first epoch alone took 293 s
TRAINING_FIXTURES = {"tiny_checkpoint": 1200}


def pytest_collection_modifyitems(config, items):
    if not DATA.is_dir():
        pytest.exit(f"real test data not found at {DATA} (set DISHTRACK_SHARED)", returncode=4)
    for item in items:
        budget = max((TRAINING_FIXTURES[f] for f in getattr(item, "fixturenames", ()) if f in TRAINING_FIXTURES),
                     default=0)
        if budget and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(budget))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout: float, interval: float = 0.2, what: str = "condition"):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        try:
            last = pred()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - keep polling, report the last failure
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


@pytest.fixture(scope="session")
def sample_mkv(tmp_path_factory) -> Path:
    """The real video remuxed (no re-encode) into the .mkv the RTSP server serves."""
    gst = shutil.which("gst-launch-1.0")
    if gst is None:
        pytest.fail("gst-launch-1.0 missing: run tests/run.sh (installs Debian GStreamer)")
    out = tmp_path_factory.mktemp("media") / "tud_campus.mkv"
    subprocess.run([gst, "-q", "filesrc", f"location={VIDEO}", "!", "qtdemux", "!", "h264parse", "!",
                    "matroskamux", "!", "filesink", f"location={out}"], check=True, timeout=60)
    return out


class RtspServer:
    """The shared GStreamer RTSP test server as a killable subprocess."""

    def __init__(self, port: int, mode: str, media: Path | None, log_dir: Path) -> None:
        self.port, self.mode, self.media, self.log_dir = port, mode, media, log_dir
        self.proc: subprocess.Popen | None = None
        self.url = f"rtsp://127.0.0.1:{port}/cam"
        self.starts = 0

    def start(self) -> "RtspServer":
        self.starts += 1
        log = open(self.log_dir / f"rtsp-{self.starts}.log", "w")
        args = ["/usr/bin/python3", str(RTSP_SERVER), str(self.port), self.mode]
        if self.media:
            args.append(str(self.media))
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: "READY" in (self.log_dir / f"rtsp-{self.starts}.log").read_text(), 20,
                   what="RTSP server READY")
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def rtsp_server(tmp_path, sample_mkv):
    if not Path("/usr/bin/python3").exists():
        pytest.fail("/usr/bin/python3 (Debian) missing: run tests/run.sh")
    servers: list[RtspServer] = []

    def make(mode: str = "loop", port: int | None = None) -> RtspServer:
        s = RtspServer(port or free_port(), mode, sample_mkv if mode != "live" else None, tmp_path)
        servers.append(s)
        return s.start()

    yield make
    for s in servers:
        s.kill()


class ServiceProcess:
    """``dishtrack run`` in a subprocess with a given config."""

    def __init__(self, cfg: dict, tmp: Path, nice: int | None = None) -> None:
        """``nice``: the service's niceness (default: this process's; below it needs root)."""
        self.port = free_port()
        cfg.setdefault("api", {})["port"] = self.port
        cfg.setdefault("storage", {"sqlite_path": str(tmp / "events.sqlite3")})
        self.cfg_path = tmp / "config.yaml"
        self.cfg_path.write_text(yaml.safe_dump(cfg))
        self.log_path = tmp / "service.log"
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(["dishtrack", "run", "--config", str(self.cfg_path)],
                                     stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
                                     preexec_fn=None if nice is None else lambda: os.setpriority(os.PRIO_PROCESS, 0, nice))
        try:
            wait_until(self._ready, 90, what=f"service on {self.base} (log {self.log_path})")
        except BaseException:  # never leave a service running behind a failed start (it would load the CPU)
            self.proc.kill()
            self.proc.wait(10)
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"service exited {self.proc.returncode}:\n{self.log_path.read_text()}")
        with contextlib.suppress(httpx.HTTPError):  # up and serving; /health may rightly say 503 (camera down)
            return httpx.get(self.base + "/livez", timeout=2).status_code == 200
        return False

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.base + path, timeout=10, **kw)

    def stop(self) -> int:
        servers.stop_process(self.proc, 30)
        return self.proc.returncode


@pytest.fixture
def service(tmp_path):
    procs: list[ServiceProcess] = []

    def start(cfg: dict, nice: int | None = None) -> ServiceProcess:
        p = ServiceProcess(cfg, tmp_path, nice)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A dish checkpoint from `train` on tiny budgets (session-wide: test_train and test_backends share it)."""
    from dishtrack.models.train import TrainSettings, train

    out = tmp_path_factory.mktemp("ck") / "dishes.pt"
    rep = train(TrainSettings(data=str(DATA / "mealtray_kiosk_dev"), out=str(out), max_images=30, val_fraction=0.25,
                              loc_size=256, loc_epochs_head=1, loc_epochs_finetune=1, cls_epochs=2, cls_views=1,
                              progress=False))
    return out, rep


@pytest.fixture(scope="session")
def detector():
    from dishtrack.config import DetectorConfig
    from dishtrack.models.detector import Detector

    return Detector(DetectorConfig(device="cpu"))


def read_frames(n: int, start: int = 0):
    import cv2

    cap = cv2.VideoCapture(str(VIDEO))
    frames = []
    idx = 0
    while len(frames) < n:
        ok, img = cap.read()
        if not ok:
            break
        if idx >= start:
            frames.append((idx + 1, img))  # MOT frame numbers are 1-based
        idx += 1
    cap.release()
    return frames


@pytest.fixture
def chromium(tmp_path):
    """Headless Debian Chromium through chromedriver, with the flags this closed network needs
    (no background networking); quit at the end of the test."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver_bin):
        pytest.fail("chromium / chromedriver missing: run tests/run.sh (installs Debian chromium)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
              "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1280,1000"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(driver_bin), options=opts)
    drv.set_page_load_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()


def page_shows_stream_and_events(drv) -> list:
    """The web page in ``drv`` goes live, decodes MJPEG frames and lists a checkout event;
    returns the event elements."""
    from selenium.webdriver.common.by import By

    wait_until(lambda: drv.find_element(By.ID, "status").text == "live", 20, what="websocket live")
    img = wait_until(lambda: drv.find_element(By.CSS_SELECTOR, ".cam img"), 20, what="stream <img>")
    wait_until(lambda: drv.execute_script("return arguments[0].naturalWidth", img) == 640, 30,
               what="MJPEG frames decoded in the page")
    events = wait_until(lambda: drv.find_elements(By.CSS_SELECTOR, "#events li.event"), 60,
                        what="a checkout event in the page")
    return events


class AppServer:
    """The app under real uvicorn on 127.0.0.1 in a thread (lifespan: pipeline started and stopped)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app, self.port = app, free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base, self.ws = f"http://127.0.0.1:{self.port}", f"ws://127.0.0.1:{self.port}"

    def __enter__(self) -> "AppServer":
        self.thread.start()
        wait_until(lambda: self.server.started, 30, what="uvicorn started")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def get(self, path: str, token: str | None = None, **kw) -> httpx.Response:
        headers = kw.pop("headers", {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.get(self.base + path, headers=headers, timeout=10, **kw)


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL (Debian postgresql-15) for the session; skipped when it is not installed."""
    if (why := servers.pg_missing()) is not None:
        pytest.skip(why)
    pg = servers.PgServer().start()
    yield pg
    pg.cleanup()


@pytest.fixture
def pg_url(pg_server, request):
    """A fresh database per test on the session's PostgreSQL."""
    import hashlib

    return pg_server.create_db("t_" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12])

"""The running service (``dishtrack run``) on a real RTSP camera (GStreamer
test server streaming the real video), killed and restarted under it."""
import subprocess
import time

import cv2
import httpx
import numpy as np
import pytest
import yaml

from conftest import free_port, wait_until


def camera(svc):
    return svc.get("/health").json()["cameras"][0]


def processed(svc) -> float:
    for line in svc.get("/metrics").text.splitlines():
        if line.startswith('dishtrack_frames_processed_total{camera="door"}'):
            return float(line.split()[-1])
    return 0.0


def first_mjpeg_frame(svc) -> np.ndarray:
    with httpx.stream("GET", svc.base + "/cameras/door/stream.mjpg", timeout=20) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("multipart/x-mixed-replace")
        buf = b""
        for chunk in r.iter_bytes():
            buf += chunk
            start, end = buf.find(b"\xff\xd8"), buf.find(b"\xff\xd9")
            if start >= 0 and end > start:
                return cv2.imdecode(np.frombuffer(buf[start:end + 2], np.uint8), cv2.IMREAD_COLOR)
    raise AssertionError("no JPEG in the MJPEG stream")


@pytest.mark.rtsp
def test_service_recovers_when_the_rtsp_camera_is_killed_and_restarted(rtsp_server, service):
    cam = rtsp_server("loop")
    svc = service({
        "cameras": [{"id": "door", "source": cam.url, "stall_timeout_s": 2.0, "reconnect_initial_s": 0.2,
                     "reconnect_max_s": 1.0, "open_timeout_s": 3.0}],
        "zones": [{"id": "z", "camera": "door", "line": {"p1": [0.5, 0], "p2": [0.5, 1]}}],
    })
    wait_until(lambda: camera(svc)["state"] == "streaming" and processed(svc) >= 10, 60, what="streaming")
    img = first_mjpeg_frame(svc)
    assert img.shape == (480, 640, 3)

    live = cv2.imdecode(np.frombuffer(svc.get("/cameras/door/snapshot.jpg").content, np.uint8), cv2.IMREAD_COLOR)
    cam.kill()
    wait_until(lambda: camera(svc)["state"] in ("reconnecting", "stalled"), 20, what="outage noticed")
    assert svc.get("/health").json()["status"] == "degraded"

    def dimmed():
        snap = cv2.imdecode(np.frombuffer(svc.get("/cameras/door/snapshot.jpg").content, np.uint8),
                            cv2.IMREAD_COLOR)
        return snap.mean() < live.mean() / 2

    wait_until(dimmed, 10, what="the stream showing NO SIGNAL")
    before = processed(svc)
    time.sleep(2.0)  # stays down for a while; the service keeps answering
    assert svc.get("/health").status_code == 200

    cam.start()  # same port, same URL
    wait_until(lambda: camera(svc)["state"] == "streaming", 30, what="recovery")
    wait_until(lambda: processed(svc) >= before + 20, 60, what="frames flowing again")
    c = camera(svc)
    assert c["reconnects"] >= 1
    assert svc.get("/health").json()["status"] == "ok"
    assert svc.proc.poll() is None
    assert 'dishtrack_camera_reconnects{camera="door"}' in svc.get("/metrics").text
    # SIGTERM: graceful shutdown (uvicorn re-raises the signal afterwards, hence -15)
    assert svc.stop() in (0, -15)
    log = svc.log_path.read_text()
    assert "Application shutdown complete" in log and "Traceback" not in log


@pytest.mark.rtsp
def test_reader_detects_a_stalled_stream_and_recovers(rtsp_server):
    """SIGSTOP freezes the server with the connection open (no EOF, no frames):
    the reader must notice by frame-arrival time, count a stall, and reconnect
    once the camera answers again."""
    import os
    import signal

    from dishtrack.config import CameraConfig
    from dishtrack.service.ingest import CameraReader

    cam = rtsp_server("loop")
    r = CameraReader(CameraConfig(id="r", source=cam.url, stall_timeout_s=2.0, reconnect_initial_s=0.2,
                                  reconnect_max_s=1.0, open_timeout_s=2.0)).start()
    try:
        wait_until(lambda: r.status().frames_read > 25, 20, what="frames")
        os.kill(cam.proc.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: r.status().state.value == "stalled", 20, what="stall detected")
            wait_until(lambda: r.status().stalls >= 1, 20, what="stall counted")
        finally:
            os.kill(cam.proc.pid, signal.SIGCONT)
        n = r.status().frames_read
        wait_until(lambda: r.status().state.value == "streaming" and r.status().frames_read > n + 25, 30,
                   what="recovered after the stall")
        assert r.status().reconnects >= 1
        # nobody consumes the slot: it holds one frame, every other one was dropped and counted
        st = r.status()
        assert r.slot.take() is not None and st.frames_dropped >= st.frames_read - 2
    finally:
        r.stop()


def test_a_camera_that_cannot_be_opened_says_whether_the_server_or_the_stream_is_wrong(rtsp_server, tmp_path):
    """A wrong port and a wrong path both read 'cannot open rtsp://...' (FFmpeg's reason went to stderr,
    unnamed), and check-config called such cameras ready (RTSP probe)."""
    from dishtrack.config import CameraConfig
    from dishtrack.service.ingest import open_capture

    srv = rtsp_server("live")
    dead = free_port()
    with pytest.raises(ConnectionError, match="the server answers but would not play it"):
        open_capture(CameraConfig(id="c", source=srv.url.replace("/cam", "/nope"), open_timeout_s=5))
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{dead} takes no connection"):
        open_capture(CameraConfig(id="c", source=f"rtsp://admin:s3cret@127.0.0.1:{dead}/cam", open_timeout_s=5))
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"cameras": [{"id": "ok", "source": srv.url},
                                                {"id": "off", "source": f"rtsp://admin:s3cret@127.0.0.1:{dead}/cam"}],
                                    "zones": [{"id": f"z{c}", "camera": c, "line": {"p1": [0.5, 0], "p2": [0.5, 1]}}
                                              for c in ("ok", "off")],
                                    "storage": {"sqlite_path": str(tmp_path / "e.db")}}))
    r = subprocess.run(["dishtrack", "check-config", "--no-model", "--config", str(path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and f"camera off: source rtsp://***@127.0.0.1:{dead}/cam: 127.0.0.1:{dead} takes no " \
        "connection" in r.stderr, r.stderr
    assert "camera ok" not in r.stderr and "s3cret" not in r.stderr + r.stdout

"""The FastAPI app over the real pipeline (bundled detector, real video)."""
import time

import pytest
from fastapi.testclient import TestClient

from conftest import VIDEO, wait_until
from dishtrack.config import AppConfig
from dishtrack.service.api import build_runtime, create_app


def make_cfg(tmp_path, **camera):
    menu = tmp_path / "menu.yaml"
    menu.write_text("currency: EUR\nitems:\n  person: {name: Walk-in, price: 1.25}\n")
    return AppConfig.model_validate({
        "cameras": [{"id": "cam0", "source": str(VIDEO), "realtime": False, "loop": False, **camera}],
        "zones": [{"id": "z0", "camera": "cam0", "line": {"p1": [0.5, 0.0], "p2": [0.5, 1.0]},
                   "tray_gap_s": 0.3, "tray_max_s": 2.0}],
        "storage": {"sqlite_path": str(tmp_path / "events.sqlite3")},
        "menu": {"path": str(menu), "timezone": "UTC"},
        "auth": {"allowed_hosts": ["testserver"]},  # TestClient's Host header
    })


@pytest.fixture
def client(tmp_path, detector):
    app = create_app(build_runtime(make_cfg(tmp_path), detector=detector))
    with TestClient(app) as c:
        yield c


def test_offline_file_processes_every_frame_and_serves_events(client):
    rt = client.app.state.runtime
    # a websocket subscriber connected from the start receives events live
    with client.websocket_connect("/ws/events") as ws:
        first_live = ws.receive_json()
        assert rt.store.get(first_live["event_id"]) is not None  # persisted before published
    wait_until(rt.pipeline.finished.is_set, 180, what="pipeline to finish the file")
    health = client.get("/health").json()
    cam = health["cameras"][0]
    assert cam["state"] == "ended" and cam["frames_read"] == 71 and cam["frames_dropped"] == 0
    assert health["status"] == "ok" and health["detector_device"] == "cpu"

    all_events = client.get("/events", params={"limit": 1000}).json()
    assert all_events["next_after"] is None
    items = all_events["items"]
    assert len(items) >= 2, items
    assert sum(i["count"] for e in items for i in e["items"]) >= 3  # people crossing the middle line
    assert all(e["items"][0]["label"] == "person" for e in items)
    assert [e["seq"] for e in items] == sorted(e["seq"] for e in items)
    # receipts: priced from the menu, one person = 1.25 EUR
    for e in items:
        n = sum(i["count"] for i in e["items"])
        assert e["currency"] == "EUR" and e["total"] == pytest.approx(1.25 * n)
        assert all(i["name"] == "Walk-in" and not i["unpriced"] for i in e["items"])
        assert e["needs_review"] == any(i["needs_review"] for i in e["items"])
    reviewed = client.get("/events", params={"needs_review": True, "limit": 1000}).json()["items"]
    assert [e["seq"] for e in reviewed] == [e["seq"] for e in items if e["needs_review"]]

    p1 = client.get("/events", params={"limit": 1}).json()
    assert len(p1["items"]) == 1 and p1["next_after"] == p1["items"][0]["seq"]
    p2 = client.get("/events", params={"limit": 1, "after": p1["next_after"]}).json()
    assert p2["items"][0]["seq"] > p1["items"][0]["seq"]
    assert client.get("/events", params={"camera": "nope"}).json()["items"] == []
    assert client.get("/events", params={"label": "bowl"}).json()["items"] == []
    assert len(client.get("/events", params={"label": "person"}).json()["items"]) == len(items)
    assert client.get("/events", params={"limit": 0}).status_code == 422
    assert client.get("/events", params={"since": 10, "until": 5}).status_code == 422
    assert client.get("/events", params={"since": 10, "until": 10}).json()["items"] == []

    one = client.get(f"/events/{items[0]['event_id']}")
    assert one.status_code == 200 and one.json() == items[0]
    assert client.get("/events/doesnotexist").status_code == 404

    # a reconnecting client replays what it missed, in order, with nothing lost
    with client.websocket_connect(f"/ws/events?after={items[0]['seq']}") as ws:
        replay = [ws.receive_json() for _ in range(len(items) - 1)]
    assert [e["seq"] for e in replay] == [e["seq"] for e in items[1:]]

    snap = client.get("/cameras/cam0/snapshot.jpg")
    assert snap.status_code == 200 and snap.content[:2] == b"\xff\xd8"
    assert client.get("/cameras/nope/stream.mjpg").status_code == 404
    tracks = client.get("/cameras/cam0/tracks").json()
    assert tracks["frame_index"] == 70

    metrics = client.get("/metrics").text
    assert 'dishtrack_frames_processed_total{camera="cam0"} 71.0' in metrics
    assert f'dishtrack_checkout_events_total{{camera="cam0",zone="z0"}} {float(len(items))}' in metrics
    assert "dishtrack_frame_age_seconds_bucket" in metrics
    assert "<title>dishtrack</title>" in client.get("/").text


def test_missing_video_file_reports_error_state(tmp_path, detector):
    cfg = make_cfg(tmp_path, source=str(tmp_path / "missing.mp4"))
    with TestClient(create_app(build_runtime(cfg, detector=detector))) as c:
        wait_until(lambda: c.get("/cameras").json()[0]["state"] == "error", 20, what="error state")
        cam = c.get("/cameras").json()[0]
        assert "does not exist" in cam["last_error"] and str(tmp_path / "missing.mp4") in cam["last_error"]


def test_unreachable_rtsp_is_degraded_and_retries_with_backoff(tmp_path, detector):
    from conftest import free_port

    cfg = make_cfg(tmp_path, source=f"rtsp://127.0.0.1:{free_port()}/cam", reconnect_initial_s=0.1,
                   reconnect_max_s=0.4, open_timeout_s=10)
    with TestClient(create_app(build_runtime(cfg, detector=detector))) as c:
        time.sleep(2.0)
        h = c.get("/health").json()
        assert h["status"] == "degraded"
        assert h["cameras"][0]["state"] == "reconnecting"
        assert "cannot open" in h["cameras"][0]["last_error"]


def test_shutdown_persists_the_open_tray(tmp_path, detector):
    """Trays never close on their own here (huge gap/max); stopping the service
    must still write the tray in progress to SQLite."""
    cfg = make_cfg(tmp_path).model_copy(deep=True)
    cfg = cfg.model_copy(update={"zones": [cfg.zones[0].model_copy(update={"tray_gap_s": 1e6, "tray_max_s": 1e6})]})
    app = create_app(build_runtime(cfg, detector=detector))
    with TestClient(app) as c:
        rt = c.app.state.runtime
        zone = rt.pipeline.zones["cam0"][0]
        wait_until(lambda: zone.assembler.pending >= 1, 120, what="a crossing in an open tray")
        assert c.get("/events").json()["items"] == []
    from dishtrack.service.store import EventStore

    store = EventStore(cfg.storage.sqlite_path)
    items = store.list().items
    assert len(items) == 1 and items[0]["items"][0]["count"] >= 1

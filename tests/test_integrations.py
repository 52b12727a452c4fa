"""Issue 9: PostgreSQL event store, MQTT and webhook sinks, with real servers started here
(Debian postgresql + mosquitto, installed by tests/run.sh; a test skips with the reason when
a binary is missing), a real HTTP receiver (stdlib http.server) and a real paho subscriber."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import psycopg
import pytest
from websockets.sync.client import connect as ws_connect

import servers
from conftest import VIDEO, AppServer, wait_until
from dishtrack.config import AppConfig, IntegrationsConfig
from dishtrack.service.api import build_runtime, create_app
from dishtrack.service.outbox import Outbox, build_outbox
from dishtrack.service.store import EventStore
from dishtrack.service.store_pg import SCHEMA_VERSION, PgEventStore
from dishtrack.tracking.types import CheckoutEvent, CheckoutItem

# The outage the issue names is 30 s. What the behaviour depends on is that the broker is gone
# across several failed reconnect attempts and backoff retries of the outbox while events keep
# coming; with the reconnect delay at 1 s a 4 s outage goes through the same states (connect
# refused, rows pending with growing backoff, reconnect, woken delivery) as 30 s, only fewer
# times. DISHTRACK_BROKER_DOWN_S=30 runs the full length.
BROKER_DOWN_S = float(os.environ.get("DISHTRACK_BROKER_DOWN_S", "4"))
SECRET = "pos-shared-secret-0123456789"


def ev(i: int, cam: str = "cam0", label: str = "plate") -> CheckoutEvent:
    return CheckoutEvent(f"ev{i:05d}-{cam}", cam, "z0", 1000.0 + i, 1000.5 + i, (CheckoutItem(label, 1 + i % 3, 0.9),),
                         (i,), 0.9)


# -- servers

@pytest.fixture
def broker(tmp_path):
    if (why := servers.mosquitto_missing()) is not None:
        pytest.skip(why)
    b = servers.Mosquitto(tmp_path / "mosquitto").start()
    yield b
    b.stop()


class Subscriber:
    """A real MQTT client: persistent session (clean_session=False), QoS 1, reconnecting."""

    def __init__(self, port: int, topics: list[str]) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-sub-{port}", clean_session=False)
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = lambda c, u, f, rc, p: [c.subscribe(t, qos=1) for t in topics]
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.messages.append((msg.topic, msg.payload, msg.retain))

    def events(self) -> list[dict]:
        with self.lock:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith("/events")]

    def last(self, topic: str) -> bytes | None:
        with self.lock:
            got = [p for t, p, _ in self.messages if t == topic]
        return got[-1] if got else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class PosServer:
    """A point-of-sale stand-in: answers 503 to the first ``fail_first`` POSTs, then 200; keeps every request."""

    def __init__(self, fail_first: int = 0, port: int = 0) -> None:
        self.requests: list[tuple[int, dict, bytes]] = []  # (status answered, headers, body)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = 503 if len(outer.requests) < fail_first else 200
                outer.requests.append((status, dict(self.headers), body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/receipts"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def delivered(self) -> list[dict]:
        return [json.loads(b) for s, _, b in self.requests if s == 200]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def valid_signature(headers: dict, body: bytes) -> bool:
    want = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers["X-Dishtrack-Signature"], want)


# -- PostgreSQL store
def test_postgres_store_contract_migrations_retention_and_commit_ordered_seq(pg_url):
    s = PgEventStore(pg_url)
    assert s.schema_version == SCHEMA_VERSION and s.shared
    for i in range(7):
        s.save(ev(i, cam="cam0" if i % 2 == 0 else "cam1", label="bowl" if i == 3 else "plate"))
    p1 = s.list(limit=3)
    assert [r["event_id"][:7] for r in p1.items] == ["ev00000", "ev00001", "ev00002"] and p1.next_after == 3
    assert [r["seq"] for r in s.list(after=p1.next_after, limit=10).items] == [4, 5, 6, 7]
    assert [r["seq"] for r in s.list(camera_id="cam1").items] == [2, 4, 6]
    assert [r["seq"] for r in s.list(label="bowl").items] == [4]
    assert [r["seq"] for r in s.list(since=1002.0, until=1004.6).items] == [3, 4, 5]
    rec = s.get(ev(3, cam="cam1").event_id)
    assert rec["items"][0] == {"label": "bowl", "count": 1, "confidence": 0.9, "name": None, "unit_price": None,
                               "line_total": None, "unpriced": False, "needs_review": False}
    # a retried write: no duplicate, no store-specific exception, the stored record comes back
    assert s.save(ev(3, cam="cam1", label="bowl")) == rec and s.count() == 7
    s.close()
    s = PgEventStore(pg_url)  # reopening: migrations already applied, data kept
    assert s.schema_version == SCHEMA_VERSION and s.count() == 7 and s.last_seq() == 7
    with psycopg.connect(pg_url) as c:
        assert c.execute("SELECT COUNT(*) FROM dishtrack_schema").fetchone()[0] == len(
            __import__("dishtrack.service.store_pg", fromlist=["MIGRATIONS"]).MIGRATIONS)
        assert c.execute("SELECT COUNT(*) FROM event_labels").fetchone()[0] == 7
    # retention: age, then count; labels go with their events
    assert s.prune(ended_before=1002.0) == 2 and s.count() == 5
    assert s.prune(max_events=3) == 2 and [r["seq"] for r in s.list().items] == [5, 6, 7]
    with psycopg.connect(pg_url) as c:
        assert c.execute("SELECT COUNT(*) FROM event_labels").fetchone()[0] == 3
    assert s.prune(max_bytes=s.used_bytes() // 3) >= 1 and s.count() <= 2
    s.close()

    # two writers (two nodes) and a reader paging by cursor concurrently: the reader never skips an event
    # (with a bare sequence, a seq drawn first but committed last would be behind the reader's cursor)
    a, b, reader = PgEventStore(pg_url), PgEventStore(pg_url), PgEventStore(pg_url)
    written: list[str] = []

    def write(store, cam):
        for i in range(150):
            written.append(store.save(ev(100 + i, cam=cam))["event_id"])

    threads = [threading.Thread(target=write, args=(a, "nodeA")), threading.Thread(target=write, args=(b, "nodeB"))]
    seen, cursor = [], reader.last_seq()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) or cursor < reader.last_seq():
        page = reader.list(after=cursor, limit=7)
        seen += [r["event_id"] for r in page.items]
        cursor = page.items[-1]["seq"] if page.items else cursor
    assert len(seen) == 300 and sorted(seen) == sorted(written)
    for st in (a, b, reader):
        st.close()


def test_sqlite_store_returns_the_stored_record_for_a_duplicate(tmp_path):
    s = EventStore(tmp_path / "e.sqlite3")
    first = s.save(ev(1))
    assert s.save(ev(1)) == first and s.count() == 1 and not s.shared
    s.close()


# -- MQTT
def test_broker_down_events_delivered_later_in_order_once(broker, tmp_path):
    cfg = IntegrationsConfig.model_validate({
        "outbox_path": str(tmp_path / "outbox.sqlite3"), "retry_initial_s": 0.2, "retry_max_s": 2.0,
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "site": "canteen1", "reconnect_min_s": 1,
                 "reconnect_max_s": 1}})
    store = EventStore(tmp_path / "events.sqlite3")
    sub = Subscriber(broker.port, ["dishtrack/canteen1/+/events", "dishtrack/canteen1/availability"])
    wait_until(lambda: sub.client.is_connected(), 10, what="subscriber connected")
    time.sleep(0.3)  # subscription acknowledged
    box = build_outbox(cfg).start()
    try:
        for i in range(10):
            box.submit(store.save(ev(i)))
        wait_until(lambda: len(sub.events()) == 10, 10, what="events before the outage")
        assert sub.last("dishtrack/canteen1/availability") == b"online"

        broker.stop()
        t_down = time.monotonic()
        i = 10
        while time.monotonic() - t_down < BROKER_DOWN_S:  # events keep coming during the outage
            box.submit(store.save(ev(i, cam="cam1" if i % 2 else "cam0")))
            i += 1
            time.sleep(0.1)
        wait_until(lambda: box.pending() == i - 10, 5, what="outage events pending in the outbox file")
        mqtt_rows = box.summary()[0]
        assert mqtt_rows["pending"] == i - 10 and "not connected" in (mqtt_rows["last_error"] or "")
        assert len(sub.events()) == 10

        broker.start()  # same port, same persistence: the subscriber's session (and its queue) is back
        wait_until(lambda: len(sub.events()) >= i, 20, what="events produced during the outage")
        time.sleep(0.5)  # a duplicate would arrive now
        got = sub.events()
        assert [e["seq"] for e in got] == list(range(1, i + 1))  # nothing lost, in order, once
        assert len({e["event_id"] for e in got}) == i
        assert got == store.list(limit=1000).items
        topics = [t for t, _, _ in sub.messages if t.endswith("/events")]
        assert set(topics) == {"dishtrack/canteen1/cam0/events", "dishtrack/canteen1/cam1/events"}
        assert box.pending() == 0 and box.summary()[0]["delivered"] == i
        wait_until(lambda: sub.last("dishtrack/canteen1/availability") == b"online", 5, what="online again")
    finally:
        box.stop()
        sub.close()
    # a clean stop says offline (retained)
    late = Subscriber(broker.port, ["dishtrack/canteen1/availability"])
    wait_until(lambda: late.last("dishtrack/canteen1/availability") == b"offline", 10, what="retained offline")
    late.close()


# -- webhooks
def test_webhook_retries_with_backoff_and_delivers_once_signed(tmp_path):
    pos, broken = PosServer(fail_first=3), PosServer(fail_first=10**6)
    cfg = IntegrationsConfig.model_validate({
        "outbox_path": str(tmp_path / "outbox.sqlite3"), "retry_initial_s": 0.1, "retry_max_s": 1.0,
        "webhooks": [{"name": "pos", "url": pos.url, "secret": SECRET},
                     {"name": "legacy", "url": broken.url, "secret": SECRET, "max_attempts": 2}]})
    store = EventStore(tmp_path / "events.sqlite3")
    box = build_outbox(cfg).start()
    t0 = time.monotonic()
    try:
        records = [store.save(ev(i)) for i in range(5)]
        for r in records:
            box.submit(r)
        box.submit(records[0])  # submitted twice (a retried store write): sent once
        wait_until(lambda: len(pos.delivered()) == 5, 10, what="webhook deliveries")
        took = time.monotonic() - t0
        wait_until(lambda: box.pending() == 0, 10, what="legacy hook given up")
    finally:
        box.stop()
        pos.close()
        broken.close()
    assert [r["event_id"] for r in pos.delivered()] == [r["event_id"] for r in records]  # in order, once each
    assert pos.delivered() == records
    statuses = [s for s, _, _ in pos.requests]
    assert statuses == [503, 503, 503, 200, 200, 200, 200, 200]
    assert took >= 0.1 + 0.2 + 0.4 - 0.05  # exponential backoff between the failures
    for _, headers, body in pos.requests:
        assert valid_signature(headers, body) and headers["Content-Type"] == "application/json"
    assert [h["X-Dishtrack-Attempt"] for _, h, _ in pos.requests[:4]] == ["1", "2", "3", "4"]

    box = Outbox(cfg, [])  # the outbox file, read back: delivery status per event
    rows = box.deliveries(sink="webhook:pos")
    assert [(r["status"], r["attempts"]) for r in rows] == [("delivered", 4)] + [("delivered", 1)] * 4
    legacy = box.deliveries(sink="webhook:legacy", status="failed")
    assert legacy[0]["event_id"] == records[0]["event_id"] and legacy[0]["attempts"] == 2
    assert "HTTP 503" in legacy[0]["last_error"]
    box.stop()


def test_outbox_survives_a_restart_while_the_receiver_is_down(tmp_path):
    pos = PosServer()
    url = pos.url
    pos.close()  # nothing listens: connection refused
    cfg = IntegrationsConfig.model_validate({
        "outbox_path": str(tmp_path / "outbox.sqlite3"), "retry_initial_s": 0.1, "retry_max_s": 0.5,
        "webhooks": [{"name": "pos", "url": url, "secret": SECRET}]})
    store = EventStore(tmp_path / "events.sqlite3")
    box = build_outbox(cfg).start()
    records = [store.save(ev(i)) for i in range(3)]
    for r in records:
        box.submit(r)
    wait_until(lambda: box.pending() == 3 and box.summary()[0]["last_error"], 5, what="failed attempt recorded")
    assert "Connection refused" in box.summary()[0]["last_error"] or "Errno" in box.summary()[0]["last_error"]
    box.stop()  # the process ends with three events undelivered

    pos = PosServer(port=int(url.split(":")[2].split("/")[0]))  # the receiver back on its address
    box = build_outbox(cfg).start()  # the next process: delivers from the file
    try:
        wait_until(lambda: len(pos.delivered()) == 3, 10, what="delivery after restart")
    finally:
        box.stop()
        pos.close()
    assert pos.delivered() == records


def test_an_outbox_file_of_the_previous_version_is_kept_and_takes_revisions(tmp_path):
    """An outbox written by the version before corrections reached the sinks (one row per event):
    its undelivered row is still delivered, in order, and a correction of that event is then sent
    as its next revision (the old UNIQUE(sink, event_id) refused it)."""
    import sqlite3

    path = tmp_path / "outbox.sqlite3"
    store = EventStore(tmp_path / "events.sqlite3")
    r0, r1 = store.save(ev(0)), store.save(ev(1))
    with sqlite3.connect(path) as db:  # the version-1 schema, as that release wrote it
        db.executescript("""
            CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, sink TEXT NOT NULL, event_id TEXT NOT NULL,
                seq INTEGER NOT NULL, camera_id TEXT NOT NULL, zone_id TEXT NOT NULL, body TEXT NOT NULL,
                status TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0,
                next_at REAL NOT NULL DEFAULT 0, last_error TEXT, created_at REAL NOT NULL, delivered_at REAL,
                UNIQUE(sink, event_id));
            CREATE INDEX outbox_pending ON outbox(sink, status, id);
            CREATE INDEX outbox_event ON outbox(event_id);
            PRAGMA user_version=1;""")
        for r, status in ((r0, "delivered"), (r1, "pending")):
            db.execute("INSERT INTO outbox(sink, event_id, seq, camera_id, zone_id, body, status, attempts, created_at)"
                       " VALUES ('webhook:pos', ?, ?, 'cam0', 'z0', ?, ?, ?, ?)",
                       (r["event_id"], r["seq"], json.dumps(r), status, int(status == "delivered"), time.time()))
        db.execute("UPDATE sqlite_sequence SET seq = 5 WHERE name = 'outbox'")  # rows 3-5 delivered and pruned
    pos = PosServer()
    cfg = IntegrationsConfig.model_validate({"outbox_path": str(path), "retry_initial_s": 0.1,
                                             "webhooks": [{"name": "pos", "url": pos.url, "secret": SECRET}]})
    box = build_outbox(cfg).start()
    try:
        wait_until(lambda: len(pos.delivered()) == 1, 10, what="the old pending row")
        corrected = {**r1, "revision": 1, "corrected": True, "items": [{"label": "bread", "count": 1}]}
        box.submit(corrected)
        box.submit(corrected)  # re-sent (a replayed correction): delivered once
        box.submit(r1)  # the detected revision again: already delivered
        wait_until(lambda: len(pos.delivered()) == 2 and box.pending() == 0, 10, what="the correction")
        rows = box.deliveries(sink="webhook:pos")
    finally:
        box.stop()
        pos.close()
    assert pos.delivered() == [r1, corrected]
    assert [h["X-Dishtrack-Revision"] for _, h, _ in pos.requests] == ["0", "1"]
    assert [(r["id"], r["event_id"], r["revision"], r["status"]) for r in rows] == [
        (1, r0["event_id"], 0, "delivered"), (2, r1["event_id"], 0, "delivered"),
        (6, r1["event_id"], 1, "delivered")]  # ids go on after the pruned ones: ?after= paging skips nothing
    again = Outbox(cfg, [])  # opened again (another process, a restart): nothing migrated twice
    assert [(r["id"], r["revision"]) for r in again.deliveries(sink="webhook:pos")] == [(1, 0), (2, 0), (6, 1)]
    again.stop()


# -- the service
def service_cfg(tmp_path, **over) -> AppConfig:
    return AppConfig.model_validate({
        "cameras": [{"id": "cam0", "source": str(VIDEO), "realtime": False, "loop": False}],
        "zones": [{"id": "z0", "camera": "cam0", "line": {"p1": [0.5, 0.0], "p2": [0.5, 1.0]},
                   "tray_gap_s": 0.3, "tray_max_s": 2.0}],
        "storage": {"sqlite_path": str(tmp_path / "events.sqlite3")}, **over})


def test_two_nodes_on_postgres_events_reach_mqtt_the_pos_and_the_other_nodes_websocket(tmp_path, pg_url, broker,
                                                                                       detector):
    """Node A: the app on the real video with PostgreSQL storage, MQTT and a webhook (its first POST
    fails). Node B: another app on the same database (its own camera is not there: no frames, no CPU
    taken from A), whose websocket receives A's events live, in seq order, and again by ``?after=``."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pos = PosServer(fail_first=1)
    sub = Subscriber(broker.port, ["dishtrack/#"])
    wait_until(lambda: sub.client.is_connected(), 10, what="subscriber connected")
    cfg_a = service_cfg(tmp_path / "a", storage={"url": pg_url}, integrations={
        "outbox_path": str(tmp_path / "a" / "outbox.sqlite3"), "retry_initial_s": 0.1,
        "mqtt": {"host": "127.0.0.1", "port": broker.port},
        "webhooks": [{"name": "pos", "url": pos.url, "secret": SECRET}]})
    cfg_b = AppConfig.model_validate({"cameras": [{"id": "tillB", "source": str(tmp_path / "b" / "none.mp4"),
                                                   "realtime": False, "loop": False}],
                                      "storage": {"url": pg_url}})
    got_b: list[dict] = []
    try:
        with AppServer(create_app(build_runtime(cfg_b, detector=detector))) as node_b, \
                ws_connect(node_b.ws + "/ws/events", open_timeout=10) as ws_b:
            rt = build_runtime(cfg_a, detector=detector)
            with AppServer(create_app(rt)) as node_a:
                wait_until(rt.pipeline.finished.is_set, 180, what="node A to finish the video")
                assert rt.outbox.flush(15)
                events = node_a.get("/events", params={"limit": 1000}).json()["items"]
                deliveries = node_a.get("/admin/deliveries").json()
                config = node_a.get("/config").json()
                while len(got_b) < len(events):
                    got_b.append(json.loads(ws_b.recv(timeout=10)))
            with ws_connect(node_b.ws + "/ws/events?after=0", open_timeout=10) as ws:
                replay = [json.loads(ws.recv(timeout=10)) for _ in range(len(events))]
            on_b = httpx.get(node_b.base + "/events", params={"limit": 1000}).json()["items"]
    finally:
        pos.close()
    assert len(events) >= 2 and all(e["camera_id"] == "cam0" for e in events)
    # PostgreSQL holds them, readable by any SQL tool
    with psycopg.connect(pg_url) as c:
        rows = c.execute("SELECT seq, event_id, payload->'items'->0->>'label' FROM events ORDER BY seq").fetchall()
    assert [(r[0], r[1]) for r in rows] == [(e["seq"], e["event_id"]) for e in events] and rows[0][2] == "person"
    # node B: live websocket, replay and REST all show A's events, same order
    ids = [e["event_id"] for e in events]
    assert [e["event_id"] for e in got_b] == [e["event_id"] for e in replay] == [e["event_id"] for e in on_b] == ids
    assert [e["seq"] for e in got_b] == sorted(e["seq"] for e in got_b)
    # MQTT and the point-of-sale: each event once, in order, signed
    wait_until(lambda: len(sub.events()) == len(events), 10, what="all events over MQTT")
    assert [e["event_id"] for e in sub.events()] == ids
    assert {t for t, _, _ in sub.messages if t.endswith("/events")} == {"dishtrack/cam0/events"}
    assert sub.last("dishtrack/availability") in (b"online", b"offline")
    assert [e["event_id"] for e in pos.delivered()] == ids and pos.requests[0][0] == 503
    assert all(valid_signature(h, b) for _, h, b in pos.requests)
    by_sink = {s["sink"]: s for s in deliveries["sinks"]}
    assert by_sink["mqtt"]["delivered"] == by_sink["webhook:pos"]["delivered"] == len(events)
    assert by_sink["webhook:pos"]["pending"] == 0
    first = [r for r in deliveries["items"] if r["sink"] == "webhook:pos"][0]
    assert first["event_id"] == ids[0] and first["attempts"] == 2 and first["status"] == "delivered"
    # secrets masked in GET /config
    assert config["integrations"]["webhooks"][0]["secret"] == "***" and "postgres@" not in config["storage"]["url"]
    sub.close()


def test_a_corrected_receipt_reaches_mqtt_and_the_pos_as_its_next_revision(tmp_path, broker, detector):
    """A cashier's correction in the service goes where the detected receipt went: the point-of-sale
    and MQTT get the same event id with revision 1 after revision 0; the correction sent again
    (idempotent replay) is not delivered twice."""
    pos = PosServer()
    sub = Subscriber(broker.port, ["dishtrack/#"])
    wait_until(lambda: sub.client.is_connected(), 10, what="subscriber connected")
    cfg = service_cfg(tmp_path, integrations={
        "outbox_path": str(tmp_path / "outbox.sqlite3"), "retry_initial_s": 0.1,
        "mqtt": {"host": "127.0.0.1", "port": broker.port},
        "webhooks": [{"name": "pos", "url": pos.url, "secret": SECRET}]})
    rt = build_runtime(cfg, detector=detector)
    try:
        with AppServer(create_app(rt)) as node:
            wait_until(rt.pipeline.finished.is_set, 180, what="the video to finish")
            assert rt.outbox.flush(15)
            first = node.get("/events", params={"limit": 1000}).json()["items"][0]
            url = f"{node.base}/events/{first['event_id']}/corrections"
            body = {"revision": 1, "changes": [{"op": "add", "label": "bread"}]}
            assert httpx.post(url, json=body, timeout=10).status_code == 201
            assert httpx.post(url, json=body, timeout=10).status_code == 200  # replayed
            assert rt.outbox.flush(15)
            deliveries = node.get("/admin/deliveries", params={"event_id": first["event_id"]}).json()["items"]
            metrics = node.get("/metrics").text
            stored = len(node.get("/events", params={"limit": 1000}).json()["items"])
        for sink in ("mqtt", "webhook:pos"):  # rows per sink: every event once, plus the corrected revision
            assert f'dishtrack_outbox_rows{{sink="{sink}",status="delivered"}} {stored + 1}.0' in metrics, metrics
            assert f'dishtrack_outbox_oldest_pending_seconds{{sink="{sink}"}} 0.0' in metrics
        wait_until(lambda: [e.get("revision", 0) for e in sub.events() if e["event_id"] == first["event_id"]]
                   == [0, 1], 10, what="both revisions over MQTT")
    finally:
        pos.close()
        sub.close()
    sent = [e for e in pos.delivered() if e["event_id"] == first["event_id"]]
    assert [e.get("revision", 0) for e in sent] == [0, 1]
    assert {i["label"]: i["count"] for i in sent[1]["items"]}.get("bread") == 1 and sent[1]["corrected"] is True
    heads = [h for _, h, b in pos.requests if json.loads(b)["event_id"] == first["event_id"]]
    assert [h["X-Dishtrack-Revision"] for h in heads] == ["0", "1"] and all(
        valid_signature(h, b) for _, h, b in pos.requests)
    assert sorted((d["sink"], d["revision"], d["status"]) for d in deliveries) == [
        ("mqtt", 0, "delivered"), ("mqtt", 1, "delivered"), ("webhook:pos", 0, "delivered"),
        ("webhook:pos", 1, "delivered")]


def test_health_is_degraded_while_a_sink_falls_behind(tmp_path, detector):
    """An integrator's POS answering 500 left 14 events pending for 41 s while /health said ok (probe).
    Now degraded (still HTTP 200: events are stored) with the sink named, and ok again once delivered."""
    from fastapi.testclient import TestClient

    pos = PosServer(fail_first=6)
    cfg = service_cfg(tmp_path, integrations={
        "outbox_path": str(tmp_path / "outbox.sqlite3"), "retry_initial_s": 0.2, "retry_max_s": 1.0,
        "behind_s": 1.0, "webhooks": [{"name": "pos", "url": pos.url, "secret": SECRET}]})
    rt = build_runtime(cfg, detector=detector)
    try:
        with TestClient(create_app(rt), base_url="http://localhost") as c:
            def behind():
                body = c.get("/health").json()
                return body["status"] == "degraded" and body["sinks_behind"] and body
            body = wait_until(behind, 120, interval=0.3, what="degraded while the POS fails")
            (b,) = body["sinks_behind"]
            assert b["sink"] == "webhook:pos" and b["pending"] >= 1 and "503" in (b["last_error"] or ""), b
            assert c.get("/health").status_code == 200
            wait_until(lambda: rt.pipeline.finished.is_set() and rt.outbox.flush(1), 120, what="all delivered")
            body = c.get("/health").json()
            assert body["status"] == "ok" and body["sinks_behind"] == [], body
    finally:
        pos.close()


def test_deliveries_need_admin_and_secrets_are_masked():
    from dishtrack.service.admin import redacted_config
    from dishtrack.service.auth import required_role

    assert required_role("/admin/deliveries", "GET", client_loopback=True) == "admin"
    cfg = AppConfig.model_validate({
        "cameras": [{"id": "cam0", "source": str(VIDEO)}],
        "storage": {"url": "postgresql://dishtrack:hunter2@db.lan:5432/dishtrack"},
        "integrations": {"mqtt": {"host": "broker", "username": "u", "password": "mqtt-pass"},
                         "webhooks": [{"name": "pos", "url": "https://pos.lan/hook?token=abc", "secret": SECRET}]}})
    text = json.dumps(redacted_config(cfg))
    for secret in ("hunter2", "mqtt-pass", SECRET, "token=abc"):
        assert secret not in text
    assert cfg.integrations.webhooks[0].secret == SECRET  # masked in the view only
    default = AppConfig.model_validate({"cameras": [{"id": "cam0", "source": str(VIDEO)}]})
    assert default.storage.url is None and build_outbox(default.integrations) is None  # `dishtrack run` unchanged


def test_deliveries_of_an_unknown_sink_are_a_422_naming_the_sinks(tmp_path):
    """`?sink=pos` (the webhook's name; its sink is 'webhook:pos') answered 200 with no items, as if nothing
    had been sent, while a bad status was a 422."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from dishtrack.service.deliveries import deliveries_router

    cfg = IntegrationsConfig.model_validate({"outbox_path": str(tmp_path / "outbox.sqlite3"), "webhooks": [
        {"name": "pos", "url": f"http://127.0.0.1:{servers.free_port()}/hook", "secret": SECRET}]})
    box = build_outbox(cfg)
    app = FastAPI()
    app.include_router(deliveries_router(box))
    c = TestClient(app)
    r = c.get("/admin/deliveries", params={"sink": "pos"})
    assert r.status_code == 422 and "no sink 'pos'; the outbox has webhook:pos" in r.text, r.text
    assert c.get("/admin/deliveries", params={"sink": "webhook:pos"}).status_code == 200
    assert c.get("/admin/deliveries", params={"status": "bogus"}).status_code == 422


def test_mqtt_says_when_the_broker_cannot_be_reached_and_a_clean_stop_is_not_a_drop(tmp_path, caplog):
    """With the broker down at startup nothing was logged until a delivery failed; every clean stop logged
    'MQTT disconnected ...; reconnecting' as a warning although the process was exiting."""
    import logging

    if (why := servers.mosquitto_missing()) is not None:
        pytest.skip(why)
    from dishtrack.config import MqttConfig
    from dishtrack.service.sink_mqtt import MqttSink

    caplog.set_level(logging.INFO, logger="dishtrack.service.sink_mqtt")
    broker = servers.Mosquitto(tmp_path / "mosquitto")  # its port, not listening yet
    sink = MqttSink(MqttConfig(host="127.0.0.1", port=broker.port, reconnect_min_s=1, reconnect_max_s=1))
    sink.start()
    try:
        wait_until(lambda: f"MQTT cannot reach 127.0.0.1:{broker.port}" in caplog.text, 10, what="unreachable said")
        broker.start()
        wait_until(lambda: sink.connects == 1, 15, what="connected once the broker is up")
        assert caplog.text.count("cannot reach") == 1  # said once per outage, not per attempt
    finally:
        sink.close()
        broker.stop()
    assert "reconnecting" not in caplog.text, caplog.text


# -- a database outage on one node

def test_a_postgres_outage_on_one_node_spools_events_keeps_the_camera_and_health_says_why(tmp_path, detector,
                                                                                          caplog):
    """README: 'A database outage spools events in memory as for a full disk'. Tried by a new user: /health
    answered 500 with a traceback (its event count needs the database), the only node gave up its camera
    once its lease could not be renewed (no other node exists to take it: the trays passing meanwhile were
    never seen), and after the restart the first write on each old connection failed (an event's evidence
    crops lost). A real PostgreSQL stopped for three lease periods under a live-paced camera."""
    if (why := servers.pg_missing()) is not None:
        pytest.skip(why)
    from fastapi.testclient import TestClient

    pg = servers.PgServer().start()  # its own server: this test stops it
    try:
        cfg = AppConfig.model_validate({
            "cameras": [{"id": "cam0", "source": str(VIDEO), "realtime": True, "loop": True}],
            "zones": [{"id": "z0", "camera": "cam0", "line": {"p1": [0.5, 0.0], "p2": [0.5, 1.0]},
                       "tray_gap_s": 0.3, "tray_max_s": 2.0}],
            "storage": {"url": pg.url()}, "cluster": {"lease_s": 2, "heartbeat_s": 0.5},
            "corrections": {"dataset_dir": str(tmp_path / "corrections")}})
        rt = build_runtime(cfg, detector=detector)
        with TestClient(create_app(rt), base_url="http://localhost") as c:
            wait_until(lambda: rt.store.count() >= 1, 90, interval=0.5, what="a first event stored")
            pg.stop()
            down_at = time.monotonic()
            h = c.get("/health")
            assert h.status_code == 503, (h.status_code, h.text)  # was 500: Internal Server Error
            assert c.get("/metrics").status_code == 200  # was 500 too (the database's size)
            r = c.get("/events")
            assert r.status_code == 503 and "event store unreachable" in r.json()["detail"], r.text  # was 500
            assert "127.0.0.1" not in r.text  # psycopg's message (host, port, user) is logged, not served
            from starlette.websockets import WebSocketDisconnect

            with c.websocket_connect("ws://localhost/ws/events?after=0") as ws, pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()  # the replay cannot read the store: closed with the reason, not a traceback
            assert closed.value.code == 1011 and closed.value.reason == "event store unreachable"
            assert any("event store" in r for r in h.json()["failing"]), h.json()
            frames = c.get("/cameras").json()[0]["frames_read"]
            time.sleep(max(0.0, 3 * 2 - (time.monotonic() - down_at)))  # three lease periods
            cam = c.get("/cameras").json()[0]
            assert rt.pipeline.readers["cam0"].status().state.value == "streaming", cam
            assert rt.cluster is None or rt.cluster.leases.holds("cam0")
            wait_until(lambda: len(rt.pipeline.unsaved) >= 2, 60, interval=0.5,
                       what="events made (and spooled) while the database is down")
            assert c.get("/cameras").json()[0]["frames_read"] > frames
            pg.start()
            wait_until(lambda: not rt.pipeline.unsaved and c.get("/health").status_code == 200, 60, interval=0.5,
                       what="events written once the database is back")
            emitted = rt.pipeline.events_emitted
            stored = c.get("/events", params={"limit": 1000}).json()["items"]
            assert len(stored) >= emitted and len({e["event_id"] for e in stored}) == len(stored)
        with psycopg.connect(pg.url()) as conn:
            with_items = conn.execute("SELECT COUNT(*) FROM events WHERE payload->'items' != '[]'").fetchone()[0]
            with_crops = conn.execute("SELECT COUNT(DISTINCT event_id) FROM event_evidence").fetchone()[0]
        assert with_crops == with_items, (with_crops, with_items)  # no event's crops lost to a stale connection
        opened = [r for r in caplog.records if "camera cam0: streaming" in r.getMessage() and r.levelno >= 20]
        assert len(opened) == 1, len(opened)  # a looped file is not news at every loop (was INFO every 2.8 s)
    finally:
        pg.stop()
        pg.cleanup()

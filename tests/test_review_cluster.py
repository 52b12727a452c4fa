"""Corrections with PostgreSQL storage shared by several nodes (real PostgreSQL from tests/servers.py):
two apps on one database racing on the same revision (exactly one wins; the other gets 409, or 200
for the same changes), the race window forced open (a stale read committed after the winner), a
correction made on node A reaching node B's websocket with the event's seq, and the dataset folder
default for PostgreSQL storage."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import cv2
import httpx
import psycopg
import pytest
from websockets.sync.client import connect as ws_connect

from conftest import AppServer, read_frames
from dishtrack.config import AppConfig, StorageConfig
from dishtrack.service.api import build_runtime, create_app
from dishtrack.service.corrections import Change, CorrectionError, CorrectionStore, default_dataset_dir
from dishtrack.service.evidence import EvidenceUnit
from dishtrack.service.review_pg import PgReviewDb
from dishtrack.service.store_pg import PgEventStore
from dishtrack.tracking.types import CheckoutEvent, CheckoutItem


def _node_cfg(pg_url: str, name: str, tmp: Path) -> AppConfig:
    """A node on the shared database; its camera file does not exist (no frames, no CPU taken)."""
    return AppConfig.model_validate({
        "cameras": [{"id": "till", "source": str(tmp / "none.mp4"), "realtime": False, "loop": False}],
        "storage": {"url": pg_url}, "cluster": {"node_id": name}, "rate_limit": {"enabled": False},
        "corrections": {"dataset_dir": str(tmp / f"dataset-{name}")}})


def _fill(pg_url: str, n: int) -> list[dict]:
    """``n`` stored events of 2 dishes each, with real evidence crops (JPEGs cut from the test video)."""
    (_, img), = read_frames(1)
    jpeg = cv2.imencode(".jpg", img[100:260, 200:320])[1].tobytes()
    store = PgEventStore(pg_url)
    db = PgReviewDb(store)
    out, now = [], time.time()  # recent: retention keeps them
    for i in range(n):
        ev = CheckoutEvent(f"race{i}", "till", "z0", now - 60 + i, now - 59 + i,
                           (CheckoutItem("Plate", 1, 0.6), CheckoutItem("Soup", 1, 0.7)), (1, 2), 0.6)
        out.append(store.save(ev))
        db.save_evidence(ev.event_id, [EvidenceUnit(0, 1, "Plate", 0.6, jpeg, (10.0, 10.0, 100.0, 150.0)),
                                       EvidenceUnit(1, 2, "Soup", 0.7, jpeg, (5.0, 5.0, 110.0, 150.0))])
    db.close()
    store.close()
    return out


def _race(urls: list[str], bodies: list[dict]) -> list[httpx.Response]:
    """POST each body to its node at the same moment."""
    gate = threading.Barrier(len(urls))
    got: list = [None] * len(urls)

    def go(k):
        with httpx.Client(timeout=20) as c:
            gate.wait()
            got[k] = c.post(urls[k], json=bodies[k])
    threads = [threading.Thread(target=go, args=(k,)) for k in range(len(urls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return got


def _revision_of(ws, event_id: str, revision: int) -> dict:
    while True:
        msg = json.loads(ws.recv(timeout=15))
        if msg["event_id"] == event_id and msg.get("revision", 0) == revision:
            return msg


def test_two_nodes_race_on_one_revision_and_a_correction_reaches_the_other_nodes_websocket(pg_url, tmp_path,
                                                                                           detector):
    events = _fill(pg_url, 6)
    rt_a = build_runtime(_node_cfg(pg_url, "A", tmp_path), detector=detector)
    rt_b = build_runtime(_node_cfg(pg_url, "B", tmp_path), detector=detector)
    with AppServer(create_app(rt_a)) as a, AppServer(create_app(rt_b)) as b, \
            ws_connect(a.ws + "/ws/events", open_timeout=10) as ws_a, \
            ws_connect(b.ws + "/ws/events", open_timeout=10) as ws_b:
        # a correction made on node A: on both nodes' websockets, as the event's new revision, same seq
        first = events[0]
        r = httpx.post(f"{a.base}/events/{first['event_id']}/corrections", timeout=20,
                       json={"revision": 1, "changes": [{"op": "relabel", "unit": 0, "label": "Bread"}]})
        assert r.status_code == 201, r.text
        on_b, on_a = _revision_of(ws_b, first["event_id"], 1), _revision_of(ws_a, first["event_id"], 1)
        assert on_b == on_a and isinstance(on_b.pop("feed_seq"), int)  # a feed message: its place in the feed
        assert on_b == r.json()["event"] == b.get(f"/events/{first['event_id']}").json()
        assert on_b["seq"] == first["seq"] and on_b["corrected"] and {i["label"] for i in on_b["items"]} == {
            "Bread", "Soup"}
        assert [h["revision"] for h in b.get(f"/events/{first['event_id']}/revisions").json()["revisions"]] == [0, 1]
        assert b.get(f"/events/{first['event_id']}/evidence/0.jpg").content[:2] == b"\xff\xd8"  # crops: any node

        # both nodes correct the same events at once, with different changes: one 201, one 409 per event
        for ev in events[1:]:
            eid = ev["event_id"]
            urls = [f"{n.base}/events/{eid}/corrections" for n in (a, b)]
            got = _race(urls, [{"revision": 1, "changes": [{"op": "relabel", "unit": 0, "label": "Bread"}]},
                               {"revision": 1, "changes": [{"op": "remove", "unit": 1}]}])
            assert sorted(x.status_code for x in got) == [201, 409], [x.text for x in got]
            won = next(x for x in got if x.status_code == 201).json()["event"]
            assert a.get(f"/events/{eid}").json() == b.get(f"/events/{eid}").json() == won
            # the same changes from both: one creates, the other is the idempotent replay (200, same event)
            same = {"revision": 2, "changes": [{"op": "add", "label": "Drink"}]}
            got = _race(urls, [same, same])
            assert sorted(x.status_code for x in got) == [200, 201], [x.text for x in got]
            assert got[0].json()["event"] == got[1].json()["event"]
            assert [h["revision"] for h in a.get(f"/events/{eid}/revisions").json()["revisions"]] == [0, 1, 2]
            assert _revision_of(ws_b, eid, 2)["seq"] == ev["seq"]
    with psycopg.connect(pg_url) as c:
        # one revision row per number, correction rows only for the winners' changes (1 + 1 per event)
        assert c.execute("SELECT COUNT(*), COUNT(DISTINCT (event_id, revision)) FROM event_revisions").fetchone() \
            == (2 + 5 * 3, 2 + 5 * 3)
        assert c.execute("SELECT COUNT(*) FROM corrections").fetchone()[0] == 1 + 5 * 2
    # the winner's node wrote the relabelled crop as a training example (the first event: node A)
    assert (tmp_path / "dataset-A" / "crops" / f"{first['event_id']}_0.jpg").exists()


class _StaleReads(PgReviewDb):
    """Its next read of the event is as it was before another node's correction: the race window
    between reading and committing, held open."""

    def __init__(self, store, stale: dict) -> None:
        super().__init__(store)
        self.stale, self.stale_next = stale, False

    def event(self, event_id: str) -> dict | None:
        if self.stale_next:
            self.stale_next = False
            return self.stale
        return super().event(event_id)


def test_a_correction_built_on_a_stale_read_loses_at_commit(pg_url, tmp_path):
    ev, = _fill(pg_url, 1)
    store_a, store_b = PgEventStore(pg_url), PgEventStore(pg_url)
    node_a = CorrectionStore(PgReviewDb(store_a), tmp_path / "a")
    node_b = CorrectionStore(_StaleReads(store_b, store_b.get(ev["event_id"])), tmp_path / "b")
    try:
        assert node_a.correct(ev["event_id"], 1, [Change("relabel", 0, "Bread")], "anna").created
        node_b.db.stale_next = True
        with pytest.raises(CorrectionError) as e:  # B read revision 0: the commit's check stops it
            node_b.correct(ev["event_id"], 1, [Change("remove", 1)], "ben")
        assert e.value.status == 409
        node_b.db.stale_next = True
        again = node_b.correct(ev["event_id"], 1, [Change("relabel", 0, "Bread")], "ben")
        assert not again.created and again.record["corrected_by"] == "anna"
        assert [r.revision for r in node_a.db.revisions(ev["event_id"])] == [0, 1]
    finally:
        for s in (node_a.db, node_b.db, store_a, store_b):
            s.close()


def test_dataset_dir_default_for_postgresql_storage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_dataset_dir(StorageConfig(url="postgresql://u:pw@db.lan:5432/canteen")) == \
        tmp_path / "canteen_corrections"
    assert default_dataset_dir(StorageConfig(url="postgresql://db.lan/")) == tmp_path / "dishtrack_corrections"
    assert default_dataset_dir(StorageConfig(sqlite_path=str(tmp_path / "x" / "events.sqlite3"))) == \
        tmp_path / "x" / "events_corrections"

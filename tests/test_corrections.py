"""Evidence crops and cashier corrections (issue 10 item 3), against the real app (bundled detector on
the real video, auth on) under real uvicorn: crops per dish from the pipeline, the admin-only rule,
revisions idempotent by (event_id, revision), re-publishing on the websocket, the corrections dataset
read back by the importers `train --data` uses, and the page in headless Chromium."""
from __future__ import annotations

import json

import cv2
import httpx
import numpy as np
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from conftest import VIDEO, AppServer, wait_until
from dishtrack.config import AppConfig
from dishtrack.service.api import build_runtime, create_app
from dishtrack.service.auth import hash_token, new_token

VIEWER, ADMIN = new_token(), new_token()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, detector, tmp_path_factory):
    """The app on the real video, its events (crops, revisions) in SQLite or in the suite's real PostgreSQL."""
    tmp = tmp_path_factory.mktemp("corr")
    if request.param == "postgresql":
        storage = {"url": request.getfixturevalue("pg_server").create_db("t_corrections")}
    else:
        storage = {"sqlite_path": str(tmp / "events.sqlite3")}
    cfg = AppConfig.model_validate({
        "cameras": [{"id": "cam0", "source": str(VIDEO), "realtime": True, "loop": True}],
        "zones": [{"id": "z0", "camera": "cam0", "line": {"p1": [0.5, 0.0], "p2": [0.5, 1.0]}, "tray_gap_s": 0.3,
                   "tray_max_s": 2.0}],
        "storage": storage,
        "auth": {"enabled": True, "tokens": [{"name": "till1", "role": "viewer", "hash": hash_token(VIEWER)},
                                             {"name": "boss", "role": "admin", "hash": hash_token(ADMIN)}]},
        "rate_limit": {"enabled": False},
        "corrections": {"dataset_dir": str(tmp / "dataset")}})
    with AppServer(create_app(build_runtime(cfg, detector=detector))) as s:
        s.dataset = tmp / "dataset"
        yield s


def _h(token):
    return {"Authorization": f"Bearer {token}"}


def _post(s, event_id, body, token=ADMIN):
    return httpx.post(f"{s.base}/events/{event_id}/corrections", json=body, headers=_h(token) if token else {},
                      timeout=10)


def _events_with_crops(s, n=1):
    def ready():
        out = []
        for ev in s.get("/events?limit=1000", token=VIEWER).json()["items"]:
            if ev.get("revision", 0) == 0 and sum(i["count"] for i in ev["items"]) >= 1:
                units = s.get(f"/events/{ev['event_id']}/evidence", token=VIEWER).json()["units"]
                if units and all(u["crop"] for u in units):
                    out.append((ev, units))
        return out if len(out) >= n else None
    return wait_until(ready, 120, interval=0.5, what=f"{n} checkout events with evidence crops")


def test_each_event_keeps_one_crop_per_dish_from_the_pipeline(server):
    (ev, units), = _events_with_crops(server)[:1]
    assert len(units) == sum(i["count"] for i in ev["items"]) == len(ev["track_ids"])
    # the units add up to the receipt, label by label
    assert sorted(u["label"] for u in units) == sorted(i["label"] for i in ev["items"] for _ in range(i["count"]))
    r = server.get(units[0]["crop_url"], token=VIEWER)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    img = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and 8 <= max(img.shape[:2]) <= 160  # bounded: crop_max_px
    assert img.std() > 5  # a picture, not a blank
    assert server.get(f"/events/{ev['event_id']}/evidence/99.jpg", token=VIEWER).status_code == 404
    assert server.get("/events/nope/evidence", token=VIEWER).status_code == 404


def test_only_an_admin_corrects(server):
    (ev, units), = _events_with_crops(server)[:1]
    body = {"revision": 1, "changes": [{"op": "relabel", "unit": 0, "label": "bicycle"}]}
    assert _post(server, ev["event_id"], body, token=None).status_code == 401
    r = _post(server, ev["event_id"], body, token=VIEWER)
    assert r.status_code == 403 and "needs admin" in r.json()["detail"]
    assert server.get(f"/events/{ev['event_id']}", token=VIEWER).json().get("revision", 0) == 0
    assert server.get("/me", token=VIEWER).json() == {"name": "till1", "role": "viewer"}


def test_correction_is_a_new_revision_idempotent_republished_and_a_training_example(server):
    from dishtrack.models.importers import load_dataset

    (ev, units), = _events_with_crops(server)[:1]
    eid, seq = ev["event_id"], ev["seq"]
    n = len(units)
    body = {"revision": 1, "changes": [{"op": "relabel", "unit": 0, "label": "bicycle"}, {"op": "add", "label": "dog"}]}
    with ws_connect(f"{server.ws}/ws/events", additional_headers=_h(VIEWER), open_timeout=10) as ws:
        r = _post(server, eid, body)
        assert r.status_code == 201, r.text
        got = r.json()
        assert got["created"] and got["revision"] == 1
        # the websocket re-publishes the event: same seq, new revision
        while True:
            msg = json.loads(ws.recv(timeout=10))
            if msg["event_id"] == eid:
                break
        assert msg["seq"] == seq and msg["revision"] == 1 and msg["corrected_by"] == "boss"
    cur = server.get(f"/events/{eid}", token=VIEWER).json()
    counts = {i["label"]: i["count"] for i in cur["items"]}
    assert counts.get("bicycle") == 1 and counts.get("dog") == 1 and sum(counts.values()) == n + 1
    assert cur["revision"] == 1 and cur["corrected_by"] == "boss" and cur["needs_review"] is False
    listed = next(e for e in server.get("/events?limit=1000", token=VIEWER).json()["items"] if e["event_id"] == eid)
    assert listed == cur  # GET /events serves the latest revision
    assert any(e["event_id"] == eid for e in server.get("/events?label=bicycle&limit=1000", token=VIEWER)
               .json()["items"])
    hist = server.get(f"/events/{eid}/revisions", token=VIEWER).json()["revisions"]
    assert [h["revision"] for h in hist] == [0, 1]
    assert hist[0]["event"]["items"] == ev["items"] and hist[0]["corrected_by"] is None  # the original kept
    assert hist[1]["corrected_by"] == "boss" and hist[1]["changes"][0]["op"] == "relabel"
    assert hist[1]["units"][0]["model_label"] == units[0]["label"] and hist[1]["units"][0]["label"] == "bicycle"
    # idempotent by (event_id, revision): the same request again changes nothing
    again = _post(server, eid, body)
    assert again.status_code == 200 and again.json()["created"] is False and again.json()["event"] == cur
    assert len(server.get(f"/events/{eid}/revisions", token=VIEWER).json()["revisions"]) == 2
    # another correction under an existing or skipped revision number is a conflict
    other = {"revision": 1, "changes": [{"op": "remove", "unit": 0}]}
    assert _post(server, eid, other).status_code == 409
    assert _post(server, eid, {**other, "revision": 3}).status_code == 409
    assert _post(server, eid, {"revision": 2, "changes": [{"op": "remove", "unit": 42}]}).status_code == 422
    empty = {"revision": 2, "changes": [{"op": "relabel", "unit": 0, "label": ""}]}
    assert _post(server, eid, empty).status_code == 422
    assert _post(server, "nope", body).status_code == 404
    # the corrected crop is a labelled example in a dataset `train --data` reads
    data = load_dataset(server.dataset)
    assert data.format == "manifest" and not data.problems, [str(p) for p in data.problems]
    s = next(s for s in data.samples if s.image.name == f"{eid}_0.jpg")
    assert s.labels == ("bicycle",) and s.group == eid
    h, w = cv2.imread(str(s.image)).shape[:2]
    assert 0 <= s.boxes[0, 0] < s.boxes[0, 2] <= w and 0 <= s.boxes[0, 1] < s.boxes[0, 3] <= h
    # a second revision: remove the added dish; the label counts follow
    r2 = _post(server, eid, {"revision": 2, "changes": [{"op": "remove", "unit": n}]})
    assert r2.status_code == 201
    assert "dog" not in {i["label"] for i in r2.json()["event"]["items"]}


def _log_in(drv, server, token) -> None:
    """The page: redirected to /login, the token typed in, back on the page with its websocket live."""
    from selenium.webdriver.common.by import By

    drv.get(server.base + "/")
    wait_until(lambda: drv.current_url.endswith("/login"), 10, what="redirect to /login")
    drv.find_element(By.ID, "token").send_keys(token)
    drv.find_element(By.ID, "login").click()
    wait_until(lambda: drv.find_element(By.ID, "status").text == "live", 20, what="websocket live")


@pytest.mark.browser
def test_admin_corrects_a_receipt_in_the_page(server, chromium, tmp_path):
    from selenium.webdriver.common.by import By

    _events_with_crops(server)
    drv = chromium
    _log_in(drv, server, ADMIN)

    def editable():
        for li in drv.find_elements(By.CSS_SELECTOR, "#events li.event[data-revision='0']"):
            imgs = li.find_elements(By.CSS_SELECTOR, ".unit img")
            if imgs and li.find_elements(By.CSS_SELECTOR, ".label-input") and all(
                    drv.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) for i in imgs):
                return li
        return None

    li = wait_until(editable, 60, what="an event with its evidence crops and correction inputs")
    eid = li.get_attribute("data-event-id")
    # a refused correction says why in words (a 422's detail is a list: it read "[object Object]")
    add = li.find_element(By.CSS_SELECTOR, ".add-input")
    add.send_keys("x" * 70)
    li.find_element(By.CSS_SELECTOR, ".save-correction").click()
    err = li.find_element(By.CSS_SELECTOR, ".correction-error")
    wait_until(lambda: err.text or None, 10, what="the error line")
    assert err.text.startswith("422") and "64 characters" in err.text and "object" not in err.text, err.text
    add.clear()
    first = li.find_element(By.CSS_SELECTOR, ".label-input")
    first.clear()
    first.send_keys("bicycle")
    li.find_element(By.CSS_SELECTOR, ".save-correction").click()

    def corrected():
        el = drv.find_element(By.CSS_SELECTOR, f"#events li.event[data-event-id='{eid}']")
        return el if el.get_attribute("data-revision") == "1" and "bicycle" in el.text else None

    el = wait_until(corrected, 20, what="the corrected receipt (revision 1) in the page")
    assert "rev 1" in el.text and "boss" in el.text
    assert len(drv.find_elements(By.CSS_SELECTOR, f"#events li.event[data-event-id='{eid}']")) == 1
    stored = server.get(f"/events/{eid}", token=VIEWER).json()
    assert stored["revision"] == 1 and "bicycle" in {i["label"] for i in stored["items"]}
    drv.save_screenshot(str(tmp_path / "corrected.png"))


@pytest.mark.browser
def test_the_page_shows_a_correction_made_while_its_websocket_was_down(server, chromium):
    """The page's websocket drops and reconnects (1 s later); a correction committed in between, of an
    event the page shows, must still replace the receipt shown: it keeps its event's seq, so the
    reconnection's ?after= never brought it (the page kept the uncorrected receipt)."""
    from selenium.webdriver.common.by import By

    drv = chromium
    drv.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
        window.__sockets = [];
        const Native = window.WebSocket;
        window.WebSocket = function (url, protocols) {
          const ws = new Native(url, protocols); window.__sockets.push(ws); return ws; };
        window.WebSocket.prototype = Native.prototype;"""})  # the test can then drop the page's socket
    candidates = {ev["event_id"]: ev for ev, _ in _events_with_crops(server)}
    _log_in(drv, server, VIEWER)

    def shown():
        for li in drv.find_elements(By.CSS_SELECTOR, "#events li.event[data-revision='0']"):
            if li.get_attribute("data-event-id") in candidates:
                return li.get_attribute("data-event-id")
        return None

    eid = wait_until(shown, 30, what="an uncorrected event with evidence in the page")
    drv.execute_script("window.__sockets[window.__sockets.length - 1].close()")  # no message after this
    r = _post(server, eid, {"revision": 1, "changes": [{"op": "relabel", "unit": 0, "label": "unicycle"}]})
    assert r.status_code == 201, r.text

    def corrected():
        el = drv.find_element(By.CSS_SELECTOR, f"#events li.event[data-event-id='{eid}']")
        return el if el.get_attribute("data-revision") == "1" and "unicycle" in el.text else None

    wait_until(corrected, 20, what="the correction made while the websocket was down, in the page")
    urls = drv.execute_script("return window.__sockets.map(w => w.url)")
    assert len(urls) >= 2 and "revisions_after=" not in urls[0] and "revisions_after=" in urls[-1], urls


def test_evidence_keeper_keeps_the_best_frame_and_stays_bounded():
    """Real video frames, track snapshots as the tracker reports them: the crop follows the wholly
    visible, larger view; crops held per camera never exceed max_tracks; take() forgets them."""
    from conftest import read_frames
    from dishtrack.service.evidence import EvidenceKeeper
    from dishtrack.tracking.tracker import TrackUpdate
    from dishtrack.tracking.types import CheckoutEvent, CheckoutItem, Frame, Track, TrackState

    frames = [Frame("cam0", i, float(i), img) for i, img in read_frames(6)]

    def track(tid, box, label="person"):
        return Track(tid, "cam0", TrackState.CONFIRMED, box, 0, label, 0.8, 1.0, 5, 5, 0, ())

    keeper = EvidenceKeeper(crop_max_px=64, max_tracks=8)
    keeper.observe(frames[0], TrackUpdate("cam0", 0, 0.0, (track(1, (-60.0, 100.0, 60.0, 300.0)),), (), (640, 480)))
    half = keeper._crops["cam0"][1]
    keeper.observe(frames[1], TrackUpdate("cam0", 1, 1.0, (track(1, (200.0, 100.0, 320.0, 300.0)),), (), (640, 480)))
    whole = keeper._crops["cam0"][1]
    assert whole.quality > half.quality and whole.image.shape[0] == 64  # replaced, long side bounded
    keeper.observe(frames[2], TrackUpdate("cam0", 2, 2.0, (track(1, (210.0, 110.0, 300.0, 280.0)),), (), (640, 480)))
    assert keeper._crops["cam0"][1] is not None and keeper._crops["cam0"][1].quality == whole.quality  # smaller: kept
    for k in range(20):  # many tracks: the least recently seen are dropped
        keeper.observe(frames[3], TrackUpdate("cam0", 3, 3.0, (track(100 + k, (10.0 * k, 10.0, 10.0 * k + 50, 90.0)),),
                                              (), (640, 480)))
    assert keeper.held("cam0") == 8 and keeper.dropped == 13
    ev = CheckoutEvent("e", "cam0", "z", 0.0, 3.0, (CheckoutItem("person", 2, 0.8),), (119, 1), 0.8)
    units = keeper.take(ev)
    assert [u.jpeg is not None for u in units] == [True, False]  # track 1 was pushed out by the bound
    assert [u.label for u in units] == ["person", "person"] and keeper.held("cam0") == 7


def test_a_label_differing_only_in_case_or_spaces_is_the_known_dish(server):
    """A cashier typing " BICYCLE " means the detector's "bicycle": one dish in the counts, the
    analytics and the training examples (a second spelling made `enrol` refuse the dataset)."""
    (ev, units), = _events_with_crops(server)[:1]
    r = _post(server, ev["event_id"], {"revision": 1, "changes": [{"op": "relabel", "unit": 0, "label": " BICYCLE "},
                                                                   {"op": "add", "label": "Dog"}]})
    assert r.status_code == 201, r.text
    labels = {i["label"] for i in r.json()["event"]["items"]}
    assert {"bicycle", "dog"} <= labels and not {"BICYCLE", " BICYCLE ", "Dog"} & labels
    assert "bicycle" in server.get("/labels", token=VIEWER).json()["labels"]


def test_an_oversized_correction_is_refused_before_it_is_read(server):
    (ev, _), = _events_with_crops(server)[:1]
    long = _post(server, ev["event_id"], {"revision": 1, "changes": [{"op": "add", "label": "a" * 100_000}]})
    assert long.status_code == 422 and long.json()["detail"][0]["loc"][-1] == "label"  # names the field
    huge = {"revision": 1, "changes": [{"op": "add", "label": "a" * 5_000_000}]}  # over api.max_body_bytes
    r = _post(server, ev["event_id"], huge)
    assert r.status_code == 413 and len(r.content) < 1000
    # chunked, without a Content-Length: counted as it arrives
    r = httpx.post(f"{server.base}/events/{ev['event_id']}/corrections", headers={**_h(ADMIN),
                   "content-type": "application/json"}, content=iter([json.dumps(huge).encode()]), timeout=10)
    assert r.status_code == 413
    assert server.get(f"/events/{ev['event_id']}", token=VIEWER).json().get("revision", 0) == 0


def test_an_edited_manifest_does_not_lose_the_correction(server):
    """The operator edits manifest.jsonl (an editor's BOM, a half-written line): a later correction is
    still stored, published and written; the operator's lines are kept as they were."""
    (ev, units), = _events_with_crops(server)[:1]
    mf = server.dataset / "manifest.jsonl"
    server.dataset.mkdir(parents=True, exist_ok=True)
    before = mf.read_text(encoding="utf-8-sig") if mf.exists() else ""
    mf.write_text("\ufeff" + before + '{"image": "crops/half\n', encoding="utf-8")
    with ws_connect(f"{server.ws}/ws/events", additional_headers=_h(VIEWER), open_timeout=10) as ws:
        r = _post(server, ev["event_id"], {"revision": 1, "changes": [{"op": "relabel", "unit": 0, "label": "dog"}]})
        assert r.status_code == 201, r.text
        while (msg := json.loads(ws.recv(timeout=10)))["event_id"] != ev["event_id"]:
            pass
        assert msg["revision"] == 1
    assert not mf.read_bytes().startswith(b"\xef\xbb\xbf")  # read past the BOM (the first line parsed)
    text = mf.read_text(encoding="utf-8")
    assert '{"image": "crops/half' in text and all(ln in text for ln in before.splitlines())
    assert f'crops/{ev["event_id"]}_0.jpg' in text


def _revisions_from(ws, want: set[tuple[str, int]], seconds: float = 10) -> list[dict]:
    """Corrected revisions (revision > 0) off the websocket until every (event_id, revision) in ``want`` came."""
    got = []
    while not want <= {(m["event_id"], m["revision"]) for m in got}:
        msg = json.loads(ws.recv(timeout=seconds))
        if msg.get("revision", 0) > 0:
            got.append(msg)
    return got


def test_a_reconnecting_client_gets_the_corrections_it_missed(server):
    """A correction of an event the client already has keeps that event's seq, so ``?after=SEQ`` alone
    never replays it: a till that reconnected kept the uncorrected receipt. Every corrected revision
    carries ``feed_seq`` (commit order); ``?revisions_after=F`` replays those after F before the live
    feed, and ``GET /revisions?after=F`` pages them for REST pollers."""
    (e1, _), (e2, _) = _events_with_crops(server, 2)[:2]
    relabel = [{"op": "relabel", "unit": 0, "label": "dog"}]
    with ws_connect(f"{server.ws}/ws/events", additional_headers=_h(VIEWER), open_timeout=10) as ws:
        assert _post(server, e1["event_id"], {"revision": 1, "changes": relabel}).status_code == 201
        seen, = _revisions_from(ws, {(e1["event_id"], 1)})[-1:]
    f1 = seen["feed_seq"]
    assert isinstance(f1, int) and f1 >= 1
    last_seq = max(e["seq"] for e in server.get("/events?limit=1000", token=VIEWER).json()["items"])
    # while the client is away: a second revision of the first event, a first one of the second
    assert _post(server, e1["event_id"], {"revision": 2, "changes": [{"op": "remove", "unit": 0}]}).status_code == 201
    assert _post(server, e2["event_id"], {"revision": 1, "changes": relabel}).status_code == 201
    missed = {(e1["event_id"], 2), (e2["event_id"], 1)}
    url = f"{server.ws}/ws/events?after={last_seq}&revisions_after={f1}"
    with ws_connect(url, additional_headers=_h(VIEWER), open_timeout=10) as ws:
        got = _revisions_from(ws, missed)
    assert [(m["event_id"], m["revision"]) for m in got] == [(e1["event_id"], 2), (e2["event_id"], 1)]
    assert got[0]["feed_seq"] > f1 and got[1]["feed_seq"] > got[0]["feed_seq"]
    assert got[0]["seq"] == e1["seq"] and got[1]["seq"] == e2["seq"]
    # the same feed over REST, paged
    page = server.get(f"/revisions?after={f1}&limit=1", token=VIEWER).json()
    assert [(m["event_id"], m["revision"]) for m in page["items"]] == [(e1["event_id"], 2)]
    rest = server.get(f"/revisions?after={page['next_after']}", token=VIEWER).json()
    assert [(m["event_id"], m["revision"]) for m in rest["items"]] == [(e2["event_id"], 1)]
    assert rest["next_after"] is None and rest["items"][0] == got[1]
    assert server.get("/revisions?after=-1", token=VIEWER).status_code == 422
    # only feed messages carry feed_seq: an event record corrected to F=10 must not move a client's
    # resume point past a correction F=9 still on its way
    assert "feed_seq" not in server.get(f"/events/{e1['event_id']}", token=VIEWER).json()
    assert all("feed_seq" not in e for e in server.get("/events?limit=1000", token=VIEWER).json()["items"])
    with pytest.raises(InvalidStatus):  # refused at the handshake (was a 1011 close and a traceback)
        ws_connect(f"{server.ws}/ws/events?revisions_after={2**63}", additional_headers=_h(VIEWER), open_timeout=10)


def test_two_corrections_of_one_event_are_published_in_revision_order(tmp_path):
    """Cashier A's revision 1 is committed, then cashier B's revision 2, before A's thread publishes:
    subscribers must still get 1 before 2 (a client keeping the last message per event would
    otherwise end on the old receipt). Also: replaying the latest revision publishes it again (a
    publish lost to a crash after the commit is repaired; subscribers key by event_id + revision)."""
    import threading
    import time

    from dishtrack.service.corrections import Change, CorrectionStore
    from dishtrack.service.review_db import open_review_db
    from dishtrack.service.store import EventStore
    from dishtrack.tracking.types import CheckoutEvent, CheckoutItem

    store = EventStore(str(tmp_path / "ev.sqlite3"))
    store.save(CheckoutEvent("e1", "cam", "z", 0.0, 1.0, (CheckoutItem("Plate", 2, 0.7),), (1, 2), 0.7))
    corr = CorrectionStore(open_review_db(store), tmp_path / "ds")
    got, a_committed = [], threading.Event()

    def slow_publish(record):
        a_committed.set()
        time.sleep(0.3)  # A's thread is slow to hand the record on
        got.append(record["revision"])

    a = threading.Thread(target=corr.correct, args=("e1", 1, [Change("relabel", 0, "Bread")], "a"),
                         kwargs={"publish": slow_publish})
    a.start()
    assert a_committed.wait(10)
    corr.correct("e1", 2, [Change("remove", 1)], "b", publish=lambda r: got.append(r["revision"]))
    a.join(10)
    assert got == [1, 2]
    out = corr.correct("e1", 2, [Change("remove", 1)], "b", publish=lambda r: got.append(r["revision"]))
    assert not out.created and out.record["revision"] == 2 and got == [1, 2, 2]
    old = corr.correct("e1", 1, [Change("relabel", 0, "Bread")], "a", publish=lambda r: got.append(r["revision"]))
    assert old.record["revision"] == 1 and got == [1, 2, 2]  # the stored revision; an old one is not re-sent


def test_typed_labels_map_to_the_detectors_and_every_dates_menu_dishes(tmp_path):
    from dishtrack.service.corrections import CorrectionStore
    from dishtrack.service.review_db import open_review_db
    from dishtrack.service.store import EventStore
    from dishtrack.tracking.menu import Menu, MenuFile

    menu = Menu(MenuFile.model_validate({"currency": "EUR", "items": {"Bread": {"name": "Bread", "price": 1}},
                                         "dates": {"2026-12-24": {"items": {"Christmas Pudding": {
                                             "name": "Pudding", "price": 4}}}}}))
    corr = CorrectionStore(open_review_db(EventStore(str(tmp_path / "ev.sqlite3"))), tmp_path / "ds", menu)
    corr.dish_labels = ("bread", "Plate")
    assert corr.known_labels() == ["bread", "Plate", "Bread", "Christmas Pudding"]
    assert corr.canonical("Bread") == "Bread" and corr.canonical("bread ") == "bread"  # an exact match wins
    assert corr.canonical(" PLATE") == "Plate" and corr.canonical("christmas  pudding") == "Christmas Pudding"
    assert corr.canonical(" Fried  rice ") == "Fried  rice"  # a new dish: as typed, stripped


def test_an_event_file_from_before_the_corrections_feed_is_migrated_and_never_reuses_a_position(tmp_path):
    """A file whose revisions have no feed_seq (stored before the feed) opens, keeps them, and feeds only
    new corrections; a position is never handed out twice, also after retention deletes the newest one
    (MAX(feed_seq) + 1 would give it again, and a client holding it would skip the new correction)."""
    import sqlite3

    from dishtrack.service.corrections import Change, CorrectionStore
    from dishtrack.service.review_db import open_review_db
    from dishtrack.service.store import EventStore
    from dishtrack.tracking.types import CheckoutEvent, CheckoutItem

    path = tmp_path / "ev.sqlite3"
    store = EventStore(str(path))
    for eid in ("old", "e1", "e2"):
        store.save(CheckoutEvent(eid, "cam", "z", 0.0, 1.0, (CheckoutItem("Plate", 2, 0.7),), (1, 2), 0.7))
    with sqlite3.connect(path) as db:  # the review table as the previous version created it
        db.execute("CREATE TABLE event_revisions (event_id TEXT NOT NULL, revision INTEGER NOT NULL, payload TEXT"
                   " NOT NULL, units TEXT NOT NULL, changes TEXT NOT NULL, corrected_by TEXT, corrected_at REAL,"
                   " PRIMARY KEY (event_id, revision))")
        db.execute("INSERT INTO event_revisions VALUES ('old', 1, '{\"revision\": 1}', '[]', '[]', 'a', 1.0)")
    corr = CorrectionStore(open_review_db(store), tmp_path / "ds")
    assert corr.db.last_feed_seq() == 0 and corr.db.corrected_after(0) == []
    assert [r.revision for r in corr.db.revisions("old")] == [1]  # kept
    first = corr.correct("e1", 1, [Change("relabel", 0, "Bread")], "a")
    assert first.feed_seq == 1 and corr.db.corrected_after(0) == [(1, {**first.record, "feed_seq": 1})]
    assert "feed_seq" not in corr.db.event("e1")  # only feed messages carry it
    store.prune(max_events=1)  # retention: the oldest events go (old, e1), their revisions with them
    assert corr.db.corrected_after(0) == [] and corr.db.event("e1") is None
    second = corr.correct("e2", 1, [Change("remove", 0)], "a")
    assert second.feed_seq == 2 and corr.db.last_feed_seq() == 2
    store.close()
    again = EventStore(str(path))  # reopening migrates nothing twice
    assert open_review_db(again).corrected_after(1) == [(2, second.message())]
    again.close()
    # a file restored without its counter row: the counter starts above the positions already given
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM revision_feed")
    restored = EventStore(str(path))
    assert CorrectionStore(open_review_db(restored), tmp_path / "ds").correct(
        "e2", 2, [Change("remove", 1)], "a").feed_seq == 3
    restored.close()

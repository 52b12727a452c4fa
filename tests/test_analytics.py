"""Analytics (issue 10 item 5): numbers from a real event store (SQLite, and the suite's real PostgreSQL)
holding known events and corrections, the same through SQL (the view SQL tools use), pruning takes
corrections along, and the page draws its charts in headless Chromium against the running service."""
from __future__ import annotations

import sqlite3

import pytest

from conftest import VIDEO, AppServer, wait_until
from dishtrack.service.analytics import analytics
from dishtrack.service.corrections import Change, CorrectionStore
from dishtrack.service.review_db import open_review_db
from dishtrack.service.store import EventStore
from dishtrack.tracking.types import CheckoutEvent, CheckoutItem

T0 = 1795370400.0  # a whole hour (UTC)
H = 3600.0


def _ev(eid, cam, t, items, review):
    return CheckoutEvent(eid, cam, "z", t - 1, t, tuple(CheckoutItem(lbl, n, 0.7) for lbl, n in items),
                         tuple(range(sum(n for _, n in items))), 0.7, needs_review=review)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    """(storage config, sql(query) -> rows read by a plain client: sqlite3 / psycopg, as SQL tools would)."""
    if request.param == "postgresql":
        import psycopg

        url = request.getfixturevalue("pg_url")

        def sql(q):
            with psycopg.connect(url) as c:
                return c.execute(q).fetchall()
        return {"url": url}, sql
    path = str(tmp_path / "ev.sqlite3")

    def sql(q):
        with sqlite3.connect(path) as db:
            return db.execute(q).fetchall()
    return {"sqlite_path": path}, sql


def open_store(storage):
    if "url" in storage:
        from dishtrack.service.store_pg import PgEventStore

        return PgEventStore(storage["url"])
    return EventStore(storage["sqlite_path"])


def fill(storage, dataset):
    store = open_store(storage)
    corr = CorrectionStore(open_review_db(store), dataset)
    for ev in (_ev("e1", "a", T0 + 100, [("Dessert", 1), ("Plate", 2)], False),
               _ev("e2", "a", T0 + H + 100, [("Drink", 1), ("Plate", 1)], True),
               _ev("e3", "b", T0 + 200, [("Dessert", 1), ("Fruit", 1)], True),
               _ev("e4", "b", T0 + 2 * H + 100, [("Yogurt", 3)], False),
               _ev("e5", "a", T0 + 2 * H + 200, [("Plate", 1)], True)):
        store.save(ev)
    fix = [("e1", 1, [Change("relabel", 0, "Plate"), Change("remove", 2)]),
           ("e2", 1, [Change("relabel", 0, "Yogurt")]),
           ("e3", 1, [Change("relabel", 0, "Plate")]),
           ("e3", 2, [Change("relabel", 1, "Bread")]),
           ("e4", 1, [Change("relabel", 0, "Dessert")]),
           ("e4", 2, [Change("relabel", 0, "Plate"), Change("add", None, "Cheese")])]
    for eid, rev, changes in fix:
        assert corr.correct(eid, rev, changes, "boss", now=T0 + 5 * H).created
    return store, corr.db


def test_analytics_numbers_on_known_events(tmp_path, backend):
    storage, sql = backend
    store, db = fill(storage, tmp_path / "ds")
    a = analytics(db)
    assert a["per_hour"] == [{"hour_start": T0, "camera_id": "a", "dishes": 2},
                             {"hour_start": T0, "camera_id": "b", "dishes": 2},
                             {"hour_start": T0 + H, "camera_id": "a", "dishes": 2},
                             {"hour_start": T0 + 2 * H, "camera_id": "a", "dishes": 1},
                             {"hour_start": T0 + 2 * H, "camera_id": "b", "dishes": 4}]
    assert a["per_camera"] == [{"camera_id": "a", "events": 3, "dishes": 5},
                               {"camera_id": "b", "events": 2, "dishes": 6}]
    assert a["per_dish"] == [{"label": "Plate", "dishes": 6}, {"label": "Yogurt", "dishes": 3},
                             {"label": "Bread", "dishes": 1}, {"label": "Cheese", "dishes": 1}]
    assert a["dishes"] == 11
    assert a["review"] == {"events": 5, "needed_review": 3, "corrected": 4, "needed_review_share": 0.6,
                           "corrected_share": 0.8, "needed_review_corrected": 2}
    # the latest relabel of each dish decides (e4: Yogurt -> Dessert -> Plate counts as Yogurt/Plate)
    assert a["confused_pairs"] == [{"detected": "Dessert", "corrected": "Plate", "count": 2},
                                   {"detected": "Drink", "corrected": "Yogurt", "count": 1},
                                   {"detected": "Fruit", "corrected": "Bread", "count": 1},
                                   {"detected": "Yogurt", "corrected": "Plate", "count": 1}]
    assert a["corrections"] == {"relabel": 6, "remove": 1, "add": 1}
    b = analytics(db, camera="b")
    assert b["review"]["events"] == 2 and b["dishes"] == 6 and b["review"]["needed_review"] == 1
    assert [p["count"] for p in b["confused_pairs"]] == [1, 1, 1]
    late = analytics(db, since=T0 + H)
    assert late["review"]["events"] == 3 and late["dishes"] == 7
    assert analytics(db, since=T0 + 10 * H)["review"]["needed_review_share"] is None
    # SQL tools: the same per-hour sales from the view
    assert sql("SELECT SUM(dishes) FROM dishes_sold_hourly")[0][0] == 11
    assert sql("SELECT hour_start, dishes FROM dishes_sold_hourly WHERE camera_id='b' AND label='Yogurt'"
               ) == [(T0 + 2 * H, 2)]
    assert sql("SELECT COUNT(*) FROM corrections WHERE event_id='e4'")[0][0] == 3
    # retention deletes an event's revisions and corrections with it
    assert store.prune(max_events=4) == 1
    assert analytics(db)["confused_pairs"][0] == {"detected": "Dessert", "corrected": "Plate", "count": 1}
    assert [sql(f"SELECT COUNT(*) FROM {t} WHERE event_id='e1'")[0][0]
            for t in ("event_revisions", "corrections")] == [0, 0]
    db.close()
    store.close()


@pytest.mark.browser
def test_analytics_page_draws_charts(tmp_path, backend, detector, chromium):
    from selenium.webdriver.common.by import By

    from dishtrack.config import AppConfig
    from dishtrack.service.api import build_runtime, create_app

    storage, _ = backend
    store, db = fill(storage, tmp_path / "ds")
    db.close()
    store.close()
    cfg = AppConfig.model_validate({"cameras": [{"id": "cam0", "source": str(VIDEO), "realtime": True}],
                                    "storage": {**storage, "retention": {"max_age_days": None}},
                                    "cluster": {"node_id": "analytics"}})
    with AppServer(create_app(build_runtime(cfg, detector=detector))) as s:
        assert s.get("/analytics/data").json()["dishes"] == 11
        assert s.get("/analytics/data?since=10&until=5").status_code == 422
        drv = chromium
        drv.get(s.base + "/analytics?x=1")
        drv.execute_script("document.getElementById('range').value = '0'")  # all time (the events are in 2026)
        drv.execute_script("load()")
        wait_until(lambda: drv.find_element(By.ID, "summary").text == "5 receipts, 11 dishes", 20,
                   what="analytics loaded")
        assert int(drv.find_element(By.ID, "per-hour").get_attribute("data-bars")) == 5
        assert int(drv.find_element(By.ID, "per-dish").get_attribute("data-bars")) == 4
        assert drv.find_element(By.ID, "review-share").text == "60.0%"
        assert drv.find_element(By.ID, "corrected-share").text == "80.0%"
        rows = [r.text for r in drv.find_elements(By.CSS_SELECTOR, "#pairs tbody tr")]
        assert rows[0] == "Dessert Plate 2" and len(rows) == 4
        # the canvas really has pixels in the bar colour
        painted = drv.execute_script(
            "const c = document.getElementById('per-hour'); const d = c.getContext('2d')"
            ".getImageData(0, 0, c.width, c.height).data; let n = 0;"
            "for (let i = 0; i < d.length; i += 4) if (d[i] === 0x4e && d[i+1] === 0x79 && d[i+2] === 0xa7) n++;"
            "return n;")
        assert painted > 500
        assert [o.text for o in drv.find_elements(By.CSS_SELECTOR, "#camera option")] == ["all", "a", "b"]
        drv.save_screenshot(str(tmp_path / "analytics.png"))

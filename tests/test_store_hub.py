import asyncio

from dishtrack.service.hub import EventHub
from dishtrack.service.store import EventStore
from dishtrack.tracking.types import CheckoutEvent, CheckoutItem


def ev(i, cam="cam0", zone="z", label="plate", n=1, t=1000.0):
    return CheckoutEvent(f"e{i}", cam, zone, t + i, t + i + 0.5, (CheckoutItem(label, n, 0.9),), (i,), 0.9)


def test_store_pages_filters_and_survives_reopen(tmp_path):
    path = tmp_path / "db" / "events.sqlite3"
    s = EventStore(path)
    assert s.journal_mode == "wal"
    for i in range(7):
        s.save(ev(i, cam="cam0" if i % 2 == 0 else "cam1", label="bowl" if i == 3 else "plate"))
    page1 = s.list(limit=3)
    assert [r["event_id"] for r in page1.items] == ["e0", "e1", "e2"] and page1.next_after == 3
    page2 = s.list(after=page1.next_after, limit=3)
    page3 = s.list(after=page2.next_after, limit=3)
    assert [r["event_id"] for r in page2.items + page3.items] == ["e3", "e4", "e5", "e6"]
    assert page3.next_after is None
    assert [r["event_id"] for r in s.list(camera_id="cam1").items] == ["e1", "e3", "e5"]
    assert [r["event_id"] for r in s.list(label="bowl").items] == ["e3"]
    assert [r["event_id"] for r in s.list(since=1002.0, until=1004.6).items] == ["e2", "e3", "e4"]
    s.close()
    s2 = EventStore(path)
    assert s2.count() == 7 and s2.get("e3")["items"][0]["label"] == "bowl"
    assert s2.get("missing") is None
    again = s2.save(ev(3))  # event ids are unique: a replay cannot duplicate, it gets the stored record
    assert again == s2.get("e3") and again["seq"] == 4
    assert s2.count() == 7 and s2.last_seq() == 7


def test_hub_cuts_off_a_slow_subscriber_without_blocking_others():
    async def scenario():
        hub = EventHub(queue_size=2)
        hub.bind(asyncio.get_running_loop())
        slow, fast = hub.subscribe(), hub.subscribe()
        got = []
        for i in range(5):
            hub.publish({"seq": i})
            await asyncio.sleep(0)
            got.append((await fast.queue.get())["seq"])
        return hub, slow, fast, got

    hub, slow, fast, got = asyncio.run(scenario())
    assert got == [0, 1, 2, 3, 4]
    assert slow.overflowed and not fast.overflowed
    assert hub.dropped_subscribers == 1

"""Event write + publish latency, SQLite vs PostgreSQL, at a steady event rate (issue 9 target:
p99 <= 20 ms to PostgreSQL under 200 events/s).

Per event, as the pipeline does it: ``store.save`` (persist; PostgreSQL also NOTIFYs) then
``hub.publish``; measured two ways:
  * ``write+publish``: time the pipeline thread spends (what delays tracking);
  * ``to websocket queue``: from the start of the write until the record sits in a websocket
    subscriber's queue (SQLite: published directly; PostgreSQL: via LISTEN/NOTIFY -> StoreFeed,
    the path every node's websocket takes).
PostgreSQL is a local server started from the Debian package (fsync on) unless --pg-url is given.

    python bench/store_benchmark.py [--rate 200] [--seconds 10] [--pg-url postgresql://...]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dishtrack.service.hub import EventHub  # noqa: E402
from dishtrack.service.store import EventStore  # noqa: E402
from dishtrack.tracking.types import CheckoutEvent, CheckoutItem  # noqa: E402


def _event(i: int) -> CheckoutEvent:
    now = time.time()
    items = (CheckoutItem("bowl", 2, 0.8), CheckoutItem("plate", 1, 0.9))
    return CheckoutEvent(f"bench-{now:.6f}-{i}", f"cam{i % 4}", "checkout0", now - 1.5, now, items, (i, i + 1), 0.85)


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] * 1000


def run(store, rate: float, seconds: float) -> dict:
    loop = asyncio.new_event_loop()
    hub = EventHub(100000, fed_by_store=store.shared)
    hub.bind(loop)
    arrived: dict[str, float] = {}
    sub = hub.subscribe()

    async def consume():
        while True:
            rec = await sub.queue.get()
            arrived[rec["event_id"]] = time.perf_counter()

    threading.Thread(target=loop.run_forever, daemon=True).start()
    consumer = asyncio.run_coroutine_threadsafe(consume(), loop)
    feed = None
    if store.shared:
        from dishtrack.service.feed import StoreFeed

        feed = StoreFeed(store, hub).start()
    for i in range(20):  # warm-up: connections, prepared statements
        hub.publish(store.save(_event(-1 - i)))
    time.sleep(0.5)
    n = int(rate * seconds)
    started: dict[str, float] = {}
    call: list[float] = []
    t0 = time.perf_counter()
    for i in range(n):
        due = t0 + i / rate
        if (d := due - time.perf_counter()) > 0:
            time.sleep(d)
        ev = _event(i)
        s = time.perf_counter()
        started[ev.event_id] = s
        hub.publish(store.save(ev))
        call.append(time.perf_counter() - s)
    achieved = n / (time.perf_counter() - t0)
    end = time.time() + 10
    while time.time() < end and not all(k in arrived for k in started):
        time.sleep(0.05)
    e2e = [arrived[k] - s for k, s in started.items() if k in arrived]
    if feed is not None:
        feed.stop()
    consumer.cancel()
    time.sleep(0.1)
    loop.call_soon_threadsafe(loop.stop)
    return {"events": n, "rate": achieved, "call_p50": _pct(call, 50), "call_p99": _pct(call, 99),
            "call_max": max(call) * 1000, "ws_p50": _pct(e2e, 50), "ws_p99": _pct(e2e, 99),
            "delivered": len(e2e), "mean_ms": statistics.fmean(call) * 1000}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0, help="events per second")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--pg-url", help="an existing PostgreSQL (default: start one from the Debian package)")
    ap.add_argument("--pg-fsync", choices=["on", "off"], default="on", help="the started server's fsync")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = EventStore(Path(tmp) / "bench.sqlite3")
        results["sqlite"] = run(sqlite, args.rate, args.seconds)
        sqlite.close()
    pg = None
    url = args.pg_url
    if url is None:
        import servers

        if (why := servers.pg_missing()) is not None:
            print(f"postgresql: skipped ({why})")
        else:
            pg = servers.PgServer(fsync=args.pg_fsync == "on").start()
            url = pg.create_db("bench")
    if url is not None:
        from dishtrack.service.store_pg import PgEventStore

        try:
            store = PgEventStore(url)
            results["postgresql"] = run(store, args.rate, args.seconds)
            store.close()
        finally:
            if pg is not None:
                pg.cleanup()
    print(f"{'store':<11} {'events':>6} {'ev/s':>6}  {'write+publish p50':>17} {'p99':>7} {'max':>7}"
          f"  {'to websocket queue p50':>22} {'p99':>7}")
    for name, r in results.items():
        print(f"{name:<11} {r['events']:>6} {r['rate']:>6.0f}  {r['call_p50']:>14.2f} ms {r['call_p99']:>7.2f}"
              f" {r['call_max']:>7.2f}  {r['ws_p50']:>19.2f} ms {r['ws_p99']:>7.2f}"
              + ("" if r["delivered"] == r["events"] else f"  (only {r['delivered']} delivered)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Feeds the websocket hub from a shared event store (PostgreSQL), so every node's
subscribers see every node's events.

One thread per node: it sleeps on ``LISTEN`` (woken at each commit anywhere),
then pages ``list(after=cursor)`` and hands each record to the hub in ``seq``
order. Paging by cursor, not trusting notification payloads, means a missed or
coalesced notification, or a reconnect, loses nothing: the next page has it.
``poll_s`` bounds the delay should a notification never come.

Corrected revisions keep their event's ``seq``, so a second cursor pages them
(``review_pg.PgReviewDb.corrected_after``, by ``feed_seq``: commit order); each
reaches the hub as the event's new revision, as a local correction does with SQLite."""
from __future__ import annotations

import logging
import threading

from .hub import EventHub
from .review_pg import PgReviewDb
from .store_pg import Listener, PgEventStore

log = logging.getLogger(__name__)


class StoreFeed:
    def __init__(self, store: PgEventStore, hub: EventHub, poll_s: float = 1.0,
                 revisions: PgReviewDb | None = None) -> None:
        self.store, self.hub, self.poll_s, self.revisions = store, hub, poll_s, revisions
        self.cursor = 0
        self.revision_cursor = 0
        self.delivered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-feed", daemon=True)

    def start(self) -> "StoreFeed":
        self.cursor = self.store.last_seq()  # live from now on; older events: ?after= replay
        if self.revisions is not None:
            self.revision_cursor = self.revisions.last_feed_seq()
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _drain(self) -> None:
        while True:
            page = self.store.list(after=self.cursor, limit=500)
            for rec in page.items:
                self.hub.feed(rec)
                self.cursor = rec["seq"]
                self.delivered += 1
            if page.next_after is None:
                break
        # then corrected revisions (an event committed just before its first correction may come after
        # it: its row holds the latest revision, so the client sees that revision twice, never an older one)
        while self.revisions is not None:
            got = self.revisions.corrected_after(self.revision_cursor, 500)
            for feed_seq, rec in got:
                self.hub.feed(rec)
                self.revision_cursor = feed_seq
                self.delivered += 1
            if len(got) < 500:
                return

    def _run(self) -> None:
        listener = Listener(self.store.url)
        backoff = 0.5
        try:
            while not self._stop.is_set():
                try:
                    listener.wait(self.poll_s)  # LISTEN first, then page: nothing committed in between is missed
                    self._drain()
                    backoff = 0.5
                except Exception as e:  # noqa: BLE001 - database restarting: retry, the cursor keeps our place
                    log.warning("event feed: %s (retrying in %.1fs)", e, backoff)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 2.0)  # a restarted database is noticed within 2 s
        finally:
            listener.close()

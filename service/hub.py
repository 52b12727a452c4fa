"""Fan-out of persisted events to websocket subscribers, each with a bounded queue.

A subscriber whose queue is full is cut off (and counted) rather than letting
memory grow; it reconnects with ``after=<last seq>`` and pages the gap from
the store, so nothing is lost.
"""
from __future__ import annotations

import asyncio
import logging
import threading

log = logging.getLogger(__name__)


class Subscription:
    def __init__(self, maxsize: int) -> None:
        self.queue: asyncio.Queue = asyncio.Queue(maxsize)
        self.overflowed = False


class EventHub:
    """``fed_by_store``: a store shared by several nodes (PostgreSQL) delivers every node's events,
    this node's included, through ``feed.StoreFeed`` in ``seq`` order; the pipeline's own ``publish``
    is then ignored (published directly, a local event could overtake a remote one with a lower seq,
    which the websocket's ``seq > last`` check would then drop)."""

    def __init__(self, queue_size: int = 256, *, fed_by_store: bool = False) -> None:
        self.queue_size = queue_size
        self.fed_by_store = fed_by_store
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subs: set[Subscription] = set()
        self._lock = threading.Lock()
        self.dropped_subscribers = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def subscribe(self) -> Subscription:
        s = Subscription(self.queue_size)
        with self._lock:
            self._subs.add(s)
        return s

    def unsubscribe(self, s: Subscription) -> None:
        with self._lock:
            self._subs.discard(s)

    def publish(self, record: dict) -> None:
        """Thread-safe: called from the pipeline thread (ignored when ``fed_by_store``)."""
        if not self.fed_by_store:
            self.feed(record)

    def feed(self, record: dict) -> None:
        """Thread-safe: deliver ``record`` to every subscriber."""
        if self._loop is None or self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._deliver, record)

    def _deliver(self, record: dict) -> None:
        with self._lock:
            subs = list(self._subs)
        for s in subs:
            if s.overflowed:
                continue
            try:
                s.queue.put_nowait(record)
            except asyncio.QueueFull:
                s.overflowed = True
                self.dropped_subscribers += 1
                log.warning("websocket subscriber too slow (queue %d full): disconnecting", self.queue_size)

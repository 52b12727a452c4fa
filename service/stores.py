"""The event-store interface and the choice between its two implementations.

SQLite (``store.EventStore``) is the embedded default: one file, one process.
PostgreSQL (``store_pg.PgEventStore``, ``storage.url``) is shared by several
nodes; there the websocket hub is fed from the store (``feed.StoreFeed``) so
every node's subscribers see every node's events, in ``seq`` order."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from dishtrack.config import StorageConfig
from dishtrack.tracking.types import CheckoutEvent

from .store import EventPage, EventStore


@runtime_checkable
class Store(Protocol):
    """What the pipeline, the API, retention and the feed need from an event store."""

    shared: bool  # True: other processes write too, the hub must be fed from the store

    def save(self, event: CheckoutEvent) -> dict:
        """Persist, return the record with its ``seq``; a known ``event_id`` returns the stored record."""

    def get(self, event_id: str) -> dict | None: ...

    def list(self, *, after: int = 0, limit: int = 50, camera_id: str | None = None,
             zone_id: str | None = None, label: str | None = None, since: float | None = None,
             until: float | None = None, needs_review: bool | None = None) -> EventPage: ...

    def last_seq(self) -> int: ...

    def count(self) -> int: ...

    def size_bytes(self) -> int: ...

    def prune(self, *, ended_before: float | None = None, max_events: int | None = None,
              max_bytes: int | None = None, batch: int = 500) -> int: ...

    def close(self) -> None: ...


def open_store(cfg: StorageConfig) -> Store:
    """``storage.url`` set: PostgreSQL (schema migrated on open); else the SQLite file ``sqlite_path``."""
    if cfg.url:
        from .store_pg import PgEventStore  # psycopg only when configured

        return PgEventStore(cfg.url)
    return EventStore(cfg.sqlite_path)

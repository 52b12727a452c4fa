"""Checkout events persisted in SQLite (WAL). Events are written here before
they are published, so a subscriber that missed some can page them back by seq."""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from dishtrack.config import ConfigError
from dishtrack.tracking.types import CheckoutEvent

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    camera_id TEXT NOT NULL,
    zone_id TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL NOT NULL,
    confidence REAL NOT NULL,
    payload TEXT NOT NULL,
    needs_review INTEGER NOT NULL DEFAULT 0,
    currency TEXT,
    total REAL
);
CREATE INDEX IF NOT EXISTS events_camera ON events(camera_id, seq);
CREATE INDEX IF NOT EXISTS events_time ON events(ended_at);
CREATE TABLE IF NOT EXISTS event_labels (
    seq INTEGER NOT NULL REFERENCES events(seq),
    label TEXT NOT NULL,
    count INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS event_labels_label ON event_labels(label, seq);
"""
# columns added after the first schema: (name, DDL type); an older database file
# gets them by ALTER TABLE (old rows: not flagged, no price)
_ADDED_COLUMNS = (("needs_review", "INTEGER NOT NULL DEFAULT 0"), ("currency", "TEXT"), ("total", "REAL"))
_SCHEMA_VERSION = 2
_POST_MIGRATION = "CREATE INDEX IF NOT EXISTS events_review ON events(needs_review, seq);"
_EVENT_DEFAULTS = {"needs_review": False, "currency": None, "total": None}
_ITEM_DEFAULTS = {"name": None, "unit_price": None, "line_total": None, "unpriced": False, "needs_review": False}


def _record(seq: int, payload: str | dict) -> dict:
    """A stored event as served; payloads written before receipts get the new keys' defaults.
    ``payload``: JSON text (SQLite) or the decoded object (PostgreSQL jsonb)."""
    d = json.loads(payload) if isinstance(payload, str) else dict(payload)
    for k, v in _EVENT_DEFAULTS.items():
        d.setdefault(k, v)
    for item in d.get("items", []):
        for k, v in _ITEM_DEFAULTS.items():
            item.setdefault(k, v)
    return {"seq": seq, **d}


class StoreError(ConfigError):
    """``storage.sqlite_path`` cannot be opened for writing (read-only filesystem, not a
    directory, no permission); raised at startup, before the model loads."""


@dataclass(frozen=True, slots=True)
class EventPage:
    items: list[dict]
    next_after: int | None  # pass as ``after`` for the next page; None = no more


class EventStore:
    """Thread-safe (one connection behind a lock; SQLite serialises writes anyway)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            parent = Path(self.path).parent
            why = (f"{parent} is not a directory" if parent.exists() and not parent.is_dir()
                   else getattr(e, "strerror", None) or str(e))
            raise StoreError(f"storage.sqlite_path {self.path}: cannot create the event database: {why}") from e
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            self._migrate()  # always writes (user_version): a read-only file or folder fails here, at startup
        except sqlite3.Error as e:
            self._db.close()
            raise StoreError(f"storage.sqlite_path {self.path}: cannot write the event database: {e}") from e

    def _migrate(self) -> None:
        """Bring a database file written by an older version up to this schema."""
        have = {r["name"] for r in self._db.execute("PRAGMA table_info(events)")}
        for name, ddl in _ADDED_COLUMNS:
            if name not in have:
                self._db.execute(f"ALTER TABLE events ADD COLUMN {name} {ddl}")
        self._db.executescript(_POST_MIGRATION)
        self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    @property
    def schema_version(self) -> int:
        with self._lock:
            return self._db.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @property
    def journal_mode(self) -> str:
        with self._lock:
            return self._db.execute("PRAGMA journal_mode").fetchone()[0]

    shared = False  # one process's file: the pipeline publishes to its own hub (see stores.Store)

    def save(self, event: CheckoutEvent) -> dict:
        """Persist and return the stored record (with its ``seq``). An ``event_id`` already stored
        (a retried write whose first attempt landed) is not written again: its record is returned."""
        d = event.to_dict()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(
                    "INSERT INTO events(event_id, camera_id, zone_id, started_at, ended_at, confidence, payload,"
                    " needs_review, currency, total) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(event_id) DO NOTHING",
                    (event.event_id, event.camera_id, event.zone_id, event.started_at, event.ended_at,
                     event.confidence, json.dumps(d), int(event.needs_review), event.currency, event.total))
                if cur.rowcount == 0:
                    row = self._db.execute("SELECT seq, payload FROM events WHERE event_id=?",
                                           (event.event_id,)).fetchone()
                    self._db.execute("COMMIT")
                    return _record(row["seq"], row["payload"])
                seq = cur.lastrowid
                self._db.executemany("INSERT INTO event_labels(seq, label, count) VALUES (?,?,?)",
                                     [(seq, i.label, i.count) for i in event.items])
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may already have rolled back (disk full)
                    self._db.execute("ROLLBACK")
                raise
        return {"seq": seq, **d}

    @contextlib.contextmanager
    def transaction(self):
        """The connection inside BEGIN IMMEDIATE .. COMMIT under the store's lock (rolled back on error),
        for tables other modules keep next to the events (service/review_sqlite.py: evidence, revisions)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        """A read on the store's connection (review_sqlite: corrections, analytics)."""
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def get(self, event_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT seq, payload FROM events WHERE event_id=?", (event_id,)).fetchone()
        return _record(row["seq"], row["payload"]) if row else None

    def size_bytes(self) -> int:
        """Bytes on disk: the database file plus its write-ahead log (0 in memory)."""
        if self.path == ":memory:":
            return 0
        return sum(os.path.getsize(p) for p in (self.path, self.path + "-wal") if os.path.exists(p))

    def used_bytes(self) -> int:
        """Bytes in pages holding data (file size minus the free list, which SQLite reuses)."""
        with self._lock:
            page = self._db.execute("PRAGMA page_size").fetchone()[0]
            pages = self._db.execute("PRAGMA page_count").fetchone()[0]
            free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * page

    def _delete_oldest(self, where: str, args: tuple, limit: int) -> int:
        """One short transaction: delete up to ``limit`` of the oldest events matching ``where``."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seqs = [r[0] for r in self._db.execute(
                    f"SELECT seq FROM events WHERE {where} ORDER BY seq LIMIT ?", (*args, limit))]
                if seqs:
                    marks = ",".join("?" * len(seqs))
                    self._db.execute(f"DELETE FROM event_labels WHERE seq IN ({marks})", seqs)
                    self._db.execute(f"DELETE FROM events WHERE seq IN ({marks})", seqs)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        return len(seqs)

    def prune(self, *, ended_before: float | None = None, max_events: int | None = None,
              max_bytes: int | None = None, batch: int = 500) -> int:
        """Delete the oldest events by age, count and used size; returns how many. Works in
        batches so event writes and API reads are never blocked for long."""
        n = 0
        if ended_before is not None:
            while (k := self._delete_oldest("ended_at < ?", (ended_before,), batch)):
                n += k
        if max_events is not None:
            while (extra := self.count() - max_events) > 0:
                n += self._delete_oldest("1", (), min(batch, extra))
        if max_bytes is not None:
            while (used := self.used_bytes()) > max_bytes and (count := self.count()):
                # about as many rows as the excess holds (deleting a whole batch would overshoot)
                want = min(batch, int((used - max_bytes) / (used / count)) + 1)
                if not (k := self._delete_oldest("1", (), want)):
                    break
                n += k
        if n:
            with self._lock:  # give the log's pages back to the file so the size bound holds on disk too
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return n

    def last_seq(self) -> int:
        """The highest stored ``seq`` (0 when empty)."""
        with self._lock:
            return self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]

    def list(self, *, after: int = 0, limit: int = 50, camera_id: str | None = None,
             zone_id: str | None = None, label: str | None = None, since: float | None = None,
             until: float | None = None, needs_review: bool | None = None) -> EventPage:
        """Events in ``seq`` order after ``after``, filtered, at most ``limit``."""
        filters = (
            ("e.camera_id = ?", camera_id),
            ("e.zone_id = ?", zone_id),
            ("e.ended_at >= ?", since),
            ("e.ended_at < ?", until),
            ("e.needs_review = ?", None if needs_review is None else int(needs_review)),
            ("EXISTS (SELECT 1 FROM event_labels l WHERE l.seq = e.seq AND l.label = ?)", label),
        )
        where, args = ["e.seq > ?"], [after]
        for clause, value in filters:
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = f"SELECT e.seq, e.payload FROM events e WHERE {' AND '.join(where)} ORDER BY e.seq LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, limit + 1)).fetchall()
        items = [_record(r["seq"], r["payload"]) for r in rows[:limit]]
        return EventPage(items, items[-1]["seq"] if len(rows) > limit else None)

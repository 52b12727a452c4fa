"""On-disk outbox (SQLite) between the pipeline and the sinks (MQTT, webhooks).

``submit`` only puts the persisted record on a bounded in-memory queue, so
detection and tracking never wait for a disk or a network. A writer thread adds
one row per (sink, event, revision) to the outbox file (``UNIQUE(sink, event_id,
revision)``: an event submitted twice, e.g. after a retried store write, is sent
once; a cashier's correction is the event's next revision, sent after it); one
worker thread per sink delivers that sink's rows strictly in order (a failing
head row holds the later ones back), retries it with exponential backoff
(``retry_initial_s`` doubling to ``retry_max_s``) and records status, attempts
and the last error, which ``GET /admin/deliveries`` shows. Rows survive a
restart: what the broker or point-of-sale did not acknowledge is sent after it.
Delivered rows are kept ``keep_delivered_days`` for that view."""
from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path

from dishtrack.config import IntegrationsConfig

from .sinks import DeliveryResult, OutMessage, Sink

log = logging.getLogger(__name__)

_TABLE = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sink TEXT NOT NULL,
    event_id TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL,
    camera_id TEXT NOT NULL,
    zone_id TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at REAL NOT NULL,
    delivered_at REAL,
    UNIQUE(sink, event_id, revision)
);
"""
_INDEXES = """
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox(sink, status, id);
CREATE INDEX IF NOT EXISTS outbox_event ON outbox(event_id);
"""
_COLUMNS_V1 = ("id, sink, event_id, seq, camera_id, zone_id, body, status, attempts, next_at, last_error, "
               "created_at, delivered_at")
_SCHEMA_VERSION = 2  # 2: a row per revision (corrections); 1: per event
_BATCH = 100
_PRUNE_EVERY_S = 60.0
STATUSES = ("pending", "delivered", "failed")


class Outbox:
    def __init__(self, cfg: IntegrationsConfig, sinks: list[Sink]) -> None:
        self.cfg, self.path = cfg, cfg.outbox_path
        self.sinks = {s.name: s for s in sinks}
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._migrate()
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(cfg.queue_max)
        self.dropped = 0  # events lost because the in-memory queue was full
        self._stop = threading.Event()
        self._wake = {name: threading.Event() for name in self.sinks}
        self._threads = [threading.Thread(target=self._write_loop, name="outbox-writer", daemon=True)]
        self._threads += [threading.Thread(target=self._deliver_loop, args=(name,), name=f"outbox-{name}", daemon=True)
                          for name in self.sinks]

    def _migrate(self) -> None:
        """Create the table, or bring a version-1 file (one row per event, rows of an older process not
        yet delivered) to a row per revision, keeping every row, its id (the delivery order, and the
        id counter, so ``/admin/deliveries?after=`` paging goes on) and status. Decided on the table's
        columns inside the write lock: another process opening the file at the same time, or an older
        release that reopened a migrated file (it sets the version back), migrates nothing twice."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: outbox version {version} is newer than this dishtrack's "
                                   f"({_SCHEMA_VERSION})")
            columns = {r[1] for r in db.execute("PRAGMA table_info(outbox)")}
            if columns and "revision" not in columns:
                db.execute("ALTER TABLE outbox RENAME TO outbox_v1")  # its sqlite_sequence row goes with it
                db.execute(_TABLE)
                db.execute(f"INSERT INTO outbox({_COLUMNS_V1}) SELECT {_COLUMNS_V1} FROM outbox_v1")
                counter = db.execute("SELECT MAX(seq) FROM sqlite_sequence WHERE name IN ('outbox', 'outbox_v1')"
                                     ).fetchone()[0]
                db.execute("DROP TABLE outbox_v1")  # its indexes and counter with it
                if counter is not None:
                    db.execute("DELETE FROM sqlite_sequence WHERE name = 'outbox'")
                    db.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('outbox', ?)", (counter,))
                log.info("%s: outbox migrated to version %d (a row per revision)", self.path, _SCHEMA_VERSION)
            db.execute(_TABLE)
            for stmt in _INDEXES.strip().splitlines():
                db.execute(stmt)
            db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- producer side (pipeline thread, correction routes)
    def submit(self, record: dict) -> None:
        """Never blocks: a full queue (outbox disk stalled) drops the event for the sinks, counted and logged
        (it is in the event store already)."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            log.error("outbox queue full (%d): event %s not sent to %s", self.cfg.queue_max,
                      record.get("event_id"), ", ".join(self.sinks))

    def start(self) -> "Outbox":
        for s in self.sinks.values():
            s.on_ready = lambda name=s.name: self._ready(name)  # e.g. MQTT reconnected: retry now
            s.start()
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Write what is queued to disk, then stop; undelivered rows wait for the next start."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        for ev in self._wake.values():
            ev.set()
        for t in self._threads:
            if t.is_alive():
                t.join(max(0.1, deadline - time.monotonic()))
        for s in self.sinks.values():
            try:
                s.close()
            except Exception:  # noqa: BLE001 - a broker gone at shutdown
                log.exception("closing sink %s", s.name)
        with self._lock:
            self._db.close()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every submitted event is on disk and delivered (or failed); tests and shutdown."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._queue.unfinished_tasks == 0 and not self.pending():
                return True
            time.sleep(0.02)
        return False

    # -- writer thread
    def _write_loop(self) -> None:
        next_prune = 0.0
        while True:
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set():
                    return
                first = None
            batch = [first] if first is not None else []
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if batch:
                self._write(batch)
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + _PRUNE_EVERY_S
                self._prune()

    def _write(self, batch: list[dict]) -> None:
        now = time.time()
        rows = [(sink, r["event_id"], int(r.get("revision", 0)), r["seq"], r["camera_id"], r["zone_id"],
                 json.dumps(r, separators=(",", ":")), now) for r in batch for sink in self.sinks]
        while True:
            try:
                with self._lock:
                    self._db.execute("BEGIN IMMEDIATE")
                    self._db.executemany("INSERT INTO outbox(sink, event_id, revision, seq, camera_id, zone_id, body,"
                                         " created_at) VALUES (?,?,?,?,?,?,?,?)"
                                         " ON CONFLICT(sink, event_id, revision) DO NOTHING", rows)
                    self._db.execute("COMMIT")
                break
            except sqlite3.Error as e:  # disk full / locked: keep the batch, in order, and retry
                with self._lock:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                log.error("outbox write failed (%s); retrying", e)
                if self._stop.wait(1.0):
                    log.error("%d events not written to the outbox at shutdown", len(batch))
                    break
        for _ in batch:
            self._queue.task_done()
        for ev in self._wake.values():
            ev.set()

    def _prune(self) -> None:
        cutoff = time.time() - self.cfg.keep_delivered_days * 86400
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE status != 'pending' AND created_at < ?", (cutoff,))

    # -- one worker per sink
    def _ready(self, sink: str) -> None:
        with self._lock:
            self._db.execute("UPDATE outbox SET next_at = 0 WHERE sink = ? AND status = 'pending'", (sink,))
        self._wake[sink].set()

    def _head(self, sink: str) -> tuple[list[OutMessage], float]:
        """The oldest pending rows of ``sink``, or ([], seconds to wait) while none is due."""
        with self._lock:
            rows = self._db.execute("SELECT id, event_id, revision, camera_id, zone_id, body, attempts, next_at"
                                    " FROM outbox"
                                    " WHERE sink = ? AND status = 'pending' ORDER BY id LIMIT ?",
                                    (sink, _BATCH)).fetchall()
        if not rows:
            return [], 1.0
        if (wait := rows[0]["next_at"] - time.time()) > 0:
            return [], wait  # backing off
        return [OutMessage(r["id"], r["event_id"], r["camera_id"], r["zone_id"], r["body"], r["attempts"],
                           r["revision"]) for r in rows], 0.0

    def _deliver_loop(self, name: str) -> None:
        sink, wake = self.sinks[name], self._wake[name]
        while not self._stop.is_set():
            wake.clear()  # before reading: a row written after this read wakes the wait below
            msgs, wait = self._head(name)
            if not msgs:
                wake.wait(wait)  # new rows, a sink back up (on_ready) or stop end it early
                continue
            try:
                res = sink.deliver(msgs)
            except Exception as e:  # noqa: BLE001 - a sink bug must not end its worker
                log.exception("sink %s failed", name)
                res = DeliveryResult(0, f"{type(e).__name__}: {e}")
            self._record(name, msgs, res.delivered, res.error)

    def _record(self, sink: str, msgs: list[OutMessage], delivered: int, error: str | None) -> None:
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("UPDATE outbox SET status='delivered', delivered_at=?, attempts=attempts+1,"
                                 " last_error=NULL WHERE id=?", [(now, m.id) for m in msgs[:delivered]])
            if delivered < len(msgs) and error is not None:
                head = msgs[delivered]
                attempts = head.attempts + 1
                delay = min(self.cfg.retry_initial_s * 2 ** (attempts - 1), self.cfg.retry_max_s)
                limit = getattr(getattr(self.sinks[sink], "cfg", None), "max_attempts", None)
                status = "failed" if limit is not None and attempts >= limit else "pending"
                self._db.execute("UPDATE outbox SET attempts=?, next_at=?, last_error=?, status=? WHERE id=?",
                                 (attempts, now + delay, error, status, head.id))
                if attempts == 1 or status == "failed":
                    log.warning("delivery of %s to %s %s: %s", head.event_id, sink,
                                "failed for good" if status == "failed" else "failed, retrying", error)
            self._db.execute("COMMIT")

    # -- status (API)
    def pending(self, sink: str | None = None) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM outbox WHERE status='pending'"
                                    + (" AND sink=?" if sink else ""), (sink,) if sink else ()).fetchone()[0]

    def sink_names(self) -> list[str]:
        """The configured sinks and any other the outbox file still holds rows of (a sink since removed)."""
        with self._lock:
            stored = [r[0] for r in self._db.execute("SELECT DISTINCT sink FROM outbox")]
        return sorted(set(self.sinks) | set(stored))

    def summary(self) -> list[dict]:
        """Per sink: counts per status, the oldest pending event's age and the last error."""
        out = []
        now = time.time()
        with self._lock:
            for name in self.sinks:
                counts = dict.fromkeys(STATUSES, 0)
                for r in self._db.execute("SELECT status, COUNT(*) FROM outbox WHERE sink=? GROUP BY status",
                                          (name,)):
                    counts[r[0]] = r[1]
                head = self._db.execute("SELECT created_at, last_error FROM outbox WHERE sink=? AND status='pending'"
                                        " ORDER BY id LIMIT 1", (name,)).fetchone()
                out.append({"sink": name, **counts,
                            "oldest_pending_s": None if head is None else round(now - head["created_at"], 3),
                            "last_error": None if head is None else head["last_error"]})
        return out

    def deliveries(self, *, sink: str | None = None, status: str | None = None, event_id: str | None = None,
                   after: int = 0, limit: int = 100) -> list[dict]:
        """Outbox rows (newest state), in delivery order after row id ``after``."""
        where, args = ["id > ?"], [after]
        for col, v in (("sink", sink), ("status", status), ("event_id", event_id)):
            if v is not None:
                where.append(f"{col} = ?")
                args.append(v)
        with self._lock:
            rows = self._db.execute(f"SELECT id, sink, event_id, revision, seq, camera_id, status, attempts, last_error, "
                                    f"created_at, delivered_at, next_at FROM outbox WHERE {' AND '.join(where)} "
                                    "ORDER BY id LIMIT ?", (*args, limit)).fetchall()
        return [{**dict(r), "next_at": r["next_at"] if r["status"] == "pending" and r["next_at"] else None}
                for r in rows]


def build_outbox(cfg: IntegrationsConfig) -> Outbox | None:
    """The outbox with the configured sinks; None when no sink is configured (nothing written)."""
    from .sinks import build_sinks

    sinks = build_sinks(cfg)
    return Outbox(cfg, sinks) if sinks else None

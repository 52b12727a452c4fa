"""The review database (``review_db.ReviewDb``) in the SQLite event file: tables created by their
own migration step (``CORRECTIONS_MIGRATION``) on the store's connection, a trigger deleting them
with their event (retention bounds them too), and the ``dishes_sold_hourly`` view for SQL tools.
One process owns the file, so the store's lock and ``BEGIN IMMEDIATE`` serialise corrections."""
from __future__ import annotations

import json
import sqlite3

from .evidence import EvidenceUnit
from .review_db import (AnalyticsRows, EvidenceRow, NewRevision, Revision, RevisionConflict, StoredCrop,
                        event_filter)
from .store import EventStore, _record

CORRECTIONS_MIGRATION = """
CREATE TABLE IF NOT EXISTS event_evidence (
    event_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    track_id INTEGER,
    label TEXT NOT NULL,
    confidence REAL,
    box TEXT,
    jpeg BLOB,
    PRIMARY KEY (event_id, idx)
);
CREATE TABLE IF NOT EXISTS event_revisions (
    event_id TEXT NOT NULL,
    revision INTEGER NOT NULL,
    payload TEXT NOT NULL,
    units TEXT NOT NULL,
    changes TEXT NOT NULL,
    corrected_by TEXT,
    corrected_at REAL,
    PRIMARY KEY (event_id, revision)
);
CREATE TABLE IF NOT EXISTS corrections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    revision INTEGER NOT NULL,
    unit INTEGER NOT NULL,
    op TEXT NOT NULL,
    model_label TEXT,
    original_label TEXT,
    corrected_label TEXT,
    corrected_by TEXT NOT NULL,
    corrected_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS corrections_event ON corrections(event_id, unit);
CREATE TABLE IF NOT EXISTS revision_feed (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS events_delete_corrections AFTER DELETE ON events BEGIN
    DELETE FROM event_evidence WHERE event_id = OLD.event_id;
    DELETE FROM event_revisions WHERE event_id = OLD.event_id;
    DELETE FROM corrections WHERE event_id = OLD.event_id;
END;
CREATE VIEW IF NOT EXISTS dishes_sold_hourly AS
    SELECT CAST(e.ended_at / 3600 AS INTEGER) * 3600 AS hour_start, e.camera_id, l.label, SUM(l.count) AS dishes
    FROM events e JOIN event_labels l ON l.seq = e.seq GROUP BY hour_start, e.camera_id, l.label;
"""


def _statements(script: str) -> list[str]:
    """Split the migration script into statements (triggers contain ';' inside BEGIN .. END)."""
    out, buf = [], []
    for line in script.strip().splitlines():
        buf.append(line)
        text = "\n".join(buf)
        if sqlite3.complete_statement(text):
            out.append(text)
            buf = []
    return out


def _revision(r: sqlite3.Row) -> Revision:
    return Revision(r["revision"], json.loads(r["payload"]), json.loads(r["units"]), json.loads(r["changes"]),
                    r["corrected_by"], r["corrected_at"], r["feed_seq"])


class SqliteReviewDb:
    def __init__(self, store: EventStore) -> None:
        self.store = store
        with store.transaction() as db:  # migration step: the review tables (idempotent)
            for stmt in _statements(CORRECTIONS_MIGRATION):
                db.execute(stmt)
            # files from before the corrections feed: revisions stored then have none (they were published)
            if "feed_seq" not in {r[1] for r in db.execute("PRAGMA table_info(event_revisions)")}:
                db.execute("ALTER TABLE event_revisions ADD COLUMN feed_seq INTEGER")
            db.execute("CREATE UNIQUE INDEX IF NOT EXISTS event_revisions_feed ON event_revisions(feed_seq)")
            # the counter starts above any position already handed out (a file restored without its row)
            db.execute("INSERT OR IGNORE INTO revision_feed(id, last)"
                       " SELECT 1, COALESCE(MAX(feed_seq), 0) FROM event_revisions")

    def close(self) -> None:
        pass  # the store's connection: closed with the store

    def event(self, event_id: str) -> dict | None:
        return self.store.get(event_id)

    def save_evidence(self, event_id: str, units: list[EvidenceUnit]) -> None:
        with self.store.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO event_evidence(event_id, idx, track_id, label, confidence, box,"
                           " jpeg) VALUES (?,?,?,?,?,?,?)",
                           [(event_id, u.index, u.track_id, u.label, u.confidence,
                             json.dumps(u.box) if u.box else None, u.jpeg) for u in units])

    def evidence(self, event_id: str) -> list[EvidenceRow]:
        return [EvidenceRow(r["idx"], r["track_id"], r["label"], r["confidence"], bool(r["crop"]))
                for r in self.store.query("SELECT idx, track_id, label, confidence, jpeg IS NOT NULL AS crop"
                                          " FROM event_evidence WHERE event_id=? ORDER BY idx", (event_id,))]

    def crop(self, event_id: str, index: int) -> StoredCrop | None:
        rows = self.store.query("SELECT box, jpeg FROM event_evidence WHERE event_id=? AND idx=?", (event_id, index))
        if not rows or not rows[0]["jpeg"]:
            return None
        box = rows[0]["box"]
        return StoredCrop(rows[0]["jpeg"], tuple(json.loads(box)) if box else None)

    def revision(self, event_id: str, revision: int) -> Revision | None:
        rows = self.store.query("SELECT * FROM event_revisions WHERE event_id=? AND revision=?", (event_id, revision))
        return _revision(rows[0]) if rows else None

    def revisions(self, event_id: str) -> list[Revision]:
        return [_revision(r) for r in self.store.query(
            "SELECT * FROM event_revisions WHERE event_id=? ORDER BY revision", (event_id,))]

    def commit_revision(self, new: NewRevision) -> int:
        p = new.payload
        with self.store.transaction() as db:
            row = db.execute("SELECT COALESCE(json_extract(payload, '$.revision'), 0) FROM events WHERE event_id=?",
                             (new.event_id,)).fetchone()
            if row is None or row[0] != new.revision - 1:
                raise RevisionConflict(None if row is None else row[0])
            if new.original is not None:
                o = new.original
                db.execute("INSERT OR IGNORE INTO event_revisions(event_id, revision, payload, units, changes)"
                           " VALUES (?,0,?,?,'[]')", (new.event_id, json.dumps(o.payload), json.dumps(o.units)))
            # a counter row, not MAX(feed_seq) + 1: retention deleting the newest revision must not reuse it
            db.execute("UPDATE revision_feed SET last = last + 1 WHERE id = 1")
            feed_seq = db.execute("SELECT last FROM revision_feed WHERE id = 1").fetchone()[0]
            db.execute("INSERT INTO event_revisions(event_id, revision, payload, units, changes, corrected_by,"
                       " corrected_at, feed_seq) VALUES (?,?,?,?,?,?,?,?)",
                       (new.event_id, new.revision, json.dumps(p), json.dumps(new.units), json.dumps(new.changes),
                        new.corrected_by, new.corrected_at, feed_seq))
            db.executemany("INSERT INTO corrections(event_id, revision, unit, op, model_label, original_label,"
                           " corrected_label, corrected_by, corrected_at) VALUES (?,?,?,?,?,?,?,?,?)",
                           [(new.event_id, new.revision, c.unit, c.op, c.model_label, c.original_label,
                             c.corrected_label, new.corrected_by, new.corrected_at) for c in new.rows])
            db.execute("UPDATE events SET payload=?, needs_review=?, confidence=?, currency=?, total=? "
                       "WHERE event_id=?", (json.dumps(p), int(p["needs_review"]), p["confidence"], p["currency"],
                                            p["total"], new.event_id))
            db.execute("DELETE FROM event_labels WHERE seq=?", (new.seq,))
            db.executemany("INSERT INTO event_labels(seq, label, count) VALUES (?,?,?)",
                           [(new.seq, i["label"], i["count"]) for i in p["items"]])
        return feed_seq

    def last_feed_seq(self) -> int:
        rows = self.store.query("SELECT last FROM revision_feed WHERE id = 1")
        return rows[0]["last"] if rows else 0

    def corrected_after(self, cursor: int, limit: int = 500) -> list[tuple[int, dict]]:
        rows = self.store.query("SELECT r.feed_seq, e.seq, r.payload FROM event_revisions r JOIN events e"
                                " ON e.event_id = r.event_id WHERE r.feed_seq > ? ORDER BY r.feed_seq LIMIT ?",
                                (cursor, limit))
        return [(r["feed_seq"], {**_record(r["seq"], r["payload"]), "feed_seq": r["feed_seq"]}) for r in rows]

    def analytics(self, since: float | None, until: float | None, camera: str | None, bucket_s: int,
                  top_pairs: int) -> AnalyticsRows:
        where, args = event_filter(since, until, camera, "?")
        q = self.store.query
        b = int(bucket_s)
        per_hour = [dict(r) for r in q(
            f"SELECT CAST(e.ended_at / {b} AS INTEGER) * {b} AS hour_start, e.camera_id, SUM(l.count) AS dishes"
            f" FROM events e JOIN event_labels l ON l.seq = e.seq WHERE {where}"
            " GROUP BY hour_start, e.camera_id ORDER BY hour_start, e.camera_id", args)]
        per_camera = [dict(r) for r in q(
            f"SELECT e.camera_id, COUNT(*) AS events, COALESCE(SUM((SELECT SUM(count) FROM event_labels l"
            f" WHERE l.seq = e.seq)), 0) AS dishes FROM events e WHERE {where} GROUP BY e.camera_id"
            " ORDER BY e.camera_id", args)]
        per_dish = [dict(r) for r in q(
            f"SELECT l.label, SUM(l.count) AS dishes FROM events e JOIN event_labels l ON l.seq = e.seq"
            f" WHERE {where} GROUP BY l.label ORDER BY dishes DESC, l.label", args)]
        r = q("SELECT COUNT(*) AS events,"
              " COALESCE(SUM(CASE WHEN r0.payload IS NOT NULL THEN json_extract(r0.payload, '$.needs_review')"
              " ELSE e.needs_review END), 0) AS needed_review,"
              " COALESCE(SUM(r0.payload IS NOT NULL), 0) AS corrected,"
              " COALESCE(SUM(r0.payload IS NOT NULL AND json_extract(r0.payload, '$.needs_review')), 0)"
              " AS review_corrected"
              " FROM events e LEFT JOIN event_revisions r0 ON r0.event_id = e.event_id AND r0.revision = 0"
              f" WHERE {where}", args)[0]
        # per dish the latest relabel decides; a pair is (what the model said, what the cashier set)
        pairs = [{"detected": p["model_label"], "corrected": p["corrected_label"], "count": p["n"]} for p in q(
            "SELECT c.model_label, c.corrected_label, COUNT(*) AS n FROM corrections c JOIN events e"
            " ON e.event_id = c.event_id WHERE c.op = 'relabel' AND c.model_label IS NOT NULL"
            " AND c.model_label != c.corrected_label AND c.id = (SELECT MAX(c2.id) FROM corrections c2"
            " WHERE c2.event_id = c.event_id AND c2.unit = c.unit AND c2.op IN ('relabel', 'remove'))"
            f" AND {where} GROUP BY c.model_label, c.corrected_label"
            " ORDER BY n DESC, c.model_label, c.corrected_label LIMIT ?",
            (*args, top_pairs))]
        ops = {p["op"]: p["n"] for p in q(
            f"SELECT c.op, COUNT(*) AS n FROM corrections c JOIN events e ON e.event_id = c.event_id WHERE {where}"
            " GROUP BY c.op", args)}
        return AnalyticsRows(per_hour, per_camera, per_dish, r["events"], r["needed_review"], r["corrected"],
                             r["review_corrected"], pairs, ops)

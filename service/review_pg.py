"""The review database (``review_db.ReviewDb``) in PostgreSQL, next to the events of
``store_pg.PgEventStore`` (tables: store_pg migration 2, deleted with their event by
``ON DELETE CASCADE``), shared by every node on the database.

Several nodes may correct the same event at once. ``commit_revision`` locks the event's row
(``SELECT .. FOR UPDATE``) and checks its revision inside the transaction, and
(event_id, revision) is the revisions table's primary key, so exactly one correction wins a
revision; the other sees ``RevisionConflict`` and is answered from what the winner stored
(200 for the same changes, else 409). A corrected revision gets a ``feed_seq`` drawn under an
advisory lock held to commit (commit order, as events' ``seq``) and NOTIFYs the events channel,
so ``feed.StoreFeed`` delivers it to every node's websocket, with the event's ``seq``."""
from __future__ import annotations

import psycopg
from psycopg.types.json import Jsonb

from .evidence import EvidenceUnit
from .review_db import (AnalyticsRows, EvidenceRow, NewRevision, Revision, RevisionConflict, StoredCrop,
                        event_filter)
from .store import _record
from .store_pg import CHANNEL, REVISION_LOCK, PgEventStore, _Conn


def _rows(cur) -> list[dict]:
    names = [d.name for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


_REVISION_COLS = "revision, payload, units, changes, corrected_by, corrected_at, feed_seq"


class PgReviewDb:
    """Thread-safe: one connection for writes (evidence from the pipeline, corrections), one for reads."""

    def __init__(self, store: PgEventStore) -> None:
        if not isinstance(store, PgEventStore):
            raise TypeError(f"no review database for {type(store).__name__}")
        self.store = store  # its migrations created the tables (schema version >= 2)
        self._w, self._r = _Conn(store.url), _Conn(store.url)

    def close(self) -> None:
        for c in (self._w, self._r):
            c.close()

    def event(self, event_id: str) -> dict | None:
        return self.store.get(event_id)

    def save_evidence(self, event_id: str, units: list[EvidenceUnit]) -> None:
        if not units:
            return
        with self._w.use() as c, c.transaction(), c.cursor() as cur:
            cur.executemany(
                "INSERT INTO event_evidence(event_id, idx, track_id, label, confidence, box, jpeg)"
                " VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (event_id, idx) DO UPDATE SET track_id=EXCLUDED.track_id,"
                " label=EXCLUDED.label, confidence=EXCLUDED.confidence, box=EXCLUDED.box, jpeg=EXCLUDED.jpeg",
                [(event_id, u.index, u.track_id, u.label, u.confidence, Jsonb(list(u.box)) if u.box else None,
                  u.jpeg) for u in units])

    def evidence(self, event_id: str) -> list[EvidenceRow]:
        with self._r.use() as c:
            rows = c.execute("SELECT idx, track_id, label, confidence, jpeg IS NOT NULL FROM event_evidence"
                             " WHERE event_id=%s ORDER BY idx", (event_id,)).fetchall()
        return [EvidenceRow(*r) for r in rows]

    def crop(self, event_id: str, index: int) -> StoredCrop | None:
        with self._r.use() as c:
            row = c.execute("SELECT box, jpeg FROM event_evidence WHERE event_id=%s AND idx=%s",
                            (event_id, index)).fetchone()
        if row is None or not row[1]:
            return None
        return StoredCrop(bytes(row[1]), tuple(row[0]) if row[0] else None)

    def revision(self, event_id: str, revision: int) -> Revision | None:
        with self._r.use() as c:
            row = c.execute(f"SELECT {_REVISION_COLS} FROM event_revisions WHERE event_id=%s AND revision=%s",
                            (event_id, revision)).fetchone()
        return Revision(*row) if row else None

    def revisions(self, event_id: str) -> list[Revision]:
        with self._r.use() as c:
            rows = c.execute(f"SELECT {_REVISION_COLS} FROM event_revisions WHERE event_id=%s ORDER BY revision",
                             (event_id,)).fetchall()
        return [Revision(*r) for r in rows]

    def commit_revision(self, new: NewRevision) -> int:
        p = new.payload
        try:
            with self._w.use() as c, c.transaction():
                row = c.execute("SELECT COALESCE((payload->>'revision')::int, 0) FROM events WHERE event_id=%s"
                                " FOR UPDATE", (new.event_id,)).fetchone()  # corrections of one event queue here
                if row is None or row[0] != new.revision - 1:
                    raise RevisionConflict(None if row is None else row[0])
                if new.original is not None:
                    o = new.original
                    c.execute("INSERT INTO event_revisions(event_id, revision, payload, units, changes)"
                              " VALUES (%s, 0, %s, %s, '[]') ON CONFLICT DO NOTHING",
                              (new.event_id, Jsonb(o.payload), Jsonb(o.units)))
                c.execute("SELECT pg_advisory_xact_lock(%s)", (REVISION_LOCK,))  # feed_seq in commit order
                feed_seq = c.execute("SELECT nextval('event_revisions_feed_seq')").fetchone()[0]
                c.execute("INSERT INTO event_revisions(event_id, revision, payload, units, changes, corrected_by,"
                          " corrected_at, feed_seq) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
                          (new.event_id, new.revision, Jsonb(p), Jsonb(new.units), Jsonb(new.changes),
                           new.corrected_by, new.corrected_at, feed_seq))
                with c.cursor() as cur:
                    if new.rows:
                        cur.executemany(
                            "INSERT INTO corrections(event_id, revision, unit, op, model_label, original_label,"
                            " corrected_label, corrected_by, corrected_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                            [(new.event_id, new.revision, r.unit, r.op, r.model_label, r.original_label,
                              r.corrected_label, new.corrected_by, new.corrected_at) for r in new.rows])
                    c.execute("UPDATE events SET payload=%s, needs_review=%s, confidence=%s, currency=%s, total=%s"
                              " WHERE event_id=%s", (Jsonb(p), bool(p["needs_review"]), p["confidence"],
                                                    p["currency"], p["total"], new.event_id))
                    c.execute("DELETE FROM event_labels WHERE seq=%s", (new.seq,))
                    if p["items"]:
                        cur.executemany("INSERT INTO event_labels(seq, label, count) VALUES (%s,%s,%s)",
                                        [(new.seq, i["label"], i["count"]) for i in p["items"]])
                c.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"r{new.seq}"))  # wakes every node's feed
        except psycopg.errors.UniqueViolation:  # the key decided it (the row lock should have already)
            raise RevisionConflict(new.revision) from None
        return feed_seq

    # -- the websocket feed (feed.StoreFeed): corrected revisions in commit order
    def last_feed_seq(self) -> int:
        with self._r.use() as c:
            return c.execute("SELECT COALESCE(MAX(feed_seq), 0) FROM event_revisions").fetchone()[0]

    def corrected_after(self, cursor: int, limit: int = 500) -> list[tuple[int, dict]]:
        """(feed_seq, record as GET /events/{id} served it then) of corrected revisions after ``cursor``."""
        with self._r.use() as c:
            rows = c.execute("SELECT r.feed_seq, e.seq, r.payload FROM event_revisions r JOIN events e"
                             " ON e.event_id = r.event_id WHERE r.feed_seq > %s ORDER BY r.feed_seq LIMIT %s",
                             (cursor, limit)).fetchall()
        return [(f, {**_record(seq, payload), "feed_seq": f}) for f, seq, payload in rows]

    def analytics(self, since: float | None, until: float | None, camera: str | None, bucket_s: int,
                  top_pairs: int) -> AnalyticsRows:
        where, args = event_filter(since, until, camera, "%s")
        b = int(bucket_s)
        with self._r.use() as c:
            def q(sql: str, a: tuple = args) -> list[dict]:
                return _rows(c.execute(sql, a))

            per_hour = q(f"SELECT (FLOOR(e.ended_at / {b}) * {b})::BIGINT AS hour_start, e.camera_id,"
                         " SUM(l.count)::BIGINT AS dishes FROM events e JOIN event_labels l ON l.seq = e.seq"
                         f" WHERE {where} GROUP BY 1, 2 ORDER BY hour_start, e.camera_id COLLATE \"C\"")
            per_camera = q("SELECT e.camera_id, COUNT(*) AS events, COALESCE(SUM((SELECT SUM(l.count) FROM"
                           " event_labels l WHERE l.seq = e.seq)), 0)::BIGINT AS dishes FROM events e"
                           f" WHERE {where} GROUP BY e.camera_id ORDER BY e.camera_id COLLATE \"C\"")
            per_dish = q("SELECT l.label, SUM(l.count)::BIGINT AS dishes FROM events e JOIN event_labels l"
                         f" ON l.seq = e.seq WHERE {where} GROUP BY l.label ORDER BY dishes DESC,"
                         " l.label COLLATE \"C\"")
            r = q("SELECT COUNT(*) AS events,"
                  " COUNT(*) FILTER (WHERE CASE WHEN r0.payload IS NOT NULL"
                  " THEN COALESCE((r0.payload->>'needs_review')::boolean, FALSE) ELSE e.needs_review END)"
                  " AS needed_review, COUNT(r0.payload) AS corrected,"
                  " COUNT(*) FILTER (WHERE COALESCE((r0.payload->>'needs_review')::boolean, FALSE))"
                  " AS review_corrected"
                  " FROM events e LEFT JOIN event_revisions r0 ON r0.event_id = e.event_id AND r0.revision = 0"
                  f" WHERE {where}")[0]
            # per dish the latest relabel decides; a pair is (what the model said, what the cashier set)
            pairs = [{"detected": p["model_label"], "corrected": p["corrected_label"], "count": p["n"]} for p in q(
                "SELECT c.model_label, c.corrected_label, COUNT(*) AS n FROM corrections c JOIN events e"
                " ON e.event_id = c.event_id WHERE c.op = 'relabel' AND c.model_label IS NOT NULL"
                " AND c.model_label <> c.corrected_label AND c.id = (SELECT MAX(c2.id) FROM corrections c2"
                " WHERE c2.event_id = c.event_id AND c2.unit = c.unit AND c2.op IN ('relabel', 'remove'))"
                f" AND {where} GROUP BY c.model_label, c.corrected_label"
                " ORDER BY n DESC, c.model_label COLLATE \"C\", c.corrected_label COLLATE \"C\" LIMIT %s",
                (*args, top_pairs))]
            ops = {p["op"]: p["n"] for p in q(
                "SELECT c.op, COUNT(*) AS n FROM corrections c JOIN events e ON e.event_id = c.event_id"
                f" WHERE {where} GROUP BY c.op")}
        return AnalyticsRows(per_hour, per_camera, per_dish, r["events"], r["needed_review"], r["corrected"],
                             r["review_corrected"], pairs, ops)

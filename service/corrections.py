"""Cashier corrections: evidence crops stored next to each event, corrected receipts as new
revisions (who, when, original vs corrected), and corrected crops written out as labelled
examples for ``dishtrack train --data``.

Tables live in the event database, created by their own migration step
(``CORRECTIONS_MIGRATION``) on the store's connection; triggers delete them with their event,
so retention bounds them too. Revision 0 is the event as the pipeline stored it; a correction
creates revision N+1, replaces the event's payload (``GET /events`` serves the latest) and keeps
every revision. Idempotent by (event_id, revision): the same revision sent again returns the
stored one; a different correction under an existing number is a conflict.
"""
from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from dishtrack.tracking.types import CheckoutEvent, CheckoutItem

from .evidence import EvidenceUnit
from .store import EventStore

log = logging.getLogger(__name__)

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
CREATE TRIGGER IF NOT EXISTS events_delete_corrections AFTER DELETE ON events BEGIN
    DELETE FROM event_evidence WHERE event_id = OLD.event_id;
    DELETE FROM event_revisions WHERE event_id = OLD.event_id;
    DELETE FROM corrections WHERE event_id = OLD.event_id;
END;
CREATE VIEW IF NOT EXISTS dishes_sold_hourly AS
    SELECT CAST(e.ended_at / 3600 AS INTEGER) * 3600 AS hour_start, e.camera_id, l.label, SUM(l.count) AS dishes
    FROM events e JOIN event_labels l ON l.seq = e.seq GROUP BY hour_start, e.camera_id, l.label;
"""
_LABEL = re.compile(r"^[^\x00-\x1f<>]{1,64}$")
OPS = ("relabel", "remove", "add")


class CorrectionError(ValueError):
    """A correction that cannot apply; ``status``: 404 unknown event, 409 revision conflict, 422 bad change."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Change:
    op: str  # relabel | remove | add
    unit: int | None = None  # index of the dish (relabel, remove)
    label: str | None = None  # new label (relabel, add)

    def to_dict(self) -> dict:
        return {"op": self.op, "unit": self.unit, "label": self.label}


@dataclass(frozen=True, slots=True)
class Outcome:
    record: dict  # the event's latest revision, as GET /events serves it
    revision: int  # the revision the request named
    created: bool  # False: the same revision was already stored (idempotent replay)


def _unit_dict(u: EvidenceUnit) -> dict:
    return {"index": u.index, "track_id": u.track_id, "label": u.label, "model_label": u.label,
            "confidence": u.confidence, "crop": u.jpeg is not None, "removed": False, "added": False}


class CorrectionStore:
    def __init__(self, store: EventStore, dataset_dir: str | Path, menu=None) -> None:
        self.store = store
        self.dataset = Path(dataset_dir)
        self.menu = menu
        self._write_lock = threading.Lock()  # one correction at a time (revision numbers, manifest file)
        with store.transaction() as db:  # migration step: corrections tables (idempotent)
            for stmt in _statements(CORRECTIONS_MIGRATION):
                db.execute(stmt)

    # -- evidence
    def save_evidence(self, event_id: str, units: list[EvidenceUnit]) -> None:
        with self.store.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO event_evidence(event_id, idx, track_id, label, confidence, box,"
                           " jpeg) VALUES (?,?,?,?,?,?,?)",
                           [(event_id, u.index, u.track_id, u.label, u.confidence,
                             json.dumps(u.box) if u.box else None, u.jpeg) for u in units])

    def crop(self, event_id: str, index: int) -> bytes | None:
        rows = self.store.query("SELECT jpeg FROM event_evidence WHERE event_id=? AND idx=?", (event_id, index))
        return rows[0]["jpeg"] if rows and rows[0]["jpeg"] else None

    def _base_units(self, record: dict) -> list[dict]:
        rows = self.store.query("SELECT idx, track_id, label, confidence, jpeg IS NOT NULL AS crop FROM event_evidence"
                                " WHERE event_id=? ORDER BY idx", (record["event_id"],))
        if rows:
            return [{"index": r["idx"], "track_id": r["track_id"], "label": r["label"], "model_label": r["label"],
                     "confidence": r["confidence"], "crop": bool(r["crop"]), "removed": False, "added": False}
                    for r in rows]
        units = []  # no evidence kept (disabled, or an older event): one unit per counted dish, no picture
        for it in record["items"]:
            for _ in range(it["count"]):
                units.append({"index": len(units), "track_id": None, "label": it["label"], "model_label": it["label"],
                              "confidence": it["confidence"], "crop": False, "removed": False, "added": False})
        return units

    def units(self, event_id: str) -> tuple[dict, list[dict]] | None:
        """(latest record, its units) or None for an unknown event."""
        record = self.store.get(event_id)
        if record is None:
            return None
        rev = record.get("revision", 0)
        if rev:
            rows = self.store.query("SELECT units FROM event_revisions WHERE event_id=? AND revision=?",
                                    (event_id, rev))
            if rows:
                return record, json.loads(rows[0]["units"])
        return record, self._base_units(record)

    def history(self, event_id: str) -> list[dict] | None:
        """Every revision, oldest first (revision 0: as the pipeline stored it)."""
        got = self.units(event_id)
        if got is None:
            return None
        record, units = got
        rows = self.store.query("SELECT * FROM event_revisions WHERE event_id=? ORDER BY revision", (event_id,))
        if not rows:
            return [{"revision": 0, "event": record, "units": units, "changes": [], "corrected_by": None,
                     "corrected_at": None}]
        return [{"revision": r["revision"], "event": {"seq": record["seq"], **json.loads(r["payload"])},
                 "units": json.loads(r["units"]), "changes": json.loads(r["changes"]),
                 "corrected_by": r["corrected_by"], "corrected_at": r["corrected_at"]} for r in rows]

    # -- corrections
    def correct(self, event_id: str, revision: int, changes: list[Change], who: str,
                now: float | None = None) -> Outcome:
        with self._write_lock:
            got = self.units(event_id)
            if got is None:
                raise CorrectionError(404, f"no event {event_id!r}")
            record, units = got
            current = record.get("revision", 0)
            if revision <= current:
                rows = self.store.query("SELECT changes FROM event_revisions WHERE event_id=? AND revision=?",
                                        (event_id, revision))
                if rows and json.loads(rows[0]["changes"]) == [c.to_dict() for c in changes]:
                    return Outcome(record, revision, False)
                raise CorrectionError(409, f"event {event_id} already has revision {revision} "
                                      f"(latest {current}) with other changes; correct the latest")
            if revision != current + 1:
                raise CorrectionError(409, f"event {event_id} is at revision {current}: the next is {current + 1}")
            if not changes:
                raise CorrectionError(422, "no changes")
            now = time.time() if now is None else now
            new_units = [dict(u) for u in units]
            logged = []
            for c in changes:
                logged.append(self._apply(new_units, c))
            payload = self._payload(record, new_units, revision, who, now)
            self._commit(record, units, new_units, payload, changes, logged, revision, who, now)
            self._write_examples(event_id, revision, new_units, logged, who)
            return Outcome({"seq": record["seq"], **payload}, revision, True)

    def _apply(self, units: list[dict], c: Change) -> tuple:
        """Apply one change in place; returns (unit, op, original label, corrected label)."""
        if c.op not in OPS:
            raise CorrectionError(422, f"unknown op {c.op!r} (one of {', '.join(OPS)})")
        if c.op in ("relabel", "add") and (not isinstance(c.label, str) or not _LABEL.match(c.label.strip())):
            raise CorrectionError(422, f"{c.op}: label must be 1..64 printable characters, got {c.label!r}")
        if c.op == "add":
            u = {"index": len(units), "track_id": None, "label": c.label.strip(), "model_label": None,
                 "confidence": 1.0, "crop": False, "removed": False, "added": True}
            units.append(u)
            return u["index"], "add", None, u["label"]
        if c.unit is None or not 0 <= c.unit < len(units) or units[c.unit]["removed"]:
            raise CorrectionError(422, f"{c.op}: no dish #{c.unit} on this receipt")
        u = units[c.unit]
        before = u["label"]
        if c.op == "remove":
            u["removed"] = True
            return c.unit, "remove", before, None
        u["label"], u["confidence"] = c.label.strip(), 1.0
        return c.unit, "relabel", before, u["label"]

    def _payload(self, record: dict, units: list[dict], revision: int, who: str, now: float) -> dict:
        live = [u for u in units if not u["removed"]]
        by_label: dict[str, list[float]] = defaultdict(list)
        for u in live:
            by_label[u["label"]].append(float(u["confidence"] if u["confidence"] is not None else 1.0))
        items = tuple(CheckoutItem(label=lbl, count=len(c), confidence=round(sum(c) / len(c), 4))
                      for lbl, c in sorted(by_label.items()))
        ev = CheckoutEvent(event_id=record["event_id"], camera_id=record["camera_id"], zone_id=record["zone_id"],
                           started_at=record["started_at"], ended_at=record["ended_at"], items=items,
                           track_ids=tuple(u["track_id"] for u in live if u["track_id"] is not None),
                           confidence=round(min((i.confidence for i in items), default=1.0), 4))
        if self.menu is not None:
            ev = self.menu.apply(ev)  # a dish missing from the menu stays flagged, never priced at 0
        return {**ev.to_dict(), "revision": revision, "corrected": True, "corrected_by": who, "corrected_at": now}

    def _commit(self, record, old_units, new_units, payload, changes, logged, revision, who, now) -> None:
        ev_id = record["event_id"]
        with self.store.transaction() as db:
            if revision == 1:  # keep what the pipeline stored as revision 0
                original = {k: v for k, v in record.items() if k != "seq"}
                db.execute("INSERT OR IGNORE INTO event_revisions(event_id, revision, payload, units, changes)"
                           " VALUES (?,0,?,?,'[]')", (ev_id, json.dumps(original), json.dumps(old_units)))
            db.execute("INSERT INTO event_revisions(event_id, revision, payload, units, changes, corrected_by,"
                       " corrected_at) VALUES (?,?,?,?,?,?,?)",
                       (ev_id, revision, json.dumps(payload), json.dumps(new_units),
                        json.dumps([c.to_dict() for c in changes]), who, now))
            db.executemany("INSERT INTO corrections(event_id, revision, unit, op, model_label, original_label,"
                           " corrected_label, corrected_by, corrected_at) VALUES (?,?,?,?,?,?,?,?,?)",
                           [(ev_id, revision, unit, op, new_units[unit]["model_label"], before, after, who, now)
                            for unit, op, before, after in logged])
            db.execute("UPDATE events SET payload=?, needs_review=?, confidence=?, currency=?, total=? "
                       "WHERE event_id=?", (json.dumps(payload), int(payload["needs_review"]),
                                            payload["confidence"], payload["currency"], payload["total"], ev_id))
            db.execute("DELETE FROM event_labels WHERE seq=?", (record["seq"],))
            db.executemany("INSERT INTO event_labels(seq, label, count) VALUES (?,?,?)",
                           [(record["seq"], i["label"], i["count"]) for i in payload["items"]])

    # -- training examples
    def _write_examples(self, event_id: str, revision: int, units: list[dict], logged: list[tuple],
                        who: str) -> None:
        """Relabelled dishes with a crop -> ``dataset_dir``: crops/<event>_<unit>.jpg, a ``manifest.jsonl``
        line (the box in the crop, the corrected label; a later correction of the same dish replaces it)
        and ``trays.csv`` (one group per event, so validation never splits an event)."""
        relabelled = sorted({unit for unit, op, _, _ in logged if op == "relabel"})
        rows = []
        for k in relabelled:
            u = units[k]
            if u["removed"] or not u["crop"]:
                continue
            got = self.store.query("SELECT box, jpeg FROM event_evidence WHERE event_id=? AND idx=?", (event_id, k))
            if not got or not got[0]["jpeg"] or not got[0]["box"]:
                continue
            rows.append((f"crops/{event_id}_{k}.jpg", got[0]["jpeg"], json.loads(got[0]["box"]), u))
        if not rows:
            return
        try:
            (self.dataset / "crops").mkdir(parents=True, exist_ok=True)
            for rel, jpeg, _, _ in rows:
                tmp = self.dataset / (rel + ".tmp")
                tmp.write_bytes(jpeg)
                tmp.replace(self.dataset / rel)
            mf = self.dataset / "manifest.jsonl"
            names = {rel for rel, *_ in rows}
            kept = [ln for ln in (mf.read_text().splitlines() if mf.exists() else [])
                    if ln.strip() and json.loads(ln).get("image") not in names]
            kept += [json.dumps({"image": rel, "boxes": [box], "labels": [u["label"]], "event_id": event_id,
                                 "unit": u["index"], "revision": revision, "model_label": u["model_label"],
                                 "corrected_by": who}) for rel, _, box, u in rows]
            tmp = mf.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            tmp.replace(mf)
            trays = self.dataset / "trays.csv"
            listed = set(trays.read_text().splitlines()[1:]) if trays.exists() else set()
            new = [f"{rel},{event_id}" for rel, *_ in rows if f"{rel},{event_id}" not in listed]
            with trays.open("a") as fh:
                if not listed and trays.stat().st_size == 0:
                    fh.write("image,tray\n")
                fh.writelines(r + "\n" for r in new)
        except OSError as e:  # the correction itself is stored; the example can be re-exported later
            log.error("corrected crops of event %s not written to %s: %s", event_id, self.dataset, e)


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


def default_dataset_dir(sqlite_path: str) -> Path:
    """Next to the database: events.sqlite3 -> events_corrections/."""
    if sqlite_path == ":memory:":
        return Path.cwd() / "dishtrack_corrections"
    p = Path(sqlite_path)
    return p.parent / f"{p.stem}_corrections"

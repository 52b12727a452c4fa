"""Cashier corrections: evidence crops stored next to each event, corrected receipts as new
revisions (who, when, original vs corrected), and corrected crops written out as labelled
examples for ``dishtrack train --data``.

The domain logic lives here (apply changes, recount and re-price with the menu, the training
examples); the tables live in the event database behind ``review_db.ReviewDb`` (SQLite or
PostgreSQL). Revision 0 is the event as the pipeline stored it; a correction creates revision
N+1, replaces the event's payload (``GET /events`` serves the latest) and keeps every revision.
Idempotent by (event_id, revision): the same revision sent again returns the stored one; a
different correction under an existing number is a conflict, also when another node sharing the
database committed it a moment earlier (``commit_revision`` checks the revision atomically).
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dishtrack.models.importers import label_key
from dishtrack.tracking.types import CheckoutEvent, CheckoutItem

from .evidence import EvidenceUnit
from .review_db import CorrectionRow, NewRevision, Revision, ReviewDb, RevisionConflict

log = logging.getLogger(__name__)

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
    record: dict  # the revision the request named, as GET /events serves it
    revision: int  # the revision the request named
    created: bool  # False: the same revision was already stored (idempotent replay)
    latest: bool = True  # the event's latest revision (a replay may name an older one)
    feed_seq: int | None = None  # the revision's place in the corrections feed

    def message(self) -> dict:
        """The record as the corrections feed sends it (websocket, outbox): with ``feed_seq``."""
        return self.record if self.feed_seq is None else {**self.record, "feed_seq": self.feed_seq}


def _unit_dict(u: EvidenceUnit) -> dict:
    return {"index": u.index, "track_id": u.track_id, "label": u.label, "model_label": u.label,
            "confidence": u.confidence, "crop": u.jpeg is not None, "removed": False, "added": False}


class CorrectionStore:
    def __init__(self, db: ReviewDb, dataset_dir: str | Path, menu=None) -> None:
        self.db = db
        self.dataset = Path(dataset_dir)
        self.menu = menu
        self.dish_labels: tuple[str, ...] = ()  # the detector's (set by the runtime), before the menu's
        self._write_lock = threading.Lock()  # one correction at a time in this process (manifest file)

    def known_labels(self) -> list[str]:
        """Dishes the page offers: the detector's, then the menu's (every date's too)."""
        known = list(self.dish_labels)
        if self.menu is not None:
            for items in (self.menu.data.items, *(d.items for d in self.menu.data.dates.values())):
                known += [k for k in items if k not in known]
        return known

    def canonical(self, label: str) -> str:
        """A typed label as the known dish it names: case and runs of spaces do not make a second dish
        (counts, analytics, and ``enrol`` refuses a dataset naming a dish two ways). An exact match wins
        (a detector's "bread" beside a menu's "Bread": each picks itself); a name no known dish has is a
        new dish, kept as typed (stripped)."""
        typed = label.strip()
        known = self.known_labels()
        if typed in known:
            return typed
        return next((k for k in known if label_key(k) == label_key(typed)), typed)

    # -- evidence
    def save_evidence(self, event_id: str, units: list[EvidenceUnit]) -> None:
        self.db.save_evidence(event_id, units)

    def crop(self, event_id: str, index: int) -> bytes | None:
        got = self.db.crop(event_id, index)
        return got.jpeg if got is not None else None

    def _base_units(self, record: dict) -> list[dict]:
        rows = self.db.evidence(record["event_id"])
        if rows:
            return [{"index": r.index, "track_id": r.track_id, "label": r.label, "model_label": r.label,
                     "confidence": r.confidence, "crop": r.crop, "removed": False, "added": False} for r in rows]
        units = []  # no evidence kept (disabled, or an older event): one unit per counted dish, no picture
        for it in record["items"]:
            for _ in range(it["count"]):
                units.append({"index": len(units), "track_id": None, "label": it["label"], "model_label": it["label"],
                              "confidence": it["confidence"], "crop": False, "removed": False, "added": False})
        return units

    def units(self, event_id: str) -> tuple[dict, list[dict]] | None:
        """(latest record, its units) or None for an unknown event."""
        record = self.db.event(event_id)
        if record is None:
            return None
        rev = record.get("revision", 0)
        if rev and (stored := self.db.revision(event_id, rev)) is not None:
            return record, stored.units
        return record, self._base_units(record)

    def history(self, event_id: str) -> list[dict] | None:
        """Every revision, oldest first (revision 0: as the pipeline stored it)."""
        got = self.units(event_id)
        if got is None:
            return None
        record, units = got
        revs = self.db.revisions(event_id)
        if not revs:
            return [{"revision": 0, "event": record, "units": units, "changes": [], "corrected_by": None,
                     "corrected_at": None}]
        return [{"revision": r.revision, "event": {"seq": record["seq"], **r.payload}, "units": r.units,
                 "changes": r.changes, "corrected_by": r.corrected_by, "corrected_at": r.corrected_at} for r in revs]

    # -- corrections
    def correct(self, event_id: str, revision: int, changes: list[Change], who: str,
                now: float | None = None, publish: Callable[[dict], None] | None = None) -> Outcome:
        """``publish`` gets the record while this correction still holds the lock, so two corrections
        of one event reach subscribers in revision order; a replay of the latest revision publishes it
        again (repairs a publish lost after the commit; subscribers key by event_id + revision). A
        replay does not write training examples again: on another node sharing the database it
        would copy the winner's crops into a second dataset."""
        with self._write_lock:
            try:
                out = self._correct(event_id, revision, changes, who, now)
            except RevisionConflict as e:  # another node committed in between: judge against what it stored
                if e.current is None:
                    raise CorrectionError(404, f"no event {event_id!r}") from None
                log.info("event %s: revision %d was committed first by another correction", event_id, revision)
                out = self._correct(event_id, revision, changes, who, now)
            if publish is not None and out.latest:
                publish(out.message())
            return out

    def _correct(self, event_id: str, revision: int, changes: list[Change], who: str, now: float | None) -> Outcome:
        got = self.units(event_id)
        if got is None:
            raise CorrectionError(404, f"no event {event_id!r}")
        record, units = got
        current = record.get("revision", 0)
        if revision <= current:
            stored = self.db.revision(event_id, revision)
            if stored is not None and stored.changes == [c.to_dict() for c in changes]:
                return Outcome({"seq": record["seq"], **stored.payload}, revision, False, revision == current,
                               stored.feed_seq)
            raise CorrectionError(409, f"event {event_id} already has revision {revision} "
                                  f"(latest {current}) with other changes; correct the latest")
        if revision != current + 1:
            raise CorrectionError(409, f"event {event_id} is at revision {current}: the next is {current + 1}")
        if not changes:
            raise CorrectionError(422, "no changes")
        now = time.time() if now is None else now
        new_units = [dict(u) for u in units]
        logged = [self._apply(new_units, c) for c in changes]
        payload = self._payload(record, new_units, revision, who, now)
        original = None
        if revision == 1:  # keep what the pipeline stored as revision 0
            original = Revision(0, {k: v for k, v in record.items() if k != "seq"}, units, [], None, None)
        feed_seq = self.db.commit_revision(NewRevision(
            event_id, record["seq"], revision, payload, new_units, [c.to_dict() for c in changes],
            tuple(CorrectionRow(unit, op, new_units[unit]["model_label"], before, after)
                  for unit, op, before, after in logged), who, now, original))
        self._write_examples(event_id, revision, new_units, logged, who)
        return Outcome({"seq": record["seq"], **payload}, revision, True, True, feed_seq)

    def _apply(self, units: list[dict], c: Change) -> tuple:
        """Apply one change in place; returns (unit, op, original label, corrected label)."""
        if c.op not in OPS:
            raise CorrectionError(422, f"unknown op {c.op!r} (one of {', '.join(OPS)})")
        if c.op in ("relabel", "add") and (not isinstance(c.label, str) or not _LABEL.match(c.label.strip())):
            raise CorrectionError(422, f"{c.op}: label must be 1..64 printable characters, got {c.label!r}")
        label = self.canonical(c.label) if c.op in ("relabel", "add") else None
        if c.op == "add":
            u = {"index": len(units), "track_id": None, "label": label, "model_label": None,
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
        u["label"], u["confidence"] = label, 1.0
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
            got = self.db.crop(event_id, k)
            if got is None or not got.box:
                continue
            rows.append((f"crops/{event_id}_{k}.jpg", got.jpeg, list(got.box), u))
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
            kept = [ln for ln in (mf.read_text(encoding="utf-8-sig", errors="surrogateescape").splitlines()
                                  if mf.exists() else [])
                    if ln.strip() and _manifest_image(ln) not in names]
            kept += [json.dumps({"image": rel, "boxes": [box], "labels": [u["label"]], "event_id": event_id,
                                 "unit": u["index"], "revision": revision, "model_label": u["model_label"],
                                 "corrected_by": who}) for rel, _, box, u in rows]
            tmp = mf.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8", errors="surrogateescape")
            tmp.replace(mf)
            trays = self.dataset / "trays.csv"
            listed = (set(trays.read_text(encoding="utf-8-sig", errors="surrogateescape").splitlines()[1:])
                      if trays.exists() else set())
            new = [f"{rel},{event_id}" for rel, *_ in rows if f"{rel},{event_id}" not in listed]
            with trays.open("a", encoding="utf-8") as fh:
                if not listed and trays.stat().st_size == 0:
                    fh.write("image,tray\n")
                fh.writelines(r + "\n" for r in new)
        except Exception:  # noqa: BLE001 - the correction is committed; its answer and publish must follow
            log.exception("corrected crops of event %s not written to %s", event_id, self.dataset)


def _manifest_image(line: str) -> str | None:
    """The image a manifest line is about; None for a line this cannot read (an operator's edit):
    it is kept as it is, and the importer ``train`` uses reports it with its line number."""
    try:
        got = json.loads(line)
    except ValueError:
        return None
    image = got.get("image") if isinstance(got, dict) else None
    return image if isinstance(image, str) else None


def default_dataset_dir(storage) -> Path:
    """Where corrected crops go when ``corrections.dataset_dir`` is not set. SQLite: next to the
    database (events.sqlite3 -> events_corrections/). PostgreSQL: ``<database name>_corrections/``
    in the working directory (the node's data folder; ``/data`` in the Docker image): the
    database is on another machine, the crops are files for ``train --data`` on this one."""
    if storage.url:
        from psycopg.conninfo import conninfo_to_dict  # only with PostgreSQL storage

        name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(conninfo_to_dict(storage.url).get("dbname") or "dishtrack"))
        return Path.cwd() / f"{name.lstrip('.') or 'dishtrack'}_corrections"
    if storage.sqlite_path == ":memory:":
        return Path.cwd() / "dishtrack_corrections"
    p = Path(storage.sqlite_path)
    return p.parent / f"{p.stem}_corrections"

"""The review database: evidence crops, receipt revisions and cashier corrections, kept in the
event database next to the events (so retention deletes them with their event). One interface,
one implementation per event store: ``review_sqlite.SqliteReviewDb`` (the embedded file) and
``review_pg.PgReviewDb`` (PostgreSQL, shared by several nodes). ``corrections.CorrectionStore``
(apply changes, re-price, write training examples) and ``analytics`` talk only to this, so the
domain logic is written once and only the SQL differs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .evidence import EvidenceUnit


class RevisionConflict(Exception):
    """``commit_revision`` found the event no longer at the revision the correction was built on
    (another correction, possibly on another node, committed first); ``current`` is the event's
    revision now, None when the event is gone (deleted by retention)."""

    def __init__(self, current: int | None) -> None:
        super().__init__(f"event at revision {current}" if current is not None else "event gone")
        self.current = current


@dataclass(frozen=True, slots=True)
class EvidenceRow:
    """One dish as the pipeline counted it (revision 0), without its picture."""

    index: int
    track_id: int | None
    label: str
    confidence: float | None
    crop: bool  # a JPEG is stored


@dataclass(frozen=True, slots=True)
class StoredCrop:
    jpeg: bytes
    box: tuple[float, float, float, float] | None  # the dish box in the JPEG's pixels


@dataclass(frozen=True, slots=True)
class Revision:
    """A stored revision: 0 is the event as detected, N >= 1 the Nth correction."""

    revision: int
    payload: dict  # the event as served (without ``seq``)
    units: list[dict]  # the dishes (index, label, model_label, removed, added, ...)
    changes: list[dict]  # the request's changes (op, unit, label); [] for revision 0
    corrected_by: str | None
    corrected_at: float | None
    feed_seq: int | None = None  # its place in the corrections feed (None: revision 0, or stored before the feed)


@dataclass(frozen=True, slots=True)
class CorrectionRow:
    """One applied change, for analytics (the model's label vs the cashier's)."""

    unit: int
    op: str  # relabel | remove | add
    model_label: str | None
    original_label: str | None  # the label before this change
    corrected_label: str | None  # the label after it (None: removed)


@dataclass(frozen=True, slots=True)
class NewRevision:
    """Everything one correction writes, in one transaction."""

    event_id: str
    seq: int
    revision: int  # must be the event's current revision + 1 when committed
    payload: dict
    units: list[dict]
    changes: list[dict]
    rows: tuple[CorrectionRow, ...]
    corrected_by: str
    corrected_at: float
    original: Revision | None  # revision 0 to keep (with the first correction only)


@dataclass(frozen=True, slots=True)
class AnalyticsRows:
    """Raw figures over events that ended in [since, until); ``analytics.analytics`` shapes them."""

    per_hour: list[dict]  # hour_start, camera_id, dishes
    per_camera: list[dict]  # camera_id, events, dishes
    per_dish: list[dict]  # label, dishes
    events: int
    needed_review: int  # flagged by the pipeline (revision 0)
    corrected: int
    needed_review_corrected: int
    confused_pairs: list[dict]  # detected, corrected, count (the latest relabel of each dish)
    ops: dict[str, int]  # corrections per op


@runtime_checkable
class ReviewDb(Protocol):
    def event(self, event_id: str) -> dict | None:
        """The event's latest revision as ``GET /events/{id}`` serves it (with ``seq``)."""

    def save_evidence(self, event_id: str, units: list[EvidenceUnit]) -> None:
        """The stored event's dishes and crops (replacing any saved before)."""

    def evidence(self, event_id: str) -> list[EvidenceRow]:
        """Dishes with evidence, by index ([] when none was kept)."""

    def crop(self, event_id: str, index: int) -> StoredCrop | None: ...

    def revision(self, event_id: str, revision: int) -> Revision | None: ...

    def revisions(self, event_id: str) -> list[Revision]:
        """Every stored revision, oldest first ([] while the event was never corrected)."""

    def commit_revision(self, new: NewRevision) -> int:
        """Atomically: keep revision 0 (first correction), store the new revision and its
        correction rows, and make it the event's payload and label counts. Raises
        ``RevisionConflict`` unless the event is at ``new.revision - 1`` at commit time.
        Returns the revision's ``feed_seq``: its place in the corrections feed, in commit order,
        never reused. It is kept beside the payload, not in it: only feed messages carry it, so a
        client's resume point moves in feed order (an event record corrected to F=10 must not
        move it past a correction F=9 still on its way)."""

    def last_feed_seq(self) -> int:
        """The newest corrected revision's ``feed_seq`` (0: none yet)."""

    def corrected_after(self, cursor: int, limit: int = 500) -> list[tuple[int, dict]]:
        """(feed_seq, record as ``GET /events/{id}`` served it then, plus ``feed_seq``) of corrected
        revisions after ``cursor``, oldest first: what a reconnecting client missed (corrections keep
        their event's ``seq``, so the events cursor never brings them back)."""

    def analytics(self, since: float | None, until: float | None, camera: str | None, bucket_s: int,
                  top_pairs: int) -> AnalyticsRows: ...

    def close(self) -> None: ...


def event_filter(since: float | None, until: float | None, camera: str | None, mark: str) -> tuple[str, tuple]:
    """SQL condition on events ``e`` that ended in [since, until), of one camera if given, and its
    arguments; ``mark``: the driver's placeholder (``?`` sqlite3, ``%s`` psycopg)."""
    clauses, args = ["1 = 1"], []
    for column, op, value in (("ended_at", ">=", since), ("ended_at", "<", until), ("camera_id", "=", camera)):
        if value is not None:
            clauses.append(f"e.{column} {op} {mark}")
            args.append(value)
    return " AND ".join(clauses), tuple(args)


def open_review_db(store) -> ReviewDb:
    """The review database living in ``store`` (tables migrated on open)."""
    from .store import EventStore

    if isinstance(store, EventStore):
        from .review_sqlite import SqliteReviewDb

        return SqliteReviewDb(store)
    from .review_pg import PgReviewDb  # psycopg only with PostgreSQL storage

    return PgReviewDb(store)

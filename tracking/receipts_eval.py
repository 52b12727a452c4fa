"""Scores checkout events against ground-truth trays (receipts).

A tray is right only if exactly one event belongs to it and that event's
label counts equal the tray's; splits (several events for one tray) and
merges (one event holding two trays, leaving the other with none) are both
wrong. Item precision/recall credit per label ``min(predicted, true)`` so a
split tray's items still count, while a merged pair's extra items are false
positives and the empty tray's items misses.

Review flags (``needs_review``) are scored as a cashier uses them: a receipt
that is wrong but flagged gets looked at, one that is wrong and unflagged is
trusted and charged wrong; flagging every receipt would catch every error at
the cost of reviewing them all, so both shares are reported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence


@dataclass(frozen=True, slots=True)
class GtTray:
    tray: int
    counts: Mapping[str, int]
    cross_s: float  # the tray centre crosses the line
    first_s: float  # tray in view from ... to
    last_s: float


@dataclass(frozen=True, slots=True)
class EventCounts:
    time_s: float  # when the event's crossings happened (video seconds; e.g. mid of first..last)
    counts: Mapping[str, int]
    needs_review: bool = False


def trays_from_receipts(doc: Mapping) -> list[GtTray]:
    """``receipts.json`` of a synthetic video -> GtTray list (frame numbers -> seconds)."""
    fps = float(doc["fps"])
    return [GtTray(int(t["tray"]), dict(t["counts"]), t["cross_frame"] / fps, t["first_frame"] / fps,
                   t["last_frame"] / fps) for t in doc["trays"]]


def match_events(events: Sequence[EventCounts], trays: Sequence[GtTray]) -> list[int | None]:
    """Per event, the index into ``trays`` whose crossing time is nearest among the trays
    in view at the event's time; None when no tray is in view then."""
    out: list[int | None] = []
    for ev in events:
        cands = [i for i, t in enumerate(trays) if t.first_s <= ev.time_s <= t.last_s]
        out.append(min(cands, key=lambda i: abs(trays[i].cross_s - ev.time_s)) if cands else None)
    return out


def score_receipts(events: Sequence[EventCounts], trays: Sequence[GtTray]) -> dict:
    """Tray- and item-level scores; ``per_tray`` lists what each tray got."""
    owner = match_events(events, trays)
    per: list[list[EventCounts]] = [[] for _ in trays]
    for ev, i in zip(events, owner):
        if i is not None:
            per[i].append(ev)
    tp = 0
    rows = []
    for t, evs in zip(trays, per):
        pred: dict[str, int] = {}
        for ev in evs:
            for lbl, n in ev.counts.items():
                pred[lbl] = pred.get(lbl, 0) + int(n)
        tp += sum(min(n, pred.get(lbl, 0)) for lbl, n in t.counts.items())
        exact = len(evs) == 1 and _nonzero(evs[0].counts) == _nonzero(t.counts)
        rows.append({"tray": t.tray, "events": len(evs), "exact": exact, "gt": dict(t.counts), "pred": pred,
                     "flagged": any(ev.needs_review for ev in evs)})
    n_gt = sum(sum(t.counts.values()) for t in trays)
    n_pred = sum(sum(int(n) for n in ev.counts.values()) for ev in events)
    n_trays = len(trays)
    return {
        "trays": n_trays,
        "events": len(events),
        "unmatched_events": sum(i is None for i in owner),
        "trays_one_event": sum(r["events"] == 1 for r in rows),
        "trays_no_event": sum(r["events"] == 0 for r in rows),
        "trays_split": sum(r["events"] > 1 for r in rows),
        "exact_receipts": sum(r["exact"] for r in rows),
        "exact_receipt_rate": sum(r["exact"] for r in rows) / n_trays if n_trays else 0.0,
        "item_precision": tp / n_pred if n_pred else 0.0,
        "item_recall": tp / n_gt if n_gt else 0.0,
        "events_per_tray": len(events) / n_trays if n_trays else 0.0,
        # review: trays with a flagged event; wrong ones among them (caught) and not (trusted, wrong)
        "trays_flagged": sum(r["flagged"] for r in rows),
        "wrong_flagged": sum(r["flagged"] and not r["exact"] for r in rows),
        "wrong_unflagged": sum(not r["flagged"] and not r["exact"] for r in rows),
        "per_tray": rows,
    }


def _nonzero(counts: Mapping[str, int]) -> dict[str, int]:
    return {k: int(v) for k, v in counts.items() if int(v)}

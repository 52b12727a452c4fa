"""Sales and review analytics from the event store: dishes sold per hour and per camera, the
share of receipts that needed review and that were corrected, and the dish pairs the model
confuses most (from cashiers' corrections). Plain SQL over the event tables (and the
``dishes_sold_hourly`` view), so SQL tools can ask the same questions; a small page plots it."""
from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse

from .store import EventStore

_TIME_MAX = 1e11


def _where(since: float | None, until: float | None, camera: str | None, alias: str = "e") -> tuple[str, tuple]:
    clauses, args = ["1"], []
    for clause, value in ((f"{alias}.ended_at >= ?", since), (f"{alias}.ended_at < ?", until),
                          (f"{alias}.camera_id = ?", camera)):
        if value is not None:
            clauses.append(clause)
            args.append(value)
    return " AND ".join(clauses), tuple(args)


def analytics(store: EventStore, since: float | None = None, until: float | None = None,
              camera: str | None = None, bucket_s: int = 3600, top_pairs: int = 10) -> dict:
    """Numbers over events that ended in [since, until) (latest revisions: corrected receipts count as
    corrected). ``needed_review``: flagged by the pipeline (revision 0), whether corrected since or not."""
    where, args = _where(since, until, camera)
    per_hour = [dict(r) for r in store.query(
        f"SELECT CAST(e.ended_at / {int(bucket_s)} AS INTEGER) * {int(bucket_s)} AS hour_start, e.camera_id,"
        f" SUM(l.count) AS dishes FROM events e JOIN event_labels l ON l.seq = e.seq WHERE {where}"
        " GROUP BY hour_start, e.camera_id ORDER BY hour_start, e.camera_id", args)]
    per_camera = [dict(r) for r in store.query(
        f"SELECT e.camera_id, COUNT(*) AS events, COALESCE(SUM((SELECT SUM(count) FROM event_labels l"
        f" WHERE l.seq = e.seq)), 0) AS dishes FROM events e WHERE {where} GROUP BY e.camera_id ORDER BY e.camera_id",
        args)]
    per_dish = [dict(r) for r in store.query(
        f"SELECT l.label, SUM(l.count) AS dishes FROM events e JOIN event_labels l ON l.seq = e.seq WHERE {where}"
        " GROUP BY l.label ORDER BY dishes DESC, l.label", args)]
    r = store.query(
        "SELECT COUNT(*) AS events,"
        " COALESCE(SUM(CASE WHEN r0.payload IS NOT NULL THEN json_extract(r0.payload, '$.needs_review')"
        " ELSE e.needs_review END), 0) AS needed_review,"
        " COALESCE(SUM(r0.payload IS NOT NULL), 0) AS corrected,"
        " COALESCE(SUM(r0.payload IS NOT NULL AND json_extract(r0.payload, '$.needs_review')), 0) AS review_corrected"
        " FROM events e LEFT JOIN event_revisions r0 ON r0.event_id = e.event_id AND r0.revision = 0"
        f" WHERE {where}", args)[0]
    n = r["events"]
    review = {"events": n, "needed_review": r["needed_review"], "corrected": r["corrected"],
              "needed_review_share": r["needed_review"] / n if n else None,
              "corrected_share": r["corrected"] / n if n else None,
              "needed_review_corrected": r["review_corrected"]}
    # per dish the latest relabel decides; a pair is (what the model said, what the cashier set)
    pairs = [{"detected": p["model_label"], "corrected": p["corrected_label"], "count": p["n"]} for p in store.query(
        "SELECT c.model_label, c.corrected_label, COUNT(*) AS n FROM corrections c JOIN events e"
        " ON e.event_id = c.event_id WHERE c.op = 'relabel' AND c.model_label IS NOT NULL"
        " AND c.model_label != c.corrected_label AND c.id = (SELECT MAX(c2.id) FROM corrections c2"
        " WHERE c2.event_id = c.event_id AND c2.unit = c.unit AND c2.op IN ('relabel', 'remove'))"
        f" AND {where} GROUP BY c.model_label, c.corrected_label ORDER BY n DESC, c.model_label LIMIT ?",
        (*args, top_pairs))]
    ops = {p["op"]: p["n"] for p in store.query(
        f"SELECT c.op, COUNT(*) AS n FROM corrections c JOIN events e ON e.event_id = c.event_id WHERE {where}"
        " GROUP BY c.op", args)}
    return {"since": since, "until": until, "camera": camera, "bucket_s": bucket_s,
            "dishes": sum(p["dishes"] for p in per_dish), "per_hour": per_hour, "per_camera": per_camera,
            "per_dish": per_dish, "review": review, "confused_pairs": pairs,
            "corrections": {k: ops.get(k, 0) for k in ("relabel", "remove", "add")}}


def analytics_router(rt) -> APIRouter:
    r = APIRouter()

    @r.get("/analytics", response_class=HTMLResponse)
    def page() -> str:
        """Charts of /analytics/data (plain canvas, no external scripts)."""
        return resources.files("dishtrack.service").joinpath("static", "analytics.html").read_text()

    @r.get("/analytics/data", responses={501: {"description": "the event store is not SQLite"}})
    def data(since: float | None = Query(None, ge=0, le=_TIME_MAX, allow_inf_nan=False),
             until: float | None = Query(None, ge=0, le=_TIME_MAX, allow_inf_nan=False),
             camera: str | None = None, top_pairs: int = Query(10, ge=1, le=100)) -> dict:
        """Dishes per hour and camera, review and correction shares, most-confused dish pairs."""
        if since is not None and until is not None and until < since:
            raise RequestValidationError([{"type": "greater_than_equal", "loc": ("query", "until"),
                                           "msg": f"Input should be greater than or equal to since ({since})",
                                           "input": until, "ctx": {"ge": since}}])
        if rt.corrections is None:  # the correction tables and SQL live in the SQLite store
            raise HTTPException(501, "analytics need the SQLite event store (storage.sqlite_path)")
        return analytics(rt.store, since, until, camera, top_pairs=top_pairs)

    return r

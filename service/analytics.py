"""Sales and review analytics from the event store: dishes sold per hour and per camera, the
share of receipts that needed review and that were corrected, and the dish pairs the model
confuses most (from cashiers' corrections). Plain SQL over the event tables in SQLite or PostgreSQL
(``review_db.ReviewDb.analytics``; the ``dishes_sold_hourly`` view), so SQL tools can ask the same
questions; a small page plots it."""
from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse

from .review_db import ReviewDb

_TIME_MAX = 1e11


def analytics(db: ReviewDb, since: float | None = None, until: float | None = None,
              camera: str | None = None, bucket_s: int = 3600, top_pairs: int = 10) -> dict:
    """Numbers over events that ended in [since, until) (latest revisions: corrected receipts count as
    corrected). ``needed_review``: flagged by the pipeline (revision 0), whether corrected since or not."""
    r = db.analytics(since, until, camera, bucket_s, top_pairs)
    n = r.events
    review = {"events": n, "needed_review": r.needed_review, "corrected": r.corrected,
              "needed_review_share": r.needed_review / n if n else None,
              "corrected_share": r.corrected / n if n else None,
              "needed_review_corrected": r.needed_review_corrected}
    return {"since": since, "until": until, "camera": camera, "bucket_s": bucket_s,
            "dishes": sum(p["dishes"] for p in r.per_dish), "per_hour": r.per_hour, "per_camera": r.per_camera,
            "per_dish": r.per_dish, "review": review, "confused_pairs": r.confused_pairs,
            "corrections": {k: r.ops.get(k, 0) for k in ("relabel", "remove", "add")}}


def analytics_router(rt) -> APIRouter:
    r = APIRouter()

    @r.get("/analytics", response_class=HTMLResponse)
    def page() -> str:
        """Charts of /analytics/data (plain canvas, no external scripts)."""
        return resources.files("dishtrack.service").joinpath("static", "analytics.html").read_text()

    @r.get("/analytics/data", responses={503: {"description": "corrections are not enabled"}})
    def data(since: float | None = Query(None, ge=0, le=_TIME_MAX, allow_inf_nan=False),
             until: float | None = Query(None, ge=0, le=_TIME_MAX, allow_inf_nan=False),
             camera: str | None = None, top_pairs: int = Query(10, ge=1, le=100)) -> dict:
        """Dishes per hour and camera, review and correction shares, most-confused dish pairs."""
        if since is not None and until is not None and until < since:
            raise RequestValidationError([{"type": "greater_than_equal", "loc": ("query", "until"),
                                           "msg": f"Input should be greater than or equal to since ({since})",
                                           "input": until, "ctx": {"ge": since}}])
        if rt.corrections is None:  # the review tables are opened with the corrections
            raise HTTPException(503, "corrections are not enabled")
        return analytics(rt.corrections.db, since, until, camera, top_pairs=top_pairs)

    return r

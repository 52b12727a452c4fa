"""Routes for reviewing receipts: evidence crops (viewer), corrections (admin: every non-GET
needs it, see auth.required_role) and revision history, with SQLite or PostgreSQL storage. A
correction is re-published on the websocket as the event's new revision (on every node's, with
PostgreSQL)."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from .corrections import Change, CorrectionError


class ChangeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    op: Literal["relabel", "remove", "add"]
    unit: int | None = Field(None, ge=0, description="dish index (relabel, remove): `units[].index` of the evidence")
    label: str | None = Field(None, max_length=64, description="the right dish (relabel, add); a known dish's "
                              "name in other case or spacing is that dish (`GET /labels`), another name a new dish")


class CorrectionIn(BaseModel):
    """``revision``: the revision this correction creates (the event's current revision + 1). Sending the
    same (event, revision, changes) again is answered with the stored result, not a new revision."""

    model_config = ConfigDict(extra="forbid")
    revision: int = Field(ge=1, le=100000)
    changes: list[ChangeIn] = Field(min_length=1, max_length=200)


class ErrorBody(BaseModel):
    detail: str


def _err(*codes: int) -> dict:
    text = {404: "unknown event (or crop)", 409: "revision conflict: correct the latest revision",
            503: "corrections are not enabled"}
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}


def _who(request: Request) -> str:
    p = getattr(request.state, "principal", None)
    if p is not None:
        return p.name
    host = request.client.host if request.client else "unknown"
    return f"anonymous@{host}"  # auth off (loopback): no name to record


def review_router(rt) -> APIRouter:
    r = APIRouter()

    def corrections():
        if rt.corrections is None:
            raise HTTPException(503, "corrections are not enabled")
        return rt.corrections

    @r.get("/me")
    def me(request: Request) -> dict:
        """Who the page is logged in as; with auth off every client may correct (role admin)."""
        p = getattr(request.state, "principal", None)
        return {"name": p.name, "role": p.role} if p is not None else {"name": None, "role": "admin"}

    @r.get("/labels", responses=_err(503))
    def labels() -> dict:
        """Dish labels the page offers for corrections: the detector's, then the menu's (every date's)."""
        return {"labels": corrections().known_labels()}

    @r.get("/events/{event_id}/evidence", responses=_err(404, 503))
    def evidence(event_id: str) -> dict:
        """The event's dishes (latest revision): label, confidence, whether a crop exists and its URL."""
        got = corrections().units(event_id)
        if got is None:
            raise HTTPException(404, f"no event {event_id!r}")
        record, units = got
        return {"event_id": event_id, "revision": record.get("revision", 0),
                "units": [{**u, "crop_url": f"/events/{event_id}/evidence/{u['index']}.jpg" if u["crop"] else None}
                          for u in units]}

    @r.get("/events/{event_id}/evidence/{index}.jpg", response_class=Response,
           responses={200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
                      **_err(404, 503)})
    def evidence_crop(event_id: str, index: int = Path(ge=0, le=100000)) -> Response:
        jpeg = corrections().crop(event_id, index)
        if jpeg is None:
            raise HTTPException(404, f"no crop #{index} for event {event_id!r}")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    @r.get("/events/{event_id}/revisions", responses=_err(404, 503))
    def revisions(event_id: str) -> dict:
        """Every revision oldest first: revision 0 as detected, then each correction (who, when, changes)."""
        hist = corrections().history(event_id)
        if hist is None:
            raise HTTPException(404, f"no event {event_id!r}")
        return {"event_id": event_id, "revisions": hist}

    @r.get("/revisions", responses=_err(503))
    def revisions_feed(after: int = Query(0, ge=0, le=2**63 - 1, description="return corrected revisions with "
                                          "feed_seq greater than this"),
                       limit: int = Query(50, ge=1, le=1000)) -> dict:
        """Corrected revisions in commit order, each the event as GET /events/{id} served it then (with
        ``feed_seq``): a correction keeps its event's seq, so ``GET /events?after=`` never brings it back."""
        got = corrections().db.corrected_after(after, limit + 1)  # one more: is there a next page?
        more = len(got) > limit
        got = got[:limit]
        return {"items": [rec for _, rec in got], "next_after": got[-1][0] if more else None}

    def publish(record: dict) -> None:
        """A corrected receipt goes where a detected one goes. Websockets: with SQLite this node's;
        with PostgreSQL the hub ignores it and the store feed delivers it to every node's (review_pg:
        feed_seq), this one's included. MQTT and webhooks: this node's outbox, as the next revision."""
        rt.hub.publish(record)
        if rt.outbox is not None:
            rt.outbox.submit(record)

    @r.post("/events/{event_id}/corrections", status_code=201,
            responses={200: {"description": "this revision was already stored (idempotent replay)"},
                       400: {"model": ErrorBody, "description": "malformed JSON body (or a Host not allowed: text)",
                             "content": {"text/plain": {"schema": {"type": "string"}}}},
                       **_err(404, 409, 503)})
    def correct(event_id: str, body: CorrectionIn, request: Request) -> JSONResponse:
        """Relabel, remove or add dishes (admin role). Creates revision ``body.revision`` (= current + 1),
        re-publishes the event on the websocket and writes relabelled crops to the corrections dataset."""
        try:
            out = corrections().correct(event_id, body.revision,
                                        [Change(c.op, c.unit, c.label) for c in body.changes], _who(request),
                                        publish=publish)
        except CorrectionError as e:
            if e.status == 422:  # the same body as every other 422 (pydantic error list)
                raise RequestValidationError([{"type": "value_error", "loc": ("body", "changes"), "msg": str(e),
                                               "input": body.model_dump()["changes"]}]) from None
            raise HTTPException(e.status, str(e)) from None
        return JSONResponse({"created": out.created, "revision": out.revision, "event": out.record},
                            status_code=201 if out.created else 200)

    return r

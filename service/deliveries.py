"""``GET /admin/deliveries``: what the outbox sent to MQTT and the webhooks, and what waits
(admin role: the prefix ``/admin/`` needs it, see auth.required_role)."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query
from fastapi.exceptions import RequestValidationError

from .outbox import Outbox


def deliveries_router(outbox: Outbox | None) -> APIRouter:
    r = APIRouter()

    @r.get("/admin/deliveries")
    def deliveries(sink: str | None = Query(None, description="mqtt, webhook:<name>"),
                   status: Literal["pending", "delivered", "failed"] | None = None,
                   event_id: str | None = None,
                   after: int = Query(0, ge=0, le=2**63 - 1, description="outbox row id to page on from"),
                   limit: int = Query(100, ge=1, le=1000)) -> dict:
        """Per sink: counts per status, oldest pending age, last error; then the rows (delivery order)
        with attempts, last error and times. Empty when no sink is configured."""
        if outbox is None:
            return {"sinks": [], "items": [], "next_after": None}
        if sink is not None and sink not in (names := outbox.sink_names()):  # 'pos' for 'webhook:pos': not an empty list
            raise RequestValidationError([{"type": "value_error", "loc": ("query", "sink"), "input": sink,
                                           "msg": f"no sink {sink!r}; the outbox has {', '.join(names)}"}])
        items = outbox.deliveries(sink=sink, status=status, event_id=event_id, after=after, limit=limit)
        return {"sinks": outbox.summary(), "items": items,
                "next_after": items[-1]["id"] if len(items) == limit else None}

    return r

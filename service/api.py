"""HTTP + websocket API: events (REST, paged/filtered; websocket with replay),
annotated MJPEG per camera, health, Prometheus metrics and a small web page."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, HTTPException, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError, WebSocketRequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from dishtrack.config import AppConfig

from . import health as health_rules
from .admin import admin_router
from .analytics import analytics_router
from .auth import install_security
from .cache import TtlCache
from .client_messages import PONG, ClientMessages
from .corrections import CorrectionStore, default_dataset_dir
from .hub import EventHub
from .metrics import Metrics
from .cluster import ClusterMember
from .cluster import node_id as cluster_node_id
from .deliveries import deliveries_router
from .outbox import Outbox, build_outbox
from .pipeline import Pipeline
from .stores import Store, open_store
from .review_api import review_router
from .review_db import open_review_db

log = logging.getLogger(__name__)
_BOUNDARY = "dishtrackframe"
_SEQ_MAX = 2**63 - 1  # SQLite INTEGER; a larger ``after`` is a 422, not an OverflowError
_TIME_MAX = 1e11  # unix seconds (year ~5138); rejects ms timestamps passed by mistake


class ErrorBody(BaseModel):
    """What a 404 / 503 carries."""

    detail: str


def _responses(*codes: int) -> dict:
    text = {404: "unknown camera or event", 503: "not available (yet)"}
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}


_JSON_503 = {503: {"description": "failing (same body, status `failing`)",
                   "content": {"application/json": {"schema": {"type": "object"}}}}}


@dataclass
class Runtime:
    cfg: AppConfig
    store: Store
    hub: EventHub
    metrics: Metrics
    pipeline: Pipeline
    stopping: threading.Event = field(default_factory=threading.Event)  # set on SIGTERM: streams end
    outbox: Outbox | None = None  # MQTT / webhooks (integrations)
    corrections: CorrectionStore | None = None  # evidence crops, corrections, revisions
    cluster: ClusterMember | None = None  # camera leases (PostgreSQL storage); None: every camera local


def build_runtime(cfg: AppConfig, detector=None) -> Runtime:
    store = open_store(cfg.storage)  # first: an unwritable path / unreachable database fails before the model loads
    if detector is None:
        from dishtrack.models.detector import load_detector  # torch import only when serving

        detector = load_detector(cfg.detector)
    hub = EventHub(cfg.api.ws_queue, fed_by_store=store.shared)
    metrics = Metrics()
    outbox = build_outbox(cfg.integrations)
    # evidence crops, corrections and revisions in the event database (SQLite or PostgreSQL)
    corrections = CorrectionStore(open_review_db(store), cfg.corrections.dataset_dir
                                  or default_dataset_dir(cfg.storage))
    pipeline = Pipeline(cfg, detector, store, hub, metrics, publishers=outbox, corrections=corrections)
    corrections.menu = pipeline.menu  # corrected receipts are priced like detected ones
    corrections.dish_labels = tuple(getattr(detector, "labels", ()) or ())  # a typed label's known spelling
    return Runtime(cfg, store, hub, metrics, pipeline, outbox=outbox, corrections=corrections,
                   cluster=ClusterMember.for_config(cfg, pipeline))


def create_app(runtime: Runtime) -> FastAPI:
    rt = runtime

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        rt.hub.bind(asyncio.get_running_loop())
        feed = None
        if rt.store.shared:  # PostgreSQL: every node's events reach this node's websockets from the store
            from .feed import StoreFeed

            review = rt.corrections.db if rt.corrections is not None else None  # corrected revisions too
            feed = StoreFeed(rt.store, rt.hub, revisions=review).start()
        if rt.outbox is not None:
            rt.outbox.start()
        rt.pipeline.start()
        if rt.cluster is not None:
            rt.cluster.start()  # its ticks start the cameras whose leases this node wins
        try:
            yield
        finally:
            rt.stopping.set()
            if rt.cluster is not None:
                await asyncio.to_thread(rt.cluster.stop)
            await asyncio.to_thread(rt.pipeline.stop)
            if rt.cluster is not None:  # after the flush: the next holder starts after our last event
                await asyncio.to_thread(rt.cluster.leave)
            if rt.outbox is not None:
                await asyncio.to_thread(rt.outbox.stop)
            if feed is not None:
                await asyncio.to_thread(feed.stop)
            if rt.corrections is not None:
                rt.corrections.db.close()
            rt.store.close()

    # max_body_size: Starlette reads a whole body into memory before a route checks it and uvicorn
    # sets no limit; over it, 413 (by Content-Length before reading, or as a chunked body passes it)
    app = FastAPI(title="dishtrack", version="0.1.0", lifespan=lifespan, max_body_size=rt.cfg.api.max_body_bytes)
    app.state.runtime = rt
    install_security(app, rt.cfg)  # Host/Origin allow-lists, rate limits, tokens (+ /login)
    app.include_router(admin_router(rt.cfg))  # /config (admin role)
    app.include_router(deliveries_router(rt.outbox))  # /admin/deliveries (admin role)
    app.include_router(review_router(rt))  # evidence crops, corrections (admin), revisions
    app.include_router(analytics_router(rt))  # /analytics page + /analytics/data
    cache = TtlCache(rt.cfg.api.cache_s)  # polled endpoints: cost independent of the request rate
    node_id = rt.cluster.node_id if rt.cluster is not None else cluster_node_id(rt.cfg)  # /cameras "node"

    def camera_or_404(camera_id: str):
        if camera_id not in rt.pipeline.readers:
            raise HTTPException(404, f"unknown camera {camera_id!r}; cameras: {sorted(rt.pipeline.readers)}")
        return rt.pipeline.readers[camera_id]

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return resources.files("dishtrack.service").joinpath("static", "index.html").read_text()

    stuck_s = rt.cfg.api.health_stuck_s

    @app.get("/health", responses=_JSON_503)
    @cache.cached
    def health() -> JSONResponse:
        """``ok`` / ``degraded`` (a camera reconnecting, or a sink's oldest undelivered event older than
        ``integrations.behind_s``: ``sinks_behind``; HTTP 200) / ``failing`` (HTTP 503: events not
        persisted, a camera that never delivered a frame, pipeline dead or stuck; see ``failing``)."""
        status, reasons, statuses = health_rules.health(rt.pipeline, stuck_s)
        try:
            stored = rt.store.count()
        except Exception as e:  # noqa: BLE001 - a database outage is what health is asked about, not a 500
            stored, status = None, "failing"
            reasons = [*reasons, f"event store unreachable: {type(e).__name__}: {e}"]
        behind = []
        if rt.outbox is not None:  # events stored but not reaching the point-of-sale or the broker
            limit = rt.cfg.integrations.behind_s
            try:
                behind = [{"sink": x["sink"], "pending": x["pending"], "oldest_pending_s": x["oldest_pending_s"],
                           "last_error": x["last_error"]} for x in rt.outbox.summary()
                          if (x["oldest_pending_s"] or 0.0) > limit]
            except Exception as e:  # noqa: BLE001 - the outbox file unreadable: say so, not a 500
                behind = [{"sink": "outbox", "pending": None, "oldest_pending_s": None,
                           "last_error": f"cannot read the outbox: {e}"}]
            if behind and status == "ok":
                status = "degraded"
        cams = []
        for cid, st in statuses.items():
            d = st.to_dict()
            d.update(rt.metrics.summary(cid))
            cams.append(d)
        loop_at = rt.pipeline.loop_at
        body = {"status": status, "cameras": cams, "events_stored": stored,
                "pipeline_finished": rt.pipeline.finished.is_set(),
                "detector_device": str(getattr(rt.pipeline.detector, "device", "n/a")),
                "failing": reasons, "sinks_behind": behind, "events_unsaved": len(rt.pipeline.unsaved),
                "persist_error": rt.pipeline.persist_error, "pipeline_alive": rt.pipeline.alive,
                "pipeline_loop_age_s": None if loop_at is None else round(time.time() - loop_at, 3)}
        return JSONResponse(body, status_code=503 if status == "failing" else 200)

    @app.get("/livez", responses=_JSON_503)
    @cache.cached
    def livez() -> JSONResponse:
        """Liveness: the process answers and the pipeline thread runs (or finished its input) and is not stuck."""
        v = health_rules.liveness(rt.pipeline, stuck_s)
        return JSONResponse({"live": v.ok, "reasons": list(v.reasons), "checks": v.checks},
                            status_code=200 if v.ok else 503)

    @app.get("/readyz", responses=_JSON_503)
    @cache.cached
    def readyz() -> JSONResponse:
        """Readiness: model loaded, store writable (no event waiting for its write), a camera streaming."""
        v = health_rules.readiness(rt.pipeline, rt.cfg.storage.sqlite_path)
        return JSONResponse({"ready": v.ok, "reasons": list(v.reasons), "checks": v.checks},
                            status_code=200 if v.ok else 503)

    @app.get("/metrics", response_class=Response,
             responses={200: {"description": "Prometheus text exposition format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    @cache.cached
    def metrics() -> Response:
        rt.pipeline.refresh_gauges()
        try:
            rt.metrics.db_bytes.set(rt.store.size_bytes())  # file stats: per scrape, not per frame
        except Exception as e:  # noqa: BLE001 - a database outage: the other series still count (was a 500)
            log.warning("metrics: event store size unknown: %s", e)
        if rt.outbox is not None:
            rt.metrics.observe_outbox(rt.outbox.summary())
        return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/cameras")
    @cache.cached
    def cameras() -> list[dict]:
        """Every configured camera; ``node``: the cluster node reading it (null: none right now)."""
        holders = rt.cluster.holders() if rt.cluster is not None else {}
        out = []
        for cam, r in list(rt.pipeline.readers.items()):
            d = r.status().to_dict()
            d["node"] = holders.get(cam) if rt.cluster is not None else node_id
            if not rt.pipeline.is_local(cam):
                d["state"] = "remote" if d["node"] else "unassigned"
            out.append(d)
        return out

    @app.get("/cameras/{camera_id}/tracks", responses=_responses(404))
    @cache.cached
    def tracks(camera_id: str) -> dict:
        camera_or_404(camera_id)
        upd = rt.pipeline.last_update.get(camera_id)
        if upd is None:
            return {"frame_index": None, "tracks": []}
        return {"frame_index": upd.frame_index, "timestamp": upd.timestamp, "tracks": [
            {"track_id": t.track_id, "state": t.state.value, "box": t.box, "label": t.label,
             "confidence": t.confidence, "hits": t.hits} for t in upd.tracks]}

    @app.get("/cameras/{camera_id}/snapshot.jpg", response_class=Response,
             responses={200: {"description": "latest annotated frame",
                              "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
                        **_responses(404, 503)})
    def snapshot(camera_id: str) -> Response:
        camera_or_404(camera_id)
        _, jpeg = rt.pipeline.streams[camera_id].get()
        if jpeg is None:
            raise HTTPException(503, "no frame processed yet for this camera")
        return Response(jpeg, media_type="image/jpeg")

    @app.get("/cameras/{camera_id}/stream.mjpg", response_class=StreamingResponse,
             responses={200: {"description": "annotated MJPEG, one JPEG part per frame",
                              "content": {"multipart/x-mixed-replace": {"schema": {"type": "string",
                                                                                   "format": "binary"}}}},
                        **_responses(404)})
    async def stream(camera_id: str, request: Request) -> StreamingResponse:
        camera_or_404(camera_id)
        slot = rt.pipeline.streams[camera_id]
        period = 1.0 / rt.cfg.api.mjpeg_fps

        async def parts():
            last = -1
            while not rt.stopping.is_set() and not await request.is_disconnected():
                seq, jpeg = slot.get()
                if jpeg is not None and seq != last:
                    last = seq
                    yield (f"--{_BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                           ).encode() + jpeg + b"\r\n"
                await asyncio.sleep(period / 2)

        return StreamingResponse(parts(), media_type=f"multipart/x-mixed-replace; boundary={_BOUNDARY}",
                                 headers={"Cache-Control": "no-store"})

    @app.get("/events")
    def events(after: int = Query(0, ge=0, le=_SEQ_MAX, description="return events with seq greater than this"),
               limit: int = Query(50, ge=1, le=1000),
               camera: str | None = None, zone: str | None = None, label: str | None = None,
               since: float | None = Query(None, ge=0, le=_TIME_MAX, allow_inf_nan=False,
                                           description="ended_at >= since (unix seconds)"),
               until: float | None = Query(None, ge=0, le=_TIME_MAX, allow_inf_nan=False,
                                           description="ended_at < until (unix seconds); >= since"),
               needs_review: bool | None = Query(None, description="only events that do (true) / do not "
                                                 "(false) need review")) -> dict:
        if since is not None and until is not None and until < since:
            # the same body as every other 422 (pydantic error list), not a bare string
            raise RequestValidationError([{"type": "greater_than_equal", "loc": ("query", "until"),
                                           "msg": f"Input should be greater than or equal to since ({since})",
                                           "input": until, "ctx": {"ge": since}}])
        page = rt.store.list(after=after, limit=limit, camera_id=camera, zone_id=zone, label=label,
                             since=since, until=until, needs_review=needs_review)
        return {"items": page.items, "next_after": page.next_after}

    @app.get("/events/{event_id}", responses=_responses(404))
    def event(event_id: str) -> dict:
        rec = rt.store.get(event_id)
        if rec is None:
            raise HTTPException(404, f"no event {event_id!r}")
        return rec

    if rt.store.shared:  # PostgreSQL: an outage is the server's state, not a bug (was a 500 with a traceback)
        import psycopg

        @app.exception_handler(psycopg.OperationalError)
        async def store_unreachable(conn, exc: psycopg.OperationalError) -> JSONResponse | None:
            """503 for HTTP; a websocket (already accepted) is closed with 1011 and the reason. The
            client gets no host or user name: psycopg's message is logged only."""
            log.warning("%s: event store unreachable: %s", conn.url.path, exc)
            if conn.scope["type"] == "websocket":
                await conn.close(code=1011, reason="event store unreachable")
                return None
            return JSONResponse({"detail": "event store unreachable (database outage; retry)"}, status_code=503,
                                headers={"Retry-After": "5"})

    @app.exception_handler(WebSocketRequestValidationError)
    async def websocket_bad_query(ws: WebSocket, exc: WebSocketRequestValidationError) -> None:
        """A bad query on a websocket (``?after=-1``) gets REST's 422 and error list at the handshake;
        FastAPI's default closes before accepting, which a client sees as a bare 403, like a refused token."""
        body = {"detail": jsonable_encoder(exc.errors())}
        if "websocket.http.response" in ws.scope.get("extensions", {}):
            await ws.send_denial_response(JSONResponse(body, status_code=422))
        else:  # a server without the denial-response extension (wsproto): a close before accept is a 403
            await ws.close(code=1008)

    @app.websocket("/ws/events")
    async def ws_events(ws: WebSocket, after: int | None = Query(None, ge=0, le=_SEQ_MAX),
                        revisions_after: int | None = Query(None, ge=0, le=_SEQ_MAX)) -> None:
        """Live events. With ``?after=SEQ`` the stored events after SEQ are sent
        first, so a reconnecting client misses nothing; a correction keeps its event's
        seq, so ``?revisions_after=F`` (the last ``feed_seq`` received) also sends the
        corrected revisions committed since. Keep the highest revision per event_id.
        A client may send heartbeats (``ping`` or ``{"type": "ping"}``, answered with
        ``{"type": "pong"}``) within ``api.ws_client_messages_per_s``; nothing else."""
        await ws.accept()
        sub = rt.hub.subscribe()
        inbound = ClientMessages(rt.cfg.api.ws_client_messages_per_s, rt.cfg.api.ws_client_burst)
        reader = asyncio.ensure_future(inbound.read(ws))
        get: asyncio.Future | None = None

        async def tend() -> bool:
            """Answer heartbeats; False (the websocket closed) when the feed is to end."""
            # a send that fits the socket buffer never suspends, so a replay would not let the loop read the
            # client's heartbeats until the next page's query; one loop turn per event lets it
            await asyncio.sleep(0)
            if rt.stopping.is_set():
                await ws.close(code=1001, reason="server shutting down")
                return False
            if reader.done():  # the client left, sent more than heartbeats, or reading failed
                failed = None if reader.cancelled() else reader.exception()
                if failed is not None:
                    log.error("reading an event-feed client failed: %r", failed)
                    await ws.close(code=1011, reason="server error reading the client's messages")
                elif inbound.flooded:
                    await ws.close(code=1008, reason="too many messages: the feed takes heartbeats only "
                                   f"(at most {rt.cfg.api.ws_client_messages_per_s:g}/s)")
                return False
            inbound.wake.clear()
            for _ in range(inbound.take_pongs()):
                await ws.send_json(PONG)
            return True

        try:
            last = -1
            last_feed = -1
            if after is not None:
                cursor = after
                while True:
                    page = await asyncio.to_thread(rt.store.list, after=cursor, limit=500)
                    for rec in page.items:
                        if not await tend():
                            return
                        await ws.send_json(rec)
                        last = rec["seq"]
                    if page.next_after is None:
                        break
                    cursor = page.next_after
            if revisions_after is not None and rt.corrections is not None:
                last_feed = revisions_after
                while True:
                    got = await asyncio.to_thread(rt.corrections.db.corrected_after, last_feed, 500)
                    for feed_seq, rec in got:
                        if not await tend():
                            return
                        await ws.send_json(rec)
                        last_feed = feed_seq
                    if len(got) < 500:
                        break
            while True:
                if not await tend():
                    return
                if sub.overflowed:
                    await ws.close(code=1013, reason="subscriber too slow; reconnect with ?after=<last seq>"
                                   "&revisions_after=<last feed_seq>")
                    return
                if get is None:  # kept across wake-ups, so no event taken off the queue is lost
                    get = asyncio.ensure_future(sub.queue.get())
                woke = asyncio.ensure_future(inbound.wake.wait())
                try:
                    await asyncio.wait({get, woke}, timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woke.cancel()
                if not get.done():
                    continue
                rec, get = get.result(), None
                if rec.get("revision", 0) > 0:  # a correction re-publishes an event (its seq is old)
                    if rec.get("feed_seq", 0) > last_feed:  # not one the replay above already sent
                        await ws.send_json(rec)
                elif rec["seq"] > last:
                    await ws.send_json(rec)
                    last = rec["seq"]
        except WebSocketDisconnect:
            pass
        finally:
            rt.hub.unsubscribe(sub)
            for task in (reader, get):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    return app

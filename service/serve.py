"""Serving with a bounded shutdown.

uvicorn's graceful shutdown waits for every open response, and an MJPEG stream
never ends on its own, so one viewer kept the process alive after SIGTERM (a
container runtime then SIGKILLs it and the open trays are lost). Here the
signal also sets the runtime's ``stopping`` event, which streaming responses
watch and end on; ``shutdown_grace_s`` caps the wait for anything else before
uvicorn cancels it. The lifespan shutdown then stops the pipeline, which
flushes open trays into the store.

The server's thread is lowered in priority (``api.nice``) once the lifespan has
started the pipeline: niceness is per thread on Linux and inherited at thread
creation, so the pipeline's threads keep the process's nice while the event loop
and the sync-endpoint worker threads it creates afterwards run below them."""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading

import uvicorn

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, stopping: threading.Event, nice: int = 0) -> None:
        super().__init__(config)
        self._stopping = stopping
        self._nice = nice

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)  # runs the lifespan first: the pipeline's threads exist from here on
        if self._nice:
            lower_thread_priority(self._nice)

    def handle_exit(self, sig: int, frame) -> None:  # signal handler, main thread
        self._stopping.set()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        # websocket handlers poll ``stopping`` every 0.25 s and close with 1001 (going away) themselves;
        # uvicorn's own connection shutdown would otherwise cut some of them without a close frame
        await asyncio.sleep(self.SETTLE_S)
        await super().shutdown(sockets)

    SETTLE_S = 0.5


def lower_thread_priority(steps: int) -> int | None:
    """Raise the calling thread's nice by ``steps`` (capped at 19); threads it creates later inherit it.
    Returns the new nice, or None where threads have no nice of their own (not Linux)."""
    if not sys.platform.startswith("linux"):  # elsewhere PRIO_PROCESS would renice the whole process
        log.warning("api.nice: per-thread priority needs Linux; the API runs at the pipeline's priority")
        return None
    tid = threading.get_native_id()
    base = os.getpriority(os.PRIO_PROCESS, tid)
    new = min(19, base + steps)
    os.setpriority(os.PRIO_PROCESS, tid, new)
    log.info("API threads at nice %d, pipeline threads at %d", new, base)
    return new


def serve(app, host: str, port: int, log_level: str, grace_s: float, nice: int = 0) -> None:
    """Run ``app`` (from ``create_app``) until SIGINT/SIGTERM; streams end at once, other
    requests get ``grace_s`` seconds; the server's threads run ``nice`` steps below the pipeline."""
    stopping: threading.Event = app.state.runtime.stopping
    # The pipeline thread gives up the GIL around every torch op, native decode and JPEG encode, and
    # must win it back from request threads each time; with the default 5 ms switch interval a busy
    # API makes each of those hand-backs wait up to 5 ms (hundreds per frame). 1 ms bounds that wait.
    sys.setswitchinterval(0.001)
    # The one websocket (/ws/events) takes heartbeats only: a frame over 64 KiB is closed with 1009 by
    # the protocol instead of being read whole (uvicorn's default allows 16 MiB per frame).
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace_s,
                            ws_max_size=64 * 1024)
    _Server(config, stopping, nice).run()
    stopping.set()

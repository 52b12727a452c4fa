"""Per-client request limits, so API clients cannot starve the pipeline.

A token bucket per client key (``token:<name>`` when authenticated, else
``ip:<address>``) bounds request *rate*; long-lived streams (MJPEG, websocket)
cost one request to open and are bounded by *concurrent connections* instead,
since a stream is one request that lasts minutes. The bucket table is an LRU of
``max_clients`` keys, so a flood from many addresses cannot grow memory without
bound. Used from the event loop only (no locking needed)."""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from typing import Callable

from dishtrack.config import RateLimitConfig


def spend_token(tokens: float, at: float, now: float, rate: float, burst: float) -> tuple[float, float]:
    """One spend from a token bucket that held ``tokens`` at ``at``: (tokens left, 0.0) when a token
    was there, else (tokens, seconds until one is)."""
    tokens = min(burst, tokens + (now - at) * rate)
    if tokens >= 1.0:
        return tokens - 1.0, 0.0
    return tokens, (1.0 - tokens) / rate


class RateLimiter:
    def __init__(self, cfg: RateLimitConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._streams: dict[str, int] = {}
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}  # key -> streams waiting for a slot, oldest first

    def take(self, key: str) -> float:
        """Spend one request for ``key``: 0.0 if allowed, else seconds until one is available."""
        if not self.cfg.enabled:
            return 0.0
        now = self._clock()
        tokens, at = self._buckets.pop(key, (float(self.cfg.burst), now))
        tokens, wait = spend_token(tokens, at, now, self.cfg.requests_per_s, float(self.cfg.burst))
        self._buckets[key] = (tokens, now)  # most recently used last
        while len(self._buckets) > self.cfg.max_clients:
            self._buckets.popitem(last=False)
        return wait

    def open_stream(self, key: str) -> bool:
        """Count a new stream for ``key``; False (nothing counted) when it already has ``max_streams``."""
        n = self._streams.get(key, 0)
        if self.cfg.enabled and n >= self.cfg.max_streams:
            return False
        self._streams[key] = n + 1
        return True

    async def open_stream_within(self, key: str, grace_s: float) -> bool:
        """``open_stream``, waiting up to ``grace_s`` for one of ``key``'s streams to end: a client's
        close handshake completes before the server's handler has ended and given its slot back.
        A waiter sleeps until ``close_stream`` hands a slot on (oldest waiter first) rather than
        polling, so clients queued at their limit cost the event loop nothing until a slot frees."""
        if self.open_stream(key):
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while (remaining := deadline - loop.time()) > 0:
            woken: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(key, deque()).append(woken)
            try:
                async with asyncio.timeout(remaining):  # not wait_for: on 3.11 it swallows a cancel once woken
                    await woken
            except TimeoutError:
                pass
            except asyncio.CancelledError:
                if woken.done() and not woken.cancelled():
                    self._wake(key)  # the slot was handed to this waiter, which has gone: pass it on
                raise
            finally:
                self._forget(key, woken)
            if self.open_stream(key):  # may be taken already by a stream opened without waiting
                return True
        return False

    def close_stream(self, key: str) -> None:
        n = self._streams.get(key, 0) - 1
        if n > 0:
            self._streams[key] = n
        else:
            self._streams.pop(key, None)
        self._wake(key)

    def _wake(self, key: str) -> None:
        queue = self._waiters.get(key)
        while queue:
            woken = queue.popleft()
            if not woken.done():
                woken.set_result(None)
                break
        if not queue:
            self._waiters.pop(key, None)

    def _forget(self, key: str, woken: asyncio.Future[None]) -> None:
        queue = self._waiters.get(key)
        if queue is None:
            return
        try:
            queue.remove(woken)
        except ValueError:  # already handed a slot by _wake
            pass
        if not queue:
            del self._waiters[key]

    def waiting(self, key: str) -> int:
        """Streams of ``key`` waiting for a slot (bounded: each is an open connection)."""
        return len(self._waiters.get(key, ()))

    def streams(self, key: str) -> int:
        return self._streams.get(key, 0)

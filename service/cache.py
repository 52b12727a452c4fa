"""Short-lived response cache for the cheap, frequently polled endpoints.

Under API load (monitoring, dashboards, a misbehaving client polling /health
hundreds of times a second) recomputing health verdicts, percentiles and the
Prometheus exposition per request takes the interpreter away from the
pipeline thread. A result reused for ``ttl`` seconds (0.2 s by default, far
below any poll interval that matters) makes that cost independent of the
request rate."""
from __future__ import annotations

import functools
import threading
import time


class TtlCache:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._data: dict = {}

    def cached(self, fn):
        """Decorator for a route function; the key is the function and its arguments. FastAPI
        still sees the original signature (``functools.wraps`` sets ``__wrapped__``)."""
        if self.ttl <= 0:
            return fn

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            key = (fn.__name__, args, tuple(sorted(kwargs.items())))
            now = time.monotonic()
            with self._lock:
                hit = self._data.get(key)
            if hit is not None and now - hit[0] < self.ttl:
                return hit[1]
            value = fn(*args, **kwargs)  # outside the lock: concurrent misses may both compute
            with self._lock:
                if len(self._data) > 1024:  # bounded: keys include path parameters
                    self._data.clear()
                self._data[key] = (now, value)
            return value

        return wrapper

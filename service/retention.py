"""Retention: the event database is pruned by age, count and size in its own thread.

Without it the SQLite file grows without bound on a checkout that runs for years.
A thread of its own (not the pipeline loop) so a large delete never delays frames;
deletes run in short batches so event writes keep going."""
from __future__ import annotations

import logging
import threading
import time

from dishtrack.config.settings import RetentionConfig

from .metrics import Metrics
from .store import EventStore

log = logging.getLogger(__name__)


class Retention:
    def __init__(self, store: EventStore, cfg: RetentionConfig, metrics: Metrics) -> None:
        self.store, self.cfg, self.metrics = store, cfg, metrics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)

    def start(self) -> "Retention":
        self._thread.start()
        return self

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def run_once(self, now: float | None = None) -> int:
        """Apply the rules once; returns the number of events deleted."""
        c = self.cfg
        now = time.time() if now is None else now
        n = self.store.prune(ended_before=None if c.max_age_days is None else now - c.max_age_days * 86400,
                             max_events=c.max_events,
                             max_bytes=None if c.max_db_mb is None else int(c.max_db_mb * 2**20))
        if n:
            self.metrics.events_pruned.inc(n)
            log.info("retention: deleted %d old checkout events (database %.1f MiB)", n,
                     self.store.size_bytes() / 2**20)
        self.metrics.db_bytes.set(self.store.size_bytes())
        return n

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - a failed prune (disk full, locked) is retried next time
                log.exception("retention run failed")
            self._stop.wait(self.cfg.interval_s)

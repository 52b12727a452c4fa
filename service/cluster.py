"""A node of a camera-sharding cluster: applies ``leases.CameraLeases`` to the pipeline.

Every ``heartbeat_s`` one tick: cameras whose lease was lost are stopped (and
their open trays flushed into the store by the tracking stage), cameras handed
over for balance are stopped *before* their lease is released, cameras won are
started. Between ticks the pipeline's fence (``CameraLeases.holds``) drops the
frames of a camera whose lease may have ended, so a node that was paused past
its lease processes none of that camera's frames once another node may hold it.
On shutdown the node stops ticking, the pipeline flushes, then every lease is
released so the others take the cameras at their next tick instead of after
expiry."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING

from dishtrack.config import AppConfig

if TYPE_CHECKING:  # leases.py needs psycopg: imported only when storage.url names a PostgreSQL server
    from .leases import CameraLeases, LeaseChange

log = logging.getLogger(__name__)


def node_id(cfg: AppConfig) -> str:
    return cfg.cluster.node_id or default_node_id()


def default_node_id() -> str:
    """hostname-pid: unique per process, readable in ``/cameras``."""
    return f"{socket.gethostname()}-{os.getpid()}"


class ClusterMember:
    """The lease thread of one node; ``None`` from ``for_config`` without PostgreSQL (all cameras local)."""

    def __init__(self, leases: CameraLeases, pipeline) -> None:
        self.leases = leases
        self.pipeline = pipeline
        self.node_id = leases.node_id
        pipeline.fence = leases.holds  # before pipeline.start(): no camera starts until its lease is won
        self.last_change: LeaseChange | None = None
        self.last_tick_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leases", daemon=True)

    @classmethod
    def for_config(cls, cfg: AppConfig, pipeline) -> "ClusterMember | None":
        if not cfg.storage.url:
            return None
        from .leases import CameraLeases

        c = cfg.cluster
        return cls(CameraLeases(cfg.storage.url, node_id(cfg), [cam.id for cam in cfg.cameras], c.lease_s,
                                c.heartbeat_s), pipeline)

    def start(self) -> "ClusterMember":
        self._thread.start()
        return self

    def tick(self) -> LeaseChange:
        """One renewal round applied to the pipeline (the thread calls this every heartbeat_s)."""
        change = self.leases.tick()
        for cam in sorted(change.lost):
            self.pipeline.stop_camera(cam)
        if change.handover:
            self.leases.release(change.handover)  # stopped first: the next holder starts after we stopped
        for cam in sorted(change.gained):
            self.pipeline.start_camera(cam)
        self.last_change, self.last_tick_at = change, time.time()
        return change

    def _run(self) -> None:
        period = self.leases.heartbeat_s
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the lease thread must outlive one bad round
                log.exception("lease tick failed")
            self._stop.wait(max(0.0, period - (time.monotonic() - t0)))

    def stop(self, timeout: float = 5.0) -> None:
        """Stop ticking (the pipeline is stopped next, then ``leave``)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def leave(self) -> None:
        """After the pipeline stopped and flushed: give every lease back, close the connection."""
        try:
            self.leases.leave()
        finally:
            self.leases.close()

    def holders(self) -> dict[str, str | None]:
        """camera -> holding node; this node's own view for its cameras, the table for the others."""
        try:
            out = self.leases.holders()
        except Exception as e:  # noqa: BLE001 - /cameras must answer while the database is away
            log.warning("cannot read camera leases: %s", e)
            out = dict.fromkeys(self.leases.cameras)
        held = self.leases.held
        for cam, node in out.items():
            if node == self.node_id and cam not in held:
                out[cam] = None  # still ours in the table, but past our own (earlier) end: being given up
        for cam in held:
            out[cam] = self.node_id
        return out

"""Camera leases in PostgreSQL: which node of a cluster reads which camera.

A row per camera (``camera_leases``: holder ``node_id``, ``expires_at``) and a
row per live node (``cluster_nodes``), both renewed by every ``tick()`` in one
transaction. Why lease rows and not session advisory locks: an advisory lock
lives as long as its connection, so a node that hangs (paused, swapping, cut
off by a network partition whose TCP session the server has not yet noticed)
keeps its cameras for minutes to hours and nobody can take them; a lease has a
stated end, the holder can fence itself off before it, and holder and expiry
are plain rows that ``/cameras`` and any SQL tool can show.

Safety (no camera held by two nodes): a free or expired lease is taken with one
conditional ``UPDATE`` on rows locked ``FOR UPDATE SKIP LOCKED``; expiry is the
database's clock (``clock_timestamp()``), never a node's. The holder counts its
lease valid only until *its* monotonic time before the renewing statement plus
``lease_s`` (earlier than the database's expiry), and ``holds()`` says False from
then on, so its pipeline drops the camera's frames before another node can take
the lease; a tick that could not renew gives up cameras whose validity would end
before the next tick — except on the only live node, which keeps its still-valid
leases while the database cannot be reached: taking a lease needs the database,
so nobody can take them, and stopping would only lose the trays passing (a node
that starts meanwhile and reaches the database first after it can overlap with
it for one heartbeat; README "Camera sharding").

Balance: each node takes at most ceil(cameras / live nodes) and hands extras
back, so cameras spread when nodes join and concentrate when one dies.
Failover: a dead node's leases expire at most ``lease_s`` after its last
renewal; a survivor's next tick (every ``heartbeat_s``) takes them, so within
``lease_s + heartbeat_s`` of the death (13 s with the defaults).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg

log = logging.getLogger(__name__)

_SCHEMA_LOCK = 0x64697368_0010  # advisory lock key ("dish" + n), see store_pg
SCHEMA = """
CREATE TABLE IF NOT EXISTS camera_leases (
    camera_id TEXT PRIMARY KEY,
    node_id TEXT,
    expires_at TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    acquired_at TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS cluster_nodes (
    node_id TEXT PRIMARY KEY,
    expires_at TIMESTAMPTZ NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
"""


def _unreachable(e: psycopg.Error) -> bool:
    """The database could not be reached (refused, timed out, connection lost). A server that answers
    with an error is up for other nodes: a statement's error has an SQLSTATE, a refused login (no such
    database or role, too many connections) carries the server's FATAL message (libpq gives it no SQLSTATE)."""
    return isinstance(e, psycopg.OperationalError) and e.sqlstate is None and "FATAL:" not in str(e)


@dataclass(frozen=True, slots=True)
class LeaseChange:
    """What one tick changed. ``handover``: lost on purpose (rebalancing); release them with
    ``CameraLeases.release`` once the camera is stopped."""

    gained: frozenset[str]
    lost: frozenset[str]
    held: frozenset[str]
    handover: frozenset[str] = frozenset()
    error: str | None = None


class CameraLeases:
    """Lease bookkeeping of one node. ``tick()`` from one thread; ``holds()`` from any."""

    def __init__(self, url: str, node_id: str, cameras: list[str], lease_s: float, heartbeat_s: float) -> None:
        self.url, self.node_id = url, node_id
        self.cameras = sorted(cameras)
        self.lease_s, self.heartbeat_s = lease_s, heartbeat_s
        self._valid: dict[str, float] = {}  # camera -> monotonic end of our lease (conservative)
        self._mine: frozenset[str] = frozenset()  # held after the last tick (lost = these minus the next)
        self._alone = False  # no other live node at the last tick: nobody could take our cameras
        self._kept = False  # cameras kept through the current outage (said once)
        self._lock = threading.Lock()  # the connection: tick thread and holders() (API)
        self._conn: psycopg.Connection | None = None
        with self._use() as c, c.transaction():
            c.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            c.execute(SCHEMA)

    @contextmanager
    def _use(self):
        """The connection, (re)opened when needed, under the lock; closed after a connection error."""
        with self._lock:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
                # a statement stuck on a dead server must not outlive the lease
                self._conn.execute(f"SET statement_timeout = {int(self.heartbeat_s * 1000)}")
            try:
                yield self._conn
            except psycopg.OperationalError:
                self._conn.close()
                raise

    # -- queries
    def holds(self, camera_id: str) -> bool:
        """This node's lease on the camera is (conservatively) still valid: process its frames."""
        return time.monotonic() < self._valid.get(camera_id, 0.0)

    @property
    def held(self) -> frozenset[str]:
        now = time.monotonic()
        return frozenset(c for c, t in dict(self._valid).items() if t > now)  # copy: the tick thread edits it

    def holders(self) -> dict[str, str | None]:
        """camera -> node holding an unexpired lease (None: free), as the database says."""
        with self._use() as c:
            rows = c.execute("SELECT camera_id, CASE WHEN expires_at > clock_timestamp() THEN node_id END"
                             " FROM camera_leases WHERE camera_id = ANY(%s)", (self.cameras,)).fetchall()
        out = dict.fromkeys(self.cameras)
        out.update(dict(rows))
        return out

    # -- the verb
    def tick(self) -> LeaseChange:
        """Renew our leases and node row, hand back extras, take free or expired leases up to our
        share; one transaction. On a database error nothing is renewed and cameras whose lease
        would end before the next tick are given up (fencing)."""
        before = self._mine
        sent = time.monotonic()
        handover: set[str] = set()
        try:
            with self._use() as c, c.transaction():
                lease = f"{self.lease_s} seconds"
                c.execute("INSERT INTO cluster_nodes(node_id, expires_at) VALUES (%s, clock_timestamp() + %s::interval)"
                          " ON CONFLICT (node_id) DO UPDATE SET expires_at = EXCLUDED.expires_at",
                          (self.node_id, lease))
                c.execute("INSERT INTO camera_leases(camera_id) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING",
                          (self.cameras,))
                renewed = {r[0] for r in c.execute(
                    "UPDATE camera_leases SET expires_at = clock_timestamp() + %s::interval WHERE node_id = %s"
                    " AND expires_at > clock_timestamp() AND camera_id = ANY(%s) RETURNING camera_id",
                    (lease, self.node_id, self.cameras))}
                alive = c.execute("SELECT COUNT(*) FROM cluster_nodes WHERE expires_at > clock_timestamp()"
                                  ).fetchone()[0]
                share = math.ceil(len(self.cameras) / max(1, alive))
                taken: set[str] = set()
                if len(renewed) > share:  # a node joined: give back the extras (after they are stopped)
                    handover = set(sorted(renewed)[share:])
                elif len(renewed) < share:
                    taken = {r[0] for r in c.execute(
                        "UPDATE camera_leases SET node_id = %s, expires_at = clock_timestamp() + %s::interval,"
                        " acquired_at = clock_timestamp() WHERE camera_id IN (SELECT camera_id FROM camera_leases"
                        " WHERE camera_id = ANY(%s) AND (node_id IS NULL OR expires_at <= clock_timestamp())"
                        " ORDER BY camera_id LIMIT %s FOR UPDATE SKIP LOCKED)"
                        " AND (node_id IS NULL OR expires_at <= clock_timestamp()) RETURNING camera_id",
                        (self.node_id, lease, self.cameras, share - len(renewed)))}
        except psycopg.Error as e:
            now = time.monotonic()
            valid = [c for c, t in self._valid.items() if t > now]
            if self._alone and valid and _unreachable(e):
                # the only node, and the database cannot be reached: taking a lease needs the database, so no
                # node can take ours; fencing would only stop the cameras and lose the trays passing (their
                # events wait in the pipeline's spool). Only leases still valid are kept (a node paused past
                # them may have lost them already), only for a connection failure (a database that answers
                # with an error is up for other nodes), and only while this node was alone at its last
                # renewal. Once the database is back the next tick renews or loses them as usual.
                if not self._kept:
                    log.warning("cannot reach the database for camera leases (%s); the only node: keeping %s",
                                e, sorted(valid))
                self._kept = True
                self._valid = dict.fromkeys(valid, now + self.lease_s)
                self._mine = frozenset(valid)
                lost = before - self._mine
                return LeaseChange(frozenset(), lost, self._mine, error=f"{type(e).__name__}: {e}")
            for cam in [c for c, t in self._valid.items() if t - now < self.heartbeat_s]:
                del self._valid[cam]  # would expire before the next attempt: stop it now
            self._mine = frozenset(self._valid)
            lost = before - self._mine
            if lost:
                log.error("cannot renew camera leases (%s); giving up %s", e, sorted(lost))
            return LeaseChange(frozenset(), lost, self._mine, error=f"{type(e).__name__}: {e}")
        mine = (renewed - handover) | taken
        self._alone, self._kept = alive <= 1, False
        until = sent + self.lease_s
        self._valid = {cam: until for cam in mine}
        self._mine = frozenset(mine)
        change = LeaseChange(frozenset(mine - before), frozenset(before - mine), frozenset(mine),
                             frozenset(handover))
        if change.gained or change.lost:
            log.info("node %s: cameras gained %s, lost %s (handed over %s), holding %s", self.node_id,
                     sorted(change.gained), sorted(change.lost), sorted(handover), sorted(mine))
        return change

    def release(self, cameras) -> None:
        """Free our leases on ``cameras`` (stopped, trays flushed) so another node takes them at once."""
        cams = sorted(cameras)
        for cam in cams:
            self._valid.pop(cam, None)
        self._mine = self._mine - set(cams)
        if not cams:
            return
        try:
            with self._use() as c:
                c.execute("UPDATE camera_leases SET node_id = NULL, expires_at = '-infinity'"
                          " WHERE node_id = %s AND camera_id = ANY(%s)", (self.node_id, cams))
        except psycopg.Error as e:  # they expire on their own
            log.warning("cannot release camera leases %s: %s", cams, e)

    def leave(self) -> None:
        """Shutdown: release every lease and our node row (the others rebalance at their next tick)."""
        self.release(self.cameras)
        try:
            with self._use() as c:
                c.execute("DELETE FROM cluster_nodes WHERE node_id = %s", (self.node_id,))
        except psycopg.Error as e:
            log.warning("cannot remove node %s from the cluster table: %s", self.node_id, e)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()

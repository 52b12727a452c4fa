"""Issue 9 item 4: camera sharding across nodes through lease rows in a real PostgreSQL
(Debian postgresql, started here; skipped with the reason when missing): the lease logic
with contenders in one process, then three real ``dishtrack run`` nodes on the real video,
one killed with SIGKILL."""
from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from conftest import VIDEO, ServiceProcess, wait_until
from dishtrack.config import AppConfig
from dishtrack.service.leases import CameraLeases

CAMS = ["c0", "c1", "c2"]


def node(url: str, name: str, lease_s: float = 2.0, heartbeat_s: float = 0.5) -> CameraLeases:
    return CameraLeases(url, name, CAMS, lease_s, heartbeat_s)


def table(url: str) -> dict[str, str | None]:
    with psycopg.connect(url) as c:
        return dict(c.execute("SELECT camera_id, CASE WHEN expires_at > clock_timestamp() THEN node_id END"
                              " FROM camera_leases").fetchall())


def test_leases_spread_renew_expire_and_never_double_hold(pg_url):
    a, b = node(pg_url, "A"), node(pg_url, "B")
    try:
        # alone, A takes every camera; B joins: A hands one over (released after "stopping" it), B takes it
        assert a.tick().gained == set(CAMS)
        assert b.tick().gained == set()  # all held, none expired
        ch = a.tick()
        assert ch.lost == ch.handover == {"c2"} and a.held == {"c0", "c1"} and not a.holds("c2")
        a.release(ch.handover)
        assert b.tick().gained == {"c2"}
        assert table(pg_url) == {"c0": "A", "c1": "A", "c2": "B"}
        # renewal: both keep ticking for > 2 lease periods, nothing moves
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            assert not a.tick().lost and not b.tick().lost
            time.sleep(0.4)
        assert a.held == {"c0", "c1"} and b.held == {"c2"}
        # A stops renewing (paused or dead). Its own fence ends first, by its clock; B takes over only after
        # the lease expired in the database, and within lease_s + heartbeat_s
        a.tick()
        paused = time.monotonic()
        fenced_at = gained_at = None
        while gained_at is None:
            now = time.monotonic()
            if fenced_at is None and not a.holds("c0"):
                fenced_at = now
            if b.tick().gained:
                gained_at = time.monotonic()
                assert fenced_at is not None, "B took a camera A still counted as its own"
            assert now - paused < 2.0 + 0.5 + 1.0, "not taken over within lease_s + heartbeat_s"
            time.sleep(0.05)
        assert gained_at - paused >= 2.0 - 0.05  # not before expiry
        assert b.held == set(CAMS) and table(pg_url) == dict.fromkeys(CAMS, "B")
        # A comes back: its leases are lost, it may not renew them; later it gets its share again
        ch = a.tick()
        assert ch.lost == {"c0", "c1"} and a.held == set()
        assert table(pg_url) == dict.fromkeys(CAMS, "B")
        ch = b.tick()  # two live nodes again: B hands one back
        b.release(ch.handover)
        assert a.tick().gained == ch.handover == {"c2"}
        # leaving: released at once, not after expiry
        b.leave()
        assert a.tick().gained == {"c0", "c1"}
    finally:
        a.close()
        b.close()


def test_a_lone_node_keeps_its_valid_leases_only_while_the_database_cannot_be_reached(pg_url):
    """A single node on PostgreSQL stopped its cameras after one lease period of database outage, although
    no node could take them (taking needs the database). Kept now, while ticking: not past a pause longer
    than the lease, not when the database answers with an error, not when another node was alive."""
    from conftest import free_port

    a, b = node(pg_url, "A"), None
    try:
        assert a.tick().held == set(CAMS)
        a.close()
        a.url = f"postgresql://postgres@127.0.0.1:{free_port()}/x"  # refused: the database is unreachable
        end = time.monotonic() + 3.0  # 1.5 lease periods, ticking every heartbeat
        while time.monotonic() < end:
            ch = a.tick()
            assert ch.error and ch.held == set(CAMS) and not ch.lost and all(a.holds(c) for c in CAMS), ch
            time.sleep(0.5)
        time.sleep(2.2)  # no tick for longer than the lease (paused): they may be another node's by now
        ch = a.tick()
        assert ch.lost == set(CAMS) and not a.held, ch
        a.url = pg_url
        assert a.tick().held == set(CAMS)  # the database is back: taken again
        a.close()
        a.url = pg_url.rsplit("/", 1)[0] + "/no_such_db"  # the server answers, with an error: fence as before
        lost = set()
        for _ in range(6):
            lost |= a.tick().lost
            time.sleep(0.5)
        assert lost == set(CAMS), lost
        a.url = pg_url
        a.tick()
        b = node(pg_url, "B")
        b.tick()
        a.tick()  # two live nodes: A keeps its share and hands one back
        held = a.held
        assert held and len(held) < len(CAMS)
        a.close()
        a.url = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
        lost = set()
        for _ in range(6):
            lost |= a.tick().lost
            time.sleep(0.5)
        assert lost == held  # not alone: fenced within its lease, B may take them
    finally:
        a.close()
        if b is not None:
            b.close()


def test_many_contenders_ticking_concurrently_never_hold_one_camera_twice(pg_url):
    nodes = [node(pg_url, f"n{i}", lease_s=1.0, heartbeat_s=0.2) for i in range(6)]
    overlaps: list = []
    stop = threading.Event()

    def run(n: CameraLeases, pause_every: int) -> None:
        k = 0
        while not stop.is_set():
            k += 1
            ch = n.tick()
            n.release(ch.handover)
            if pause_every and k % pause_every == 0:
                time.sleep(1.3)  # past its lease: the others take over
            time.sleep(0.02)

    def check() -> None:
        while not stop.is_set():
            held = [n.held for n in nodes]
            for i in range(len(held)):
                for j in range(i + 1, len(held)):
                    if held[i] & held[j]:
                        overlaps.append((nodes[i].node_id, nodes[j].node_id, held[i] & held[j]))
            time.sleep(0.005)

    threads = [threading.Thread(target=run, args=(n, (3, 5, 0, 7, 0, 0)[i])) for i, n in enumerate(nodes)]
    threads.append(threading.Thread(target=check))
    for t in threads:
        t.start()
    time.sleep(6)
    stop.set()
    for t in threads:
        t.join(10)
    try:
        assert not overlaps, overlaps[:5]
        assert all(sum(c in n.held for n in nodes) <= 1 for c in CAMS)
    finally:
        for n in nodes:
            n.close()


# -- three real nodes
LEASE_S, HEARTBEAT_S = 3.0, 1.0
FAILOVER_S = LEASE_S + HEARTBEAT_S  # the stated bound (defaults: 10 + 3 = 13 s)


def cluster_cfg(url: str, name: str) -> dict:
    cams = [{"id": c, "source": str(VIDEO), "realtime": True, "loop": True} for c in CAMS]
    zones = [{"id": f"z{c}", "camera": c, "line": {"p1": [0.5, 0.0], "p2": [0.5, 1.0]},
              "tray_gap_s": 0.3, "tray_max_s": 2.0} for c in CAMS]
    return {"cameras": cams, "zones": zones, "storage": {"url": url},
            "detector": {"device": "cpu", "input_size": 320},
            "cluster": {"node_id": name, "lease_s": LEASE_S, "heartbeat_s": HEARTBEAT_S},
            "api": {"cache_s": 0}}


def holders(nodes: list[ServiceProcess]) -> dict[str, str | None]:
    """camera -> node, from every live node's /cameras (they must agree)."""
    views = [{c["camera_id"]: c["node"] for c in n.get("/cameras").json()} for n in nodes]
    assert all(v == views[0] for v in views), views
    return views[0]


def frames(n: ServiceProcess) -> dict[str, int]:
    return {c["camera_id"]: c["frames_read"] for c in n.get("/cameras").json() if c["state"] != "remote"}


def test_three_nodes_share_cameras_a_killed_or_paused_nodes_cameras_move(pg_url, tmp_path):
    AppConfig.model_validate(cluster_cfg(pg_url, "x"))  # the config the nodes get is valid
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    names = ("n1", "n2", "n3")
    for n in names:
        (tmp_path / n).mkdir()
    with ThreadPoolExecutor(3) as pool:  # started together, as an orchestrator would
        starts = [pool.submit(ServiceProcess, cluster_cfg(pg_url, n), tmp_path / n) for n in names]
    nodes = [f.result() for f in starts]
    try:
        # each camera held by exactly one node, one each (spread), all nodes agree
        wait_until(lambda: sorted(holders(nodes).values()) == ["n1", "n2", "n3"], 30,
                   what="one camera per node")
        held = holders(nodes)
        for n in nodes:
            mine = {c for c, h in held.items() if h == name(n)}
            wait_until(lambda: set(frames(n)) == mine and all(v > 0 for v in frames(n).values()), 30,
                       what=f"{name(n)} reads only its camera")
        # SIGKILL one node: its camera moves to a survivor within the stated bound
        victim, survivors = nodes[0], nodes[1:]
        lost_cam = next(c for c, h in held.items() if h == "n1")
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        killed = time.monotonic()
        wait_until(lambda: holders(survivors)[lost_cam] in ("n2", "n3"), FAILOVER_S + 3, interval=0.1,
                   what=f"{lost_cam} taken over")
        moved_s = time.monotonic() - killed
        after = holders(survivors)
        assert set(after.values()) <= {"n2", "n3"} and None not in after.values()
        new_holder = survivors[["n2", "n3"].index(after[lost_cam])]
        wait_until(lambda: frames(new_holder).get(lost_cam, 0) > 0, 20, what=f"frames of {lost_cam} on its new node")
        t_failover = time.time()
        # every camera keeps producing frames after the failover, events go on; event ids unique
        seen = {c: n for s in survivors for c, n in frames(s).items()}
        wait_until(lambda: all(frames(s)[c] > seen[c] for s in survivors for c in frames(s)), 20,
                   what="frames from every camera after the failover")
        # (events, not only frames: at a few detections per second on this shared 2-core machine a node
        # reading two cameras can go a minute without a line crossing, so any of the new holder's cameras)
        taken = set(frames(new_holder))
        wait_until(lambda: taken & {r[0] for r in rows(pg_url) if r[2] > t_failover}, 90,
                   what=f"events from {sorted(taken)} on the node that took {lost_cam} over")
        all_rows = rows(pg_url)
        ids = [r[1] for r in all_rows]
        assert len(ids) == len(set(ids))
        print(f"failover: {lost_cam} moved {moved_s:.2f}s after SIGKILL (bound {FAILOVER_S:g}s); "
              f"{len(ids)} events")
        assert moved_s <= FAILOVER_S + 1.0  # + the /cameras polling and the new reader's start
        # SIGSTOP a node past its lease: the other takes its cameras; resumed, it has stopped them
        paused, other = survivors
        paused_cams = [c for c, h in holders(survivors).items() if h == name(paused)]
        paused.proc.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: set(holders([other]).values()) == {name(other)}, FAILOVER_S + 3, interval=0.2,
                       what="the paused node's cameras taken over")
        finally:
            paused.proc.send_signal(signal.SIGCONT)
        log = paused.log_path
        wait_until(lambda: f"lost {sorted(paused_cams)}" in log.read_text(), 2 * HEARTBEAT_S + 2,
                   what="the resumed node gave its cameras up")
        # (the two rebalance next, so which cameras come back to the resumed node is not fixed) a camera
        # held by the other node all along is not read on the resumed one
        before, processed = holders(survivors), {c: processed_frames(paused, c) for c in CAMS}
        time.sleep(1.0)
        after = holders(survivors)
        stayed = [c for c in CAMS if before[c] == after[c] == name(other)]
        assert stayed and all(processed_frames(paused, c) == processed[c] for c in stayed)
        # graceful stop of the one holding everything: released at once, taken at the next tick (not after expiry)
        other.stop()
        wait_until(lambda: holders([paused]) == dict.fromkeys(CAMS, name(paused)), 2 * HEARTBEAT_S + 2,
                   what="cameras of a stopped node taken at the next tick")
    finally:
        for n in nodes:
            n.stop()
    for n in nodes:
        assert "Traceback" not in n.log_path.read_text()


def name(n: ServiceProcess) -> str:
    return n.cfg_path.parent.name


def processed_frames(n: ServiceProcess, cam: str) -> float:
    line = next((x for x in n.get("/metrics").text.splitlines()
                 if x.startswith(f'dishtrack_frames_processed_total{{camera="{cam}"}}')), None)
    return float(line.split()[-1]) if line else 0.0  # a camera this node never read


def rows(url: str) -> list[tuple]:
    with psycopg.connect(url) as c:
        return c.execute("SELECT camera_id, event_id, EXTRACT(EPOCH FROM stored_at) FROM events").fetchall()


def test_cluster_config_forbids_unknown_keys_and_a_heartbeat_too_slow_for_the_lease():
    from pydantic import ValidationError

    base = {"cameras": [{"id": "c0", "source": str(VIDEO)}]}
    cfg = AppConfig.model_validate(base)
    assert (cfg.cluster.lease_s, cfg.cluster.heartbeat_s, cfg.cluster.node_id) == (10.0, 3.0, None)
    assert cfg.cluster.lease_s + cfg.cluster.heartbeat_s <= 15  # the stated failover bound, default settings
    with pytest.raises(ValidationError, match="heartbeat_s"):
        AppConfig.model_validate({**base, "cluster": {"lease_s": 4, "heartbeat_s": 3}})
    with pytest.raises(ValidationError, match="leese_s"):
        AppConfig.model_validate({**base, "cluster": {"leese_s": 4}})

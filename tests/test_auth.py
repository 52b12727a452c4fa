"""Auth, Host/Origin allow-lists and per-client rate limits (issue 7, items 2 and 4), against the real app
(bundled detector, real video) served by real uvicorn on 127.0.0.1 or by `dishtrack run` subprocesses;
real HTTP (httpx), websocket (websockets) and MJPEG clients."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time

import httpx
import pytest
import yaml
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from conftest import VIDEO, AppServer, free_port, page_shows_stream_and_events, wait_until
from dishtrack.config import AppConfig
from dishtrack.service.api import build_runtime, create_app
from dishtrack.service.auth import SESSION_COOKIE, hash_token, new_token

VIEWER, ADMIN = new_token(), new_token()
TOKENS = [{"name": "till1", "role": "viewer", "hash": hash_token(VIEWER)},
          {"name": "boss", "role": "admin", "hash": hash_token(ADMIN)}]
ZONE = {"id": "z0", "camera": "cam0", "line": {"p1": [0.5, 0.0], "p2": [0.5, 1.0]}, "tray_gap_s": 0.3,
        "tray_max_s": 2.0}


def make_cfg(tmp_path, auth: dict | None = None, rate_limit: dict | None = None, **camera) -> AppConfig:
    """The real video; paced (frames dropped: little CPU) unless a test needs every frame's events."""
    return AppConfig.model_validate({
        "cameras": [{"id": "cam0", "source": str(VIDEO), "realtime": True, "loop": False, **camera}],
        "zones": [ZONE], "storage": {"sqlite_path": str(tmp_path / "events.sqlite3")},
        "auth": auth or {}, "rate_limit": rate_limit or {}})


@pytest.fixture
def serve(detector):
    def start(cfg: AppConfig) -> AppServer:
        return AppServer(create_app(build_runtime(cfg, detector=detector)))
    return start


def ws_status(url: str, headers: dict | None = None) -> int:
    """HTTP status of a websocket handshake: 101 when accepted (the connection is closed again)."""
    headers = headers or {}
    if "Host" in headers:  # the websockets client always sends its own Host: do the handshake by hand
        return raw_ws_status(url, headers)
    try:
        with ws_connect(url, additional_headers=headers, open_timeout=10, close_timeout=0.2):
            return 101
    except InvalidStatus as e:
        return e.response.status_code


def raw_ws_status(url: str, headers: dict) -> int:
    import base64
    from urllib.parse import urlsplit

    u = urlsplit(url)
    lines = [f"GET {u.path} HTTP/1.1", "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13",
             f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection((u.hostname, u.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return int(sock.recv(4096).split(b" ", 2)[1])


@contextlib.contextmanager
def mjpeg(base: str, headers: dict | None = None):
    """An open MJPEG stream (httpx streaming response)."""
    with httpx.Client(timeout=10) as c, c.stream("GET", base + "/cameras/cam0/stream.mjpg", headers=headers) as r:
        yield r


def first_jpeg(r: httpx.Response) -> bytes:
    """The first JPEG of an MJPEG response, leaving the stream open (a closed generator closes the response)."""
    r.parts = getattr(r, "parts", None) or r.iter_bytes()
    buf = b""
    for chunk in r.parts:
        buf += chunk
        if b"\xff\xd9" in buf:
            return buf[buf.index(b"\xff\xd8"):buf.index(b"\xff\xd9") + 2]
    raise AssertionError("stream ended without a JPEG")


# -- (2) tokens and roles ------------------------------------------------------------------------------------

def test_rest_websocket_and_mjpeg_need_a_token_with_the_right_role(tmp_path, serve):
    with serve(make_cfg(tmp_path, auth={"enabled": True, "tokens": TOKENS}, realtime=False)) as s:
        wait_until(lambda: s.app.state.runtime.store.count() >= 1, 120, what="a stored event")
        for path in ("/events", "/cameras", "/cameras/cam0/snapshot.jpg", "/cameras/cam0/tracks", "/metrics",
                     "/config", "/openapi.json", "/cameras/cam0/stream.mjpg"):
            r = s.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.status_code)
            assert s.get(path, token=new_token()).json() == {"detail": "invalid token"}
        assert s.get("/", follow_redirects=False).headers["location"] == "/login"
        assert s.get("/", token=new_token(), follow_redirects=False).status_code == 401
        assert ws_status(s.ws + "/ws/events") == 401
        assert ws_status(s.ws + "/ws/events", {"Authorization": f"Bearer {new_token()}"}) == 401
        # probes stay open; /health is open to loopback clients (the container's own health check)
        for path in ("/livez", "/readyz", "/health"):
            assert s.get(path).status_code in (200, 503), path

        events = s.get("/events", token=VIEWER)
        assert events.status_code == 200 and len(events.json()["items"]) >= 1
        assert s.get("/cameras/cam0/snapshot.jpg", token=VIEWER).content[:2] == b"\xff\xd8"
        with mjpeg(s.base, {"Authorization": f"Bearer {VIEWER}"}) as r:
            assert r.status_code == 200 and first_jpeg(r)[:2] == b"\xff\xd8"
        with ws_connect(s.ws + "/ws/events?after=0", additional_headers={"Authorization": f"Bearer {VIEWER}"}) as ws:
            import json

            assert json.loads(ws.recv(timeout=10))["seq"] == events.json()["items"][0]["seq"]
        r = s.get("/config", token=VIEWER)
        assert r.status_code == 403 and "needs admin" in r.json()["detail"]
        cfg = s.get("/config", token=ADMIN).json()
        assert cfg["auth"]["tokens"] == [{"name": "till1", "role": "viewer"}, {"name": "boss", "role": "admin"}]
        assert VIEWER not in str(cfg) and hash_token(VIEWER) not in str(cfg)
        assert s.get("/events", token=ADMIN).status_code == 200  # admin can do what a viewer can
        # writes are admin-only (corrections): a viewer is refused before routing, an admin reaches the router
        assert httpx.post(s.base + "/events", headers={"Authorization": f"Bearer {VIEWER}"}).status_code == 403
        assert httpx.post(s.base + "/events", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 405


def test_browser_login_sets_an_httponly_strict_signed_session_cookie(tmp_path, serve):
    with serve(make_cfg(tmp_path, auth={"enabled": True, "tokens": TOKENS})) as s:
        assert "<form" in httpx.get(s.base + "/login").text
        bad = httpx.post(s.base + "/login", data={"token": new_token()})
        assert bad.status_code == 401 and "Invalid token" in bad.text and "set-cookie" not in bad.headers
        assert httpx.post(s.base + "/login", data={}).status_code == 400
        r = httpx.post(s.base + "/login", data={"token": VIEWER}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/"
        set_cookie = r.headers["set-cookie"]
        assert set_cookie.startswith(SESSION_COOKIE + "=")
        attrs = {a.strip().lower() for a in set_cookie.split(";")[1:]}
        assert "httponly" in attrs and "samesite=strict" in attrs and "path=/" in attrs
        assert VIEWER not in set_cookie  # a signed session, not the token
        session = r.cookies[SESSION_COOKIE]
        cookie = {"Cookie": f"{SESSION_COOKIE}={session}"}

        assert s.get("/events", headers=dict(cookie)).status_code == 200
        assert "<title>dishtrack</title>" in s.get("/", headers=dict(cookie)).text
        assert ws_status(s.ws + "/ws/events", dict(cookie)) == 101
        with mjpeg(s.base, dict(cookie)) as m:
            assert m.status_code == 200
        assert s.get("/config", headers=dict(cookie)).status_code == 403  # the viewer's role travels with it
        # a forged or altered session is refused
        payload, sig = session.split(".")
        forged = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB") + "." + sig
        assert s.get("/events", headers={"Cookie": f"{SESSION_COOKIE}={forged}"}).status_code == 401
        assert ws_status(s.ws + "/ws/events", {"Cookie": f"{SESSION_COOKIE}={payload}.x"}) == 401
        # JSON login for scripts; logout clears the cookie
        j = httpx.post(s.base + "/login", json={"token": ADMIN})
        assert j.json() == {"name": "boss", "role": "admin"}
        assert s.get("/config", headers={"Cookie": f"{SESSION_COOKIE}={j.cookies[SESSION_COOKIE]}"}).status_code == 200
        out = httpx.post(s.base + "/logout", headers=dict(cookie))
        assert out.status_code == 200 and 'dishtrack_session=""' in out.headers["set-cookie"]
        assert "max-age=0" in out.headers["set-cookie"].lower()

    policy = s.app.state.security  # sessions expire after auth.session_ttl_s
    who = policy.check_token(VIEWER)
    token = policy.make_session(who, now=1000.0)
    assert policy.read_session(token, now=1000.0 + policy.session_ttl_s - 1) == who
    assert policy.read_session(token, now=1000.0 + policy.session_ttl_s + 1) is None


# -- Host and Origin allow-lists -----------------------------------------------------------------------------

def test_foreign_host_and_origin_are_refused_even_without_auth(tmp_path, serve):
    """The default loopback service (auth off): DNS rebinding (Host: evil.example) and a foreign page's
    websocket / fetch (Origin: http://evil.example) were served before."""
    cfg = make_cfg(tmp_path, auth={"allowed_hosts": ["dishtrack.canteen.test"],
                                   "allowed_origins": ["https://dashboard.canteen.test"]})
    with serve(cfg) as s:
        r = s.get("/events", headers={"Host": "evil.example"})
        assert r.status_code == 400 and "Invalid host header" in r.text
        assert ws_status(s.ws + "/ws/events", {"Host": "evil.example"}) == 400
        assert s.get("/events", headers={"Host": "dishtrack.canteen.test:8000"}).status_code == 200
        assert s.get("/events", headers={"Host": "localhost"}).status_code == 200
        evil = {"Origin": "http://evil.example"}
        assert ws_status(s.ws + "/ws/events", evil) == 403
        r = s.get("/events", headers=evil)
        assert r.status_code == 403 and "Origin http://evil.example" in r.json()["detail"]
        assert httpx.post(s.base + "/logout", headers=evil).status_code == 403
        # the page's own origin and the allow-listed one pass
        assert ws_status(s.ws + "/ws/events", {"Origin": s.base}) == 101
        assert ws_status(s.ws + "/ws/events", {"Origin": f"http://localhost:{s.port}"}) == 403  # another origin
        assert s.get("/events", headers={"Origin": "https://dashboard.canteen.test"}).status_code == 200


def test_a_bad_websocket_query_is_a_422_naming_the_parameter_not_a_403(tmp_path, serve):
    """`/ws/events?after=-1` was refused at the handshake with a bare 403 (FastAPI closes before
    accepting), which reads as a refused token; REST answers the same value with 422 and the field."""
    with serve(make_cfg(tmp_path)) as s:
        for query, field in [("after=-1", "after"), ("revisions_after=x", "revisions_after")]:
            try:
                with ws_connect(f"{s.ws}/ws/events?{query}", open_timeout=10, close_timeout=0.2):
                    raise AssertionError(f"{query}: accepted")
            except InvalidStatus as e:
                assert e.response.status_code == 422, (query, e.response.status_code)
                detail = json.loads(e.response.body)["detail"]
                assert [d["loc"] for d in detail] == [["query", field]], detail
            assert s.get(f"/events?{query.replace('revisions_', '')}").status_code == 422  # as REST says
        assert ws_status(s.ws + "/ws/events?after=0") == 101


def test_foreign_origin_with_a_valid_session_cookie_is_refused(tmp_path, serve):
    """Cross-site websocket hijacking: the browser attaches the cookie, the Origin gives the foreign page away."""
    with serve(make_cfg(tmp_path, auth={"enabled": True, "tokens": TOKENS})) as s:
        session = httpx.post(s.base + "/login", json={"token": VIEWER}).cookies[SESSION_COOKIE]
        cookie = f"{SESSION_COOKIE}={session}"
        assert ws_status(s.ws + "/ws/events", {"Cookie": cookie, "Origin": s.base}) == 101
        assert ws_status(s.ws + "/ws/events", {"Cookie": cookie, "Origin": "http://evil.example"}) == 403
        assert s.get("/events", headers={"Cookie": cookie, "Origin": "http://evil.example"}).status_code == 403


# -- secure by default: refuse to start open on a public address --------------------------------------------

def _site_yaml(tmp_path, **extra) -> str:
    cfg = {"cameras": [{"id": "cam0", "source": str(VIDEO), "loop": True}], "detector": {"device": "cpu"},
           "storage": {"sqlite_path": str(tmp_path / "e.sqlite3")}, **extra}
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _own_address() -> str | None:
    """A non-loopback address of this machine (to be a non-loopback client of our own service)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent: only picks the outgoing interface
        addr = s.getsockname()[0]
        return None if addr.startswith("127.") else addr
    return None


def test_public_bind_without_tokens_refuses_to_start(tmp_path):
    site = _site_yaml(tmp_path)
    t0 = time.time()
    r = subprocess.run(["dishtrack", "run", "--config", site, "--host", "0.0.0.0", "--port", str(free_port())],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "refusing to start without authentication" in r.stderr and "dishtrack hash-token" in r.stderr
    assert "Traceback" not in r.stderr and time.time() - t0 < 30  # before the model is loaded
    r = subprocess.run(["dishtrack", "run", "--config", _site_yaml(tmp_path, auth={"enabled": False}),
                        "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "auth.allow_open" in r.stderr


def _run(args: list[str], log, env=None) -> subprocess.Popen:
    return subprocess.Popen(["dishtrack", "run", *args], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})


def test_public_bind_serves_with_cli_made_tokens_or_when_explicitly_open(tmp_path):
    """`dishtrack hash-token` output pasted into a tokens file (and the container's env var) makes
    `dishtrack run --host 0.0.0.0` start with auth on; `--allow-open` starts it open."""
    out = subprocess.run(["dishtrack", "hash-token", "--name", "till1", "--role", "viewer"], capture_output=True,
                         text=True, timeout=60, check=True).stdout.splitlines()
    token = out[0].removeprefix("token: ")
    item = yaml.safe_load(out[1].split(": ", 1)[1])
    (tmp_path / "tokens.yaml").write_text(yaml.safe_dump(item))
    env_line = out[2].split(": ", 1)[1]
    admin = new_token()
    own = _own_address()
    port = free_port()
    site = _site_yaml(tmp_path, auth={"tokens_file": str(tmp_path / "tokens.yaml")})
    proc = _run(["--config", site, "--host", "0.0.0.0", "--port", str(port)], open(tmp_path / "a.log", "w"),
                env={"DISHTRACK_AUTH_TOKENS": f"boss:admin:{hash_token(admin)}", "DISHTRACK_ALLOWED_HOSTS": own or ""})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(base + "/livez", timeout=2).status_code == 200, 90, what="service up")
        assert httpx.get(base + "/cameras").status_code == 401
        assert httpx.get(base + "/cameras", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert httpx.get(base + "/config", headers={"Authorization": f"Bearer {token}"}).status_code == 403
        assert httpx.get(base + "/config", headers={"Authorization": f"Bearer {admin}"}).status_code == 200
        if own:  # a non-loopback client: /health needs a token, the probes do not
            ext = f"http://{own}:{port}"
            assert httpx.get(ext + "/health").status_code == 401
            assert httpx.get(ext + "/health", headers={"Authorization": f"Bearer {token}"}).status_code in (200, 503)
            assert httpx.get(ext + "/livez").status_code == 200
            assert httpx.get(ext + "/cameras", headers={"Host": "evil.example"}).status_code == 400
    finally:
        proc.terminate()
        proc.wait(30)
    assert env_line == f"till1:viewer:{item[0]['hash']}"

    port = free_port()
    proc = _run(["--config", _site_yaml(tmp_path), "--host", "0.0.0.0", "--port", str(port), "--allow-open"],
                open(tmp_path / "b.log", "w"))
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/livez", timeout=2).status_code == 200, 90,
                   what="open service up")
        assert httpx.get(f"http://127.0.0.1:{port}/cameras").status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
    assert "WITHOUT authentication" in (tmp_path / "b.log").read_text()


# -- (4) per-client rate limits -------------------------------------------------------------------------------

def test_per_client_rate_limit_answers_429_with_retry_after(tmp_path, serve):
    cfg = make_cfg(tmp_path, auth={"enabled": True, "tokens": TOKENS},
                   rate_limit={"requests_per_s": 0.5, "burst": 10})
    with serve(cfg) as s, httpx.Client(base_url=s.base, timeout=10) as c:
        viewer = {"Authorization": f"Bearer {VIEWER}"}
        t0 = time.monotonic()
        codes = [c.get("/cameras", headers=viewer).status_code for _ in range(40)]
        refilled = 0.5 * (time.monotonic() - t0)  # tokens the bucket regained meanwhile (a slow CI runner)
        assert codes[:10] == [200] * 10, codes
        assert 10 <= codes.count(200) <= 10 + refilled + 1 and codes.count(429) == 40 - codes.count(200), codes
        assert codes.count(429) >= 20, codes
        r = c.get("/cameras", headers=viewer)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        # another client (token) has its own bucket; unauthenticated requests are limited per address
        assert c.get("/cameras", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
        assert c.get("/livez").status_code == 200
        time.sleep(int(r.headers["retry-after"]))
        assert c.get("/cameras", headers=viewer).status_code == 200
        # brute force: wrong tokens are throttled per address too
        codes = [c.get("/cameras", headers={"Authorization": f"Bearer {new_token()}"}).status_code
                 for _ in range(20)]
        assert set(codes) == {401, 429} and codes[-1] == 429


def test_streams_are_limited_by_concurrent_connections_per_client(tmp_path, serve):
    cfg = make_cfg(tmp_path, auth={"enabled": True, "tokens": TOKENS}, rate_limit={"max_streams": 2})
    with serve(cfg) as s:
        wait_until(s.app.state.runtime.pipeline.finished.is_set, 120, what="file processed")
        viewer = {"Authorization": f"Bearer {VIEWER}"}
        with mjpeg(s.base, viewer) as a:
            first_jpeg(a)
            with ws_connect(s.ws + "/ws/events", additional_headers=viewer):
                with mjpeg(s.base, viewer) as third:
                    assert third.status_code == 429 and third.headers["retry-after"]
                assert ws_status(s.ws + "/ws/events", viewer) == 429
                with mjpeg(s.base, {"Authorization": f"Bearer {ADMIN}"}) as other:  # another client
                    assert other.status_code == 200
                assert s.get("/events", token=VIEWER).status_code == 200  # plain requests are not streams
        # departed clients give their slots back, also a websocket that never got an event to send
        t0 = time.time()

        def two_at_once() -> bool:
            with ws_connect(s.ws + "/ws/events", additional_headers=viewer, close_timeout=0.2), \
                    ws_connect(s.ws + "/ws/events", additional_headers=viewer, close_timeout=0.2):
                return True

        wait_until(two_at_once, 10, what="both stream slots freed")
        assert time.time() - t0 < 5
        wait_until(lambda: s.app.state.runtime.hub.subscribers == 0, 5, what="hub subscriptions released")


def test_a_websocket_client_that_reconnects_at_once_gets_its_stream_slot(tmp_path, serve):
    """A page reload closes its event websocket and opens a new one at once. The departed
    connection's handler is cancelled, and its slot given back, when the server reads the client's
    goodbye, not a second later (until then a client at its limit got 429); the slot still bounds
    the live handlers (hub subscriptions), not only the open sockets. The client's close handshake
    ends before the server's handler has ended and given the slot back, so a reconnect at once may
    still find it taken: it waits up to ``rate_limit.stream_grace_s`` for it (before 2026-12-07 it got
    429 then: this test's reconnects had a retry loop, and failed once in a CI run regardless)."""
    cfg = make_cfg(tmp_path, auth={"enabled": True, "tokens": TOKENS},
                   rate_limit={"max_streams": 1, "stream_grace_s": 0.5})
    with serve(cfg) as s:
        hub = s.app.state.runtime.hub
        viewer = {"Authorization": f"Bearer {VIEWER}"}
        url = s.ws + "/ws/events"
        for _ in range(10):
            with ws_connect(url, additional_headers=viewer, close_timeout=1):
                t0 = time.time()
                assert ws_status(url, viewer) == 429  # the one slot is taken, after the grace
                assert time.time() - t0 >= 0.5
                assert hub.subscribers <= 1
            t0 = time.time()
            assert ws_status(url, viewer) == 101  # leaving, then a reload at once, no retries
            assert ws_status(url, viewer) == 101  # and another
            assert time.time() - t0 < 2
        wait_until(lambda: hub.subscribers == 0, 5, what="hub subscriptions released")


def test_streams_waiting_at_their_limit_sleep_until_a_slot_is_handed_on_oldest_first():
    """A stream opened at ``max_streams`` waits up to ``stream_grace_s`` for a slot. The waiters
    sleep until ``close_stream`` hands one on, oldest first, instead of re-trying every 20 ms (before
    2026-12-07: a client flooding reconnects at its limit cost the event loop 50 wake-ups a second per
    connection); a waiter that leaves after it was handed a slot passes it on; none is left behind."""
    import asyncio

    from dishtrack.config import RateLimitConfig
    from dishtrack.service.ratelimit import RateLimiter

    class Counting(RateLimiter):
        tries = 0

        def open_stream(self, key: str) -> bool:
            self.tries += 1
            return super().open_stream(key)

    async def scenario() -> None:
        lim = Counting(RateLimitConfig(max_streams=1))
        assert lim.open_stream("a")
        first = asyncio.create_task(lim.open_stream_within("a", 5.0))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(lim.open_stream_within("a", 5.0))
        third = asyncio.create_task(lim.open_stream_within("a", 5.0))
        await asyncio.sleep(0.5)
        assert lim.tries == 4 and lim.waiting("a") == 3  # one try each, then asleep
        lim.close_stream("a")
        assert await asyncio.wait_for(first, 1) is True
        assert not second.done() and lim.streams("a") == 1
        second.cancel()  # the client leaves while waiting
        await asyncio.sleep(0)
        lim.close_stream("a")
        assert await asyncio.wait_for(third, 1) is True
        # handed a slot, then gone before it took it: the slot goes to the next waiter
        fourth = asyncio.create_task(lim.open_stream_within("a", 5.0))
        fifth = asyncio.create_task(lim.open_stream_within("a", 5.0))
        await asyncio.sleep(0.01)
        lim.close_stream("a")  # wakes fourth ...
        fourth.cancel()  # ... which is cancelled before it runs
        assert await asyncio.wait_for(fifth, 1) is True
        with pytest.raises(asyncio.CancelledError):
            await fourth
        # nobody frees a slot: refused after the grace, and nothing is left queued
        assert await lim.open_stream_within("a", 0.2) is False
        assert lim.waiting("a") == 0 and lim.streams("a") == 1 and not lim._waiters

    asyncio.run(scenario())


def test_a_websocket_client_that_floods_the_event_feed_is_closed_and_its_slot_freed(tmp_path, serve):
    """/ws/events takes heartbeats only. A client that sends more than its budget (a burst of 32, then
    one a second) is closed with 1008, and once it has gone its slot is free again; before 2026-12-07,
    the middleware stopped reading at a full buffer, never saw the client leave, and held the slot
    and the hub subscription until the next event failed to send."""
    from websockets.exceptions import ConnectionClosed

    cfg = make_cfg(tmp_path, auth={"enabled": True, "tokens": TOKENS}, rate_limit={"max_streams": 1})
    with serve(cfg) as s:
        viewer = {"Authorization": f"Bearer {VIEWER}"}
        url = s.ws + "/ws/events"
        with ws_connect(url, additional_headers=viewer, close_timeout=1) as c:
            with pytest.raises(ConnectionClosed) as closed:
                for _ in range(40):
                    c.send("hello")
                deadline = time.time() + 15
                while True:  # events may come first; a TimeoutError fails the test
                    c.recv(timeout=max(0.1, deadline - time.time()))
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        wait_until(lambda: ws_status(url, viewer) == 101, 5, what="slot given back")
        wait_until(lambda: s.app.state.runtime.hub.subscribers == 0, 5, what="hub subscription released")


def test_an_event_feed_client_may_send_heartbeats_for_as_long_as_it_stays(tmp_path, serve):
    """Integrators' websocket clients often send an application heartbeat ("ping") every few
    seconds and expect an answer. /ws/events answers each with {"type": "pong"} and otherwise ignores
    what a client sends, within a budget of ``api.ws_client_messages_per_s`` (burst
    ``api.ws_client_burst``). Before, the route read nothing: the 33rd heartbeat filled the
    middleware's buffer and the client was closed with 1008, after 16 minutes at one per 30 s. Here 80
    heartbeats, more than twice the buffer, at 25 per second under a budget of 50 per second."""
    cfg = make_cfg(tmp_path, auth={"enabled": True, "tokens": TOKENS}, rate_limit={"max_streams": 1})
    cfg = cfg.model_copy(update={"api": cfg.api.model_copy(update={"ws_client_messages_per_s": 50.0})})
    with serve(cfg) as s:
        viewer = {"Authorization": f"Bearer {VIEWER}"}
        with ws_connect(s.ws + "/ws/events", additional_headers=viewer, close_timeout=1) as c:
            pongs = events = 0
            for i in range(80):
                c.send("ping" if i % 2 else '{"type": "ping"}')
                time.sleep(0.04)
            deadline = time.time() + 10
            while pongs < 80:
                msg = json.loads(c.recv(timeout=max(0.1, deadline - time.time())))
                if msg == {"type": "pong"}:
                    pongs += 1
                else:
                    assert "event_id" in msg, msg
                    events += 1
            c.send("hello")  # anything else is ignored, not answered: plain text, a long or deeply nested "ping"
            c.send('{"type": "ping", "pad": "' + "x" * 100 + '"}')
            c.send('{"type": "ping", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
            with pytest.raises(TimeoutError):
                while True:
                    assert json.loads(c.recv(timeout=1)) != {"type": "pong"}
            c.send("ping")  # and the feed is still there
            while json.loads(c.recv(timeout=5)) != {"type": "pong"}:
                pass
        wait_until(lambda: s.app.state.runtime.hub.subscribers == 0, 5, what="hub subscription released")


def test_heartbeats_are_answered_while_stored_events_are_replayed(tmp_path, serve):
    """A reconnecting client with ``?after=`` first gets every stored event since; its heartbeats are
    answered between them, not only after the whole backlog (which on a slow link can take longer than
    the client waits for its pong before it gives the connection up)."""
    from dishtrack.tracking.types import CheckoutEvent, CheckoutItem

    with serve(make_cfg(tmp_path)) as s:
        store = s.app.state.runtime.store
        first = store.last_seq()
        for i in range(1500):
            store.save(CheckoutEvent(f"backlog{i}", "cam0", "z0", float(i), i + 1.0,
                                     (CheckoutItem("person", 1, 0.8),), (i,), 0.8))
        with ws_connect(f"{s.ws}/ws/events?after={first}", close_timeout=1) as c:
            c.send("ping")
            received = 0
            while True:
                msg = json.loads(c.recv(timeout=10))
                if msg == {"type": "pong"}:
                    break
                received += 1
        # the replay reads pages of 500, and a send that fits the socket buffer never suspends: the server read
        # the ping only at the next page's query, so the pong came after exactly 500 events, or 1000 when the
        # ping arrived after the first page's query had begun (failed once here, tests run beside a server
        # load). Now the ping is read as it arrives: 0-26 events, 0-307 with both cores busy.
        assert received < 1000, f"the pong came after {received} of the 1500 replayed events"


# -- OpenAPI ---------------------------------------------------------------------------------------------------

def test_openapi_documents_401_403_429_and_login(tmp_path, serve):
    with serve(make_cfg(tmp_path, auth={"enabled": True, "tokens": TOKENS})) as s:
        doc = s.get("/openapi.json", token=VIEWER).json()
    paths = doc["paths"]
    for p in ("/events", "/cameras", "/config", "/cameras/{camera_id}/stream.mjpg", "/metrics"):
        assert {"400", "401", "403", "429"} <= set(paths[p]["get"]["responses"]), p
    assert "401" not in paths["/livez"]["get"]["responses"] and "429" in paths["/livez"]["get"]["responses"]
    login = paths["/login"]["post"]
    assert {"200", "303", "400", "401"} <= set(login["responses"])
    assert set(login["requestBody"]["content"]) == {"application/x-www-form-urlencoded", "application/json"}
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "session"}


def test_schemathesis_with_auth_on_no_server_errors_and_responses_match(tmp_path, serve):
    """The fuzz of test_hardening, with auth on and an admin token, plus an unauthenticated pass:
    zero 5xx, every status/content type/body as documented (401/403/429 included). 15 examples each."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                     status_code_conformance)
    from schemathesis.generation import GenerationMode

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    with serve(make_cfg(tmp_path, auth={"enabled": True, "tokens": TOKENS})) as s:
        wait_until(s.app.state.runtime.pipeline.finished.is_set, 60, what="file processed")
        raw = requests.get(s.base + "/openapi.json", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        schema = schemathesis.openapi.from_dict(raw).exclude(path_regex=r"stream\.mjpg$")
        ops = [r.ok() for r in schema.get_all_operations()]
        assert any(op.path == "/login" for op in ops)
        t0 = time.time()
        for auth in ({"Authorization": f"Bearer {ADMIN}"}, {}):
            session = requests.Session()
            session.headers.update(auth)
            for op in ops:
                @settings(max_examples=15, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
                @given(case=op.as_strategy(generation_mode=GenerationMode.POSITIVE))
                def run(case):
                    probe = case.path in ("/health", "/livez", "/readyz")
                    r = case.call_and_validate(base_url=s.base, session=session, headers=auth,
                                               checks=[c for c in checks if not (probe and c is not_a_server_error)])
                    assert r.status_code < 500 or (probe and r.status_code == 503), (case.path, r.status_code)

                try:
                    run()
                except Unsatisfiable:
                    pass
                except Exception as e:
                    raise AssertionError(f"{op.label} ({'admin' if auth else 'no token'}): {e}") from e
        assert time.time() - t0 < 90, f"fuzzing took {time.time() - t0:.0f}s"


# -- the web page with auth on (headless Chromium) -----------------------------------------------------------

@pytest.mark.browser
def test_page_after_login_shows_stream_and_live_events(service, chromium, tmp_path):
    from selenium.webdriver.common.by import By

    svc = service({
        "cameras": [{"id": "cam0", "source": str(VIDEO), "loop": True, "realtime": True}],
        "zones": [{**ZONE, "tray_gap_s": 0.5}], "auth": {"enabled": True, "tokens": TOKENS},
    })
    assert svc.get("/events").status_code == 401
    drv = chromium
    drv.get(svc.base + "/")
    wait_until(lambda: drv.current_url.endswith("/login"), 10, what="redirect to /login")
    drv.find_element(By.ID, "token").send_keys(VIEWER)
    drv.find_element(By.ID, "login").click()
    events = page_shows_stream_and_events(drv)
    assert drv.execute_script("return document.cookie") == ""  # HttpOnly: invisible to scripts
    assert "person" in events[0].text and "cam0/z0" in events[0].text

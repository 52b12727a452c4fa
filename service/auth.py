"""Who may call the API: tokens, browser sessions, Host/Origin allow-lists, rate limits.

* **Tokens** are 256-bit random strings (``dishtrack hash-token``); the config keeps
  only ``sha256:<hex>``. A fast unsalted hash is the right tool for a random
  secret of that size (nothing to brute-force; a slow KDF protects low-entropy
  *passwords* and would cost the pipeline's CPU on every request), so tokens
  chosen by hand must be long (``MIN_TOKEN_LEN``). Roles: ``viewer`` (streams,
  events, snapshots, cameras, metrics) < ``admin`` (also ``/config`` and every
  non-GET route: corrections).
* API clients send ``Authorization: Bearer <token>``; browsers ``POST /login``
  the token once and get an HttpOnly, SameSite=Strict cookie holding an
  HMAC-signed session (name, role, token fingerprint, expiry). Websockets and
  MJPEG are checked the same way (cookie or bearer). ``?token=`` in URLs is
  deliberately *not* accepted: URLs end up in access logs and browser history,
  and browsers send the cookie on same-origin websockets anyway.
* **Host** allow-list (starlette ``TrustedHostMiddleware``): loopback names plus
  ``auth.allowed_hosts``; stops DNS rebinding against a service without auth.
  **Origin**: a request carrying a foreign ``Origin`` (another site's page:
  cross-site websocket hijacking, CSRF) is 403 unless in ``auth.allowed_origins``.
* Auth is on whenever ``api.host`` is not loopback; without tokens the service
  refuses to start there unless ``auth.allow_open`` (``--allow-open``).
  ``/livez`` and ``/readyz`` stay open (orchestrator probes); ``/health`` is open
  to loopback clients only (the Docker HEALTHCHECK runs inside the container)
  because it names cameras and their errors.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Mapping
from urllib.parse import parse_qs, urlsplit

import yaml
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from dishtrack.config import AppConfig, ConfigError, TokenConfig

from .ratelimit import RateLimiter

log = logging.getLogger(__name__)

SESSION_COOKIE = "dishtrack_session"
MIN_TOKEN_LEN = 32
ROLES = {"viewer": 1, "admin": 2}
PUBLIC_PATHS = frozenset({"/livez", "/readyz", "/login", "/logout"})
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
ENV_TOKENS = "DISHTRACK_AUTH_TOKENS"  # NAME:ROLE:sha256:HEX, separated by commas/whitespace
ENV_TOKENS_FILE = "DISHTRACK_AUTH_TOKENS_FILE"
ENV_ALLOWED_HOSTS = "DISHTRACK_ALLOWED_HOSTS"  # comma-separated, added to auth.allowed_hosts
ENV_SESSION_SECRET = "DISHTRACK_SESSION_SECRET"
_LOGIN_BODY_MAX = 4096


def new_token() -> str:
    return secrets.token_urlsafe(32)  # 256 bits


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: str
    fingerprint: str  # tail of the token hash: a rotated token ends its sessions


@dataclass(frozen=True)
class SecurityPolicy:
    """Everything the middleware decides on, resolved once at startup."""

    enabled: bool
    by_hash: Mapping[str, Principal] = field(default_factory=dict)  # "sha256:..." -> who
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    allowed_origins: frozenset[str] = frozenset()
    session_secret: bytes = b""
    session_ttl_s: float = 43200.0
    cookie_secure: bool = False

    def check_token(self, token: str) -> Principal | None:
        return self.by_hash.get(hash_token(token))  # the dict key is a hash: no timing leak of the token

    def make_session(self, who: Principal, now: float | None = None) -> str:
        exp = int((time.time() if now is None else now) + self.session_ttl_s)
        payload = _b64(json.dumps({"n": who.name, "r": who.role, "f": who.fingerprint, "e": exp}).encode())
        return payload + "." + _b64(hmac.new(self.session_secret, payload.encode(), hashlib.sha256).digest())

    def read_session(self, value: str, now: float | None = None) -> Principal | None:
        payload, _, sig = value.partition(".")
        want = _b64(hmac.new(self.session_secret, payload.encode(), hashlib.sha256).digest())
        if not sig or not hmac.compare_digest(sig, want):
            return None
        try:
            d = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            if d["e"] < (time.time() if now is None else now):
                return None
            who = Principal(d["n"], d["r"], d["f"])
        except (ValueError, KeyError, TypeError):
            return None
        return who if who in self.by_hash.values() else None  # token removed or rotated: session over


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


_TOKEN_LIST = TypeAdapter(list[TokenConfig])


def _tokens_from_file(path: str) -> list[TokenConfig]:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{p}: cannot read tokens file: {e}") from e
    try:
        return _TOKEN_LIST.validate_python(raw or [])
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"{p}: invalid tokens file: {errs}") from e


def _tokens_from_env(text: str) -> list[TokenConfig]:
    out = []
    for item in text.replace(",", " ").split():
        name, _, rest = item.partition(":")
        role, _, digest = rest.partition(":")
        try:
            out.append(TokenConfig(name=name, role=role, hash=digest))
        except ValidationError as e:
            raise ConfigError(f"{ENV_TOKENS}: {name!r}: expected NAME:ROLE:sha256:HEX "
                              f"({'; '.join(x['msg'] for x in e.errors())})") from e
    return out


def load_tokens(cfg: AppConfig, env: Mapping[str, str]) -> list[TokenConfig]:
    """Inline ``auth.tokens`` + ``auth.tokens_file`` + the environment (containers)."""
    tokens = list(cfg.auth.tokens)
    for path in (cfg.auth.tokens_file, env.get(ENV_TOKENS_FILE)):
        if path:
            tokens += _tokens_from_file(path)
    if env.get(ENV_TOKENS):
        tokens += _tokens_from_env(env[ENV_TOKENS])
    names = [t.name for t in tokens]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"auth: token names must be unique across config, tokens file and {ENV_TOKENS}: {dup}")
    return tokens


def build_policy(cfg: AppConfig, env: Mapping[str, str] | None = None) -> SecurityPolicy:
    """Resolve auth for ``cfg``; ConfigError when it would serve a public address open."""
    env = os.environ if env is None else env
    a = cfg.auth
    loopback = is_loopback(cfg.api.host)
    tokens = load_tokens(cfg, env)
    enabled = (not loopback) if a.enabled is None else a.enabled
    if enabled and not tokens:
        if not a.allow_open:
            why = f"api.host {cfg.api.host} is not a loopback address" if a.enabled is None else "auth.enabled is true"
            raise ConfigError(f"refusing to start without authentication: {why} and no API tokens are configured. "
                              "Create one with `dishtrack hash-token --name NAME --role viewer|admin` and add it to "
                              f"auth.tokens, auth.tokens_file or {ENV_TOKENS}; or set auth.allow_open: true "
                              "(--allow-open) to serve without authentication")
        enabled = False
    if not enabled and not loopback:
        if not a.allow_open:
            raise ConfigError(f"refusing to serve api.host {cfg.api.host} (not loopback) with auth.enabled: false; "
                              "set auth.allow_open: true (--allow-open) if that is really intended")
        log.warning("serving %s WITHOUT authentication (auth.allow_open)", cfg.api.host)
    hosts = list(LOOPBACK_HOSTS) + [h.lower() for h in a.allowed_hosts]
    hosts += [h.strip().lower() for h in env.get(ENV_ALLOWED_HOSTS, "").split(",") if h.strip()]
    if cfg.api.host not in ("0.0.0.0", "::", ""):
        hosts.append(cfg.api.host.lower())
    secret = a.session_secret or env.get(ENV_SESSION_SECRET) or secrets.token_hex(32)
    return SecurityPolicy(
        enabled=enabled,
        by_hash={t.hash: Principal(t.name, t.role, t.hash[-16:]) for t in tokens},
        allowed_hosts=tuple(dict.fromkeys(hosts)),
        allowed_origins=frozenset(o.rstrip("/").lower() for o in a.allowed_origins),
        session_secret=secret.encode(), session_ttl_s=a.session_ttl_s, cookie_secure=a.cookie_secure)


def required_role(path: str, method: str, client_loopback: bool) -> str | None:
    """The least role a request needs (None: open to anyone)."""
    if path in PUBLIC_PATHS or (path == "/health" and client_loopback):
        return None
    if path == "/config" or path.startswith("/admin/") or method not in ("GET", "HEAD"):
        return "admin"
    return "viewer"


def _deny(status: int, detail: str, headers: dict | None = None) -> Response:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class SecurityMiddleware:
    """Origin check, rate limit / stream count, then authentication and role, for HTTP and websockets
    (a denied websocket gets the HTTP status before the handshake completes)."""

    def __init__(self, app: ASGIApp, policy: SecurityPolicy, limiter: RateLimiter) -> None:
        self.app, self.policy, self.limiter = app, policy, limiter

    def _origin_ok(self, origin: str, host: str | None) -> bool:
        o = origin.rstrip("/").lower()
        return o in self.policy.allowed_origins or (host is not None and urlsplit(o).netloc == host.lower())

    def _identify(self, headers: Headers) -> tuple[Principal | None, bool]:
        """(who, a bearer token was given but is wrong)."""
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            who = self.policy.check_token(auth[7:].strip())
            return who, who is None
        cookie = _cookie(headers, SESSION_COOKIE)
        return (self.policy.read_session(cookie) if cookie else None), False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path, method = scope["path"], scope.get("method", "GET")
        origin = headers.get("origin")
        if origin is not None and not self._origin_ok(origin, headers.get("host")):
            await _deny(403, f"Origin {origin} is not allowed (auth.allowed_origins)")(scope, receive, send)
            return
        who, bad_token = self._identify(headers) if self.policy.enabled else (None, False)
        ip = (scope.get("client") or ("unknown", 0))[0]
        key = f"token:{who.name}" if who else f"ip:{ip}"
        wait = self.limiter.take(key)
        if wait > 0:
            await _deny(429, "too many requests", {"Retry-After": str(max(1, math.ceil(wait)))})(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = who  # routes record who did it (corrections)
        if self.policy.enabled:
            need = required_role(path, method, is_loopback(ip))
            if need is not None and who is None:
                if path == "/" and method == "GET" and not bad_token:
                    await RedirectResponse("/login", status_code=303)(scope, receive, send)
                    return
                detail = "invalid token" if bad_token else "authentication required (Bearer token or /login)"
                await _deny(401, detail, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
            if need is not None and ROLES[who.role] < ROLES[need]:
                await _deny(403, f"role {who.role!r} may not {method} {path} (needs {need})")(scope, receive, send)
                return
        if scope["type"] == "http" and not path.endswith("/stream.mjpg"):
            await self.app(scope, receive, send)
            return
        # MJPEG / websocket: a concurrent-connection budget
        if not await self.limiter.open_stream_within(key, self.limiter.cfg.stream_grace_s):
            await _deny(429, f"at most {self.limiter.cfg.max_streams} concurrent streams per client",
                        {"Retry-After": "5"})(scope, receive, send)
            return
        try:
            if scope["type"] == "websocket":
                await _until_client_leaves(self.app, scope, receive, send)
            else:
                await self.app(scope, receive, send)  # MJPEG: the route polls is_disconnected itself
        finally:
            self.limiter.close_stream(key)


async def _until_client_leaves(app: ASGIApp, scope: Scope, receive: Receive, send: Send,
                               inbox_size: int = 32, unread_timeout_s: float = 5.0) -> None:
    """Run a websocket app, cancelling it as soon as the client has disconnected.

    A send-only handler never calls ``receive`` and so would learn of a departed
    client only at its next send (possibly hours without events), holding its
    stream slot and hub subscription until then. Here the client's messages are
    read as they come and handed over through a bounded queue (same order). Once
    ``websocket.disconnect`` is read the app is cancelled at once (its ``finally``
    blocks run; there is nobody left to send to), so the stream slot, given back
    when the app has ended, is free for a page reload that reconnects at once and
    still bounds the live handlers. When the queue is full the client waits
    (back-pressure for an app that reads slowly) up to ``unread_timeout_s``;
    then the app is cancelled and the client closed with 1008, since waiting on
    would stop reading the client's disconnect and buffering would grow without
    bound (``/ws/events`` reads as messages come: a flood is closed there, by its budget)."""
    inbox: asyncio.Queue = asyncio.Queue(maxsize=inbox_size)

    async def pump() -> bool:
        """Hand the client's messages over; True when it is to be closed for unread ones."""
        while True:
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                with contextlib.suppress(asyncio.QueueFull):  # the app is cancelled anyway
                    inbox.put_nowait(msg)
                return False
            try:
                await asyncio.wait_for(inbox.put(msg), unread_timeout_s)
            except asyncio.TimeoutError:
                return True

    app_task = asyncio.ensure_future(app(scope, inbox.get, send))
    pump_task = asyncio.ensure_future(pump())
    try:
        await asyncio.wait({app_task, pump_task}, return_when=asyncio.FIRST_COMPLETED)
        app_task.cancel()  # a no-op when the app has ended on its own
        with contextlib.suppress(asyncio.CancelledError):
            await app_task
        flooded = pump_task.done() and not pump_task.cancelled() and pump_task.exception() is None \
            and pump_task.result()
        if flooded:  # only now: a close sent while the app may still send would make its sends raise
            with contextlib.suppress(RuntimeError, OSError):
                await send({"type": "websocket.close", "code": 1008,
                            "reason": f"more than {inbox_size} messages unread"})
    finally:
        pump_task.cancel()
        app_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pump_task
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await app_task


def _cookie(headers: Headers, name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None


# -- login / logout ------------------------------------------------------------------------------------------

_ERR = {"content": {"application/json": {"schema": {
    "type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}}}}
_LOGIN_BODY = {"requestBody": {"required": True, "content": {
    "application/x-www-form-urlencoded": {"schema": {"type": "object", "properties": {"token": {"type": "string"}},
                                                     "required": ["token"]}},
    "application/json": {"schema": {"type": "object", "properties": {"token": {"type": "string"}},
                                    "required": ["token"]}}}}}


def _login_page(message: str = "") -> str:
    page = resources.files("dishtrack.service").joinpath("static", "login.html").read_text()
    return page.replace("<!--message-->", message)


def login_router(policy: SecurityPolicy) -> APIRouter:
    r = APIRouter()

    @r.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page() -> str:
        return _login_page()

    @r.post("/login", openapi_extra=_LOGIN_BODY, responses={
        200: {"description": "logged in (JSON request)", "content": {"application/json": {"schema": {
            "type": "object", "properties": {"name": {"type": "string"}, "role": {"type": "string"}}}}}},
        303: {"description": "logged in (form request): to /"},
        400: {"description": "no token in the body", **_ERR},
        401: {"description": "wrong token", "content": {"application/json": _ERR["content"]["application/json"],
                                                        "text/html": {"schema": {"type": "string"}}}}})
    async def login(request: Request) -> Response:
        """Exchange a token for an HttpOnly, SameSite=Strict session cookie (form field or JSON ``token``)."""
        body = await request.body()
        is_json = request.headers.get("content-type", "").split(";")[0].strip() == "application/json"
        token = None
        if len(body) <= _LOGIN_BODY_MAX:
            try:
                data = json.loads(body) if is_json else {k: v[0] for k, v in parse_qs(body.decode()).items()}
                token = data.get("token") if isinstance(data, dict) else None
            except (ValueError, UnicodeDecodeError):
                token = None
        if not isinstance(token, str) or not token:
            return _deny(400, "expected a 'token' field (form or JSON)")
        who = policy.check_token(token)
        if who is None:
            log.warning("failed login from %s", request.client.host if request.client else "?")
            if is_json:
                return _deny(401, "invalid token")
            return HTMLResponse(_login_page('<p class="error">Invalid token.</p>'), status_code=401)
        resp: Response = (JSONResponse({"name": who.name, "role": who.role}) if is_json
                          else RedirectResponse("/", status_code=303))
        resp.set_cookie(SESSION_COOKIE, policy.make_session(who), max_age=int(policy.session_ttl_s), path="/",
                        httponly=True, samesite="strict", secure=policy.cookie_secure)
        log.info("login: %s (%s)", who.name, who.role)
        return resp

    @r.post("/logout", responses={200: {"description": "logged out"}, 303: {"description": "to /login"}})
    def logout(request: Request) -> Response:
        """Clear the session cookie (the signed session itself expires at its ``session_ttl_s``)."""
        wants_html = "text/html" in request.headers.get("accept", "")
        resp: Response = RedirectResponse("/login", status_code=303) if wants_html else JSONResponse({"ok": True})
        resp.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=policy.cookie_secure)
        return resp

    return r


# -- wiring --------------------------------------------------------------------------------------------------

def _document_denials(app: FastAPI, policy: SecurityPolicy) -> None:
    """Add 400 (Host), 401/403 (auth, Origin) and 429 (rate limit) to every operation in the OpenAPI document."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        doc = original()
        for path, ops in doc.get("paths", {}).items():
            for op in ops.values():
                res = op.setdefault("responses", {})
                res.setdefault("400", {"description": "Host header not in the allow-list (auth.allowed_hosts)",
                                       "content": {"text/plain": {"schema": {"type": "string"}}}})
                res.setdefault("403", {"description": "foreign Origin, or a role that may not do this", **_ERR})
                res.setdefault("429", {"description": "rate limit (see Retry-After) or too many streams", **_ERR,
                                       "headers": {"Retry-After": {"schema": {"type": "integer"}}}})
                if policy.enabled and required_role(path, "GET", False) is not None:
                    res.setdefault("401", {"description": "no or invalid token / session", **_ERR})
                    if path == "/":
                        res.setdefault("303", {"description": "not logged in: to /login"})
        if policy.enabled:
            doc.setdefault("components", {}).setdefault("securitySchemes", {}).update({
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE}})
        app.openapi_schema = doc
        return doc

    app.openapi = openapi


def install_security(app: FastAPI, cfg: AppConfig, env: Mapping[str, str] | None = None) -> SecurityPolicy:
    """Host allow-list, Origin check, rate limits, auth (+ /login, /logout when on) on ``app``."""
    policy = build_policy(cfg, env)
    app.add_middleware(SecurityMiddleware, policy=policy, limiter=RateLimiter(cfg.rate_limit))
    hosts = ["*"] if "*" in policy.allowed_hosts else list(policy.allowed_hosts)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False)  # outermost: runs first
    if policy.enabled:
        app.include_router(login_router(policy))
    _document_denials(app, policy)
    app.state.security = policy
    log.info("auth %s (%d tokens); hosts %s; rate limit %s", "on" if policy.enabled else "off",
             len(policy.by_hash), ", ".join(policy.allowed_hosts),
             f"{cfg.rate_limit.requests_per_s:g}/s burst {cfg.rate_limit.burst}" if cfg.rate_limit.enabled else "off")
    return policy

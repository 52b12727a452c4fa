"""What an event-feed websocket client may send: heartbeats, within a budget.

The event feed is server-to-client, but integrators' clients commonly send an
application heartbeat and wait for its answer to tell a dead connection from a
quiet one. The messages are read as they come (so a departed client is seen at
once, and nothing piles up unread), a ``ping`` is answered with a pong, anything
else is ignored, and a token bucket bounds how much a client may send: a
heartbeat every second or slower never meets it, a flood does."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

from fastapi import WebSocket

from .ratelimit import spend_token

log = logging.getLogger(__name__)
PONG = {"type": "pong"}
_PING_MAX_CHARS = 64  # longer text is not a heartbeat, and is never parsed


def is_ping(msg: dict) -> bool:
    """``ping`` as text, or a JSON object whose ``type`` is ``ping``."""
    text = msg.get("text")
    if text is None:
        return False
    if len(text) > _PING_MAX_CHARS:
        return False
    text = text.strip()
    if text.lower() == "ping":
        return True
    if not text.startswith("{"):
        return False
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and obj.get("type") == "ping"


@dataclass
class ClientMessages:
    """Reads one client's messages until it leaves or floods. Only the route sends
    (two tasks sending on one websocket could interleave): ``wake`` is set when a
    pong is due or reading has ended, and the route asks ``take_pongs``."""

    per_s: float
    burst: int
    flooded: bool = False
    _pongs: int = 0
    _tokens: float = field(init=False)
    _at: float = field(init=False, default_factory=time.monotonic)
    wake: asyncio.Event = field(init=False, default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._tokens = float(self.burst)

    def _spend(self) -> bool:
        now = time.monotonic()
        self._tokens, wait = spend_token(self._tokens, self._at, now, self.per_s, float(self.burst))
        self._at = now
        return wait == 0.0

    async def read(self, ws: WebSocket) -> None:
        """Return when the client has disconnected, or (``flooded``) sent over its budget."""
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                if not self._spend():
                    self.flooded = True
                    return
                if is_ping(msg):
                    self._pongs += 1
                    self.wake.set()
                else:
                    log.debug("event feed client sent a message that is not a ping; ignored")
        finally:
            self.wake.set()

    def take_pongs(self) -> int:
        n, self._pongs = self._pongs, 0
        return n

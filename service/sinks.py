"""Where persisted events go besides the API: one class per sink (MQTT, webhook), all fed by
``outbox.Outbox``, which keeps order, retries with backoff and records delivery status."""
from __future__ import annotations

import hashlib
import hmac
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from dishtrack.config import IntegrationsConfig, WebhookConfig

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Dishtrack-Signature"


@dataclass(frozen=True, slots=True)
class OutMessage:
    """One event waiting for one sink (a row of the outbox)."""

    id: int  # outbox row id: the order of delivery
    event_id: str
    camera_id: str
    zone_id: str
    body: str  # the event record as JSON text (what is signed and sent)
    attempts: int
    revision: int = 0  # 0: as detected; N: the N-th cashier correction


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    delivered: int  # how many of the messages, from the first, were delivered
    error: str | None = None  # why the next one was not


class Sink(Protocol):
    name: str  # the outbox key: "mqtt", "webhook:<name>"
    on_ready: Callable[[], None] | None  # set by the outbox; a sink calls it when it can deliver again

    def start(self) -> None: ...

    def deliver(self, messages: Sequence[OutMessage]) -> DeliveryResult:
        """Deliver in order; stop at the first failure. Must not raise."""

    def close(self) -> None: ...


def sign(secret: str, body: bytes) -> str:
    """The signature header value: ``sha256=`` + hex HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookSink:
    """POSTs each event as JSON to a point-of-sale URL, signed (``X-Dishtrack-Signature``); any 2xx
    is delivered. The receiver verifies the HMAC over the raw body and de-duplicates by
    ``X-Dishtrack-Event-Id`` + ``X-Dishtrack-Revision`` (a retry after a lost response repeats a
    delivery; a correction comes as the same event id with the next revision, which replaces it)."""

    def __init__(self, cfg: WebhookConfig) -> None:
        self.cfg = cfg
        self.name = f"webhook:{cfg.name}"
        self.on_ready = None

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def deliver(self, messages: Sequence[OutMessage]) -> DeliveryResult:
        for n, m in enumerate(messages):
            body = m.body.encode()
            req = urllib.request.Request(self.cfg.url, data=body, method="POST", headers={
                "Content-Type": "application/json", "User-Agent": "dishtrack",
                SIGNATURE_HEADER: sign(self.cfg.secret, body), "X-Dishtrack-Event-Id": m.event_id,
                "X-Dishtrack-Revision": str(m.revision),
                "X-Dishtrack-Attempt": str(m.attempts + 1)})
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                    resp.read()
            except urllib.error.HTTPError as e:
                return DeliveryResult(n, f"HTTP {e.code} {e.reason}")
            except (OSError, ValueError) as e:  # refused, timeout, DNS, bad URL
                return DeliveryResult(n, f"{type(e).__name__}: {getattr(e, 'reason', e)}")
        return DeliveryResult(len(messages))


def build_sinks(cfg: IntegrationsConfig) -> list[Sink]:
    sinks: list[Sink] = []
    if cfg.mqtt is not None:
        from .sink_mqtt import MqttSink  # paho only when configured

        sinks.append(MqttSink(cfg.mqtt))
    sinks.extend(WebhookSink(w) for w in cfg.webhooks)
    return sinks

"""MQTT sink (paho-mqtt), topics in the style Frigate users know:

* ``<prefix>[/<site>]/<camera>/events``: one message per checkout event (the
  record as JSON), QoS 1, not retained; the template is ``mqtt.topic``.
* ``<prefix>[/<site>]/availability``: ``online`` (retained) while connected,
  ``offline`` on a clean stop and as the broker-sent last will otherwise.

paho reconnects by itself (``reconnect_min_s`` doubling to ``reconnect_max_s``).
Messages are only handed to paho while connected, at most ``WINDOW`` at once;
one in flight when the connection drops stays with paho, which resends it on
reconnect, and the outbox waits for that acknowledgement instead of publishing
the event a second time."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Sequence

import paho.mqtt.client as mqtt

from dishtrack.config import MqttConfig

from .sinks import DeliveryResult, OutMessage

log = logging.getLogger(__name__)

WINDOW = 50  # messages in flight (unacknowledged) at once
ACK_WAIT_S = 5.0


class MqttSink:
    name = "mqtt"

    def __init__(self, cfg: MqttConfig) -> None:
        self.cfg = cfg
        self.base = cfg.prefix.rstrip("/") + (f"/{cfg.site}" if cfg.site else "")
        self.availability_topic = f"{self.base}/availability"
        client_id = cfg.client_id or f"dishtrack-{socket.gethostname()}-{os.getpid()}"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        if cfg.username:
            self.client.username_pw_set(cfg.username, cfg.password)
        self.client.max_inflight_messages_set(WINDOW)
        self.client.reconnect_delay_set(max(1, int(cfg.reconnect_min_s)), max(1, int(cfg.reconnect_max_s)))
        self.client.will_set(self.availability_topic, "offline", qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self._connected = threading.Event()
        self._unreachable_said = False  # once per outage, not per reconnect attempt
        self._closing = False
        self._inflight: dict[int, mqtt.MQTTMessageInfo] = {}  # outbox row id -> paho's handle
        self.connects = 0
        self.on_ready = None

    def topic(self, m: OutMessage) -> str:
        return self.cfg.topic.format(base=self.base, camera=m.camera_id, zone=m.zone_id)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT %s:%d refused the connection: %s", self.cfg.host, self.cfg.port, reason_code)
            return
        self.connects += 1
        self._unreachable_said = False
        client.publish(self.availability_topic, "online", qos=1, retain=True)
        self._connected.set()
        log.info("MQTT connected to %s:%d", self.cfg.host, self.cfg.port)
        if self.on_ready is not None:
            self.on_ready()  # deliver what waited for the broker now, not at the end of a backoff

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._closing:
            log.info("MQTT disconnected from %s:%d (stopping)", self.cfg.host, self.cfg.port)
        elif self._connected.is_set():
            log.warning("MQTT disconnected from %s:%d (%s); reconnecting", self.cfg.host, self.cfg.port, reason_code)
        self._connected.clear()

    def _on_connect_fail(self, client, userdata) -> None:
        """paho's connect attempt failed (broker down, refused, unreachable): events wait in the outbox."""
        if not self._unreachable_said and not self._closing:
            self._unreachable_said = True
            log.warning("MQTT cannot reach %s:%d; retrying every %g..%g s (integrations.mqtt.reconnect_min_s.."
                        "reconnect_max_s), events wait in the outbox", self.cfg.host, self.cfg.port,
                        max(1, int(self.cfg.reconnect_min_s)), max(1, int(self.cfg.reconnect_max_s)))

    def start(self) -> None:
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        self.client.loop_start()

    def close(self) -> None:
        self._closing = True
        if self._connected.is_set():
            self.client.publish(self.availability_topic, "offline", qos=1, retain=True).wait_for_publish(2.0)
        self.client.disconnect()
        self.client.loop_stop()

    def deliver(self, messages: Sequence[OutMessage]) -> DeliveryResult:
        if not self._connected.wait(1.0) and not self._inflight:
            return DeliveryResult(0, f"not connected to {self.cfg.host}:{self.cfg.port}")
        batch = list(messages[:WINDOW])
        for m in batch:  # hand to paho in order; those already in flight keep their handle
            if m.id not in self._inflight:
                if not self._connected.is_set():
                    break
                self._inflight[m.id] = self.client.publish(self.topic(m), m.body, qos=1)
        deadline = time.monotonic() + ACK_WAIT_S
        done = 0
        for m in batch:
            info = self._inflight.get(m.id)
            if info is None:
                break
            while not info.is_published() and time.monotonic() < deadline:
                try:
                    info.wait_for_publish(max(0.0, deadline - time.monotonic()))
                except (RuntimeError, ValueError):  # handed over while the link dropped: paho resends it
                    time.sleep(0.05)
            if not info.is_published():
                break
            del self._inflight[m.id]
            done += 1
        if done < len(batch):
            state = "connected" if self._connected.is_set() else "not connected"
            return DeliveryResult(done, f"no acknowledgement from {self.cfg.host}:{self.cfg.port} ({state})")
        return DeliveryResult(done)

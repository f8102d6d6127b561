"""What the dashboard shows live: a paho subscription to the daemon's topics, fanned out to SSE clients.

The daemon never knows the web app exists: it publishes events and retained states to the broker as it does for
Home Assistant, and this process listens. When the broker is down the dashboard says so; the door is unaffected.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import deque
from typing import Any, Optional

import paho.mqtt.client as mqtt

from edgeface.config import EdgefaceConfig, read_secret
from edgeface.events.mqtt import Topics

log = logging.getLogger(__name__)


class LiveState:
    """Retained door states and the latest decisions, updated from the broker; thread-safe."""

    RECENT = 20

    def __init__(self, cfg: EdgefaceConfig) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.mqtt.topic_prefix, cfg.door.door_id, cfg.mqtt.ha_prefix)
        self.states: dict[str, str] = {}
        self.recent: deque[dict] = deque(maxlen=self.RECENT)
        self.connected = False
        self._lock = threading.Lock()
        self._subscribers: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = set()
        self._client: Optional[mqtt.Client] = None

    # ---------------------------------------------------------------- broker side (paho's thread)
    def start(self) -> None:
        m = self.cfg.mqtt
        if not m.enabled:
            return
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgeface-web-{self.cfg.door.door_id}")
        if m.username:
            client.username_pw_set(m.username, read_secret(m.password_env))
        if m.tls:
            client.tls_set(ca_certs=m.ca_cert, certfile=m.client_cert, keyfile=m.client_key)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.reconnect_delay_set(1, 30)
        client.connect_async(m.host, m.port, keepalive=m.keepalive_s)
        client.loop_start()
        self._client = client

    def stop(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def publish(self, topic: str, payload: str) -> bool:
        """Send one message (the signed unlock command); False when the broker is not connected."""
        if self._client is None or not self.connected:
            return False
        info = self._client.publish(topic, payload, qos=1, retain=False)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("web: MQTT connect refused: %s", reason_code)
            return
        self.connected = True
        client.subscribe(f"{self.topics.base}/#", qos=1)
        self._broadcast({"type": "broker", "connected": True})

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.connected = False
        self._broadcast({"type": "broker", "connected": False})

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            text = msg.payload.decode("utf-8", errors="replace")[:4096]
            if msg.topic == self.topics.event:
                event = json.loads(text)
                if not isinstance(event, dict):
                    return
                with self._lock:
                    if any(e.get("event_id") == event.get("event_id") for e in self.recent):
                        return  # the outbox may deliver twice (at-least-once)
                    self.recent.appendleft(event)
                self._broadcast({"type": "decision", **event})
            elif msg.topic.startswith(self.topics.base + "/") and msg.topic.count("/") == self.topics.base.count("/") + 1:
                key = msg.topic[len(self.topics.base) + 1:]
                with self._lock:
                    self.states[key] = text
                if key in ("relay", "camera", "outbox", "access", "availability", "contact"):
                    self._broadcast({"type": "state", "key": key, "value": text})
        except Exception:  # noqa: BLE001  (one odd message must not stop the listener)
            log.debug("web: MQTT message ignored", exc_info=True)

    # ---------------------------------------------------------------- SSE side (the event loop)
    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=100)
        with self._lock:
            self._subscribers.add((asyncio.get_running_loop(), q))
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        with self._lock:
            self._subscribers = {s for s in self._subscribers if s[1] is not q}

    def _broadcast(self, message: dict) -> None:
        with self._lock:
            subs = list(self._subscribers)
        for loop, q in subs:
            try:
                loop.call_soon_threadsafe(_put_nowait, q, message)
            except RuntimeError:  # that loop is closed
                pass

    def snapshot(self) -> dict:
        with self._lock:
            states = dict(self.states)
            recent = list(self.recent)
        backlog: dict = {}
        try:
            backlog = json.loads(states.get("outbox", "{}"))
        except ValueError:
            pass
        return {"connected": self.connected, "relay": states.get("relay", "?"), "camera": states.get("camera", "?"),
                "access": states.get("access", "?"), "availability": states.get("availability", "?"),
                "backlog": backlog, "recent": recent}


def _put_nowait(q: asyncio.Queue, message: dict) -> None:
    try:
        q.put_nowait(message)
    except asyncio.QueueFull:  # a stalled browser loses old news, nobody else waits for it
        pass

"""MQTT publisher (paho-mqtt 2.x): availability with Last Will, retained states, events via the outbox.

The pipeline calls `send_event()` / `set_state()`, which never block on the network and never raise:
events are written to the persistent Outbox first; one sender thread delivers them strictly in order,
waiting for each PUBACK (QoS 1) before deleting it. paho reconnects by itself (connect_async +
loop_start) with back-off; on every (re)connect availability, retained states and Home Assistant
discovery are published again.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import ssl
import sys
import threading
import time
from typing import Any, Callable, Optional

import paho.mqtt.client as mqtt

from edgeface.config import MqttConfig
from edgeface.events.outbox import Outbox

log = logging.getLogger(__name__)

CommandHandler = Callable[[str, bytes, bool], None]  # (topic, payload, retained)

#: An event published this long (s) after it was queued is marked `"queued": true` (replayed after an outage).
QUEUED_AFTER_S = 5.0
#: The Outbox sensor (`<prefix>/<door>/outbox`) is refreshed at most this often while the backlog changes.
BACKLOG_EVERY_S = 2.0


def mark_queued(payload: str, waited_s: float, *, queued_after_s: float = QUEUED_AFTER_S) -> str:
    """An event that waited >= queued_after_s gets `"queued": true` and `queued_s` (the wait); the rest, its
    `timestamp` (the original time) included, is unchanged. A live event, or a payload that is not a JSON
    object, is sent as it is."""
    if waited_s < queued_after_s:
        return payload
    try:
        data = json.loads(payload)
    except ValueError:
        return payload
    if not isinstance(data, dict):
        return payload
    data["queued"] = True
    data["queued_s"] = round(waited_s, 1)
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


class BrokerOutageLog:
    """Says that the broker cannot be reached without flooding the journal: paho retries every few seconds and is
    silent about it, so events piled up in the outbox for minutes with nothing logged. The first failed attempt is
    a WARNING naming host:port, the reason and the backlog; while it lasts one reminder per `every_s`; the connect
    that ends it is an INFO line with how long it took and what is waiting."""

    def __init__(self, logger: logging.Logger, where: str, *, every_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log, self.where, self.every_s, self._clock = logger, where, every_s, clock
        self.failing_since: Optional[float] = None
        self._reported_at = 0.0
        self._attempts = 0

    def failed(self, reason: str, waiting: int) -> None:
        now = self._clock()
        self._attempts += 1
        if self.failing_since is None:
            self.failing_since, self._reported_at, self._attempts = now, now, 1
            self._log.warning("MQTT broker %s unreachable (%s); %d event(s) waiting in the outbox, retrying",
                              self.where, reason, waiting)
        elif now - self._reported_at >= self.every_s:
            self._reported_at = now
            self._log.warning("MQTT broker %s still unreachable after %.0f s and %d attempts (%s); %d event(s) "
                              "waiting in the outbox", self.where, now - self.failing_since, self._attempts, reason,
                              waiting)

    def connected(self, waiting: int) -> None:
        if self.failing_since is None:
            self._log.info("MQTT connected to %s", self.where)
        else:
            self._log.info("MQTT connected to %s after %.0f s unreachable; %d event(s) waiting in the outbox are "
                           "sent now", self.where, self._clock() - self.failing_since, waiting)
        self.failing_since = None


class Topics:
    """Every topic of one door (docs/mqtt.md lists them with payloads)."""

    def __init__(self, prefix: str, door_id: str, ha_prefix: str = "homeassistant") -> None:
        base = f"{prefix}/{door_id}"
        self.base = base
        self.availability = f"{base}/availability"
        self.event = f"{base}/event"
        self.door_event = f"{base}/door_event"
        self.relay = f"{base}/relay"
        self.contact = f"{base}/contact"
        self.last_person = f"{base}/last_person"
        self.last_decision = f"{base}/last_decision"
        self.unlock_refusal = f"{base}/unlock/refused"
        self.gallery = f"{base}/gallery"
        self.doorbell = f"{base}/doorbell"
        self.face_image = f"{base}/face_image"
        self.camera = f"{base}/camera"
        self.outbox = f"{base}/outbox"
        self.unlock_command = f"{base}/unlock/set"
        self.access = f"{base}/access"
        self.access_command = f"{base}/access/set"
        self.ha_status = f"{ha_prefix}/status"

    def presence(self, person_id: int) -> str:
        """When person `person_id` was last let in (retained ISO timestamp; mqtt.ha_presence)."""
        return f"{self.base}/presence/{person_id}"


class MqttPublisher:
    """One paho client for one door. start() returns at once; the broker may come later."""

    def __init__(self, cfg: MqttConfig, *, door_id: str, outbox: Outbox, password: Optional[str] = None,
                 discovery: Optional[Callable[[], list[tuple[str, str]]]] = None,
                 on_command: Optional[CommandHandler] = None, reconnect_min_s: float = 1.0,
                 reconnect_max_s: float = 30.0, ack_timeout_s: float = 30.0,
                 queued_after_s: float = QUEUED_AFTER_S) -> None:
        self.cfg = cfg
        self.door_id = door_id
        self.topics = Topics(cfg.topic_prefix, door_id, cfg.ha_prefix)
        self.outbox = outbox
        self._discovery = discovery
        self._on_command = on_command
        self.ack_timeout_s = ack_timeout_s
        self.queued_after_s = queued_after_s
        self.disconnects = 0
        self.connected_since: Optional[float] = None
        self._backlog_sent: tuple[float, Optional[dict[str, Any]]] = (0.0, None)  # (monotonic time, what) last sent
        self._states: dict[str, str] = {}
        self._states_lock = threading.Lock()
        self._states_synced = False  # True once this connection has the current states (see _sync_states)
        self._state_mids: set[int] = set()  # retained state publishes not yet acknowledged (guarded by _ack_cond)
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._acked: dict[int, float] = {}
        self._ack_cond = threading.Condition()
        self._sender: Optional[threading.Thread] = None
        self.delivered = 0
        self.last_error: Optional[str] = None
        self._stopping = False  # stop() asked for the disconnect: it is no warning
        self.outage_log = BrokerOutageLog(log, f"{cfg.host}:{cfg.port}")

        client_id = cfg.client_id or f"edgeface-{door_id}"
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                        protocol=mqtt.MQTTv311)
        if cfg.username:
            c.username_pw_set(cfg.username, password)
        if cfg.tls:
            c.tls_set(ca_certs=cfg.ca_cert, certfile=cfg.client_cert, keyfile=cfg.client_key,
                      cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.will_set(self.topics.availability, "offline", qos=1, retain=True)
        c.reconnect_delay_set(min_delay=max(1, int(reconnect_min_s)), max_delay=max(1, int(reconnect_max_s)))
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_connect_fail = self._on_connect_fail
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        self.client = c

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        except Exception as exc:  # noqa: BLE001  (bad host name etc.: keep running, paho retries)
            self.last_error = str(exc)
            self.outage_log.failed(str(exc), self._waiting())
        self.client.loop_start()
        self._sender = threading.Thread(target=self._send_loop, name="mqtt-outbox", daemon=True)
        self._sender.start()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def stop(self, timeout: float = 2.0) -> None:
        """Say offline (retained), give queued events `timeout` s to go out, disconnect."""
        if self._stop.is_set():
            return
        deadline = time.monotonic() + timeout
        while self.connected and time.monotonic() < deadline and len(self.outbox) > 0:
            time.sleep(0.05)
        self._stop.set()
        self._stopping = True
        with self._ack_cond:
            self._ack_cond.notify_all()
        if self._sender is not None:
            self._sender.join(timeout=5)
        if self.connected:
            try:
                info = self.client.publish(self.topics.availability, "offline", qos=1, retain=True)
                info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001
                log.debug("could not publish offline", exc_info=True)
        self.client.disconnect()
        self.client.loop_stop()

    # -- what the pipeline calls (never blocks on the network, never raises) ---------------------
    def send_event(self, event_id: str, topic: str, payload: dict[str, Any], *, critical: bool = False) -> bool:
        try:
            self.outbox.add(event_id, topic, json.dumps(payload, separators=(",", ":"), sort_keys=True),
                            critical=critical)
            return True
        except Exception:  # noqa: BLE001
            log.exception("could not queue event %s", event_id)
            return False

    def set_state(self, topic: str, value: str, *, force: bool = False) -> None:
        """A retained latest-value state (relay, contact, camera, ...); re-sent on every reconnect. `force`
        publishes an unchanged value again (acknowledges a command that changed nothing, e.g. LOCK)."""
        with self._states_lock:  # held while publishing: states go out in the order they changed
            if self._states.get(topic) == value and not force:
                return
            self._states[topic] = value
            if self.connected and self._states_synced:  # else the reconnect's _sync_states sends the latest
                self._publish_state(topic, value)

    #: How long a reconnect waits for the re-sent older state publishes to be acknowledged before it publishes
    #: the current states anyway.
    STATE_SYNC_WAIT_S = 10.0

    def _publish_state(self, topic: str, value: str) -> None:
        try:
            info = self.client.publish(topic, value, qos=1, retain=True)
        except Exception:  # noqa: BLE001
            log.warning("MQTT publish to %s failed", topic, exc_info=True)
            return
        with self._ack_cond:
            if self._acked.pop(info.mid, None) is None:  # not acknowledged yet (the usual case)
                self._state_mids.add(info.mid)

    def _sync_states(self) -> None:
        """After a (re)connect: publish every current state once the older, unacknowledged state publishes that
        paho re-sends after on_connect have been acknowledged. Publishing them from on_connect (as before) let a
        re-sent `unlocked` from before an outage land after the fresh `locked`: the retained state lied."""
        deadline = time.monotonic() + self.STATE_SYNC_WAIT_S
        with self._ack_cond:
            while self._state_mids and self.connected and not self._stop.is_set() and time.monotonic() < deadline:
                self._ack_cond.wait(0.1)
            if self._state_mids:
                log.warning("MQTT: %d older state publishes still unacknowledged; publishing the current states",
                            len(self._state_mids))
        with self._states_lock:
            if not self.connected or self._stop.is_set():
                return  # disconnected again: the next connect syncs
            for topic, value in self._states.items():
                self._publish_state(topic, value)
            self._states_synced = True

    def publish_now(self, topic: str, payload: str, *, retain: bool = False, qos: int = 1) -> None:
        if self.connected:
            self._publish_quietly(topic, payload, retain=retain, qos=qos)

    def _publish_quietly(self, topic: str, payload: str, *, retain: bool, qos: int = 1) -> None:
        try:
            self.client.publish(topic, payload, qos=qos, retain=retain)
        except Exception:  # noqa: BLE001
            log.warning("MQTT publish to %s failed", topic, exc_info=True)

    # -- paho callbacks -------------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self.last_error = f"broker refused the connection: {reason_code}"
            log.error("MQTT %s:%s refused the connection: %s (check mqtt.username / password)",
                      self.cfg.host, self.cfg.port, reason_code)
            return
        self.outage_log.connected(self._waiting())
        self.last_error = None
        subs = []
        if self.cfg.ha_discovery:
            subs.append((self.topics.ha_status, 1))
        if self.cfg.remote_unlock and self._on_command is not None:
            subs.append((self.topics.unlock_command, 1))
        if self.cfg.access_switch and self._on_command is not None:
            subs.append((self.topics.access_command, 1))
        if subs:
            client.subscribe(subs)
        client.publish(self.topics.availability, "online", qos=1, retain=True)
        self._send_discovery()
        with self._states_lock:
            self._states_synced = False
            self._connected.set()
        self.connected_since = time.time()
        self._publish_backlog(force=True)
        # not from here: paho re-sends older unacknowledged publishes only after this callback returns
        threading.Thread(target=self._sync_states, name="mqtt-states", daemon=True).start()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if self._connected.is_set():
            if self._stopping:
                log.info("MQTT disconnected (stopping)")
            else:
                log.warning("MQTT disconnected (%s); events wait in the outbox", reason_code)
                self.disconnects += 1
        self._states_synced = False  # no lock: paho may call this from inside a publish() that set_state makes
        self._connected.clear()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this from inside its `except OSError` around the connect: the exception is the reason
        exc = sys.exc_info()[1]
        reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else "connection failed"
        self.last_error = f"broker unreachable: {reason}"
        self.outage_log.failed(reason, self._waiting())

    def _waiting(self) -> int:
        try:
            return len(self.outbox)
        except Exception:  # noqa: BLE001  (closed outbox at shutdown)
            return 0

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._ack_cond:
            now = time.monotonic()
            if mid in self._state_mids:
                self._state_mids.discard(mid)
                self._ack_cond.notify_all()
                return
            self._acked[mid] = now
            if len(self._acked) > 1000:
                self._acked = {m: t for m, t in self._acked.items() if now - t < 60}
            self._ack_cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            if msg.topic == self.topics.ha_status:
                if msg.payload.decode(errors="replace").strip() == "online":
                    log.info("Home Assistant came online: re-sending discovery")
                    self._send_discovery()
            elif self._on_command is not None:
                self._on_command(msg.topic, bytes(msg.payload), bool(msg.retain))
        except Exception:  # noqa: BLE001
            log.exception("MQTT message handler failed for %s", msg.topic)

    def resend_discovery(self) -> None:
        """Publish the discovery config again now (its components changed, e.g. a person was enrolled)."""
        if self.connected:
            self._send_discovery()

    def _send_discovery(self) -> None:
        # also with ha_discovery off: then it is the empty config that removes the device from HA
        if not self._discovery:
            return
        try:
            for topic, payload in self._discovery():
                self.client.publish(topic, payload, qos=1, retain=True)
        except Exception:  # noqa: BLE001
            log.exception("Home Assistant discovery failed")

    # -- sender -----------------------------------------------------------------------------------
    #: Waits after a failed outbox update (disk full, read-only): doubling from the first to the last.
    UPDATE_BACKOFF_S = (0.5, 30.0)

    def _send_loop(self) -> None:
        delivered_unmarked: Optional[int] = None  # seq acknowledged by the broker but not yet deleted from the outbox
        backoff = self.UPDATE_BACKOFF_S[0]
        while not self._stop.is_set():
            if not self._connected.wait(0.5):
                continue
            try:
                if not self.outbox.wait(0.5):
                    self._publish_backlog()  # idle: refresh the sensor if something changed meanwhile
                    continue
                item = self.outbox.peek()
            except Exception:  # noqa: BLE001  (closed outbox at shutdown)
                if self._stop.is_set():
                    return
                log.exception("outbox read failed")
                self._stop.wait(1.0)
                continue
            if item is None:
                self._publish_backlog()
                continue
            if not self._connected.is_set():  # lost while waiting: send it (marked queued) after the reconnect
                continue
            if item.seq == delivered_unmarked:  # the broker has it: only the delete is missing, never re-send it
                if self._mark_delivered(item, backoff):
                    delivered_unmarked, backoff = None, self.UPDATE_BACKOFF_S[0]
                else:
                    backoff = min(2 * backoff, self.UPDATE_BACKOFF_S[1])
                continue
            try:
                payload = mark_queued(item.payload, time.time() - item.created, queued_after_s=self.queued_after_s) \
                    if item.created else item.payload
                info = self.client.publish(item.topic, payload, qos=1, retain=False)
            except Exception:  # noqa: BLE001  (the sender thread must survive anything; retry later)
                log.exception("publishing event %s failed; retrying", item.event_id)
                self._stop.wait(1.0)
                continue
            # paho keeps a QoS 1 message and re-sends it after a reconnect itself, so it is published
            # once per process and we wait for its PUBACK however long the outage lasts.
            if self._wait_ack(info.mid):
                self.delivered += 1
                if not self._mark_delivered(item, backoff):
                    delivered_unmarked, backoff = item.seq, min(2 * backoff, self.UPDATE_BACKOFF_S[1])
                self._publish_backlog()

    def _mark_delivered(self, item: Any, backoff: float) -> bool:
        """Delete a delivered event; on failure log, wait `backoff` s and say False (the caller retries the delete,
        not the publish: 14,465 copies of one event in 20 s came from re-sending it when the disk was full)."""
        try:
            self.outbox.mark_delivered(item.seq)
            return True
        except Exception as exc:  # noqa: BLE001
            if self._stop.is_set():
                return False
            log.error("outbox: cannot mark event %s delivered (%s); not re-sending it, retrying in %.1f s",
                      item.event_id, exc, backoff)
            self._stop.wait(backoff)
            return False

    def _wait_ack(self, mid: int) -> bool:
        with self._ack_cond:
            while not self._stop.is_set():
                if self._acked.pop(mid, None) is not None:
                    return True
                self._ack_cond.wait(0.5)
        return False

    # -- the Outbox sensor ---------------------------------------------------------------------------
    def backlog(self) -> dict[str, Any]:
        """What the Outbox sensor shows: events waiting, dropped (ever), delivered and disconnects (this run)."""
        since = self.connected_since
        return {"waiting": len(self.outbox), "dropped": self.outbox.dropped, "delivered": self.delivered,
                "disconnects": self.disconnects, "last_error": self.last_error,
                "connected_since": None if since is None else
                dt.datetime.fromtimestamp(since, dt.timezone.utc).isoformat(timespec="seconds")}

    def _publish_backlog(self, *, force: bool = False) -> None:
        """Retained JSON state on <prefix>/<door>/outbox when it changed: at once when the backlog empties or on
        connect, else at most every BACKLOG_EVERY_S (the sender calls this after each delivery and when idle)."""
        if not self.connected:
            return
        try:
            now = time.monotonic()
            last_t, last = self._backlog_sent
            snap = self.backlog()
            if not force and (snap == last or (now - last_t < BACKLOG_EVERY_S
                                               and not (snap["waiting"] == 0 and (last or {}).get("waiting")))):
                return
            self._backlog_sent = (now, snap)
            # a retained state like the others: after a reconnect it is re-sent only once older unacknowledged
            # publishes of it are in, so the sensor never ends on a stale backlog (_sync_states)
            self.set_state(self.topics.outbox, json.dumps(snap, sort_keys=True))
        except Exception:  # noqa: BLE001  (closed outbox at shutdown)
            if not self._stop.is_set():
                log.debug("backlog publish failed", exc_info=True)

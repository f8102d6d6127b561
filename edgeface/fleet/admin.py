"""The admin side: sign and publish person changes and heartbeats, read the fleet's state back from the broker.

Runs on any host with the admin key (a door is never given it): the `edgeface fleet ...` commands, a web app,
a test. The admin has no database of its own: the broker's retained person topics are the list, so two admin
hosts see the same one, and each new version is stamped past the newest it has seen (hybrid logical clock).
"""
from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from typing import Any, Optional

import numpy as np

from edgeface.config import MqttConfig
from edgeface.errors import ConfigError
from edgeface.fleet.changes import HEARTBEAT_KIND, PERSON_KIND, Heartbeat, PersonChange, Rejected, Topics, digest
from edgeface.fleet.hlc import HybridClock
from edgeface.fleet.link import make_client
from edgeface.fleet.signing import Signer, Verifier

log = logging.getLogger(__name__)


def new_person_key() -> str:
    return secrets.token_hex(8)


class FleetAdmin:
    """Connected to the broker; `load()` reads the retained list, `put`/`revoke`/`delete` publish signed changes."""

    def __init__(self, mqtt_cfg: MqttConfig, signer: Optional[Signer], *, node: str, verifier: Optional[Verifier] = None,
                 client_id: Optional[str] = None) -> None:
        self.cfg = mqtt_cfg
        self.signer = signer
        self.verifier = verifier
        self.clock = HybridClock(node)
        self.topics = Topics(mqtt_cfg.topic_prefix)
        self.people: dict[str, PersonChange] = {}
        self.doors: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._last_message = time.monotonic()
        self._last_info: Any = None
        self._connected = threading.Event()
        self.client = make_client(mqtt_cfg, client_id or f"edgeface-fleet-admin-{node}-{secrets.token_hex(3)}")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    def start(self, timeout: float = 10.0) -> "FleetAdmin":
        self.client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            raise ConfigError(f"fleet: no connection to the broker {self.cfg.host}:{self.cfg.port} within {timeout} s")
        return self

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> "FleetAdmin":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        client.subscribe([(self.topics.people, 1), (self.topics.doors, 1)])
        self._connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self._last_message = time.monotonic()
        door = self.topics.door_id(msg.topic)
        if door is not None:
            try:
                with self._lock:
                    self.doors[door] = json.loads(msg.payload)
            except ValueError:
                log.warning("fleet: door %s reported something that is not JSON", door)
            return
        key = self.topics.person_key(msg.topic)
        if key is None or not msg.payload:
            return
        try:
            env = json.loads(msg.payload)
            if self.verifier is not None:
                kind, body = self.verifier.open(bytes(msg.payload))
            else:
                kind, body = env.get("kind"), env.get("body")
            if kind != PERSON_KIND:
                return
            change = PersonChange.from_body(body)
        except (ValueError, Rejected, AttributeError) as exc:
            log.warning("fleet: ignoring %s: %s", msg.topic, exc)
            return
        self.clock.observe(change.version)
        with self._lock:
            old = self.people.get(key)
            if old is None or change.version > old.version:
                self.people[key] = change

    def load(self, settle_s: float = 0.5, timeout: float = 30.0) -> None:
        """Wait until the retained messages stop arriving (nothing new for settle_s)."""
        deadline = time.monotonic() + timeout
        time.sleep(settle_s)
        while time.monotonic() - self._last_message < settle_s and time.monotonic() < deadline:
            time.sleep(0.05)

    # ------------------------------------------------------------------ changes
    def find(self, name: str) -> Optional[PersonChange]:
        with self._lock:
            return next((p for p in self.people.values() if not p.deleted and p.name == name), None)

    def _signer(self) -> Signer:
        if self.signer is None:
            raise ConfigError("fleet: this admin connection has no key (--key): it can read the list, not change it")
        return self.signer

    def publish(self, change: PersonChange, *, wait: bool = True) -> PersonChange:
        """Sign and publish retained; wait=False queues it (many at once: call flush() after the last)."""
        payload = self._signer().envelope(PERSON_KIND, change.body())
        info = self.client.publish(self.topics.person(change.person_key), payload, qos=1, retain=True)
        self._last_info = info
        if wait:
            info.wait_for_publish(30)
        with self._lock:
            self.people[change.person_key] = change
        return change

    def flush(self, timeout: float = 120.0) -> None:
        """Wait until the last publish(wait=False) is acknowledged by the broker."""
        if self._last_info is not None:
            self._last_info.wait_for_publish(timeout)

    def put(self, name: str, embeddings: Any, *, model_id: str, enabled: bool = True,
            schedule: Optional[dict] = None, person_key: Optional[str] = None, wait: bool = True) -> PersonChange:
        """Enroll or replace a person (a new key unless `person_key` or the name is known)."""
        known = self.people.get(person_key) if person_key else self.find(name)
        key = person_key or (known.person_key if known else new_person_key())
        vecs = np.asarray(embeddings, np.float32)
        return self.publish(PersonChange(key, self.clock.now(), name, enabled, schedule, model_id,
                                         vecs.reshape(len(vecs), -1) if len(vecs) else np.zeros((0, 0), np.float32)),
                            wait=wait)

    def set_enabled(self, name_or_key: str, enabled: bool) -> PersonChange:
        old = self.people.get(name_or_key) or self.find(name_or_key)
        if old is None or old.deleted:
            raise ConfigError(f"fleet: no person {name_or_key!r} on the broker (see: edgeface fleet status)")
        return self.publish(PersonChange(old.person_key, self.clock.now(), old.name, enabled, old.schedule,
                                         old.model_id, old.embeddings))

    def set_schedule(self, name_or_key: str, schedule: Optional[dict]) -> PersonChange:
        """When the person may enter on every door (None: any time); checked as the gallery checks it."""
        from edgeface.gallery import validate_schedule

        old = self.people.get(name_or_key) or self.find(name_or_key)
        if old is None or old.deleted:
            raise ConfigError(f"fleet: no person {name_or_key!r} on the broker (see: edgeface fleet status)")
        return self.publish(PersonChange(old.person_key, self.clock.now(), old.name, old.enabled,
                                         validate_schedule(schedule), old.model_id, old.embeddings))

    def delete(self, name_or_key: str) -> PersonChange:
        old = self.people.get(name_or_key) or self.find(name_or_key)
        if old is None or old.deleted:
            raise ConfigError(f"fleet: no person {name_or_key!r} on the broker (see: edgeface fleet status)")
        return self.publish(PersonChange(old.person_key, self.clock.now(), deleted=True))

    def heartbeat(self) -> None:
        with self._lock:
            n = sum(1 for p in self.people.values() if not p.deleted)
        payload = self._signer().envelope(HEARTBEAT_KIND, Heartbeat(self.clock.now(), n).body())
        self.client.publish(self.topics.heartbeat, payload, qos=1, retain=True).wait_for_publish(30)

    # ------------------------------------------------------------------ status
    def expected_digest(self) -> str:
        with self._lock:
            return digest({k: str(p.version) for k, p in self.people.items()})

    def status(self) -> list[dict[str, Any]]:
        """One row per door that ever reported: in sync (same digest as the broker's list) or behind."""
        want = self.expected_digest()
        with self._lock:
            doors = dict(self.doors)
        rows = []
        for door_id, rep in sorted(doors.items()):
            rows.append({"door_id": door_id, "in_sync": rep.get("digest") == want, "people": rep.get("people"),
                         "max_version": rep.get("max_version"), "stale": rep.get("stale"),
                         "rejected": rep.get("rejected"), "reported": rep.get("ts")})
        return rows

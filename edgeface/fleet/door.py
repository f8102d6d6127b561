"""A door's fleet sync client: signed changes from the broker -> this door's gallery; reports what it applied;
raises the staleness alarm when the admin's heartbeat stops arriving.

Everything a door refuses is logged with the reason (unsigned, another key, bad signature, malformed, replay,
older version, another embedding model) and counted in `rejected`. The door keeps matching with what it has
while the broker is away; with fleet.deny_when_stale it then lets in only fleet.allow_when_stale.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

from edgeface.config import EdgefaceConfig
from edgeface.errors import GalleryError
from edgeface.fleet.changes import HEARTBEAT_KIND, PERSON_KIND, Heartbeat, PersonChange, Rejected, Topics, digest
from edgeface.fleet.hlc import HLC
from edgeface.fleet.link import make_client
from edgeface.fleet.signing import Verifier
from edgeface.fleet.state import FleetState

log = logging.getLogger(__name__)

#: (stale, detail) -> None: called on every change of the staleness state.
StaleHandler = Callable[[bool, dict], None]


def under_state_dir(cfg: EdgefaceConfig, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(cfg.state_dir).expanduser() / p


class FleetDoor:
    """Build with the config and the door's open gallery; start() connects, close() stops (safe twice)."""

    BATCH = 500

    def __init__(self, cfg: EdgefaceConfig, gallery: Any, *, model_id: Optional[str] = None,
                 on_stale: Optional[StaleHandler] = None, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.door_id = cfg.door.door_id
        self.gallery = gallery
        self.model_id = str(model_id or gallery.model_id)
        self.topics = Topics(cfg.mqtt.topic_prefix)
        self.verifier = Verifier.load(under_state_dir(cfg, cfg.fleet.public_key))
        self.state = FleetState(under_state_dir(cfg, cfg.fleet.state_path))
        self.rejected: Counter[str] = Counter()
        self.applied_count = 0
        self._on_stale = on_stale
        self._clock = clock
        self._wall = wall
        self._queue: "queue.Queue[Optional[tuple[str, bytes, bool]]]" = queue.Queue()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._heard = clock()  # a door just started has stale_after_s of grace before the alarm
        hb = self.state.meta("heartbeat")
        self._heartbeat: HLC = HLC.parse(hb) if hb else HLC(0, 0, "")
        self.stale = False
        self._report_due = True
        self._reported_at = -1e9
        self._threads: list[threading.Thread] = []
        self._repaired: dict[str, float] = {}
        self.client = make_client(cfg.mqtt, (cfg.mqtt.client_id or f"edgeface-{self.door_id}") + "-fleet")
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self._queue.put((m.topic, bytes(m.payload), bool(m.retain)))
        self._connected = threading.Event()
        self.client.on_disconnect = lambda *a: self._connected.clear()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FleetDoor":
        try:
            self.client.connect_async(self.cfg.mqtt.host, self.cfg.mqtt.port, keepalive=self.cfg.mqtt.keepalive_s)
        except Exception as exc:  # noqa: BLE001  (bad host name: keep going offline, paho retries)
            log.warning("fleet: connect to %s:%s failed: %s", self.cfg.mqtt.host, self.cfg.mqtt.port, exc)
        self.client.loop_start()
        for target, name in ((self._apply_loop, "fleet-apply"), (self._watch_loop, "fleet-watch")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._queue.put(None)
        for t in self._threads:
            t.join(timeout=5)
        try:
            self.client.disconnect()
            self.client.loop_stop()
        except Exception:  # noqa: BLE001
            pass
        self.state.close()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """True once every message received so far has been handled (tests and the benchmark)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.empty() and self._idle.is_set():
                return True
            time.sleep(0.02)
        return False

    def wait_connected(self, timeout: float = 10.0) -> bool:
        return self._connected.wait(timeout)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            log.warning("fleet: broker refused the connection: %s", reason_code)
            return
        client.subscribe([(self.topics.people, 1), (self.topics.heartbeat, 1)])
        self._connected.set()
        self._report_due = True

    # ------------------------------------------------------------------ applying
    def _apply_loop(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                self._maybe_report()
                continue
            self._idle.clear()
            batch = [item]
            while len(batch) < self.BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._handle_batch([b for b in batch if b is not None])
            except Exception:  # noqa: BLE001  (one bad batch must not end syncing)
                log.exception("fleet: applying %d message(s) failed", len(batch))
            finally:
                self._idle.set()
            self._maybe_report()

    def _reject(self, why: str, topic: str, reason: str, level: int = logging.WARNING) -> None:
        self.rejected[why] += 1
        log.log(level, "fleet: refused %s on %s: %s", why, topic, reason)

    def _handle_batch(self, batch: list[tuple[str, bytes, bool]]) -> None:
        accepted: list[tuple[PersonChange, str, bytes]] = []
        pending: dict[str, str] = {}  # versions accepted in this batch, not yet recorded
        for topic, payload, retained in batch:
            if topic == self.topics.heartbeat:
                self._handle_heartbeat(topic, payload, retained)
                continue
            key = self.topics.person_key(topic)
            if key is None:
                continue
            if not payload:
                self._reject("an empty message", topic, "a cleared retained topic is not a deletion (that takes "
                             "a signed tombstone)")
                continue
            try:
                kind, body = self.verifier.open(payload)
                if kind != PERSON_KIND:
                    raise Rejected(f"a {kind!r} message on a person topic")
                change = PersonChange.from_body(body)
                if change.person_key != key:
                    raise Rejected(f"signed for person {change.person_key!r}, published on {key!r}")
            except (Rejected, ValueError) as exc:
                why = "an unsigned change" if str(exc) == "unsigned" else \
                    "a change signed with another key" if "another key" in str(exc) else "an invalid change"
                self._reject(why, topic, str(exc))
                continue
            held = pending.get(key) or self.state.versions.get(key, ("", False))[0]
            current = HLC.parse(held) if held else None
            if current is not None and change.version == current:
                if retained:  # the broker's copy, delivered again on every (re)subscribe
                    log.debug("fleet: person %s version %s already applied", key, change.version)
                else:
                    self._reject("a replay", topic, f"version {change.version} of person {key} is already applied "
                                 "(a replay, or another door repairing the broker's copy)", logging.INFO)
                continue
            if current is not None and change.version < current:
                self._reject("a stale version", topic, f"version {change.version} of person {key} is older than "
                             f"the applied {current}; republishing the newer signed change")
                self._repair(key, topic, accepted)
                continue
            pending[key] = str(change.version)
            accepted.append((change, topic, payload))
        done = self._apply(accepted)
        self.state.record(done)
        if done:
            self.applied_count += len(done)
            self._report_due = True

    def _repair(self, key: str, topic: str, accepted: list[tuple[PersonChange, str, bytes]]) -> None:
        """Put the newer signed change back on the broker (two admins' retained writes can land out of order);
        a door can republish a change, never forge one."""
        now = self._clock()
        if now - self._repaired.get(key, -1e9) < 2.0:  # one repair per person at a time, not one per copy heard
            return
        self._repaired[key] = now
        env = next((e for c, _t, e in reversed(accepted) if c.person_key == key), None) or self.state.envelope(key)
        if env is not None:
            self.client.publish(topic, env, qos=1, retain=True)

    def _record(self, change: PersonChange, topic: str) -> Optional[dict]:
        """The gallery record of a change (None: a tombstone); another model's embeddings are dropped, logged."""
        if change.deleted:
            return None
        vecs, hashes = change.embeddings, change.image_hashes()
        if len(vecs) and change.model_id != self.model_id:
            self._reject("embeddings of another model", topic,
                         f"person {change.name!r} ({change.person_key}) has {len(vecs)} embedding(s) of model "
                         f"{change.model_id!r}, this door uses {self.model_id!r}: stored without embeddings, "
                         "never compared")
            vecs, hashes = vecs[:0], []
        return {"name": change.name, "enabled": change.enabled, "schedule": change.schedule, "embeddings": vecs,
                "image_hashes": hashes}

    def _apply(self, accepted: list[tuple[PersonChange, str, bytes]]) -> list[tuple[str, str, bool, bytes]]:
        """Write the accepted changes to the gallery, all in one transaction; when that fails (a name clash),
        one by one, so one bad change does not hold back the rest. Returns the rows for the fleet state."""
        if not accepted:
            return []
        items = [(c, t, e, self._record(c, t)) for c, t, e in accepted]
        try:
            self.gallery.fleet_apply([(c.person_key, r) for c, _t, _e, r in items])
            ok = items
        except GalleryError:
            ok = []
            for item in items:
                c, _t, _e, r = item
                try:
                    self.gallery.fleet_apply([(c.person_key, r)])
                    ok.append(item)
                except GalleryError as exc:
                    log.error("fleet: person %s version %s not applied: %s", c.person_key, c.version, exc)
        for c, _t, _e, r in ok:
            if r is None:
                log.info("fleet: person %s deleted (version %s)", c.person_key, c.version)
            else:
                log.log(logging.INFO if len(ok) <= 20 else logging.DEBUG,
                        "fleet: person %r (%s) %s, %d embedding(s), version %s", c.name, c.person_key,
                        "enabled" if c.enabled else "DISABLED", len(r["embeddings"]), c.version)
        if len(ok) > 20:
            log.info("fleet: applied %d changes", len(ok))
        return [(c.person_key, str(c.version), c.deleted, e) for c, _t, e, _r in ok]

    def _handle_heartbeat(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            kind, body = self.verifier.open(payload)
            if kind != HEARTBEAT_KIND:
                raise Rejected(f"a {kind!r} message on the heartbeat topic")
            hb = Heartbeat.from_body(body)
        except (Rejected, ValueError) as exc:
            self._reject("a heartbeat", topic, str(exc))
            return
        if hb.version <= self._heartbeat:
            if not (retained and hb.version == self._heartbeat):
                self._reject("a heartbeat replay", topic, f"heartbeat {hb.version} is not newer than "
                             f"{self._heartbeat}", logging.INFO)
            return
        self._heartbeat = hb.version
        self.state.set_meta("heartbeat", str(hb.version))
        # a retained heartbeat of an admin gone for an hour is an hour old, not fresh: its age counts (a clock
        # behind the admin's, as on a Pi booted without network, makes it look newer, never older than 0)
        self._heard = self._clock() - max(0.0, self._wall() - hb.version.wall_ms / 1000)
        self._check_stale()

    # ------------------------------------------------------------------ staleness and reports
    @property
    def silent_s(self) -> float:
        """Seconds since the last fresh signed heartbeat (or since start)."""
        return self._clock() - self._heard

    def _check_stale(self) -> None:
        stale = self.silent_s > self.cfg.fleet.stale_after_s
        if stale == self.stale:
            return
        self.stale = stale
        detail = {"silent_s": round(self.silent_s, 1), "stale_after_s": self.cfg.fleet.stale_after_s,
                  "last_heartbeat": str(self._heartbeat), "deny_when_stale": self.cfg.fleet.deny_when_stale}
        if stale:
            log.error("fleet: no signed heartbeat for %.0f s (fleet.stale_after_s %.0f): this door's access list "
                      "may miss revocations%s", self.silent_s, self.cfg.fleet.stale_after_s,
                      "; only fleet.allow_when_stale is let in" if self.cfg.fleet.deny_when_stale else "")
        else:
            log.warning("fleet: heartbeat heard again; the access list is being brought up to date")
        self._report_due = True
        if self._on_stale is not None:
            try:
                self._on_stale(stale, detail)
            except Exception:  # noqa: BLE001
                log.exception("fleet: staleness handler failed")

    def _watch_loop(self) -> None:
        step = min(1.0, self.cfg.fleet.stale_after_s / 4)
        while not self._stop.wait(step):
            self._check_stale()

    def report(self) -> dict[str, Any]:
        versions = {k: v for k, (v, _d) in self.state.versions.items()}
        live = sum(1 for _v, d in self.state.versions.values() if not d)
        return {"door_id": self.door_id, "model_id": self.model_id, "people": live,
                "tombstones": len(versions) - live, "digest": digest(versions),
                "max_version": max(versions.values(), default=""), "heartbeat": str(self._heartbeat),
                "stale": self.stale, "rejected": sum(self.rejected.values()), "ts": time.time()}

    def _maybe_report(self) -> None:
        if not self._report_due or not self._connected.is_set() or not self._queue.empty():
            return
        if self._clock() - self._reported_at < self.cfg.fleet.applied_interval_s:
            return
        self._report_due = False
        self._reported_at = self._clock()
        self.client.publish(self.topics.applied(self.door_id), json.dumps(self.report(), sort_keys=True), qos=1,
                            retain=True)

    # ------------------------------------------------------------------ access while stale
    def guard(self, person_id: int, rule: Any) -> Any:
        """The person's rule, or a denying one while stale with fleet.deny_when_stale (unless allow-listed)."""
        if not (self.stale and self.cfg.fleet.deny_when_stale):
            return rule
        from edgeface.decide import PersonRule

        try:
            name = next((p.name for p in self.gallery.people() if p.id == person_id), None)
        except Exception:  # noqa: BLE001  (unreadable: deny)
            name = None
        if name is not None and name in self.cfg.fleet.allow_when_stale:
            return rule
        return PersonRule(enabled=False, error=f"no word from the fleet for {self.silent_s:.0f} s and "
                                               "fleet.deny_when_stale is on")


def attach_to_daemon(daemon: Any) -> Optional[FleetDoor]:
    """The daemon's one fleet hook: start the sync client when fleet.enabled; the alarm becomes a door event and
    the HA 'Fleet stale' state. The daemon closes it with its other parts."""
    cfg = daemon.cfg
    if not cfg.fleet.enabled:
        return None
    topic = f"{cfg.mqtt.topic_prefix}/{cfg.door.door_id}/fleet_stale"

    def on_stale(stale: bool, detail: dict) -> None:
        daemon.events.door_event("fleet_stale" if stale else "fleet_ok", detail)
        if daemon.mqtt is not None:
            daemon.mqtt.set_state(topic, "ON" if stale else "OFF")

    fleet = FleetDoor(cfg, daemon.gallery, model_id=daemon.model_id, on_stale=on_stale)
    if daemon.mqtt is not None:
        daemon.mqtt.set_state(topic, "OFF")
    daemon._own(fleet)
    return fleet.start()

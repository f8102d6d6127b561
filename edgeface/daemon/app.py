"""The access daemon: frames -> analyze -> gallery match -> policy -> door relay + events (MQTT, audit).

`Daemon.process_frame()` is the whole per-frame pipeline (tests drive it with real JPEGs);
`Daemon.run()` feeds it from the camera until stopped. Nothing here blocks on the network: events go
to the persistent outbox and the MQTT sender thread delivers them. The door is released on every
way out (close(), signals via the CLI, exceptions).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional
from zoneinfo import ZoneInfo

from edgeface.events.access import AccessSwitch
from edgeface.events.audit import AuditError, AuditLog
from edgeface.config import EdgefaceConfig, read_secret
from edgeface.decide import PersonRule, Policy, person_rule
from edgeface.door import Door, DoorContact, make_pin_factory
from edgeface.errors import ConfigError
from edgeface.events.records import CRITICAL_KINDS, AccessEvent, DoorEvent
from edgeface.frames import FrameSource, open_source
from edgeface.events.remote import Verdict
from edgeface.security import ensure_private_dir
from edgeface.vision.presence import PresenceGate
from edgeface.types import Decision, Frame, Match

log = logging.getLogger(__name__)

EventSink = Callable[[dict], None]


def state_path(cfg: EdgefaceConfig, path: str) -> Path:
    """A relative file path in the config is relative to state_dir."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(cfg.state_dir).expanduser() / p


def ensure_embedder(cfg: EdgefaceConfig) -> None:
    """Let the converter produce a missing embedder model, when that part of edgeface is installed."""
    try:
        import edgeface.convert as convert  # the [convert] wing, imported only here and only when it is present
    except ImportError:
        return
    ensure = getattr(convert, "ensure_embedder_model", None)
    if ensure is not None:
        ensure(cfg)


@dataclass
class _PeopleCache:
    loaded: float = -1e9
    rules: dict[int, PersonRule] = None  # type: ignore[assignment]
    disabled: list[tuple[int, str]] = None  # type: ignore[assignment]
    unreadable: bool = False


class FrameFailureLog:
    """Logs failing frames without flooding the journal: a gallery damaged while the daemon runs fails every
    frame (10+ a second), and one traceback each fills a Pi's SD card. The first failure of a kind (exception
    type and message) is logged with its traceback, repeats of it become one count line per `interval_s`, and
    the first good frame after failures says how many there were. The door stays locked throughout: a failed
    frame never reaches the policy."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log, self.interval_s, self._clock = logger, interval_s, clock
        self._kind: Optional[str] = None
        self._failures = 0  # since the last good frame
        self._unreported = 0  # repeats of the current kind not yet in a count line
        self._reported_at = 0.0

    def failed(self, frame_index: int, exc: BaseException) -> None:
        kind = f"{type(exc).__name__}: {exc}"
        self._failures += 1
        now = self._clock()
        if kind != self._kind:
            self._flush()
            self._kind, self._unreported, self._reported_at = kind, 0, now
            self._log.error("frame %s failed (the door stays locked)", frame_index, exc_info=exc)
            return
        self._unreported += 1
        if now - self._reported_at >= self.interval_s:
            self._flush()
            self._reported_at = now

    def close(self) -> None:
        """The count line still owed (the frames ended while failing)."""
        self._flush()

    def succeeded(self) -> None:
        if self._failures:
            self._flush()
            self._log.warning("frames are processed again after %d failed frame(s)", self._failures)
            self._failures, self._kind = 0, None

    def _flush(self) -> None:
        if self._unreported:
            self._log.error("%d more frame(s) failed the same way: %s", self._unreported, self._kind)
            self._unreported = 0


class Daemon:
    """Owns every part; build with the config, optionally hand in parts (tests, demo)."""

    PEOPLE_REFRESH_S = 2.0

    def __init__(self, cfg: EdgefaceConfig, *, analyzer: Any = None, gallery: Any = None,
                 source: Optional[FrameSource] = None, pin_factory: Any = None,
                 event_sink: Optional[EventSink] = None, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.door_id = cfg.door.door_id
        self._clock = clock
        self._event_sink = event_sink
        self._closed = False
        self._stop = threading.Event()
        self._heartbeat = time.monotonic()
        self._people = _PeopleCache()
        self._rule_errors: dict[str, str] = {}
        self.tz = ZoneInfo(cfg.policy.timezone)
        self.frames_seen = 0
        self.frame_failures = FrameFailureLog(log)
        self.camera_health = "reconnecting"
        self._parts: list[Any] = []  # closed in reverse order
        self.fleet: Any = None
        try:
            self._build(analyzer, gallery, source, pin_factory)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ wiring
    def _build(self, analyzer: Any, gallery: Any, source: Optional[FrameSource], pin_factory: Any) -> None:
        cfg = self.cfg
        state = Path(cfg.state_dir).expanduser()
        try:
            ensure_private_dir(state)  # 0700, also when it already exists looser (logged)
        except OSError as exc:
            raise ConfigError(f"state_dir = {str(state)!r}: cannot create it: {exc.strerror or exc}") from None
        self.audit = AuditLog(state_path(cfg, cfg.audit.path), retention_days=cfg.audit.retention_days,
                              max_rows=cfg.audit.max_rows)
        self._parts.append(self.audit)

        # the door first and released: nothing may leave the relay in an unknown state
        factory = pin_factory if pin_factory is not None else make_pin_factory(cfg.door.pin_factory)
        self.door = Door.from_config(cfg.door, pin_factory=factory, on_change=self._on_relay, state_dir=state)
        self._parts.append(self.door)
        self.contact: Optional[DoorContact] = None
        if cfg.door.contact_pin is not None:
            grace = cfg.door.pulse_s + 2.0
            self.contact = DoorContact(cfg.door.contact_pin, closed_is_low=cfg.door.contact_closed_is_low,
                                       held_open_s=cfg.door.held_open_s, pin_factory=factory,
                                       was_granted=lambda: self.door.recently_unlocked(grace),
                                       on_event=self._on_contact)
            self._parts.append(self.contact)

        if analyzer is None:
            ensure_embedder(cfg)
            from edgeface.vision.analyzer import FaceAnalyzer

            analyzer = FaceAnalyzer.from_config(cfg.detector, cfg.embedder, cfg.models_dir)
            self._parts.append(analyzer)  # only what the daemon made is closed by it
        self.analyzer = analyzer
        self.presence = PresenceGate(cfg.presence)
        self.model_id = str(analyzer.embedder.model_id)

        if gallery is None:
            from edgeface.gallery import analyzer_model, open_gallery

            gallery = open_gallery(cfg, model=analyzer_model(analyzer), create=True)
            self._parts.append(gallery)
        self.gallery = gallery
        # the runtime switch (HA's Access enabled): an unreadable state means OFF
        self.access = AccessSwitch(state_path(cfg, "access.json"), config_enabled=cfg.policy.enabled)
        if self.access.error:
            self.audit.record("access_switch", result="off", reason=self.access.error)
        self.policy: Any = Policy(cfg.policy, rules=self._rule, access=self.access.reason_off)
        self.liveness: Any = None
        if cfg.liveness.enabled:  # a blink or 3-D head motion before any grant (edgeface.vision.liveness)
            from edgeface.vision.liveness import LivenessPolicy, MeshLiveness

            self.liveness = MeshLiveness.from_config(cfg.liveness, models_dir=cfg.models_dir,
                                                     num_threads=cfg.detector.num_threads)
            self._parts.append(self.liveness)
            self.policy = LivenessPolicy(self.policy, self.liveness)  # type: ignore[assignment]

        self.mqtt = None
        self.outbox = None
        self.hass: Any = None  # HA entity states beyond the events (edgeface.events.hass_state)
        self._frame_image: Any = None  # the frame being decided (the face image entity's crop)
        self._verifier = None
        self._refusals: Any = None
        self._refusal_timer: Optional[threading.Timer] = None
        self._totp: Any = None
        if cfg.mqtt.enabled:
            from edgeface.events.hass import discovery_messages
            from edgeface.events.mqtt import MqttPublisher
            from edgeface.events.outbox import Outbox

            self.outbox = Outbox(state_path(cfg, cfg.mqtt.outbox_path), max_events=cfg.mqtt.outbox_max_events)
            self._parts.append(self.outbox)
            on_command = None
            if cfg.mqtt.remote_unlock:
                from edgeface.events.remote import CommandVerifier, NonceStore, RefusalLimiter

                secret = read_secret(cfg.mqtt.remote_unlock_secret_env)
                if not secret and not cfg.mqtt.remote_unlock_totp:
                    raise ConfigError(f"mqtt.remote_unlock is true but the secret "
                                      f"${cfg.mqtt.remote_unlock_secret_env} (environment or systemd credential) "
                                      "is not set")
                if secret:  # signed commands (optional when one-time codes are on)
                    nonces = NonceStore(state_path(cfg, "nonces.db"), keep_s=4 * cfg.mqtt.command_max_age_s + 60)
                    self._parts.append(nonces)
                    self._verifier = CommandVerifier(secret, self.door_id, max_age_s=cfg.mqtt.command_max_age_s,
                                                     nonces=nonces)
                self._refusals = RefusalLimiter()
                if cfg.mqtt.remote_unlock_totp:
                    self._totp = self._build_totp()
            if cfg.mqtt.remote_unlock or cfg.mqtt.access_switch:
                on_command = self._on_command
            from edgeface.events.hass_state import HassStates

            def discovery() -> list[tuple[str, str]]:
                people, removed = self.hass.discovery_people() if self.hass is not None else ([], [])
                return discovery_messages(cfg, people=people, removed_people=removed)

            self.mqtt = MqttPublisher(cfg.mqtt, door_id=self.door_id, outbox=self.outbox,
                                      password=read_secret(cfg.mqtt.password_env) if cfg.mqtt.username else None,
                                      discovery=discovery, on_command=on_command)
            self.hass = HassStates(cfg.mqtt, self.mqtt, door_id=self.door_id, tz=self.tz, clock=self._clock)
            self.hass.gallery(self.gallery, force=True)
            self.mqtt.set_state(self.mqtt.topics.relay, self.door.state)
            self.mqtt.set_state(self.mqtt.topics.access, "ON" if self.access.on else "OFF")
            if self.contact is not None:
                self.mqtt.set_state(self.mqtt.topics.contact, self.contact.state)

        self.thumbnails: Any = None
        if cfg.web.thumbnails:  # for the web app's access log (edgeface.daemon.thumbnails)
            from edgeface.daemon.thumbnails import DecisionThumbnails, ThumbnailStore

            self.thumbnails = DecisionThumbnails(ThumbnailStore(
                state_path(cfg, "thumbnails.db"), retention_days=cfg.web.thumbnail_retention_days,
                max_rows=cfg.web.thumbnail_max))
            self._parts.append(self.thumbnails)

        self.snapshot: Any = None
        if cfg.web.live_interval_s > 0:  # the web app's live view, only while watched (edgeface.daemon.snapshot)
            from edgeface.daemon.snapshot import LiveSnapshot

            self.snapshot = LiveSnapshot(state, cfg.web.live_interval_s)
        self.source = source if source is not None else open_source(cfg.camera, on_health=self._on_camera_health)
        self._parts.append(self.source)
        if cfg.fleet.enabled:  # the fleet's shared access list, synced through the broker (edgeface.fleet)
            from edgeface.fleet.door import attach_to_daemon

            self.fleet = attach_to_daemon(self)

    def _build_totp(self) -> Any:
        from edgeface.events.totp import TotpSecretError, TotpStore, TotpVerifier

        env = self.cfg.mqtt.totp_secret_env
        secret = read_secret(env)
        if not secret:
            raise ConfigError(f"mqtt.remote_unlock_totp is true but the TOTP secret ${env} (environment or systemd "
                              "credential) is not set; make one with `edgeface door totp-init`")
        store = TotpStore(state_path(self.cfg, "totp.db"))
        self._parts.append(store)
        try:
            return TotpVerifier(secret, store)
        except TotpSecretError as exc:
            raise ConfigError(f"${env} (the TOTP secret): {exc}") from None

    def start(self) -> None:
        """Connect MQTT (asynchronously: the broker may come later)."""
        if self.mqtt is not None:
            self.mqtt.start()
        self.audit.record("daemon", result="started", model_id=self.model_id)

    def summary(self) -> list[str]:
        """Start-up summary lines (models, gallery size, camera, door, broker)."""
        cfg = self.cfg
        det = getattr(self.analyzer, "detector", None)
        people = self._safe_people()
        lines = [
            f"models: detector {getattr(det, 'model_id', None) or cfg.detector.model or 'blazeface_' + cfg.detector.variant}"
            f", embedder {self.model_id}",
            f"gallery: {state_path(cfg, cfg.gallery.path)} ({len(people)} people, "
            f"{sum(1 for p in people if getattr(p, 'enabled', True))} enabled), max distance "
            f"{getattr(self.gallery, 'max_distance', '?')} ({getattr(self.gallery, 'match_mode', '?')} match)",
            f"camera: {getattr(self.source, 'name', cfg.camera.source)} (max {cfg.camera.max_fps:g} fps)",
            f"door {self.door_id}: relay pin {cfg.door.relay_pin} ({'active high' if cfg.door.active_high else 'active low'}"
            f", pulse {cfg.door.pulse_s:g} s, pin factory {cfg.door.pin_factory or 'default'})"
            + (f", contact pin {cfg.door.contact_pin}" if cfg.door.contact_pin is not None else ""),
            f"policy: {cfg.policy.min_frames} of {cfg.policy.window_frames} frames in {cfg.policy.window_s:g} s, "
            f"cooldown {cfg.policy.cooldown_s:g} s, min face {cfg.policy.min_face_size} px"
            + (f", liveness {cfg.liveness.method}" if cfg.liveness.enabled else ", no liveness check")
            + ("" if self.access.on else ", ACCESS DISABLED" + (" (switch)" if cfg.policy.enabled else "")),
        ]
        if cfg.mqtt.enabled:
            lines.append(f"mqtt: {cfg.mqtt.host}:{cfg.mqtt.port}{' (TLS)' if cfg.mqtt.tls else ''} topics "
                         f"{cfg.mqtt.topic_prefix}/{self.door_id}/..., outbox {len(self.outbox or [])} waiting"
                         + (", remote unlock ON" if cfg.mqtt.remote_unlock else "")
                         + (" (one-time codes)" if cfg.mqtt.remote_unlock_totp else ""))
        else:
            lines.append("mqtt: disabled")
        return lines

    # ------------------------------------------------------------------ people / rules
    def _safe_people(self) -> list[Any]:
        try:
            return list(self.gallery.people())
        except Exception:  # noqa: BLE001
            return []

    def _refresh_people(self, *, force: bool = False) -> None:
        """Re-read every person's rule (at most every PEOPLE_REFRESH_S). Fails secure: a person whose schedule
        cannot be read is denied, and when the list cannot be read at all nobody is let in (both logged)."""
        now = time.monotonic()
        if not force and now - self._people.loaded < self.PEOPLE_REFRESH_S and self._people.rules is not None:
            return
        rules: dict[int, PersonRule] = {}
        disabled: list[tuple[int, str]] = []
        errors: dict[str, str] = {}
        try:
            people = list(self.gallery.people())
        except Exception as exc:  # noqa: BLE001  (any failure here must deny, never allow)
            people = []
            errors["*"] = f"the gallery's people cannot be read ({exc}); everyone is denied"
        for p in people:
            rules[p.id] = rule = person_rule(p)
            if rule.error is not None:
                errors[p.name] = f"person {p.name!r}: {rule.error}; access denied"
                continue
            if not p.enabled:
                disabled.append((p.id, p.name))
        for key, line in errors.items():  # once per problem, not every refresh
            if self._rule_errors.get(key) != line:
                log.error("%s", line)
        self._rule_errors = errors
        self._people = _PeopleCache(now, rules, disabled, unreadable="*" in errors)

    def _rule(self, person_id: int) -> PersonRule:
        self._refresh_people()
        rule = self._people.rules.get(person_id)
        if rule is None:  # matched but not (yet) in the rules: enrolled a moment ago, or the list is unreadable
            self._refresh_people(force=True)
            rule = self._people.rules.get(person_id)
        if rule is None:
            why = "the gallery's people cannot be read" if self._people.unreadable else "not in the access list"
            return PersonRule(enabled=False, error=why)
        return rule if self.fleet is None else self.fleet.guard(person_id, rule)

    def _match(self, embedding: Any) -> Match:
        match = self.gallery.match(embedding)
        if match.known:
            return match
        # Disabled people are not in the matcher's index; recognise them anyway so they get `denied`.
        self._refresh_people()
        best: Optional[Match] = None
        for pid, name in self._people.disabled:
            try:
                m = self.gallery.verify(embedding, name)
            except Exception:  # noqa: BLE001  (removed meanwhile)
                continue
            if m.distance <= m.threshold and (best is None or m.distance < best.distance):
                best = Match(pid, name, m.distance, m.threshold, pid, name)
        return best or match

    # ------------------------------------------------------------------ pipeline
    def process_frame(self, frame: Frame) -> Decision:
        """One frame through the whole pipeline; returns the policy's decision (and acts on it)."""
        self._heartbeat = time.monotonic()
        self.frames_seen += 1
        result = self.presence.analyze(self.analyzer, frame)  # the detector only when something may be there
        if self.hass is not None:
            self._frame_image = frame.image
            self.hass.gallery(self.gallery)  # the People sensors (at most every few seconds)
        if result is None:
            decision = self.policy.observe(frame.timestamp, None)
        else:
            if self.liveness is not None:
                self.liveness.observe(frame.timestamp, frame.image, result.face)
            match = self._match(result.embedding)
            if self.thumbnails is not None:
                self.thumbnails.saw(frame.image, result.face.box, result.embedding)
            decision = self.policy.observe(frame.timestamp, match, face_size=result.face.size,
                                           box=tuple(float(v) for v in result.face.box))
        if self.snapshot is not None:
            self.snapshot.frame(frame.image, None if result is None else result.face.box,
                                "" if result is None else (match.name or "unknown"))
        if decision.action == "grant":
            decision = self._grant(decision)
        elif decision.action != "none":
            self._report(decision)
        return decision

    def _grant(self, d: Decision) -> Decision:
        """Record first, then open: the relay moves only once the access event is durably queued (audit row and
        outbox row committed), so a full disk or a crash right after the pulse never leaves an opening unrecorded."""
        problem = self._report(d, durable=True)
        if problem is not None:
            log.error("grant for %r withheld: the access event could not be recorded (%s); the door stays locked",
                      d.person_name, problem)
            return replace(d, action="deny", reason=f"access event not recorded: {problem}")
        self.door.pulse()
        return d

    def _report(self, d: Decision, *, durable: bool = False) -> Optional[str]:
        """Audit, queue and publish one decision. durable=True: stop at the first write that fails and return why
        (nothing else is done); otherwise failures are logged and the rest still happens. None = all written."""
        ev = AccessEvent.from_decision(d, door_id=self.door_id, model_id=self.model_id, tz=self.tz)
        payload = ev.to_dict()
        try:
            self.audit.record("access", result=ev.result, person_id=ev.person_id, person_name=ev.person_name,
                              distance=ev.distance, event_id=ev.event_id, ts=d.timestamp, reason=ev.reason,
                              frames_used=ev.frames_used, threshold=ev.threshold, model_id=ev.model_id, strict=durable)
        except AuditError as exc:
            return str(exc)
        if self.mqtt is not None:
            queued = self.mqtt.send_event(ev.event_id, self.mqtt.topics.event, payload,
                                          critical=ev.result in CRITICAL_KINDS)
            if durable and not queued:
                self.audit.record("access", result="withheld", person_id=ev.person_id, person_name=ev.person_name,
                                  event_id=ev.event_id, reason="the outbox cannot be written")
                return "the outbox cannot be written"
            if self.hass is not None:  # last person (one message), doorbell, presence, face image
                self.hass.decision(ev, frame=self._frame_image, box=d.box)
        if self.thumbnails is not None:
            self.thumbnails.decided(ev.event_id, ev.result, ev.person_id, ev.person_name, d.timestamp)
        log.info("%s %s (distance %s, %d frames%s)", ev.result, ev.person_name or "stranger", ev.distance,
                 ev.frames_used, f", {ev.reason}" if ev.result == "denied" else "")
        self._sink(payload)
        return None

    def _door_event(self, event_type: str, detail: dict, *, durable: bool = False) -> Optional[str]:
        """Audit, queue and publish one door event; durable=True as in _report (None = all written)."""
        ev = DoorEvent.now(self.door_id, event_type, detail, ts=self._clock(), tz=self.tz)
        payload = ev.to_dict()
        try:
            self.audit.record("door", result=event_type, event_id=ev.event_id, strict=durable, **detail)
        except AuditError as exc:
            return str(exc)
        if self.mqtt is not None:
            queued = self.mqtt.send_event(ev.event_id, self.mqtt.topics.door_event, payload,
                                          critical=event_type in CRITICAL_KINDS)
            if durable and not queued:
                self.audit.record("door", result=f"{event_type}_withheld", event_id=ev.event_id)
                return "the outbox cannot be written"
        self._sink(payload)
        return None

    def _sink(self, payload: dict) -> None:
        if self._event_sink is not None:
            try:
                self._event_sink(payload)
            except Exception:  # noqa: BLE001
                log.exception("event sink failed")

    # ------------------------------------------------------------------ callbacks (other threads)
    def _on_relay(self, state: str) -> None:
        level = None
        try:
            level = bool(self.door._device.pin.state)  # the real pin level, for the audit trail
        except Exception:  # noqa: BLE001
            pass
        self.audit.record("relay", result=state, pin_level=level)
        if getattr(self, "mqtt", None) is not None:
            self.mqtt.set_state(self.mqtt.topics.relay, state)

    def _on_contact(self, kind: str, detail: dict) -> None:
        if self.mqtt is not None and kind in ("door_opened", "door_closed"):
            self.mqtt.set_state(self.mqtt.topics.contact, "open" if kind == "door_opened" else "closed")
        self._door_event(kind, detail)

    def _on_camera_health(self, state: str, detail: str) -> None:
        self.camera_health = state
        self._heartbeat = time.monotonic()  # waiting for a camera is alive, not hung
        self.audit.record("camera", result=state, detail=detail)
        if getattr(self, "mqtt", None) is not None:
            self.mqtt.set_state(self.mqtt.topics.camera, state)

    def _on_command(self, topic: str, payload: bytes, retained: bool) -> None:
        assert self.mqtt is not None
        if topic == self.mqtt.topics.access_command:
            self._on_access_command(payload, retained)
            return
        if not self.cfg.mqtt.remote_unlock:
            return
        from edgeface.events.totp import parse_lock_command

        command = parse_lock_command(payload)
        if command is not None:  # Home Assistant's lock: LOCK, or UNLOCK with a one-time code
            self._on_lock_command(command.action, command.code, retained)
            return
        if self._verifier is None:
            verdict = Verdict(False, "signed commands are off (no remote unlock secret is set)")
        else:
            verdict = self._verifier.verify(payload, retained=retained, now=self._clock())
        self._unlock_verdict(verdict, "signed")

    def _on_lock_command(self, action: str, code: str, retained: bool) -> None:
        assert self.mqtt is not None
        if action == "LOCK":
            if retained:
                log.warning("retained LOCK command ignored")
                return
            was = self.door.unlocked
            self.door.release()  # ends an unlock pulse; the relay state acknowledges it
            if not was:
                self.mqtt.set_state(self.mqtt.topics.relay, self.door.state, force=True)
            self.audit.record("remote_lock", result="accepted", was_unlocked=was)
            log.warning("remote lock (the relay was %s)", "unlocked" if was else "already locked")
            self._door_event("remote_lock", {"was_unlocked": was})
            return
        if retained:
            verdict = Verdict(False, "retained command ignored")
        elif action != "UNLOCK":
            verdict = Verdict(False, f"unknown action {action[:16]!r} (expected LOCK or UNLOCK)")
        elif self._totp is None:
            verdict = Verdict(False, "one-time codes are off (mqtt.remote_unlock_totp: false)")
        else:
            verdict = self._totp.verify(code, now=self._clock())
        self._unlock_verdict(verdict, "totp")

    def _unlock_verdict(self, verdict: Verdict, method: str) -> None:
        """An accepted unlock is recorded first (audit row, durable door event), then the relay moves; a refused one
        goes through the refusal limiter."""
        if not verdict.accepted:
            self._on_refused(verdict, method)
            return
        self.audit.record("remote_unlock", result="accepted", reason=verdict.reason, nonce=verdict.nonce, method=method)
        detail = {"method": method, **({"nonce": verdict.nonce} if verdict.nonce else {})}
        problem = self._door_event("remote_unlock", detail, durable=True)  # record, then open
        if problem is not None:
            log.error("remote unlock (%s%s) withheld: the event could not be recorded (%s); the door stays locked",
                      method, f", nonce {verdict.nonce}" if verdict.nonce else "", problem)
            return
        log.warning("remote unlock accepted (%s%s)", method, f", nonce {verdict.nonce}" if verdict.nonce else "")
        self.door.pulse()

    def _on_refused(self, verdict: Any, method: str = "signed") -> None:
        """A refused command: recorded one by one up to the limiter's burst (10 per 10 s), then only counted (one
        summary row and event per window), so a flood neither delays valid commands nor fills the audit log."""
        if self._refusals is None or self._refusals.admit(verdict.reason):
            log.warning("remote unlock refused (%s): %s", method, verdict.reason)
            self.audit.record("remote_unlock", result="refused", reason=verdict.reason, nonce=verdict.nonce,
                              method=method)
            self._door_event("remote_unlock_refused", {"method": method, "reason": verdict.reason})
            self._refusal_state(verdict.reason, method)
        elif self._refusal_timer is None:
            self._refusal_timer = threading.Timer(self._refusals.window_s, self._flush_refusals)
            self._refusal_timer.daemon = True
            self._refusal_timer.start()
        self._flush_refusals(from_timer=False)

    def _flush_refusals(self, *, force: bool = False, from_timer: bool = True) -> None:
        """Record the refusals counted in a window that ended (all of them, with force) as one row and one event."""
        if from_timer or force:
            timer, self._refusal_timer = self._refusal_timer, None
            if timer is not None and force:
                timer.cancel()
        counts = self._refusals.summary(force=force) if self._refusals is not None else None
        if not counts:
            return
        n = sum(counts.values())
        reason = f"{n} more refused commands (rate-limited: recorded as one)"
        log.warning("remote unlock refused: %s: %s", reason, ", ".join(f"{k} x{v}" for k, v in counts.items()))
        self.audit.record("remote_unlock", result="refused", reason=reason, count=n, reasons=counts)
        self._door_event("remote_unlock_refused", {"reason": reason, "count": n, "reasons": counts})
        self._refusal_state(reason, "rate-limited", count=n)

    def _refusal_state(self, reason: str, method: str, *, count: int = 1) -> None:
        """The Last refused unlock sensor beside HA's lock, with when one-time codes are accepted again."""
        if self.hass is not None:
            wait = self._totp.locked_out_for(self._clock()) if self._totp is not None else 0.0
            self.hass.refusal(reason, method, locked_out_s=wait, count=count)

    def _on_access_command(self, payload: bytes, retained: bool) -> None:
        assert self.mqtt is not None
        text = payload.decode("utf-8", errors="replace").strip().upper()
        if retained or text not in ("ON", "OFF"):
            why = "retained command ignored" if retained else f"expected ON or OFF, got {text[:16]!r}"
            log.warning("access switch command refused: %s", why)
        else:
            why = self.access.set(text == "ON")
            log.warning("access switched %s over MQTT%s", text, f" refused: {why}" if why else "")
        self.audit.record("access_switch", result="refused" if why else text.lower(), reason=why)
        self.mqtt.set_state(self.mqtt.topics.access, "ON" if self.access.on else "OFF", force=True)

    # ------------------------------------------------------------------ loop
    @property
    def heartbeat_age(self) -> float:
        return time.monotonic() - self._heartbeat

    def run(self, *, max_frames: Optional[int] = None) -> int:
        """Process frames until stop() or the source ends; a failing frame is logged, never fatal."""
        n = 0
        frames = self.source.frames()
        try:
            for frame in frames:
                if self._stop.is_set():
                    break
                try:
                    self.process_frame(frame)
                except Exception as exc:  # noqa: BLE001  (one bad frame must not stop the door)
                    self.frame_failures.failed(frame.index, exc)
                else:
                    self.frame_failures.succeeded()
                n += 1
                if max_frames is not None and n >= max_frames:
                    break
        finally:
            self.frame_failures.close()
            close = getattr(frames, "close", None)
            if close:
                close()
        return n

    def stop(self) -> None:
        """Ask run() to end (signal-safe: sets flags, releases the relay)."""
        self._stop.set()
        try:
            self.door.release()
        except Exception:  # noqa: BLE001
            pass
        src = getattr(self, "source", None)
        if src is not None:
            src.close()

    def close(self) -> None:
        """Release the relay, flush MQTT briefly, close every part (safe twice)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        door = getattr(self, "door", None)
        if door is not None:
            door.release()
        if getattr(self, "_refusals", None) is not None:
            self._flush_refusals(force=True)  # the last window's count, before the events are flushed
        if getattr(self, "mqtt", None) is not None:
            try:
                self.mqtt.stop(timeout=5.0)  # deliver what is queued (TimeoutStopSec=15)
            except Exception:  # noqa: BLE001
                log.exception("MQTT stop failed")
        audit = getattr(self, "audit", None)
        if audit is not None:
            audit.record("daemon", result="stopped")
        for part in reversed(self._parts):
            try:
                part.close()
            except Exception:  # noqa: BLE001
                log.exception("closing %s failed", type(part).__name__)

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

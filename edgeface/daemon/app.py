"""The access daemon: builds every part from the config, feeds camera frames to the pipeline, stops and closes.

The per-frame work is `edgeface.daemon.pipeline` (analyzer -> gallery -> policy -> door + events), the MQTT
commands are `edgeface.daemon.commands`, where events go is `edgeface.daemon.reporting`; systemd, signals and
logging are `edgeface.daemon.service`. Nothing here blocks on the network: events go to the persistent outbox
and the MQTT sender thread delivers them. The door is released on every way out (close(), signals via
run_daemon, exceptions).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional
from zoneinfo import ZoneInfo

from edgeface.config import EdgefaceConfig, read_secret
from edgeface.daemon.pipeline import AccessRules, Pipeline
from edgeface.daemon.reporting import EventRecorder, EventSink
from edgeface.decide import Policy
from edgeface.door import Door, DoorContact, make_pin_factory
from edgeface.errors import ConfigError
from edgeface.events.access import AccessSwitch
from edgeface.events.audit import AuditLog
from edgeface.frames import FrameSource, open_source
from edgeface.security import ensure_private_dir
from edgeface.types import Decision, Frame
from edgeface.vision.presence import PresenceGate

log = logging.getLogger(__name__)

__all__ = ["Daemon", "EventSink", "FrameFailureLog", "ensure_embedder", "state_path"]


def state_path(cfg: EdgefaceConfig, path: str) -> Path:
    """A relative file path in the config is relative to state_dir."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(cfg.state_dir).expanduser() / p


def ensure_embedder(cfg: EdgefaceConfig) -> None:
    """Let the converter produce a missing embedder model. The converter (edgeface.convert) is imported only when
    the file is missing: a start with the model in place never loads the development wing."""
    from edgeface.models import embedder_model_path

    if embedder_model_path(cfg.embedder.model, cfg.models_dir).is_file():
        return
    try:
        import edgeface.convert as convert  # the [convert] wing, imported only here and only when it is present
    except ImportError:
        return
    ensure = getattr(convert, "ensure_embedder_model", None)
    if ensure is not None:
        ensure(cfg)


def _close_logged(part: Any) -> None:
    try:
        part.close()
    except Exception:  # noqa: BLE001  (one part failing to close must not keep the others open)
        log.exception("closing %s failed", type(part).__name__)


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
    """Owns every part; build with the config, optionally hand in parts (tests, demo). What it made, and the frame
    source either way, is closed in reverse order of building (an ExitStack); a handed-in analyzer or gallery is
    the caller's to close."""

    PEOPLE_REFRESH_S = 2.0

    def __init__(self, cfg: EdgefaceConfig, *, analyzer: Any = None, gallery: Any = None,
                 source: Optional[FrameSource] = None, pin_factory: Any = None,
                 event_sink: Optional[EventSink] = None, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.door_id = cfg.door.door_id
        self._clock = clock
        self._closed = False
        self._stop = threading.Event()
        self._heartbeat = time.monotonic()
        self.tz = ZoneInfo(cfg.policy.timezone)
        self.frames_seen = 0
        self.frame_failures = FrameFailureLog(log)
        self.camera_health = "reconnecting"
        self._stack = contextlib.ExitStack()
        self.audit: Any = None
        self.door: Any = None
        self.contact: Optional[DoorContact] = None
        self.mqtt: Any = None
        self.outbox: Any = None
        self.commands: Any = None
        self.hass: Any = None  # HA entity states beyond the events (edgeface.events.hass_state)
        self.fleet: Any = None
        self.liveness: Any = None
        try:
            self._build(analyzer, gallery, source, pin_factory, event_sink)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ wiring
    def _own(self, part: Any) -> Any:
        """Close `part` when the daemon closes (reverse order of building)."""
        self._stack.callback(_close_logged, part)
        return part

    def _build(self, analyzer: Any, gallery: Any, source: Optional[FrameSource], pin_factory: Any,
               event_sink: Optional[EventSink]) -> None:
        cfg = self.cfg
        state = Path(cfg.state_dir).expanduser()
        try:
            ensure_private_dir(state)  # 0700, also when it already exists looser (logged)
        except OSError as exc:
            raise ConfigError(f"state_dir = {str(state)!r}: cannot create it: {exc.strerror or exc}") from None
        self.audit = self._own(AuditLog(state_path(cfg, cfg.audit.path), retention_days=cfg.audit.retention_days,
                                        max_rows=cfg.audit.max_rows))
        self.events = EventRecorder(self.audit, door_id=self.door_id, tz=self.tz, clock=self._clock,
                                    sink=event_sink)

        # the door first and released: nothing may leave the relay in an unknown state
        factory = pin_factory if pin_factory is not None else make_pin_factory(cfg.door.pin_factory)
        self.door = self._own(Door.from_config(cfg.door, pin_factory=factory, on_change=self._on_relay,
                                              state_dir=state))
        if cfg.door.contact_pin is not None:
            grace = cfg.door.pulse_s + 2.0
            self.contact = self._own(DoorContact(
                cfg.door.contact_pin, closed_is_low=cfg.door.contact_closed_is_low, held_open_s=cfg.door.held_open_s,
                pin_factory=factory, was_granted=lambda: self.door.recently_unlocked(grace),
                on_event=self._on_contact))

        if analyzer is None:
            ensure_embedder(cfg)
            from edgeface.vision.analyzer import FaceAnalyzer

            analyzer = self._own(FaceAnalyzer.from_config(cfg.detector, cfg.embedder, cfg.models_dir))
        self.analyzer = analyzer
        self.presence = PresenceGate(cfg.presence)
        self.model_id = self.events.model_id = str(analyzer.embedder.model_id)

        if gallery is None:
            from edgeface.gallery import analyzer_model, open_gallery

            gallery = self._own(open_gallery(cfg, model=analyzer_model(analyzer), create=True))
        self.gallery = gallery
        self.rules = AccessRules(gallery, refresh_s=self.PEOPLE_REFRESH_S)
        # the runtime switch (HA's Access enabled): an unreadable state means OFF
        self.access = AccessSwitch(state_path(cfg, "access.json"), config_enabled=cfg.policy.enabled)
        if self.access.error:
            self.audit.record("access_switch", result="off", reason=self.access.error)
        self.policy: Any = Policy(cfg.policy, rules=self.rules.rule, access=self.access.reason_off)
        if cfg.liveness.enabled:  # a blink or 3-D head motion before any grant (edgeface.vision.liveness)
            from edgeface.vision.liveness import LivenessPolicy, MeshLiveness

            self.liveness = self._own(MeshLiveness.from_config(cfg.liveness, models_dir=cfg.models_dir,
                                                               num_threads=cfg.detector.num_threads))
            self.policy = LivenessPolicy(self.policy, self.liveness)
        self.pipeline = Pipeline(analyzer=analyzer, presence=self.presence, rules=self.rules, policy=self.policy, door=self.door,
                                 recorder=self.events, liveness=self.liveness)

        if cfg.web.thumbnails:  # for the web app's access log (edgeface.daemon.thumbnails)
            from edgeface.daemon.thumbnails import DecisionThumbnails, ThumbnailStore

            self.pipeline.thumbnails = self.events.thumbnails = self._own(DecisionThumbnails(ThumbnailStore(
                state_path(cfg, "thumbnails.db"), retention_days=cfg.web.thumbnail_retention_days,
                max_rows=cfg.web.thumbnail_max)))
        if cfg.web.live_interval_s > 0:  # the web app's live view, only while watched (edgeface.daemon.snapshot)
            from edgeface.daemon.snapshot import LiveSnapshot

            self.pipeline.snapshot = LiveSnapshot(state, cfg.web.live_interval_s)

        if cfg.mqtt.enabled:
            self._build_mqtt()
        self.source = self._own(source if source is not None
                                else open_source(cfg.camera, on_health=self._on_camera_health))
        if cfg.fleet.enabled:  # the fleet's shared access list, synced through the broker (edgeface.fleet)
            from edgeface.fleet.door import attach_to_daemon

            self.fleet = attach_to_daemon(self)
            if self.fleet is not None:
                self.rules.guard = self.fleet.guard

    def _build_mqtt(self) -> None:
        from edgeface.daemon.commands import RemoteCommands
        from edgeface.events.hass import discovery_messages
        from edgeface.events.hass_state import HassStates
        from edgeface.events.mqtt import MqttPublisher
        from edgeface.events.outbox import Outbox

        cfg = self.cfg
        self.outbox = self._own(Outbox(state_path(cfg, cfg.mqtt.outbox_path), max_events=cfg.mqtt.outbox_max_events))
        on_command = None
        if cfg.mqtt.remote_unlock or cfg.mqtt.access_switch:
            self.commands = RemoteCommands.from_config(cfg, self._own, lambda name: state_path(cfg, name),
                                                       door=self.door, access=self.access, recorder=self.events,
                                                       clock=self._clock)
            on_command = self.commands.on_command

        def discovery() -> list[tuple[str, str]]:
            people, removed = self.hass.discovery_people() if self.hass is not None else ([], [])
            return discovery_messages(cfg, people=people, removed_people=removed)

        self.mqtt = MqttPublisher(cfg.mqtt, door_id=self.door_id, outbox=self.outbox,
                                  password=read_secret(cfg.mqtt.password_env) if cfg.mqtt.username else None,
                                  discovery=discovery, on_command=on_command)
        self.hass = HassStates(cfg.mqtt, self.mqtt, door_id=self.door_id, tz=self.tz, clock=self._clock)
        self.hass.gallery(self.gallery, force=True)
        self.events.mqtt = self.mqtt
        self.events.hass = self.pipeline.hass = self.hass
        if self.commands is not None:
            self.commands.mqtt, self.commands.hass = self.mqtt, self.hass
        self.mqtt.set_state(self.mqtt.topics.relay, self.door.state)
        self.mqtt.set_state(self.mqtt.topics.access, "ON" if self.access.on else "OFF")
        if self.contact is not None:
            self.mqtt.set_state(self.mqtt.topics.contact, self.contact.state)

    def start(self) -> None:
        """Connect MQTT (asynchronously: the broker may come later)."""
        if self.mqtt is not None:
            self.mqtt.start()
        self.audit.record("daemon", result="started", model_id=self.model_id)

    def summary(self) -> list[str]:
        """Start-up summary lines (models, gallery size, camera, door, broker)."""
        cfg = self.cfg
        det = getattr(self.analyzer, "detector", None)
        try:
            people = list(self.gallery.people())
        except Exception:  # noqa: BLE001  (the summary never stops a start; the rules deny and log)
            people = []
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

    # ------------------------------------------------------------------ pipeline
    def process_frame(self, frame: Frame) -> Decision:
        """One frame through the whole pipeline; returns the policy's decision (and acts on it)."""
        self._heartbeat = time.monotonic()
        self.frames_seen += 1
        return self.pipeline.process_frame(frame)

    # ------------------------------------------------------------------ callbacks (other threads)
    def _on_relay(self, state: str) -> None:
        level = None
        try:
            level = bool(self.door._device.pin.state)  # the real pin level, for the audit trail
        except Exception:  # noqa: BLE001
            pass
        self.audit.record("relay", result=state, pin_level=level)
        if self.mqtt is not None:
            self.mqtt.set_state(self.mqtt.topics.relay, state)

    def _on_contact(self, kind: str, detail: dict) -> None:
        if self.mqtt is not None and kind in ("door_opened", "door_closed"):
            self.mqtt.set_state(self.mqtt.topics.contact, "open" if kind == "door_opened" else "closed")
        self.events.door_event(kind, detail)

    def _on_camera_health(self, state: str, detail: str) -> None:
        self.camera_health = state
        self._heartbeat = time.monotonic()  # waiting for a camera is alive, not hung
        self.audit.record("camera", result=state, detail=detail)
        if self.mqtt is not None:
            self.mqtt.set_state(self.mqtt.topics.camera, state)

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
        if self.door is not None:
            self.door.release()
        if self.commands is not None:
            self.commands.close()  # the last window's refusal count, before the events are flushed
        if self.mqtt is not None:
            try:
                self.mqtt.stop(timeout=5.0)  # deliver what is queued (TimeoutStopSec=15)
            except Exception:  # noqa: BLE001
                log.exception("MQTT stop failed")
        if self.audit is not None:
            self.audit.record("daemon", result="stopped")
        self._stack.close()

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

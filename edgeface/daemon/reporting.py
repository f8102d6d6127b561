"""Where every decision and door event goes: the audit log, the MQTT outbox (and HA's last-person state), the
optional in-process sink (the demo's JSON lines, tests).

One owner for the order of those writes, because the pipeline (grants) and the remote commands (unlocks) both
need the same promise: with `durable=True` nothing is reported as done unless the audit row and the outbox row
are committed, so the caller can withhold the opening. A failing sink is logged, never raised into the caller.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional
from zoneinfo import ZoneInfo

from edgeface.types import Decision
from edgeface.events.audit import AuditError, AuditLog
from edgeface.events.records import CRITICAL_KINDS, AccessEvent, DoorEvent

log = logging.getLogger(__name__)

EventSink = Callable[[dict], None]


class EventRecorder:
    """Audit, queue and publish events. `mqtt` and `model_id` are set once those parts exist (the door's callbacks
    are wired before the broker client is built)."""

    def __init__(self, audit: AuditLog, *, door_id: str, tz: ZoneInfo, clock: Callable[[], float],
                 sink: Optional[EventSink] = None) -> None:
        self.audit, self.door_id, self.tz, self._clock, self._sink_fn = audit, door_id, tz, clock, sink
        self.mqtt: Any = None
        self.hass: Any = None  # HA entity states beyond the events (edgeface.events.hass_state)
        self.frame_image: Any = None  # the frame being decided (the face image entity's crop)
        self.model_id = ""
        self.thumbnails: Any = None  # decision thumbnails for the web app (edgeface.daemon.thumbnails)

    def access(self, d: Decision, *, durable: bool = False) -> Optional[str]:
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
        mqtt = self.mqtt
        if mqtt is not None:
            queued = mqtt.send_event(ev.event_id, mqtt.topics.event, payload, critical=ev.result in CRITICAL_KINDS)
            if durable and not queued:
                self.audit.record("access", result="withheld", person_id=ev.person_id, person_name=ev.person_name,
                                  event_id=ev.event_id, reason="the outbox cannot be written")
                return "the outbox cannot be written"
            if self.hass is not None:  # last person (one message), doorbell, presence, face image
                self.hass.decision(ev, frame=self.frame_image, box=d.box)
        if self.thumbnails is not None:
            self.thumbnails.decided(ev.event_id, ev.result, ev.person_id, ev.person_name, d.timestamp)
        log.info("%s %s (distance %s, %d frames%s)", ev.result, ev.person_name or "stranger", ev.distance,
                 ev.frames_used, f", {ev.reason}" if ev.result == "denied" else "")
        self._sink(payload)
        return None

    def door_event(self, event_type: str, detail: dict, *, durable: bool = False) -> Optional[str]:
        """Audit, queue and publish one door event; durable=True as in access() (None = all written)."""
        ev = DoorEvent.now(self.door_id, event_type, detail, ts=self._clock(), tz=self.tz)
        payload = ev.to_dict()
        try:
            self.audit.record("door", result=event_type, event_id=ev.event_id, strict=durable, **detail)
        except AuditError as exc:
            return str(exc)
        mqtt = self.mqtt
        if mqtt is not None:
            queued = mqtt.send_event(ev.event_id, mqtt.topics.door_event, payload,
                                     critical=event_type in CRITICAL_KINDS)
            if durable and not queued:
                self.audit.record("door", result=f"{event_type}_withheld", event_id=ev.event_id)
                return "the outbox cannot be written"
        self._sink(payload)
        return None

    def _sink(self, payload: dict) -> None:
        if self._sink_fn is not None:
            try:
                self._sink_fn(payload)
            except Exception:  # noqa: BLE001  (a sink never stops the door)
                log.exception("event sink failed")

"""The states behind Home Assistant's entities beyond the access events: what the daemon publishes after each
decision, each refused unlock, and when the gallery changes (docs/mqtt.md lists the topics).

- `last_decision`: one retained JSON per decision (name and result together), so the Last person sensor, which
  reads both its state and its attributes from it, changes once per decision. (A state topic plus an attributes
  topic gave two changes, the first a new name with the previous result.)
- `unlock/refused`: the last refused remote unlock (reason, method, time, `locked_out_until`): HA's lock only
  stays locked, this diagnostic sensor says why.
- `gallery`: how many people are enrolled and enabled.
- `doorbell`: an event (`ring`) per unknown face (mqtt.ha_doorbell), for HA's doorbell device class; sent live
  only (a ring replayed after a broker outage would ring for nobody).
- `presence/<person id>`: when that person was last let in (mqtt.ha_presence, off by default).
- `face_image`: the JPEG face crop of the last decision (mqtt.ha_face_image, off by default; not retained, held
  nowhere but in the message).
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Optional, Sequence

from edgeface.config import MqttConfig
from edgeface.events.records import AccessEvent, iso_time

log = logging.getLogger(__name__)

#: The gallery counts are re-read at most this often (s) while frames come in.
GALLERY_EVERY_S = 10.0


def face_crop_jpeg(rgb: Any, box: Sequence[float], *, max_px: int, margin: float = 0.25) -> Optional[bytes]:
    """The face box (x, y, w, h) of an RGB frame with a margin, longest side at most max_px, as JPEG; None when
    the box is empty or outside the frame."""
    import cv2

    x, y, w, h = (float(v) for v in box[:4])
    if w <= 0 or h <= 0:
        return None
    H, W = rgb.shape[:2]
    x0, y0 = max(0, int(x - margin * w)), max(0, int(y - margin * h))
    x1, y1 = min(W, int(x + w + margin * w)), min(H, int(y + h + margin * h))
    if x1 <= x0 or y1 <= y0:
        return None
    crop = rgb[y0:y1, x0:x1]
    scale = max_px / max(crop.shape[:2])
    if scale < 1:
        crop = cv2.resize(crop, (max(1, int(crop.shape[1] * scale)), max(1, int(crop.shape[0] * scale))),
                          interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return bytes(buf) if ok else None


class HassStates:
    """Publishes those states through the daemon's MqttPublisher (never blocks, never raises)."""

    def __init__(self, cfg: MqttConfig, mqtt: Any, *, door_id: str, tz: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg, self.mqtt, self.door_id, self.tz, self._clock = cfg, mqtt, door_id, tz, clock
        self.topics = mqtt.topics
        self._people: list[tuple[int, str]] = []  # (id, name) of everyone in the gallery, as discovery last had it
        self._ever: set[int] = set()  # every person id discovery named in this run (removed ones get removal entries)
        self._gallery_read = -1e9

    # -- what discovery needs -------------------------------------------------------------------
    def discovery_people(self) -> tuple[list[tuple[int, str]], list[int]]:
        """(current people, ids of people removed since) for the presence sensors."""
        current = {pid for pid, _ in self._people}
        return list(self._people), sorted(self._ever - current)

    # -- after each decision ----------------------------------------------------------------------
    def decision(self, ev: AccessEvent, *, frame: Any = None, box: Optional[Sequence[float]] = None) -> None:
        try:
            self._decision(ev, frame, box)
        except Exception:  # noqa: BLE001  (an extra entity never stops the door)
            log.exception("Home Assistant states for decision %s failed", ev.event_id)

    def _decision(self, ev: AccessEvent, frame: Any, box: Optional[Sequence[float]]) -> None:
        name = ev.person_name or "stranger"  # HA reserves the state `unknown`: a stranger is `stranger`
        self.mqtt.set_state(self.topics.last_decision, json.dumps(
            {"name": name, "result": ev.result, "person_name": ev.person_name, "timestamp": ev.timestamp,
             "event_id": ev.event_id, "distance": ev.distance}, sort_keys=True))
        self.mqtt.set_state(self.topics.last_person, name)
        if self.cfg.ha_doorbell and ev.result == "unknown":
            # live only, not through the outbox: a ring replayed after an outage would ring for nobody
            self.mqtt.publish_now(self.topics.doorbell, json.dumps(
                {"event_type": "ring", "timestamp": ev.timestamp, "door_id": self.door_id,
                 "access_event_id": ev.event_id}, sort_keys=True))
        if self.cfg.ha_presence and ev.result == "granted" and ev.person_id is not None:
            self.mqtt.set_state(self.topics.presence(ev.person_id), ev.timestamp)
        if self.cfg.ha_face_image and frame is not None and box is not None:
            jpeg = face_crop_jpeg(frame, box, max_px=self.cfg.ha_face_image_px)
            if jpeg:
                self.mqtt.publish_now(self.topics.face_image, jpeg, retain=False)  # type: ignore[arg-type]

    # -- refused remote unlocks -------------------------------------------------------------------
    def refusal(self, reason: str, method: str, *, locked_out_s: float = 0.0, count: int = 1) -> None:
        now = self._clock()
        try:
            self.mqtt.set_state(self.topics.unlock_refusal, json.dumps(
                {"reason": reason[:250], "method": method, "timestamp": iso_time(now, self.tz), "count": count,
                 "locked_out_until": iso_time(now + locked_out_s, self.tz) if locked_out_s > 0 else None},
                sort_keys=True))
        except Exception:  # noqa: BLE001
            log.exception("Home Assistant refusal state failed")

    # -- the gallery ------------------------------------------------------------------------------
    def gallery(self, gallery: Any, *, force: bool = False) -> None:
        """Re-read the people (at most every GALLERY_EVERY_S): counts, and discovery again when the people the
        presence sensors name changed."""
        now = time.monotonic()
        if not force and now - self._gallery_read < GALLERY_EVERY_S:
            return
        self._gallery_read = now
        try:
            people = list(gallery.people())
        except Exception:  # noqa: BLE001  (the daemon logs and denies an unreadable gallery itself)
            return
        self.mqtt.set_state(self.topics.gallery, json.dumps(
            {"people": len(people), "enabled": sum(1 for p in people if getattr(p, "enabled", True))},
            sort_keys=True))
        listed = sorted((int(p.id), str(p.name)) for p in people)
        if listed != self._people:
            self._people = listed
            self._ever |= {pid for pid, _ in listed}
            if self.cfg.ha_presence:
                self.mqtt.resend_discovery()

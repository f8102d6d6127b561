"""One frame through the access path: analyzer -> gallery match -> policy -> door + events.

`Pipeline.process_frame()` is what the daemon's run loop calls for every camera frame (tests call it with real
JPEGs). Two promises live here: a grant is recorded (audit row and outbox row committed) before the relay moves,
and no event sink raises into the pipeline (EventRecorder logs its failures). `AccessRules` turns the gallery's
people into the policy's per-person rules, failing secure.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

from edgeface.decide import PersonRule, person_rule
from edgeface.daemon.reporting import EventRecorder
from edgeface.types import Decision, Frame, Match

log = logging.getLogger(__name__)


@dataclass
class _PeopleCache:
    loaded: float = -1e9
    rules: Optional[dict[int, PersonRule]] = None
    disabled: list[tuple[int, str]] = field(default_factory=list)
    unreadable: bool = False


class AccessRules:
    """Each person's rule (enabled, schedule) read from the gallery, refreshed at most every `refresh_s`, so an
    edit made by `edgeface people` while the daemon runs applies within seconds."""

    def __init__(self, gallery: Any, *, refresh_s: float = 2.0) -> None:
        self.gallery, self.refresh_s = gallery, refresh_s
        self._people = _PeopleCache()
        self._errors: dict[str, str] = {}
        #: A last say over a known person's rule (the fleet's staleness and signature checks), when set.
        self.guard: Optional[Callable[[int, PersonRule], PersonRule]] = None

    def refresh(self, *, force: bool = False) -> None:
        """Re-read every person's rule. Fails secure: a person whose schedule cannot be read is denied, and when the
        list cannot be read at all nobody is let in (both logged, once per problem)."""
        now = time.monotonic()
        if not force and now - self._people.loaded < self.refresh_s and self._people.rules is not None:
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
            if self._errors.get(key) != line:
                log.error("%s", line)
        self._errors = errors
        self._people = _PeopleCache(now, rules, disabled, unreadable="*" in errors)

    def rule(self, person_id: int) -> PersonRule:
        """The policy's rule for a matched person; a person the rules do not know is denied."""
        self.refresh()
        rule = (self._people.rules or {}).get(person_id)
        if rule is None:  # matched but not (yet) in the rules: enrolled a moment ago, or the list is unreadable
            self.refresh(force=True)
            rule = (self._people.rules or {}).get(person_id)
        if rule is None:
            why = "the gallery's people cannot be read" if self._people.unreadable else "not in the access list"
            return PersonRule(enabled=False, error=why)
        return rule if self.guard is None else self.guard(person_id, rule)

    def match(self, embedding: Any) -> Match:
        """The gallery's match; a disabled person (not in the matcher's index) is still recognised, to be denied."""
        match = self.gallery.match(embedding)
        if match.known:
            return match
        self.refresh()
        best: Optional[Match] = None
        for pid, name in self._people.disabled:
            try:
                m = self.gallery.verify(embedding, name)
            except Exception:  # noqa: BLE001  (removed meanwhile)
                continue
            if m.distance <= m.threshold and (best is None or m.distance < best.distance):
                best = Match(pid, name, m.distance, m.threshold, pid, name)
        return best or match


class Pipeline:
    """The per-frame path; owns none of its parts (the daemon builds and closes them)."""

    def __init__(self, *, analyzer: Any, presence: Any, rules: AccessRules, policy: Any, door: Any, recorder: EventRecorder,
                 liveness: Any = None) -> None:
        self.analyzer, self.presence, self.rules, self.policy, self.door = analyzer, presence, rules, policy, door
        self.recorder, self.liveness = recorder, liveness
        self.hass: Any = None  # the HA entity states (People sensors, face image), set with the broker client
        self.thumbnails: Any = None  # decision thumbnails for the web app (edgeface.daemon.thumbnails)
        self.snapshot: Any = None  # the web app's live picture (edgeface.daemon.snapshot)

    def process_frame(self, frame: Frame) -> Decision:
        """One frame through the whole pipeline; returns the policy's decision (and acts on it)."""
        result = self.presence.analyze(self.analyzer, frame)  # the detector only when something may be there
        if self.hass is not None:
            self.recorder.frame_image = frame.image  # the face image entity's crop, should this frame decide
            self.hass.gallery(self.rules.gallery)  # the People sensors (at most every few seconds)
        if result is None:
            decision = self.policy.observe(frame.timestamp, None)
        else:
            if self.liveness is not None:
                self.liveness.observe(frame.timestamp, frame.image, result.face)
            match = self.rules.match(result.embedding)
            decision = self.policy.observe(frame.timestamp, match, face_size=result.face.size,
                                           box=tuple(float(v) for v in result.face.box))
            if self.thumbnails is not None:
                self.thumbnails.saw(frame.image, result.face.box, result.embedding)
        if self.snapshot is not None:
            self.snapshot.frame(frame.image, None if result is None else result.face.box,
                                "" if result is None else (match.name or "unknown"))
        if decision.action == "grant":
            decision = self._grant(decision)
        elif decision.action != "none":
            self.recorder.access(decision)
        return decision

    def _grant(self, d: Decision) -> Decision:
        """Record first, then open: the relay moves only once the access event is durably queued (audit row and
        outbox row committed), so a full disk or a crash right after the pulse never leaves an opening unrecorded."""
        problem = self.recorder.access(d, durable=True)
        if problem is not None:
            log.error("grant for %r withheld: the access event could not be recorded (%s); the door stays locked",
                      d.person_name, problem)
            return replace(d, action="deny", reason=f"access event not recorded: {problem}")
        self.door.pulse()
        return d

"""Access decision policy: pure logic, no I/O; the clock is passed in, so every rule is testable.

One observation per frame goes in (the main face's Match, its size), at most one Decision comes out:
- grant:   the same person matched in >= K (min_frames) of the last N (window_frames) face frames, all
           within window_s, with faces at least min_face_size pixels; the person is enabled, inside their
           schedule, and the policy is globally enabled.
- deny:    the same evidence for a known person who is disabled, outside their schedule, or while the
           policy is globally disabled (reason says which).
- unknown: K of the last N frames were strangers; at most one per unknown_interval_s.
- none:    nothing to report (not enough evidence, a face too small, cooldown, rate limit).
One visit gives one grant/deny: after a decision for a person, they get no new one until they have
not been seen for cooldown_s (the cooldown restarts while they keep standing there).
"""
from __future__ import annotations

import datetime as dt
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from edgeface.config import PolicyConfig
from edgeface.errors import ConfigError
from edgeface.gallery.records import Schedule
from edgeface.types import Action, Decision, Match


@dataclass(frozen=True)
class PersonRule:
    """What the gallery says about a person's access."""

    enabled: bool = True
    schedule: Optional[Schedule] = None
    #: Set when the person's rule could not be read (damaged schedule, unreadable gallery): always denied.
    error: Optional[str] = None


RuleLookup = Callable[[int], PersonRule]


def person_rule(person: Any) -> PersonRule:
    """The rule of one gallery Person. Fails secure: a rule the gallery cannot vouch for (rule_error: a schedule
    that cannot be read, a damaged row) or cannot parse gives a rule that denies."""
    error = getattr(person, "rule_error", None)
    schedule = None
    if error is None:
        try:
            schedule = Schedule.parse(person.schedule)
        except Exception as exc:  # noqa: BLE001  (GalleryError, or a shape the parser never expected)
            error = f"schedule unreadable ({exc})"
    if error is not None:
        return PersonRule(enabled=False, error=error)
    return PersonRule(enabled=bool(person.enabled), schedule=schedule)


@dataclass
class _Obs:
    t: float
    person_id: Optional[int]  # None = stranger
    name: Optional[str]
    distance: float
    threshold: float
    box: Optional[tuple[float, float, float, float]]


@dataclass
class _Visit:
    last_seen: float


class Policy:
    """K-of-N evidence, cooldown, schedules and stranger rate limit. Feed every frame to `observe`."""

    def __init__(self, cfg: PolicyConfig, *, rules: Optional[RuleLookup] = None,
                 access: Optional[Callable[[], str]] = None) -> None:
        self.cfg = cfg
        #: Runtime access switch: returns "" when access is on, else the reason it is off (e.g. the HA switch).
        self._access: Callable[[], str] = access or (lambda: "")
        try:
            self.tz = ZoneInfo(cfg.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"policy.timezone = {cfg.timezone!r}: unknown IANA time zone (e.g. Europe/Berlin)") from None
        self._rules: RuleLookup = rules or (lambda _pid: PersonRule())
        self._window: deque[_Obs] = deque(maxlen=cfg.window_frames)
        self._visits: dict[int, _Visit] = {}
        self._last_unknown: Optional[float] = None

    def observe(self, now: float, match: Optional[Match], *, face_size: float = 0.0,
                box: Optional[tuple[float, float, float, float]] = None) -> Decision:
        """One frame: `match` of its main face (None = no face in the frame)."""
        if match is None:
            self._expire(now)
            return Decision("none", reason="no face", timestamp=now)
        if face_size < self.cfg.min_face_size:
            return Decision("none", reason=f"face too small ({face_size:.0f} < {self.cfg.min_face_size} px)",
                            timestamp=now)
        obs = _Obs(now, match.person_id, match.name, float(match.distance), float(match.threshold), box)
        self._window.append(obs)
        self._expire(now)
        if obs.person_id is not None:
            return self._known(now, obs)
        return self._stranger(now, obs)

    def _expire(self, now: float) -> None:
        while self._window and now - self._window[0].t > self.cfg.window_s:
            self._window.popleft()

    def _known(self, now: float, obs: _Obs) -> Decision:
        pid = obs.person_id
        assert pid is not None
        visit = self._visits.get(pid)
        if visit is not None and now - visit.last_seen < self.cfg.cooldown_s:
            visit.last_seen = now  # still the same visit
            return Decision("none", pid, obs.name, "cooldown", obs.distance, obs.threshold, timestamp=now)
        # frames of an earlier visit (before its cooldown ran out) are no evidence for a new one
        since = visit.last_seen if visit is not None else float("-inf")
        same = [o for o in self._window if o.person_id == pid and o.t > since]
        if len(same) < self.cfg.min_frames:
            return Decision("none", pid, obs.name, f"{len(same)}/{self.cfg.min_frames} frames", obs.distance,
                            obs.threshold, len(same), obs.box, now)
        best = min(o.distance for o in same)
        self._visits[pid] = _Visit(now)
        rule = self._rules(pid)
        reason = ""
        if not self.cfg.enabled:
            reason = "access globally disabled"
        elif off := self._access():
            reason = off
        elif rule.error:
            reason = f"access rule unreadable: {rule.error}"
        elif not rule.enabled:
            reason = "person disabled"
        elif rule.schedule is not None:
            local = dt.datetime.fromtimestamp(now, self.tz)
            if not rule.schedule.allows(local):
                reason = f"outside schedule ({local:%a %H:%M} {self.cfg.timezone})"
        action: Action = "deny" if reason else "grant"
        return Decision(action, pid, obs.name, reason or "match", best, obs.threshold, len(same), obs.box, now)

    def _stranger(self, now: float, obs: _Obs) -> Decision:
        strangers = [o for o in self._window if o.person_id is None]
        if len(strangers) < self.cfg.min_frames:
            return Decision("none", reason=f"{len(strangers)}/{self.cfg.min_frames} stranger frames",
                            distance=obs.distance, threshold=obs.threshold, timestamp=now)
        if self._last_unknown is not None and now - self._last_unknown < self.cfg.unknown_interval_s:
            return Decision("none", reason="unknown rate limit", distance=obs.distance, threshold=obs.threshold,
                            timestamp=now)
        self._last_unknown = now
        best = min(o.distance for o in strangers)
        return Decision("unknown", None, None, "no match within threshold", best, obs.threshold, len(strangers),
                        obs.box, now)

    def reset(self) -> None:
        self._window.clear()
        self._visits.clear()
        self._last_unknown = None

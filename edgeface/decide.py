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
import re
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from edgeface.config import PolicyConfig
from edgeface.errors import ConfigError
from edgeface.types import Match

Action = Literal["grant", "deny", "unknown", "none"]
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class TimeWindow:
    """Weekdays (0 = Monday) and a local time range [start, end); end <= start wraps past midnight."""

    days: frozenset[int]
    start: dt.time
    end: dt.time

    def contains(self, local: dt.datetime) -> bool:
        t = local.time()
        if self.start < self.end:
            return local.weekday() in self.days and self.start <= t < self.end
        # wraps midnight: the part after midnight belongs to the previous day's window
        if t >= self.start:
            return local.weekday() in self.days
        return t < self.end and (local.weekday() - 1) % 7 in self.days


@dataclass(frozen=True)
class Schedule:
    """When a person may enter: any of the windows (an empty schedule never allows)."""

    windows: tuple[TimeWindow, ...]

    def allows(self, local: dt.datetime) -> bool:
        return any(w.contains(local) for w in self.windows)

    @staticmethod
    def parse(spec: Any) -> Optional["Schedule"]:
        """None/"" -> no restriction. A string "mon-fri 07:00-19:00; sat 09:00-12:00", a list of such strings,
        or a list of {"days": "mon-fri" | ["mon", ...], "start": "07:00", "end": "19:00"}."""
        if spec is None or spec == "" or spec == []:
            return None
        if isinstance(spec, Schedule):
            return spec
        items: list[Any]
        if isinstance(spec, dict) and "windows" in spec:  # the gallery's form: {"days": [...], "windows": [[s, e]]}
            days = spec.get("days") or list(DAY_NAMES)
            return Schedule(tuple(TimeWindow(_parse_days(days), _parse_time(s), _parse_time(e))
                                  for s, e in spec["windows"]))
        if isinstance(spec, str):
            items = [p for p in (s.strip() for s in spec.split(";")) if p]
        elif isinstance(spec, dict):
            items = [spec]
        elif isinstance(spec, (list, tuple)):
            items = list(spec)
        else:
            raise ConfigError(f"schedule: expected a string or a list, got {type(spec).__name__}")
        windows = []
        for item in items:
            if isinstance(item, str):
                m = re.fullmatch(r"\s*([a-zA-Z,\-\s]+?)\s+(\d{1,2}:\d{2})\s*-\s*(\d{1,2}:\d{2})\s*", item)
                if not m:
                    raise ConfigError(f"schedule {item!r}: expected 'mon-fri 07:00-19:00'")
                days, start, end = m.group(1), m.group(2), m.group(3)
            elif isinstance(item, dict):
                try:
                    days, start, end = item["days"], item["start"], item["end"]
                except KeyError as exc:
                    raise ConfigError(f"schedule {item!r}: missing key {exc.args[0]!r} (days, start, end)") from None
            else:
                raise ConfigError(f"schedule entry {item!r}: expected a string or a mapping")
            windows.append(TimeWindow(_parse_days(days), _parse_time(start), _parse_time(end)))
        return Schedule(tuple(windows))


def _parse_days(days: Any) -> frozenset[int]:
    parts = days if isinstance(days, (list, tuple)) else re.split(r"[,\s]+", str(days).strip())
    out: set[int] = set()
    for part in parts:
        part = str(part).strip().lower()[:7]
        if not part:
            continue
        if part in ("daily", "all", "*"):
            return frozenset(range(7))
        if "-" in part:
            a, b = (p.strip()[:3] for p in part.split("-", 1))
            if a not in DAY_NAMES or b not in DAY_NAMES:
                raise ConfigError(f"schedule days {days!r}: expected names like mon-fri")
            i, j = DAY_NAMES.index(a), DAY_NAMES.index(b)
            out.update((i + k) % 7 for k in range((j - i) % 7 + 1))
        elif part[:3] in DAY_NAMES:
            out.add(DAY_NAMES.index(part[:3]))
        else:
            raise ConfigError(f"schedule days {days!r}: unknown day {part!r} (mon..sun)")
    if not out:
        raise ConfigError(f"schedule days {days!r}: no day given")
    return frozenset(out)


def _parse_time(value: Any) -> dt.time:
    if isinstance(value, dt.time):
        return value
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", str(value).strip())
    if not m or int(m.group(1)) > 24 or int(m.group(2)) > 59:
        raise ConfigError(f"schedule time {value!r}: expected HH:MM")
    hour, minute = int(m.group(1)), int(m.group(2))
    return dt.time(23, 59, 59, 999999) if hour == 24 else dt.time(hour, minute)


@dataclass(frozen=True)
class PersonRule:
    """What the gallery says about a person's access."""

    enabled: bool = True
    schedule: Optional[Schedule] = None
    #: Set when the person's rule could not be read (damaged schedule, unreadable gallery): always denied.
    error: Optional[str] = None


RuleLookup = Callable[[int], PersonRule]


@dataclass(frozen=True)
class Decision:
    action: Action
    person_id: Optional[int] = None
    person_name: Optional[str] = None
    reason: str = ""
    distance: Optional[float] = None
    threshold: Optional[float] = None
    frames_used: int = 0
    box: Optional[tuple[float, float, float, float]] = None
    timestamp: float = 0.0

    @property
    def result(self) -> Optional[str]:
        """The event word: granted / denied / unknown (None for action 'none')."""
        return {"grant": "granted", "deny": "denied", "unknown": "unknown"}.get(self.action)


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

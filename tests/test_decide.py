"""Decision policy: K-of-N, window, cooldown, schedules, global switch, stranger rate limit (clock passed in)."""
from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from edgeface.config import PolicyConfig
from edgeface.decide import PersonRule, Policy
from edgeface.gallery import Schedule
from edgeface.errors import ConfigError, GalleryError
from edgeface.types import Match

ALICE = Match(1, "alice", 0.2, 0.5)
BOB = Match(2, "bob", 0.25, 0.5)
STRANGER = Match(None, None, 0.8, 0.5, 1, "alice")


def cfg(**kw) -> PolicyConfig:
    base = dict(min_frames=3, window_frames=5, window_s=2.0, cooldown_s=5.0, unknown_interval_s=10.0, min_face_size=50)
    base.update(kw)
    return PolicyConfig(**base)


def feed(policy: Policy, seq, t0=1000.0, dt_s=0.1, size=100):
    out = []
    for i, m in enumerate(seq):
        out.append(policy.observe(t0 + i * dt_s, m, face_size=size))
    return out


def actions(decisions):
    return [d.action for d in decisions]


def test_grant_needs_k_matching_frames_of_the_same_person():
    p = Policy(cfg())
    d = feed(p, [ALICE, ALICE, ALICE])
    assert actions(d) == ["none", "none", "grant"]
    assert d[-1].person_name == "alice" and d[-1].frames_used == 3 and d[-1].distance == pytest.approx(0.2)


def test_k_of_n_counts_only_the_last_n_face_frames():
    p = Policy(cfg())
    # alice, bob x4 pushes two alice frames out of a 5-frame window
    d = feed(p, [ALICE, ALICE, BOB, BOB, BOB, ALICE])
    assert "grant" not in [x.action for x in d if x.person_id == 1]
    # bob reached 3 of 5 at his third frame
    assert [x.action for x in d] == ["none", "none", "none", "none", "grant", "none"]


def test_mixed_people_do_not_add_up():
    p = Policy(cfg(min_frames=3, window_frames=4))
    assert "grant" not in actions(feed(p, [ALICE, BOB, ALICE, BOB]))


def test_frames_older_than_the_window_do_not_count():
    p = Policy(cfg(window_s=1.0))
    d = feed(p, [ALICE, ALICE, ALICE], dt_s=0.6)  # spans 1.2 s: never 3 within 1 s
    assert "grant" not in actions(d)


def test_small_faces_never_count():
    p = Policy(cfg(min_face_size=80))
    assert "grant" not in actions(feed(p, [ALICE] * 5, size=60))
    d = p.observe(2000.0, ALICE, face_size=60)
    assert d.action == "none" and "too small" in d.reason


def test_cooldown_one_visit_one_grant_then_grant_again_after_absence():
    p = Policy(cfg(cooldown_s=5.0, window_s=10.0))
    # alice stands there 20 s (frames every 0.5 s): one grant only
    d = feed(p, [ALICE] * 40, dt_s=0.5)
    assert actions(d).count("grant") == 1
    # 6 s later (longer than cooldown since last seen): a new visit, which needs its own K frames
    d2 = feed(p, [ALICE] * 3, t0=1000.0 + 39 * 0.5 + 6.0)
    assert actions(d2) == ["none", "none", "grant"]


def test_cooldown_is_per_person():
    p = Policy(cfg())
    assert actions(feed(p, [ALICE] * 3)) [-1] == "grant"
    assert actions(feed(p, [BOB] * 3, t0=1000.5))[-1] == "grant"


def test_strangers_give_rate_limited_unknown_events():
    p = Policy(cfg(unknown_interval_s=10.0))
    d = feed(p, [STRANGER] * 50, dt_s=0.2)  # 10 s of a stranger
    assert actions(d).count("unknown") == 1
    u = next(x for x in d if x.action == "unknown")
    assert u.person_id is None and u.distance == pytest.approx(0.8) and u.frames_used == 3
    d2 = feed(p, [STRANGER] * 3, t0=1000.0 + 50 * 0.2 + 1)
    assert actions(d2).count("unknown") == 1


def test_single_stranger_frame_among_known_frames_is_not_reported():
    p = Policy(cfg())
    assert "unknown" not in actions(feed(p, [ALICE, STRANGER, ALICE, ALICE]))


def test_disabled_person_is_denied_with_reason_once_per_visit():
    p = Policy(cfg(), rules=lambda pid: PersonRule(enabled=(pid != 1)))
    d = feed(p, [ALICE] * 10)
    assert actions(d).count("deny") == 1
    assert next(x for x in d if x.action == "deny").reason == "person disabled"
    assert actions(feed(p, [BOB] * 3, t0=1010))[-1] == "grant"


def test_global_disable_denies_everyone():
    p = Policy(cfg(enabled=False))
    d = feed(p, [ALICE] * 3)
    assert d[-1].action == "deny" and "globally disabled" in d[-1].reason


def test_schedule_in_the_configured_time_zone():
    sched = Schedule.parse({"days": ["mon", "tue", "wed", "thu", "fri"], "windows": [["08:00", "18:00"]]})
    p = Policy(cfg(timezone="Europe/Berlin"), rules=lambda pid: PersonRule(schedule=sched))
    berlin = ZoneInfo("Europe/Berlin")
    inside = dt.datetime(2026, 11, 25, 9, 0, tzinfo=berlin).timestamp()  # Wednesday 09:00 Berlin
    outside = dt.datetime(2026, 11, 25, 7, 30, tzinfo=berlin).timestamp()  # 06:30 UTC, 07:30 Berlin
    weekend = dt.datetime(2026, 11, 28, 9, 0, tzinfo=berlin).timestamp()  # Saturday
    assert feed(p, [ALICE] * 3, t0=inside)[-1].action == "grant"
    p.reset()
    d = feed(p, [ALICE] * 3, t0=outside)[-1]
    assert d.action == "deny" and d.reason.startswith("outside schedule")
    p.reset()
    assert feed(p, [ALICE] * 3, t0=weekend)[-1].action == "deny"


@pytest.mark.parametrize("bad", ["mon-fri 08:00-09:00", {"days": ["someday"]}, {"windows": [["8:00", "9:00"]]},
                                 {"windows": [["25:00", "26:00"]]}, {"windows": [["22:00", "02:00"]]}, 42,
                                 [{"days": "mon"}]])
def test_bad_schedules_are_one_line_errors(bad):
    with pytest.raises(GalleryError) as e:
        Schedule.parse(bad)
    assert "\n" not in str(e.value)


def test_unknown_time_zone_is_refused():
    with pytest.raises((ConfigError, ValueError)):
        Policy(cfg(timezone="Mars/Olympus"))


def test_no_face_frames_do_not_reset_evidence_but_time_does():
    p = Policy(cfg(window_s=2.0))
    seq = [ALICE, None, ALICE, None, ALICE]
    assert actions(feed(p, seq, dt_s=0.2))[-1] == "grant"


def test_gallery_schedule_form():
    s = Schedule.parse({"days": ["mon", "tue"], "windows": [["08:00", "12:00"], ["13:00", "24:00"]]})
    assert s.allows(dt.datetime(2026, 11, 23, 9, 0)) and s.allows(dt.datetime(2026, 11, 24, 23, 59))
    assert not s.allows(dt.datetime(2026, 11, 23, 12, 30)) and not s.allows(dt.datetime(2026, 11, 25, 9, 0))

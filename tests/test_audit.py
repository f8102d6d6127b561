"""Audit log: rows kept, rotated by age (retention_days) and by count (max_rows, oldest first)."""
from __future__ import annotations

from edgeface.events.audit import AuditLog


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_records_and_reopens(tmp_path):
    log = AuditLog(tmp_path / "a.db")
    log.record("access", result="granted", person_id=1, person_name="ann", distance=0.2, event_id="e1", reason="match")
    log.close()
    log.close()
    rows = AuditLog(tmp_path / "a.db").rows()
    assert rows[0]["kind"] == "access" and rows[0]["person_name"] == "ann" and rows[0]["detail"] == {"reason": "match"}


def test_retention_days_deletes_old_rows(tmp_path):
    clock = Clock(1_000_000.0)
    log = AuditLog(tmp_path / "a.db", retention_days=2, clock=clock)
    log.record("door", result="door_opened")
    clock.t += 86400.0
    log.record("door", result="door_closed")
    clock.t += 1.5 * 86400.0  # the first row is now 2.5 days old
    assert log.rotate() == 1
    assert [r["result"] for r in log.rows()] == ["door_closed"]


def test_max_rows_keeps_the_newest(tmp_path):
    log = AuditLog(tmp_path / "a.db", max_rows=100)
    for i in range(120):
        log.record("access", result="unknown", n=i)
    log.rotate()
    rows = log.rows(limit=5000)
    assert len(rows) == 100 and rows[0]["detail"]["n"] == 20 and rows[-1]["detail"]["n"] == 119
    log.close()


def test_rotation_runs_by_itself_while_writing(tmp_path):
    log = AuditLog(tmp_path / "a.db", max_rows=100)
    log.ROTATE_EVERY = 20
    for i in range(200):
        log.record("access", n=i)
    assert len(log.rows(limit=5000)) <= 100 + 20
    log.close()

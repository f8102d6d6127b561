"""Persistent outbox: order, durability across reopen, bounded with the documented drop policy."""
from __future__ import annotations

import threading

from edgeface.events.outbox import Outbox


def drain(box):
    out = []
    while (item := box.peek()) is not None:
        out.append(item.event_id)
        box.mark_delivered(item.seq)
    return out


def test_fifo_and_survives_reopen(tmp_path):
    path = tmp_path / "outbox.db"
    box = Outbox(path, max_events=100)
    for i in range(10):
        box.add(f"e{i}", "t", f'{{"i": {i}}}')
    first = box.peek()
    box.mark_delivered(first.seq)
    box.close()
    box2 = Outbox(path, max_events=100)
    assert len(box2) == 9
    assert drain(box2) == [f"e{i}" for i in range(1, 10)]
    box2.close()


def test_same_event_id_is_stored_once(tmp_path):
    box = Outbox(tmp_path / "o.db", max_events=100)
    box.add("a", "t", "{}")
    box.add("a", "t", "{}")
    assert len(box) == 1
    box.close()


def test_full_outbox_drops_oldest_non_critical_first_and_counts(tmp_path, caplog):
    box = Outbox(tmp_path / "o.db", max_events=100)
    for i in range(100):
        box.add(f"e{i}", "t", "{}", critical=(i % 2 == 0))
    box.add("new1", "t", "{}", critical=True)
    box.add("new2", "t", "{}", critical=False)
    assert len(box) == 100 and box.dropped == 2
    ids = drain(box)
    assert "e1" not in ids and "e3" not in ids and "e0" in ids and ids[-2:] == ["new1", "new2"]
    assert "outbox full" in caplog.text
    box.close()


def test_full_of_critical_events_drops_oldest_critical(tmp_path):
    box = Outbox(tmp_path / "o.db", max_events=100)
    for i in range(101):
        box.add(f"c{i}", "t", "{}", critical=True)
    assert box.dropped == 1 and box.peek().event_id == "c1"
    box.close()


def test_dropped_counter_persists(tmp_path):
    box = Outbox(tmp_path / "o.db", max_events=100)
    for i in range(105):
        box.add(f"e{i}", "t", "{}")
    box.close()
    assert Outbox(tmp_path / "o.db", max_events=100).dropped == 5


def test_concurrent_writers_keep_every_event(tmp_path):
    box = Outbox(tmp_path / "o.db", max_events=10_000)

    def writer(k):
        for i in range(50):
            box.add(f"w{k}-{i}", "t", "{}")

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = drain(box)
    assert len(ids) == 200
    for k in range(4):  # each writer's events stay in its order
        mine = [x for x in ids if x.startswith(f"w{k}-")]
        assert mine == [f"w{k}-{i}" for i in range(50)]
    box.close()

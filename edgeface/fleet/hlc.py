"""Hybrid logical clock: (wall milliseconds, counter, node id), compared as a tuple.

Wall time keeps versions close to real time; the counter orders changes made within one millisecond or while
the wall clock stands still or goes back; the node id (the admin's name) breaks ties, so two admins editing the
same person at once end in the same winner on every door (last writer wins, deterministically).
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import Callable

_NODE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TEXT_RE = re.compile(r"^(\d{1,16})-(\d{1,9})-([A-Za-z0-9_.-]{1,64})$")


@dataclass(frozen=True, order=True)
class HLC:
    wall_ms: int
    counter: int
    node: str

    def __str__(self) -> str:
        return f"{self.wall_ms:013d}-{self.counter:06d}-{self.node}"

    @classmethod
    def parse(cls, text: object) -> "HLC":
        """`WALLMS-COUNTER-NODE` as written by str(); anything else raises ValueError naming the value."""
        m = _TEXT_RE.match(text) if isinstance(text, str) else None
        if not m:
            raise ValueError(f"version {text!r}: expected WALLMS-COUNTER-NODE (hybrid logical clock)")
        return cls(int(m.group(1)), int(m.group(2)), m.group(3))


ZERO = HLC(0, 0, "")


class HybridClock:
    """Issues ever-increasing HLCs for one node; `observe` moves it past versions seen from others."""

    def __init__(self, node: str, *, wall: Callable[[], float] = time.time) -> None:
        if not _NODE_RE.match(node):
            raise ValueError(f"fleet node id {node!r}: expected 1-64 letters, digits, '_', '.' or '-'")
        self.node = node
        self._wall = wall
        self._last = ZERO
        self._lock = threading.Lock()

    def now(self) -> HLC:
        with self._lock:
            wall = int(self._wall() * 1000)
            if wall > self._last.wall_ms:
                self._last = HLC(wall, 0, self.node)
            else:
                self._last = HLC(self._last.wall_ms, self._last.counter + 1, self.node)
            return self._last

    def observe(self, seen: HLC) -> None:
        with self._lock:
            if (seen.wall_ms, seen.counter) > (self._last.wall_ms, self._last.counter):
                self._last = HLC(seen.wall_ms, seen.counter, self.node)

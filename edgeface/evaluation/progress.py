"""Progress of a long evaluation step, readable on a terminal and in a log (journald, a CI log, a file)."""
from __future__ import annotations

import math
import sys
import time
from typing import Iterator, Optional, TextIO


def progress_steps(n: int, desc: str, *, stream: Optional[TextIO] = None, every_s: float = 10.0,
                   every_share: float = 0.1) -> Iterator[int]:
    """range(n) that reports its progress: a tqdm bar on a terminal; in a log (not a terminal) one plain line per
    `every_share` of the work or per `every_s` seconds, whichever comes first, and one at the end."""
    stream = stream or sys.stderr
    if stream.isatty():
        from tqdm import tqdm
        yield from tqdm(range(n), desc=desc, unit="img", file=stream)
        return
    step = max(1, math.ceil(n * every_share))
    started = last = time.monotonic()
    next_at = step
    for i in range(n):
        yield i
        now = time.monotonic()
        if i + 1 == n or i + 1 >= next_at or now - last >= every_s:
            print(f"{desc}: {i + 1}/{n} photos ({100 * (i + 1) // max(n, 1)}%, {now - started:.0f} s)", file=stream,
                  flush=True)
            last, next_at = now, i + 1 + step  # the next line after another share of the work (or every_s)

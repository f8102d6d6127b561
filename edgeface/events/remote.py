"""Authenticated remote unlock: {nonce, ts, sig} with sig = HMAC-SHA256(secret, f"{door_id}|{nonce}|{ts}").

A command is accepted only if the signature matches, |now - ts| <= max_age_s, the nonce was never
used before (nonces are remembered in SQLite, so a replay after a restart is refused too) and the
message was not retained (a retained command would re-fire on every reconnect).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

from edgeface.security import create_private_file

#: A real command is ~150 bytes; anything much larger is refused before it is parsed (no JSON bombs).
MAX_COMMAND_BYTES = 1024


def sign(secret: str, door_id: str, nonce: str, ts: float | str) -> str:
    """HMAC-SHA256 over "<door_id>|<nonce>|<ts>"; `ts` as the text the command carries (a number prints as
    Python writes it, which is what make_command sends)."""
    msg = f"{door_id}|{nonce}|{ts}".encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def make_command(secret: str, door_id: str, *, now: float | None = None) -> dict:
    """A fresh signed unlock command (what a trusted client sends)."""
    ts = int(time.time() if now is None else now)
    nonce = secrets.token_hex(16)
    return {"nonce": nonce, "ts": ts, "sig": sign(secret, door_id, nonce, ts)}


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str
    nonce: str = ""


class NonceStore:
    """Used nonces, persisted; entries older than keep_s are forgotten (their ts is stale anyway)."""

    def __init__(self, path: Union[str, os.PathLike[str]], keep_s: float) -> None:
        self.keep_s = keep_s
        self._lock = threading.Lock()
        Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        create_private_file(path)  # 0600: SQLite gives -wal/-shm the same mode
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS used_nonces (nonce TEXT PRIMARY KEY, seen REAL NOT NULL)")

    def use(self, nonce: str, now: float) -> bool:
        """Record the nonce; False if it was already used."""
        with self._lock:
            self._db.execute("DELETE FROM used_nonces WHERE seen < ?", (now - self.keep_s,))
            cur = self._db.execute("INSERT OR IGNORE INTO used_nonces(nonce, seen) VALUES (?, ?)", (nonce, now))
            return cur.rowcount == 1

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _SentNumber(float):
    """A JSON number that remembers its text, so the signature is checked over `ts` as sent (1700000000.5 and
    1700000000.50 are different messages; re-rendering the parsed value would make them the same)."""

    text: str

    @classmethod
    def parse(cls, text: str) -> "_SentNumber":
        n = cls(float(text))  # a huge integer becomes inf here and is refused as malformed
        n.text = text
        return n


def _encodable(text: str) -> bool:
    """False for text that UTF-8 cannot encode (a lone surrogate from a JSON escape such as "\\ud800")."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


class RefusalLimiter:
    """Rate limit for recording refused remote-unlock commands: anyone on the broker can send them at will.

    The first `burst` refusals of each `window_s` are recorded one by one; later ones in the same window are only
    counted (reason -> count) and recorded as ONE summary when the window ends (`summary()`), so a flood costs
    an HMAC each, not two fsyncs each, and a valid command behind it is not delayed. Every attempt is counted."""

    def __init__(self, window_s: float = 10.0, burst: int = 10, clock: "Callable[[], float]" = time.monotonic) -> None:
        self.window_s = window_s
        self.burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        self._window_start: float | None = None
        self._in_window = 0
        self._suppressed: dict[str, int] = {}

    def admit(self, reason: str) -> bool:
        """Count one refusal; True if it should be recorded individually (else it is in the next summary)."""
        now = self._clock()
        with self._lock:
            if self._window_start is None or now - self._window_start >= self.window_s:
                if self._suppressed:  # a summary is due first; the caller takes it with summary()
                    self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
                    return False
                self._window_start, self._in_window = now, 0
            self._in_window += 1
            if self._in_window <= self.burst:
                return True
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return False

    def summary(self, *, force: bool = False) -> "dict[str, int] | None":
        """The reasons and counts suppressed in a window that has ended (or now, with force), once; else None."""
        with self._lock:
            if not self._suppressed:
                return None
            ended = self._window_start is None or self._clock() - self._window_start >= self.window_s
            if not (ended or force):
                return None
            counts, self._suppressed = self._suppressed, {}
            self._window_start, self._in_window = None, 0
            return counts

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(self._suppressed.values())


class CommandVerifier:
    def __init__(self, secret: str, door_id: str, *, max_age_s: float, nonces: NonceStore) -> None:
        if not secret:
            raise ValueError("empty remote unlock secret")
        self.secret = secret
        self.door_id = door_id
        self.max_age_s = max_age_s
        self.nonces = nonces

    def verify(self, payload: bytes, *, retained: bool, now: float) -> Verdict:
        if retained:
            return Verdict(False, "retained command ignored")
        if len(payload) > MAX_COMMAND_BYTES:
            return Verdict(False, f"command too large ({len(payload)} bytes > {MAX_COMMAND_BYTES})")
        try:
            # numbers keep the text they were sent as: the signature covers `ts` exactly as sent
            data = json.loads(payload.decode("utf-8"), parse_int=_SentNumber.parse, parse_float=_SentNumber.parse)
            nonce, ts, sig = data["nonce"], data["ts"], data["sig"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError, RecursionError):
            return Verdict(False, "malformed command (expected JSON {nonce, ts, sig})")
        if not isinstance(nonce, str) or not (8 <= len(nonce) <= 128) or not isinstance(sig, str) \
                or not isinstance(ts, _SentNumber) or not _encodable(nonce) or not _encodable(sig):
            return Verdict(False, "malformed command fields")
        if not math.isfinite(ts) or abs(ts) > 2 ** 53:  # NaN/inf would never be stale; huge ints overflow float
            return Verdict(False, "malformed command fields")
        expected = sign(self.secret, self.door_id, nonce, ts.text)
        # bytes: compare_digest refuses str with non-ASCII characters (TypeError) instead of saying "no"
        if not hmac.compare_digest(expected.encode(), sig.lower().encode("utf-8", "surrogatepass")):
            return Verdict(False, "bad signature", nonce)
        if abs(now - float(ts)) > self.max_age_s:
            return Verdict(False, f"stale command (|now - ts| = {abs(now - float(ts)):.0f} s > {self.max_age_s:.0f} s)",
                           nonce)
        if not self.nonces.use(nonce, now):
            return Verdict(False, "nonce already used (replay)", nonce)
        return Verdict(True, "ok", nonce)

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
from typing import Union

from .security import create_private_file

#: A real command is ~150 bytes; anything much larger is refused before it is parsed (no JSON bombs).
MAX_COMMAND_BYTES = 1024


def sign(secret: str, door_id: str, nonce: str, ts: float) -> str:
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
            data = json.loads(payload.decode("utf-8"))
            nonce, ts, sig = data["nonce"], data["ts"], data["sig"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError, RecursionError):
            return Verdict(False, "malformed command (expected JSON {nonce, ts, sig})")
        if not isinstance(nonce, str) or not (8 <= len(nonce) <= 128) or not isinstance(sig, str) \
                or not isinstance(ts, (int, float)) or isinstance(ts, bool):
            return Verdict(False, "malformed command fields")
        if not math.isfinite(ts) or abs(ts) > 2 ** 53:  # NaN/inf would never be stale; huge ints overflow float
            return Verdict(False, "malformed command fields")
        expected = sign(self.secret, self.door_id, nonce, ts)
        # bytes: compare_digest refuses str with non-ASCII characters (TypeError) instead of saying "no"
        if not hmac.compare_digest(expected.encode(), sig.lower().encode("utf-8", "surrogatepass")):
            return Verdict(False, "bad signature", nonce)
        if abs(now - float(ts)) > self.max_age_s:
            return Verdict(False, f"stale command (|now - ts| = {abs(now - float(ts)):.0f} s > {self.max_age_s:.0f} s)",
                           nonce)
        if not self.nonces.use(nonce, now):
            return Verdict(False, "nonce already used (replay)", nonce)
        return Verdict(True, "ok", nonce)

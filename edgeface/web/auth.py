"""Admin password (scrypt), server-side sessions with a CSRF token each, and login rate limiting.

No default password: until the admin file exists every page sends the owner to the first-run setup.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from edgeface.security import write_private_atomic

#: scrypt cost: n=2**14, r=8 needs 16 MiB and ~50 ms on a Pi 4 per check (memory-hard: no cheap GPU guessing).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1
MIN_PASSWORD = 10


def hash_password(password: str, *, salt: Optional[bytes] = None) -> dict:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return {"kdf": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "salt": salt.hex(), "hash": digest.hex()}


def check_password(password: str, record: dict) -> bool:
    try:
        digest = hashlib.scrypt(password.encode("utf-8"), salt=bytes.fromhex(record["salt"]), n=int(record["n"]),
                                r=int(record["r"]), p=int(record["p"]), dklen=32)
        return hmac.compare_digest(digest.hex(), record["hash"])
    except (KeyError, ValueError, TypeError):
        return False


class AdminStore:
    """The one admin account: state_dir/web-admin.json (0600, written atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self) -> bool:
        return self.path.is_file()

    def _record(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # unreadable: nobody logs in (fail secure)

    @property
    def username(self) -> Optional[str]:
        rec = self._record()
        return None if rec is None else rec.get("username")

    def create(self, username: str, password: str) -> None:
        """The first-run admin, only if there is none: two setups racing cannot both win (link() never replaces)."""
        data = self._encode(username, password)
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.new")
        write_private_atomic(tmp, data)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            raise ValueError("the admin account already exists") from None
        finally:
            tmp.unlink(missing_ok=True)

    def set(self, username: str, password: str) -> None:
        write_private_atomic(self.path, self._encode(username, password))

    @staticmethod
    def _encode(username: str, password: str) -> bytes:
        if len(password) < MIN_PASSWORD:
            raise ValueError(f"the password needs at least {MIN_PASSWORD} characters")
        if not username or len(username) > 64:
            raise ValueError("the user name needs 1-64 characters")
        return json.dumps({"username": username, **hash_password(password)}).encode()

    def verify(self, username: str, password: str) -> bool:
        rec = self._record()
        if rec is None:
            return False
        ok = check_password(password, rec)  # always run the KDF: no timing hint about the user name
        return ok and hmac.compare_digest(str(rec.get("username", "")).encode(), username.encode())


@dataclass
class Session:
    user: str
    csrf: str
    expires: float


@dataclass
class Sessions:
    """In-memory sessions (a restart of `edgeface web` logs everyone out, which is fine for one owner)."""

    lifetime_s: float
    clock: Callable[[], float] = time.time
    _items: dict[str, Session] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def create(self, user: str) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            now = self.clock()
            self._items = {k: s for k, s in self._items.items() if s.expires > now}
            self._items[token] = Session(user, secrets.token_urlsafe(32), now + self.lifetime_s)
        return token

    def get(self, token: Optional[str]) -> Optional[Session]:
        if not token:
            return None
        with self._lock:
            s = self._items.get(token)
            if s is None or s.expires <= self.clock():
                self._items.pop(token, None)
                return None
            return s

    def drop(self, token: Optional[str]) -> None:
        with self._lock:
            self._items.pop(token or "", None)

    def drop_all(self) -> None:
        with self._lock:
            self._items.clear()


class LoginLimiter:
    """At most `attempts` failed logins per client address per `window_s`; then refused until the window passes."""

    def __init__(self, attempts: int = 5, window_s: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.attempts, self.window_s, self._clock = attempts, window_s, clock
        self._fails: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def blocked_for(self, client: str) -> float:
        """Seconds until this client may try again (0 = may try now)."""
        now = self._clock()
        with self._lock:
            fails = [t for t in self._fails.get(client, []) if now - t < self.window_s]
            self._fails[client] = fails
            if len(fails) < self.attempts:
                return 0.0
            return self.window_s - (now - fails[0])

    def failed(self, client: str) -> None:
        with self._lock:
            self._fails.setdefault(client, []).append(self._clock())

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._fails.pop(client, None)

"""One-time unlock codes (RFC 6238 TOTP) for Home Assistant's lock entity and the owner's authenticator app.

Home Assistant cannot make an HMAC, but its MQTT lock sends the code typed into its dialog
(`code_format` + `command_template`): `{"action": "UNLOCK", "code": "123456"}`. edgeface accepts a code
when it is the TOTP of the shared secret (SHA-1, 6 digits, 30 s step: what authenticator apps use) for
the current step or one step either side, and its step is LATER than the last accepted one (so every
code, and every older code, works at most once; the last step is kept in SQLite, so a restart does not
reopen it). Wrong codes are rate limited: after `max_failures` in a row every attempt is refused for a
lock-out that doubles with each further failure (up to `max_lockout_s`), also persisted.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from edgeface.events.remote import MAX_COMMAND_BYTES, Verdict
from edgeface.security import create_private_file

STEP_S = 30
DIGITS = 6
#: At least 128 bits of secret (RFC 4226 section 4: "MUST be at least 128 bits", 160 recommended).
MIN_SECRET_BYTES = 16
SECRET_BYTES = 20

#: What Home Assistant's MQTT lock publishes (discovery `command_template`; `value` is LOCK / UNLOCK, `code`
#: what was typed, None when nothing was).
HA_COMMAND_TEMPLATE = '{"action": "{{ value }}", "code": "{{ code or \'\' }}"}'
#: The lock's `code_format`: HA checks it before it sends anything. Empty is allowed so that LOCK needs no
#: code (locking only makes the door safer); an UNLOCK without a code is refused by edgeface.
HA_CODE_FORMAT = r"^(\d{6})?$"


class TotpSecretError(ValueError):
    """The configured TOTP secret is not usable base32 of at least 128 bits."""


def new_secret() -> str:
    """A fresh random secret, base32 without padding (what authenticator apps expect)."""
    return base64.b32encode(secrets.token_bytes(SECRET_BYTES)).decode().rstrip("=")


def normalize_secret(secret: str) -> str:
    """A base32 secret as typed or stored (spaces, lower case) in the canonical upper-case form without spaces."""
    return "".join(secret.split()).upper()


def decode_secret(secret: str) -> bytes:
    """The key bytes of a base32 secret (spaces and lower case allowed, padding optional)."""
    clean = normalize_secret(secret).rstrip("=")
    try:
        key = base64.b32decode(clean + "=" * (-len(clean) % 8))
    except (binascii.Error, ValueError):
        raise TotpSecretError("not base32 (letters A-Z and digits 2-7)") from None
    if len(key) < MIN_SECRET_BYTES:
        raise TotpSecretError(f"too short ({len(key) * 8} bits; at least {MIN_SECRET_BYTES * 8} bits, "
                              f"{MIN_SECRET_BYTES * 8 // 5 + 1} base32 characters)")
    return key


def code_at(key: bytes, counter: int, *, digits: int = DIGITS) -> str:
    """HOTP (RFC 4226) of the counter: dynamic truncation of HMAC-SHA1, zero-padded to `digits`."""
    mac = hmac.new(key, counter.to_bytes(8, "big"), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    value = int.from_bytes(mac[offset:offset + 4], "big") & 0x7FFFFFFF
    return str(value % 10 ** digits).zfill(digits)


def code_now(secret: str, now: float) -> str:
    """The TOTP code an authenticator app shows at Unix time `now`."""
    return code_at(decode_secret(secret), int(now // STEP_S))


def otpauth_uri(secret: str, *, account: str, issuer: str = "edgeface") -> str:
    """The otpauth:// URI an authenticator app imports (as a QR code, e.g. `qrencode -t ansiutf8 URI`)."""
    label = urllib.parse.quote(f"{issuer}:{account}")
    query = urllib.parse.urlencode({"secret": secret, "issuer": issuer, "algorithm": "SHA1",
                                    "digits": DIGITS, "period": STEP_S})
    return f"otpauth://totp/{label}?{query}"


@dataclass(frozen=True)
class LockCommand:
    """A command in Home Assistant's lock form: action LOCK or UNLOCK, with the code typed in HA."""

    action: str
    code: str


def parse_lock_command(payload: bytes) -> Optional[LockCommand]:
    """The lock form of an unlock-topic message, or None when it is something else (a signed command).

    Plain `LOCK` / `UNLOCK` (HA without a command_template) are read as actions without a code."""
    if len(payload) > MAX_COMMAND_BYTES:
        return None
    text = payload.decode("utf-8", errors="replace").strip()
    if text in ("LOCK", "UNLOCK"):
        return LockCommand(text, "")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or "action" not in data:
        return None
    action, code = data.get("action"), data.get("code", "")
    if not isinstance(action, str) or not isinstance(code, (str, int)) or isinstance(code, bool):
        return LockCommand("INVALID", "")
    return LockCommand(action.strip().upper(), str(code).strip())


class TotpStore:
    """The last accepted time step and the wrong-code counter, in SQLite (synchronous=FULL: an accepted
    code is on disk before the door opens, so a power cut cannot make it usable again)."""

    def __init__(self, path: Union[str, os.PathLike[str]]) -> None:
        self._lock = threading.Lock()
        Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        create_private_file(path)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS totp_state (key TEXT PRIMARY KEY, value REAL NOT NULL)")

    def get(self, key: str, default: float) -> float:
        with self._lock:
            row = self._db.execute("SELECT value FROM totp_state WHERE key = ?", (key,)).fetchone()
        return default if row is None else float(row[0])

    def put(self, **values: float) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for key, value in values.items():
                    self._db.execute("INSERT INTO totp_state(key, value) VALUES (?, ?) "
                                     "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, float(value)))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class TotpVerifier:
    """Checks one code: right for now +- `window` steps, newer than the last accepted one, not locked out."""

    def __init__(self, secret: str, store: TotpStore, *, window: int = 1, max_failures: int = 5,
                 lockout_s: float = 60.0, max_lockout_s: float = 3600.0) -> None:
        self.key = decode_secret(secret)
        self.store = store
        self.window = window
        self.max_failures = max_failures
        self.lockout_s = lockout_s
        self.max_lockout_s = max_lockout_s
        self._lock = threading.Lock()

    def locked_out_for(self, now: float) -> float:
        """Seconds until codes are checked again (0 = not locked out)."""
        failures = int(self.store.get("failures", 0))
        if failures < self.max_failures:
            return 0.0
        wait = min(self.max_lockout_s, self.lockout_s * 2 ** (failures - self.max_failures))
        return max(0.0, self.store.get("last_failure", 0.0) + wait - now)

    def verify(self, code: str, *, now: float) -> Verdict:
        with self._lock:
            wait = self.locked_out_for(now)
            if wait > 0:
                return Verdict(False, f"too many wrong codes: locked out for {wait:.0f} s more")
            if not code:  # not a guess: no lock-out count
                return Verdict(False, "no code given (type the one-time code from the authenticator app)")
            if not (isinstance(code, str) and len(code) == DIGITS and code.isascii() and code.isdigit()):
                return self._fail(now, f"malformed code (expected {DIGITS} digits)")
            current = int(now // STEP_S)
            matched = None
            for counter in range(current - self.window, current + self.window + 1):
                # compare every candidate (constant time each), so timing does not tell which step matched
                if hmac.compare_digest(code_at(self.key, counter).encode(), code.encode()):
                    matched = counter if matched is None else matched
            if matched is None:
                return self._fail(now, "wrong code")
            if matched <= int(self.store.get("last_counter", -1)):
                return self._fail(now, "code already used (replay)")
            self.store.put(last_counter=matched, failures=0)
            return Verdict(True, "ok")

    def _fail(self, now: float, reason: str) -> Verdict:
        failures = int(self.store.get("failures", 0)) + 1
        self.store.put(failures=failures, last_failure=now)
        if failures >= self.max_failures:
            reason += f" ({failures} wrong in a row: codes are refused for a while)"
        return Verdict(False, reason)

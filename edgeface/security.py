"""File-permission and secret-hygiene helpers shared by every stage that writes state.

Why: the gallery holds biometric templates (and, with gallery.keep_crops, face images), the audit log
says who came and went, the outbox holds the same events: on a shared Pi or a copied SD card these must
be readable by the edgeface user only. So the state directory is 0700 and every file in it 0600
(including SQLite's -wal/-shm side files, which SQLite creates with the process umask).
Secrets (MQTT password, remote-unlock HMAC key) must never reach a log line: `SecretRedactor` masks
them in every record as a last line of defence.

Remote-unlock command verification (HMAC-SHA256, freshness, single use) lives in edgeface.events.remote.
"""
from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
DIR_MODE = 0o700
FILE_MODE = 0o600
#: Side files SQLite creates next to a database.
SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def ensure_private_dir(path: PathLike) -> Path:
    """Create `path` (and parents) as 0700, or tighten an existing directory we own to 0700.

    Parents that already exist are left alone (e.g. /var/lib); only the leaf is ours.
    """
    p = Path(path)
    p.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    st = p.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{p} is not a directory")
    if stat.S_IMODE(st.st_mode) & 0o077:
        if st.st_uid == os.geteuid():
            os.chmod(p, DIR_MODE)
            log.warning("tightened permissions of %s from %04o to 0700", p, stat.S_IMODE(st.st_mode))
        else:
            log.warning("state directory %s is accessible to other users (mode %o) and not ours to change",
                        p, stat.S_IMODE(st.st_mode))
    return p


def make_private(path: PathLike) -> None:
    """chmod 0600 a file that exists (no-op when it does not); SQLite side files included. A file that was
    looser (e.g. 0644 from an older install or a copy) is logged, so the operator learns it was exposed."""
    for suffix in SQLITE_SUFFIXES:
        f = Path(f"{os.fspath(path)}{suffix}")
        try:
            if f.is_file():
                mode = stat.S_IMODE(f.stat().st_mode)
                if mode != FILE_MODE:
                    os.chmod(f, FILE_MODE)
                    if mode & 0o077:
                        log.warning("tightened permissions of %s from %04o to 0600", f, mode)
        except FileNotFoundError:  # a -wal/-shm file vanished between the checks (checkpoint)
            pass


def create_private_file(path: PathLike) -> Path:
    """Create an empty file 0600 if missing (so a database opened next never exists with looser bits)."""
    p = Path(path)
    ensure_private_dir(p.parent) if not p.parent.exists() else None
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, FILE_MODE)
    os.close(fd)
    make_private(p)
    return p


def write_private_atomic(path: PathLike, data: bytes) -> None:
    """Replace `path` with `data`, 0600, through a temp file beside it, fsync and a rename (the folder synced too):
    a crash or a full disk leaves the old file or the new one, never half of either, and never a readable one."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Temporarily set umask 077: files created inside (SQLite's -wal/-shm too) come out 0600/0700.

    The umask is process-wide; the daemon sets it once at start-up (and the systemd unit has UMask=0077),
    this context manager is for short single-threaded sections such as the CLI opening a database.
    """
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def permission_problems(paths: Iterable[PathLike]) -> list[str]:
    """One line per state path readable or writable by group/others (what `check` should report)."""
    problems = []
    for path in paths:
        p = Path(path)
        if not p.exists():
            continue
        mode = stat.S_IMODE(p.stat().st_mode)
        want = DIR_MODE if p.is_dir() else FILE_MODE
        if mode & 0o077:
            problems.append(f"{p}: mode {mode:04o}, expected {want:04o} (chmod {want:o} {p})")
    return problems


class SecretRedactor(logging.Filter):
    """Replace every known secret value in a log record's final message (and exception text) with ***.

    Attached to handlers (not loggers) so records from every library pass through it.
    """

    MASK = "***"

    def __init__(self, secrets: Iterable[Optional[str]] = ()) -> None:
        super().__init__()
        self._secrets: list[str] = []
        for s in secrets:
            self.add(s)

    def add(self, secret: Optional[str]) -> None:
        # Very short values would mask innocent text everywhere; config refuses them elsewhere anyway.
        if secret and len(secret) >= 4 and secret not in self._secrets:
            self._secrets.append(secret)
            self._secrets.sort(key=len, reverse=True)

    def redact(self, text: str) -> str:
        for s in self._secrets:
            if s in text:
                text = text.replace(s, self.MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001  (a bad format string: leave it to the handler)
            return True
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


def install_redaction(secrets: Iterable[Optional[str]], logger: Optional[logging.Logger] = None) -> SecretRedactor:
    """Attach one SecretRedactor to every handler of `logger` (default: the root logger)."""
    target = logger or logging.getLogger()
    redactor = SecretRedactor(secrets)
    for handler in target.handlers:
        handler.addFilter(redactor)
    return redactor

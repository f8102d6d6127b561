"""The runtime access switch (Home Assistant's *Access enabled* switch), kept in `<state_dir>/access.json`.

It can only take access away: the config's `policy.enabled: false` stays off whatever the switch says.
Fail-secure: a state file that exists but cannot be read or parsed means OFF (logged), and a change
that cannot be written leaves access OFF (turning off always works in memory; turning on needs the
write to succeed).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Union

from edgeface.security import make_private, write_private_atomic

log = logging.getLogger(__name__)


class AccessSwitch:
    def __init__(self, path: Union[str, os.PathLike[str]], *, config_enabled: bool = True) -> None:
        self.path = Path(path)
        self.config_enabled = config_enabled
        self._lock = threading.Lock()
        self.error = ""
        self._on = self._load()

    def _load(self) -> bool:
        try:
            make_private(self.path)  # a file from an older install or a copy may be 0644 (tightening is logged)
        except OSError as exc:
            log.warning("access switch state %s: cannot make it private: %s", self.path, exc.strerror or exc)
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return True  # never switched: the config decides
        except (OSError, UnicodeDecodeError) as exc:
            return self._unreadable(f"cannot read it: {exc}")
        try:
            data = json.loads(text)
        except ValueError:
            return self._unreadable("not valid JSON")
        if not isinstance(data, dict) or not isinstance(data.get("enabled"), bool):
            return self._unreadable('expected {"enabled": true|false}')
        return bool(data["enabled"])

    def _unreadable(self, why: str) -> bool:
        self.error = f"access switch state {self.path}: {why}; access is OFF until it is switched on again"
        log.error("%s", self.error)
        return False

    @property
    def on(self) -> bool:
        """What the switch shows: access allowed by both the config and the switch."""
        with self._lock:
            return self.config_enabled and self._on

    def reason_off(self) -> str:
        """"" when access is on, else why it is off (the Policy's deny reason)."""
        with self._lock:
            if not self.config_enabled:
                return "access globally disabled"
            if not self._on:
                return "access switched off (unreadable switch state)" if self.error else "access switched off"
            return ""

    def set(self, on: bool, *, by: str = "mqtt") -> str:
        """Switch; returns "" when done, else why not (the state stays or becomes OFF)."""
        with self._lock:
            if on and not self.config_enabled:
                return "policy.enabled is false in the config; the switch cannot turn access on"
            if not on:
                self._on = False  # before the write: a failing disk must not keep the door usable
            try:
                self._write(on, by)
            except OSError as exc:
                why = f"cannot write {self.path}: {exc.strerror or exc}"
                log.error("access switch: %s; access stays OFF", why)
                self._on = False
                return why
            self._on = on
            self.error = ""
            return ""

    def _write(self, on: bool, by: str) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private_atomic(self.path, json.dumps({"enabled": on, "changed": time.time(), "by": by}).encode())

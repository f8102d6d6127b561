"""Commands that arrive over MQTT: a signed remote unlock, Home Assistant's lock (LOCK, or UNLOCK with a one-time
code) and the Access enabled switch.

An accepted unlock is recorded (audit row, durable door event) before the relay moves; a refused one goes through
the refusal limiter, so a flood of bad commands neither delays a valid one nor fills the audit log. Retained
commands never act: a broker replaying an old message must not open the door.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from edgeface.config import EdgefaceConfig, read_secret
from edgeface.daemon.reporting import EventRecorder
from edgeface.errors import ConfigError
from edgeface.events.access import AccessSwitch
from edgeface.events.remote import Verdict

log = logging.getLogger(__name__)


class RemoteCommands:
    """The MQTT command handler (`on_command`). `mqtt` is set once the broker client exists (the client needs this
    handler to be built)."""

    def __init__(self, cfg: EdgefaceConfig, *, door: Any, access: AccessSwitch, recorder: EventRecorder,
                 clock: Callable[[], float], verifier: Any = None, totp: Any = None, refusals: Any = None) -> None:
        self.cfg, self.door, self.access, self.recorder, self._clock = cfg, door, access, recorder, clock
        self.audit = recorder.audit
        self.verifier, self.totp, self.refusals = verifier, totp, refusals
        self.mqtt: Any = None
        self.hass: Any = None  # HA's Last refused unlock sensor
        self._refusal_timer: Optional[threading.Timer] = None

    @classmethod
    def from_config(cls, cfg: EdgefaceConfig, own: Callable[[Any], Any], state: Callable[[str], Path],
                    **parts: Any) -> "RemoteCommands":
        """The verifiers mqtt.remote_unlock / remote_unlock_totp ask for; a missing secret is a ConfigError.
        `own(part)` hands a store to the daemon to close; `state(name)` is a file in state_dir."""
        verifier = totp = refusals = None
        if cfg.mqtt.remote_unlock:
            from edgeface.events.remote import CommandVerifier, NonceStore, RefusalLimiter

            secret = read_secret(cfg.mqtt.remote_unlock_secret_env)
            if not secret and not cfg.mqtt.remote_unlock_totp:
                raise ConfigError(f"mqtt.remote_unlock is true but the secret "
                                  f"${cfg.mqtt.remote_unlock_secret_env} (environment or systemd credential) "
                                  "is not set")
            if secret:  # signed commands (optional when one-time codes are on)
                nonces = own(NonceStore(state("nonces.db"), keep_s=4 * cfg.mqtt.command_max_age_s + 60))
                verifier = CommandVerifier(secret, cfg.door.door_id, max_age_s=cfg.mqtt.command_max_age_s,
                                           nonces=nonces)
            refusals = RefusalLimiter()
            if cfg.mqtt.remote_unlock_totp:
                totp = _build_totp(cfg, own, state)
        return cls(cfg, verifier=verifier, totp=totp, refusals=refusals, **parts)

    # ------------------------------------------------------------------ dispatch (the MQTT thread)
    def on_command(self, topic: str, payload: bytes, retained: bool) -> None:
        assert self.mqtt is not None
        if topic == self.mqtt.topics.access_command:
            self._on_access_command(payload, retained)
            return
        if not self.cfg.mqtt.remote_unlock:
            return
        from edgeface.events.totp import parse_lock_command

        command = parse_lock_command(payload)
        if command is not None:  # Home Assistant's lock: LOCK, or UNLOCK with a one-time code
            self._on_lock_command(command.action, command.code, retained)
            return
        if self.verifier is None:
            verdict = Verdict(False, "signed commands are off (no remote unlock secret is set)")
        else:
            verdict = self.verifier.verify(payload, retained=retained, now=self._clock())
        self._unlock_verdict(verdict, "signed")

    def _on_lock_command(self, action: str, code: str, retained: bool) -> None:
        if action == "LOCK":
            if retained:
                log.warning("retained LOCK command ignored")
                return
            was = self.door.unlocked
            self.door.release()  # ends an unlock pulse; the relay state acknowledges it
            if not was:
                self.mqtt.set_state(self.mqtt.topics.relay, self.door.state, force=True)
            self.audit.record("remote_lock", result="accepted", was_unlocked=was)
            log.warning("remote lock (the relay was %s)", "unlocked" if was else "already locked")
            self.recorder.door_event("remote_lock", {"was_unlocked": was})
            return
        if retained:
            verdict = Verdict(False, "retained command ignored")
        elif action != "UNLOCK":
            verdict = Verdict(False, f"unknown action {action[:16]!r} (expected LOCK or UNLOCK)")
        elif self.totp is None:
            verdict = Verdict(False, "one-time codes are off (mqtt.remote_unlock_totp: false)")
        else:
            verdict = self.totp.verify(code, now=self._clock())
        self._unlock_verdict(verdict, "totp")

    def _unlock_verdict(self, verdict: Verdict, method: str) -> None:
        """An accepted unlock is recorded first (audit row, durable door event), then the relay moves; a refused one
        goes through the refusal limiter."""
        if not verdict.accepted:
            self._on_refused(verdict, method)
            return
        self.audit.record("remote_unlock", result="accepted", reason=verdict.reason, nonce=verdict.nonce, method=method)
        detail = {"method": method, **({"nonce": verdict.nonce} if verdict.nonce else {})}
        problem = self.recorder.door_event("remote_unlock", detail, durable=True)  # record, then open
        if problem is not None:
            log.error("remote unlock (%s%s) withheld: the event could not be recorded (%s); the door stays locked",
                      method, f", nonce {verdict.nonce}" if verdict.nonce else "", problem)
            return
        log.warning("remote unlock accepted (%s%s)", method, f", nonce {verdict.nonce}" if verdict.nonce else "")
        self.door.pulse()

    # ------------------------------------------------------------------ refusals
    def _on_refused(self, verdict: Any, method: str = "signed") -> None:
        """A refused command: recorded one by one up to the limiter's burst (10 per 10 s), then only counted (one
        summary row and event per window), so a flood neither delays valid commands nor fills the audit log."""
        if self.refusals is None or self.refusals.admit(verdict.reason):
            log.warning("remote unlock refused (%s): %s", method, verdict.reason)
            self.audit.record("remote_unlock", result="refused", reason=verdict.reason, nonce=verdict.nonce,
                              method=method)
            self.recorder.door_event("remote_unlock_refused", {"method": method, "reason": verdict.reason})
            self._refusal_state(verdict.reason, method)
        elif self._refusal_timer is None:
            self._refusal_timer = threading.Timer(self.refusals.window_s, self.flush_refusals)
            self._refusal_timer.daemon = True
            self._refusal_timer.start()
        self.flush_refusals(from_timer=False)

    def flush_refusals(self, *, force: bool = False, from_timer: bool = True) -> None:
        """Record the refusals counted in a window that ended (all of them, with force) as one row and one event."""
        if from_timer or force:
            timer, self._refusal_timer = self._refusal_timer, None
            if timer is not None and force:
                timer.cancel()
        counts = self.refusals.summary(force=force) if self.refusals is not None else None
        if not counts:
            return
        n = sum(counts.values())
        reason = f"{n} more refused commands (rate-limited: recorded as one)"
        log.warning("remote unlock refused: %s: %s", reason, ", ".join(f"{k} x{v}" for k, v in counts.items()))
        self.audit.record("remote_unlock", result="refused", reason=reason, count=n, reasons=counts)
        self.recorder.door_event("remote_unlock_refused", {"reason": reason, "count": n, "reasons": counts})
        self._refusal_state(reason, "rate-limited", count=n)

    def _refusal_state(self, reason: str, method: str, *, count: int = 1) -> None:
        """The Last refused unlock sensor beside HA's lock, with when one-time codes are accepted again."""
        if self.hass is not None:
            wait = self.totp.locked_out_for(self._clock()) if self.totp is not None else 0.0
            self.hass.refusal(reason, method, locked_out_s=wait, count=count)

    def close(self) -> None:
        """The last window's refusal count (before the events are flushed to the broker)."""
        if self.refusals is not None:
            self.flush_refusals(force=True)

    # ------------------------------------------------------------------ the Access enabled switch
    def _on_access_command(self, payload: bytes, retained: bool) -> None:
        text = payload.decode("utf-8", errors="replace").strip().upper()
        if retained or text not in ("ON", "OFF"):
            why = "retained command ignored" if retained else f"expected ON or OFF, got {text[:16]!r}"
            log.warning("access switch command refused: %s", why)
        else:
            why = self.access.set(text == "ON")
            log.warning("access switched %s over MQTT%s", text, f" refused: {why}" if why else "")
        self.audit.record("access_switch", result="refused" if why else text.lower(), reason=why)
        self.mqtt.set_state(self.mqtt.topics.access, "ON" if self.access.on else "OFF", force=True)


def _build_totp(cfg: EdgefaceConfig, own: Callable[[Any], Any], state: Callable[[str], Path]) -> Any:
    from edgeface.events.totp import TotpSecretError, TotpStore, TotpVerifier

    env = cfg.mqtt.totp_secret_env
    secret = read_secret(env)
    if not secret:
        raise ConfigError(f"mqtt.remote_unlock_totp is true but the TOTP secret ${env} (environment or systemd "
                          "credential) is not set; make one with `edgeface door totp-init`")
    store = own(TotpStore(state("totp.db")))
    try:
        return TotpVerifier(secret, store)
    except TotpSecretError as exc:
        raise ConfigError(f"${env} (the TOTP secret): {exc}") from None

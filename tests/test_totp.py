"""One-time unlock codes (RFC 6238): the RFC's test vectors, each code once (also after a restart), the +-1 step
window, the lock-out after wrong codes, Home Assistant's lock command form, the secret CLI; the access switch
state file (fail-secure when unreadable)."""
from __future__ import annotations

import base64
import json
import os
import urllib.parse
from pathlib import Path

import pytest

from edgeface.events.access import AccessSwitch
from edgeface.events.totp import (HA_CODE_FORMAT, HA_COMMAND_TEMPLATE, TotpSecretError, TotpStore, TotpVerifier, code_at,
                           code_now, decode_secret, new_secret, otpauth_uri, parse_lock_command)

RFC_KEY = b"12345678901234567890"
SECRET = base64.b32encode(RFC_KEY).decode()
T0 = 1_800_000_015.0  # middle of a 30 s step


@pytest.mark.parametrize("t, code", [(59, "94287082"), (1111111109, "07081804"), (1111111111, "14050471"),
                                     (1234567890, "89005924"), (2000000000, "69279037"), (20000000000, "65353130")])
def test_rfc6238_sha1_test_vectors(t, code):
    assert code_at(RFC_KEY, t // 30, digits=8) == code


@pytest.fixture()
def verifier(tmp_path):
    store = TotpStore(tmp_path / "totp.db")
    yield TotpVerifier(SECRET, store)
    store.close()


def test_a_code_is_accepted_once_and_older_codes_never_again(verifier):
    code = code_now(SECRET, T0)
    assert verifier.verify(code, now=T0).accepted
    again = verifier.verify(code, now=T0 + 1)
    assert not again.accepted and "already used" in again.reason
    # the previous step's code is inside the window but older than the accepted one
    assert "already used" in verifier.verify(code_now(SECRET, T0 - 30), now=T0 + 2).reason
    assert verifier.verify(code_now(SECRET, T0 + 30), now=T0 + 30).accepted  # the next step's code works


def test_one_step_either_side_is_accepted_two_are_not(tmp_path):
    for offset, ok in ((-30, True), (30, True), (-60, False), (60, False)):
        store = TotpStore(tmp_path / f"t{offset}.db")
        v = TotpVerifier(SECRET, store)
        assert v.verify(code_now(SECRET, T0 + offset), now=T0).accepted is ok, offset
        store.close()


def test_used_codes_stay_used_after_a_restart(tmp_path):
    code = code_now(SECRET, T0)
    s1 = TotpStore(tmp_path / "totp.db")
    assert TotpVerifier(SECRET, s1).verify(code, now=T0).accepted
    s1.close()
    s2 = TotpStore(tmp_path / "totp.db")
    assert "already used" in TotpVerifier(SECRET, s2).verify(code, now=T0 + 5).reason
    s2.close()
    assert oct(os.stat(tmp_path / "totp.db").st_mode & 0o777) == "0o600"


def test_wrong_codes_lock_out_even_the_right_code_and_the_lock_out_grows(tmp_path):
    store = TotpStore(tmp_path / "totp.db")
    v = TotpVerifier(SECRET, store, max_failures=5, lockout_s=60)
    right = code_now(SECRET, T0)
    wrong = "000000" if right != "000000" else "111111"
    for i in range(5):
        assert v.verify(wrong, now=T0 + i).reason.startswith("wrong code")
    locked = v.verify(right, now=T0 + 5)
    assert not locked.accepted and "locked out" in locked.reason
    # after the lock-out the right code works and resets the count
    later = T0 + 4 + 61
    assert v.verify(code_now(SECRET, later), now=later).accepted
    for i in range(5):
        v.verify(wrong, now=later + 1 + i)
    assert 55 < v.locked_out_for(later + 6) <= 60
    assert "locked out" in v.verify(wrong, now=later + 30).reason  # refused unchecked: not counted
    after = later + 5 + 61
    assert v.verify(wrong, now=after).reason.startswith("wrong code")  # the next wrong one doubles it
    assert 110 < v.locked_out_for(after + 1) <= 120
    store.close()
    # the count is on disk: a restart does not reset it
    s2 = TotpStore(tmp_path / "totp.db")
    assert TotpVerifier(SECRET, s2, lockout_s=60).locked_out_for(after + 1) > 110
    s2.close()


@pytest.mark.parametrize("code, why", [("", "no code"), ("12345", "malformed"), ("12345a", "malformed"),
                                       ("١٢٣٤٥٦", "malformed"), ("1234567", "malformed")])
def test_malformed_codes_are_refused(verifier, code, why):
    v = verifier.verify(code, now=T0)
    assert not v.accepted and why in v.reason


def test_an_empty_code_is_not_counted_as_a_guess(verifier):
    for i in range(10):
        verifier.verify("", now=T0 + i)
    assert verifier.locked_out_for(T0 + 10) == 0
    assert verifier.verify(code_now(SECRET, T0 + 10), now=T0 + 10).accepted


def test_secrets():
    s = new_secret()
    assert len(decode_secret(s)) == 20 and len(s) == 32
    assert decode_secret(s.lower()[:16] + " " + s.lower()[16:]) == decode_secret(s)  # as people type it
    with pytest.raises(TotpSecretError, match="base32"):
        decode_secret("not base32!")
    with pytest.raises(TotpSecretError, match="too short"):
        decode_secret(base64.b32encode(b"short").decode())


def test_otpauth_uri_has_what_authenticator_apps_read():
    uri = otpauth_uri(SECRET, account="front")
    parsed = urllib.parse.urlparse(uri)
    assert parsed.scheme == "otpauth" and parsed.netloc == "totp"
    assert urllib.parse.unquote(parsed.path) == "/edgeface:front"
    q = dict(urllib.parse.parse_qsl(parsed.query))
    assert q == {"secret": SECRET, "issuer": "edgeface", "algorithm": "SHA1", "digits": "6", "period": "30"}


def test_ha_lock_commands_are_parsed():
    import re

    assert re.match(HA_CODE_FORMAT, "123456") and re.match(HA_CODE_FORMAT, "")
    assert not re.match(HA_CODE_FORMAT, "12345") and not re.match(HA_CODE_FORMAT, "1234567")
    # what HA 2025.4 renders from HA_COMMAND_TEMPLATE (tests/test_hass_core.py sends it through a real HA)
    assert HA_COMMAND_TEMPLATE == '{"action": "{{ value }}", "code": "{{ code or \'\' }}"}'
    cmd = parse_lock_command(b'{"action": "UNLOCK", "code": "012345"}')
    assert (cmd.action, cmd.code) == ("UNLOCK", "012345")
    cmd = parse_lock_command(b'{"action": "LOCK", "code": ""}')
    assert (cmd.action, cmd.code) == ("LOCK", "")
    assert parse_lock_command(b"UNLOCK").action == "UNLOCK" and parse_lock_command(b"LOCK").code == ""
    assert parse_lock_command(json.dumps({"nonce": "abcdefgh", "ts": 1, "sig": "x"}).encode()) is None
    assert parse_lock_command(b"garbage") is None
    assert parse_lock_command(json.dumps({"action": ["x"]}).encode()).action == "INVALID"
    assert parse_lock_command(b'{"action": "UNLOCK", "code": "' + b"1" * 2000 + b'"}') is None  # too large


def test_totp_cli_creates_a_private_secret_and_prints_the_uri(tmp_path, capsys, monkeypatch):
    from edgeface.cli import main

    out = tmp_path / "unlock-totp"
    assert main(["door", "totp-init", "--out", str(out)]) == 0
    uri = capsys.readouterr().out.strip()
    secret = out.read_text().strip()
    assert oct(out.stat().st_mode & 0o777) == "0o600" and len(decode_secret(secret)) == 20
    assert uri == otpauth_uri(secret, account="front")
    assert main(["door", "totp-init", "--out", str(out)]) == 2  # never overwrites by accident
    assert "already exists" in capsys.readouterr().err and out.read_text().strip() == secret
    monkeypatch.setenv("EDGEFACE_UNLOCK_TOTP", secret)
    assert main(["door", "totp-uri"]) == 0 and capsys.readouterr().out.strip() == uri
    monkeypatch.setenv("EDGEFACE_UNLOCK_TOTP", "bad!")
    assert main(["door", "totp-uri"]) == 2 and "EDGEFACE_UNLOCK_TOTP" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- the access switch
def test_access_switch_is_on_until_switched_and_remembers(tmp_path):
    path = tmp_path / "access.json"
    sw = AccessSwitch(path)
    assert sw.on and sw.reason_off() == ""
    assert sw.set(False) == ""
    assert not sw.on and sw.reason_off() == "access switched off"
    assert not AccessSwitch(path).on  # after a restart
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert AccessSwitch(path).set(True) == "" and AccessSwitch(path).on


@pytest.mark.parametrize("content", [b"", b"{", b'{"enabled": "yes"}', b"\xff\xfe", b"[]"])
def test_unreadable_access_switch_state_means_off(tmp_path, content, caplog):
    path = tmp_path / "access.json"
    path.write_bytes(content)
    sw = AccessSwitch(path)
    assert not sw.on and "unreadable" in sw.reason_off()
    assert str(path) in sw.error and any(r.levelname == "ERROR" for r in caplog.records)


def test_config_disabled_access_cannot_be_switched_on(tmp_path):
    sw = AccessSwitch(tmp_path / "access.json", config_enabled=False)
    assert not sw.on and sw.reason_off() == "access globally disabled"
    assert "policy.enabled is false" in sw.set(True)
    assert not sw.on


def test_a_switch_state_that_cannot_be_written_leaves_access_off(tmp_path):
    folder = tmp_path / "state"
    folder.mkdir()
    sw = AccessSwitch(folder / "access.json")
    assert sw.on
    folder.rmdir()
    folder.write_text("a file where the state directory was")  # every write fails now, also as root
    assert "cannot write" in sw.set(False) and not sw.on  # off in memory although the disk said no
    assert "cannot write" in sw.set(True) and not sw.on  # on needs the write


def test_a_switched_off_door_denies_a_known_face_with_the_reason(tmp_path):
    from edgeface.config import PolicyConfig
    from edgeface.decide import Policy
    from edgeface.types import Match

    sw = AccessSwitch(tmp_path / "access.json")
    policy = Policy(PolicyConfig(min_frames=2, window_frames=3, cooldown_s=0), access=sw.reason_off)
    match = Match(1, "barack_obama", 0.1, 0.4)
    assert policy.observe(100.0, match, face_size=200).action == "none"
    assert policy.observe(100.2, match, face_size=200).action == "grant"
    sw.set(False)
    policy.observe(200.0, match, face_size=200)
    d = policy.observe(200.2, match, face_size=200)
    assert (d.action, d.reason) == ("deny", "access switched off")


def test_random_unlock_topic_payloads_never_crash_the_parser_nor_open(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    store = TotpStore(tmp_path / "totp.db")
    v = TotpVerifier(SECRET, store, max_failures=10**9)  # no lock-out: every guess is really checked
    now = T0
    valid = {code_now(SECRET, now + k * 30) for k in (-1, 0, 1)}

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=300),
                     st.builds(lambda a, c: json.dumps({"action": a, "code": c}).encode(),
                               st.one_of(st.text(max_size=8), st.sampled_from(["UNLOCK", "LOCK", "unlock"])),
                               st.one_of(st.text(max_size=10), st.integers(), st.none(), st.booleans()))))
    def check(payload):
        cmd = parse_lock_command(payload)
        if cmd is not None and cmd.action == "UNLOCK" and cmd.code not in valid:
            assert not v.verify(cmd.code, now=now).accepted

    check()
    store.close()


def test_one_time_codes_need_remote_unlock_and_a_valid_secret(tmp_path, analyzer, monkeypatch):
    from edgeface.config import parse_config
    from edgeface.daemon.app import Daemon
    from edgeface.errors import ConfigError
    from edgeface.frames import FolderSource

    faces = Path(__file__).resolve().parent / "fixtures" / "faces"
    with pytest.raises(ConfigError, match="remote_unlock_totp is true but remote_unlock is false"):
        parse_config({"mqtt": {"remote_unlock_totp": True}})

    def build():
        cfg = parse_config({"state_dir": str(tmp_path / "state"), "door": {"pin_factory": "mock"},
                            "mqtt": {"remote_unlock": True, "remote_unlock_totp": True}})
        Daemon(cfg, analyzer=analyzer, source=FolderSource(faces)).close()

    monkeypatch.delenv("EDGEFACE_UNLOCK_SECRET", raising=False)
    monkeypatch.delenv("EDGEFACE_UNLOCK_TOTP", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match=r"\$EDGEFACE_UNLOCK_TOTP .*totp-init"):
        build()
    monkeypatch.setenv("EDGEFACE_UNLOCK_TOTP", "JBSWY3DP")  # 40 bits
    with pytest.raises(ConfigError, match=r"\$EDGEFACE_UNLOCK_TOTP \(the TOTP secret\): too short"):
        build()
    monkeypatch.setenv("EDGEFACE_UNLOCK_TOTP", SECRET)
    build()  # the signing secret is optional with one-time codes


def test_totp_init_needs_only_the_door_id_and_checks_before_writing(tmp_path, capsys):
    """An unrelated config error is a warning, not a stop after the secret was written; a bad door id or an
    unusable output stops it before anything is written."""
    from edgeface.cli import main

    cfg = tmp_path / "config.yaml"
    cfg.write_text("door:\n  door_id: back\npolicy:\n  timezone: Mars/Olympus\n")
    out = tmp_path / "etc" / "unlock-totp"
    assert main(["--config", str(cfg), "door", "totp-init", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    secret = out.read_text().strip()
    assert captured.out.strip() == otpauth_uri(secret, account="back")
    assert "warning: the config has other problems" in captured.err and "timezone" in captured.err

    cfg.write_text("door:\n  door_id: 'no spaces allowed'\n")
    other = tmp_path / "other"
    assert main(["--config", str(cfg), "door", "totp-init", "--out", str(other)]) == 2
    assert "door.door_id = 'no spaces allowed'" in capsys.readouterr().err and not other.exists()
    assert main(["--config", str(cfg), "door", "totp-init", "--door-id", "side", "--out", str(other)]) == 0
    assert capsys.readouterr().out.strip() == otpauth_uri(other.read_text().strip(), account="side")

    cfg.write_text("door: [unclosed\n")
    third = tmp_path / "third"
    assert main(["--config", str(cfg), "door", "totp-init", "--out", str(third)]) == 2
    assert "give --door-id" in capsys.readouterr().err and not third.exists()
    assert main(["--config", str(cfg), "door", "totp-init", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err  # click says so, before anything is written

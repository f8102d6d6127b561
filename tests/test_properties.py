"""Property-based tests (hypothesis): hostile or random input gives a clear error, never a crash, never an unlock.

- image decoding of random bytes and of damaged real JPEGs raises nothing but ImageError;
- configuration parsing of random mappings raises nothing but ConfigError;
- remote-unlock command verification of random payloads never accepts without the secret, and the
  daemon's command handler never moves the relay for them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeface.config import EdgefaceConfig, parse_config
from edgeface.errors import ConfigError, ImageError
from edgeface.vision.images import decode_image
from edgeface.events.remote import CommandVerifier, NonceStore, sign

REPO = Path(__file__).resolve().parents[1]
JPEG = (REPO / "tests" / "fixtures" / "faces" / "elon_musk").glob("*.jpg").__next__().read_bytes()
SECRET = "property-test-secret-0123456789"

# ------------------------------------------------------------------------------------------------ images


def _check_decoded(data: bytes) -> None:
    try:
        img = decode_image(data)
    except ImageError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.flags["C_CONTIGUOUS"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_decode_or_raise_image_error(data):
    _check_decoded(data)


@settings(max_examples=150, deadline=None)
@given(cut=st.integers(0, len(JPEG)), flips=st.lists(st.tuples(st.integers(0, len(JPEG) - 1), st.integers(1, 255)),
                                                     max_size=20))
def test_damaged_jpeg_decodes_or_raises_image_error(cut, flips):
    data = bytearray(JPEG)
    for pos, xor in flips:
        data[pos] ^= xor
    _check_decoded(bytes(data[:cut]))


@pytest.mark.parametrize("header", [
    # PNG IHDR claiming 100000 x 100000 pixels (40 GB decoded): refused before allocating
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x01\x86\xa0\x00\x01\x86\xa0\x08\x02\x00\x00\x00",
    # a BMP header claiming 60000 x 60000
    b"BM" + (0).to_bytes(4, "little") + b"\0\0\0\0" + (54).to_bytes(4, "little") + (40).to_bytes(4, "little")
    + (60000).to_bytes(4, "little") + (60000).to_bytes(4, "little") + (1).to_bytes(2, "little")
    + (24).to_bytes(2, "little") + b"\0" * 24,
])
def test_decompression_bombs_are_refused(header):
    with pytest.raises(ImageError):
        decode_image(header + b"\0" * 1024)


# ------------------------------------------------------------------------------------------------ config

SECTIONS = {name: field.annotation for name, field in EdgefaceConfig.model_fields.items()}
KEYS = sorted({k for name in SECTIONS for k in getattr(SECTIONS[name], "model_fields", {})} | set(SECTIONS))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=30), st.sampled_from(["", "0", "-1", "1e309", "nan", "inf", "short", "full",
                                                           "mock", "UTC", "Mars/Olympus", "../../etc/passwd"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8),
                                                                       inner, max_size=4)), max_leaves=12)
configs = st.dictionaries(st.sampled_from(sorted(SECTIONS)) | st.text(max_size=10),
                          st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=10), values, max_size=6) | values,
                          max_size=5)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_random_config_mappings_raise_only_config_error(data):
    try:
        cfg = parse_config(data, source="fuzz.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml")
        return
    assert isinstance(cfg, EdgefaceConfig)
    assert cfg.policy.min_frames <= cfg.policy.window_frames


@settings(max_examples=100, deadline=None)
@given(st.one_of(scalars, st.lists(scalars, max_size=3)))
def test_non_mapping_top_level_is_a_config_error(data):
    if isinstance(data, dict) or data is None:
        return
    with pytest.raises(ConfigError):
        parse_config(data)


# ------------------------------------------------------------------------------------------------ commands

@pytest.fixture(scope="module")
def verifier(tmp_path_factory):
    store = NonceStore(tmp_path_factory.mktemp("nonces") / "n.db", keep_s=600)
    yield CommandVerifier(SECRET, "front", max_age_s=30, nonces=store)
    store.close()


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                                     st.text(max_size=40)),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=8)
command_like = st.fixed_dictionaries({}, optional={
    "nonce": st.text(min_size=0, max_size=140) | json_values,
    "ts": st.integers(-2**40, 2**40) | st.floats(allow_nan=True, allow_infinity=True) | json_values,
    "sig": st.text(alphabet="0123456789abcdefABCDEF", min_size=0, max_size=70) | json_values,
    "door": json_values})


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=300), command_like.map(lambda d: json.dumps(d).encode())), st.booleans())
def test_random_commands_are_never_accepted(verifier, payload, retained):
    verdict = verifier.verify(payload, retained=retained, now=time.time())
    assert not verdict.accepted
    assert verdict.reason


@settings(max_examples=300, deadline=None)
@given(nonce=st.text(min_size=8, max_size=128), ts=st.integers(-2**70, 2**70) | st.floats(),
       sig=st.text(max_size=80) | st.text(alphabet="0123456789abcdef", min_size=64, max_size=64))
def test_well_formed_commands_with_random_signatures_are_refused(verifier, nonce, ts, sig):
    """Every field well-typed, so the signature comparison itself is exercised (non-ASCII, NaN, huge ints)."""
    payload = json.dumps({"nonce": nonce, "ts": ts, "sig": sig}).encode()
    verdict = verifier.verify(payload, retained=False, now=time.time())
    assert not verdict.accepted and verdict.reason


@settings(max_examples=200, deadline=None)
@given(nonce=st.text(min_size=8, max_size=64), skew=st.floats(-1000, 1000), tamper=st.sampled_from(
    ["door", "nonce", "ts", "secret"]))
def test_signed_but_tampered_commands_are_refused(verifier, nonce, skew, tamper):
    now = time.time()
    ts = int(now + skew)
    sig = sign(SECRET, "front", nonce, ts)
    if tamper == "door":
        sig = sign(SECRET, "back", nonce, ts)
    elif tamper == "secret":
        sig = sign(SECRET[:-1], "front", nonce, ts)
    payload = {"nonce": nonce + ("x" if tamper == "nonce" else ""), "ts": ts + (1 if tamper == "ts" else 0), "sig": sig}
    assert not verifier.verify(json.dumps(payload).encode(), retained=False, now=now).accepted

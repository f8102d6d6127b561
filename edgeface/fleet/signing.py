"""Ed25519 keys and signatures (the `cryptography` package). The admin holds the private key; doors the public one.

What is signed is the canonical JSON of a change (sorted keys, no spaces) prefixed with its kind, so a signed
heartbeat can never be passed off as a person change and vice versa.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeface.errors import ConfigError
from edgeface.security import write_private_atomic


def canonical(kind: str, body: dict[str, Any]) -> bytes:
    return kind.encode() + b"\n" + json.dumps(body, sort_keys=True, separators=(",", ":"),
                                              ensure_ascii=False).encode()


def key_id(public: Ed25519PublicKey) -> str:
    """A short fingerprint (16 hex) of a public key: named in every envelope and log line."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new admin key (0600, refuses to overwrite) and its public key; returns the key id."""
    if private_path.exists():
        raise ConfigError(f"{private_path} already exists: refusing to overwrite a fleet admin key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    write_private_atomic(private_path, pem)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    tmp = public_path.with_name(public_path.name + ".tmp")
    tmp.write_bytes(pub)
    os.replace(tmp, public_path)
    return key_id(key.public_key())


class Signer:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.key_id = key_id(key.public_key())

    @classmethod
    def load(cls, path: Path) -> "Signer":
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"fleet admin key {path}: cannot read an Ed25519 private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"fleet admin key {path}: expected an Ed25519 private key, got {type(key).__name__}")
        return cls(key)

    def envelope(self, kind: str, body: dict[str, Any]) -> bytes:
        sig = self._key.sign(canonical(kind, body))
        return json.dumps({"kind": kind, "key_id": self.key_id, "body": body,
                           "sig": base64.b64encode(sig).decode()}, sort_keys=True, separators=(",", ":")).encode()


class Verifier:
    def __init__(self, public: Ed25519PublicKey) -> None:
        self._public = public
        self.key_id = key_id(public)

    @classmethod
    def load(cls, path: Path) -> "Verifier":
        try:
            key = serialization.load_pem_public_key(Path(path).read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"fleet.public_key = {str(path)!r}: cannot read an Ed25519 public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"fleet.public_key = {str(path)!r}: expected an Ed25519 public key, got "
                              f"{type(key).__name__}")
        return cls(key)

    def open(self, payload: bytes) -> tuple[str, dict[str, Any]]:
        """(kind, body) of a signed envelope; ValueError with the reason when it is not one signed by our key."""
        try:
            env = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            raise ValueError("not JSON") from None
        if not isinstance(env, dict) or not isinstance(env.get("body"), dict) or not isinstance(env.get("kind"), str):
            raise ValueError("not a fleet envelope (kind, body, sig)")
        sig = env.get("sig")
        if not sig or not isinstance(sig, str):
            raise ValueError("unsigned")
        if env.get("key_id") != self.key_id:
            raise ValueError(f"signed with another key ({env.get('key_id')!r}, this fleet's is {self.key_id})")
        try:
            self._public.verify(base64.b64decode(sig, validate=True), canonical(env["kind"], env["body"]))
        except (InvalidSignature, ValueError):
            raise ValueError("bad signature (forged or altered)") from None
        return env["kind"], env["body"]

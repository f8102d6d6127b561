"""One access list for many doors, synced through the MQTT broker (docs/fleet.md).

An admin signs person changes (Ed25519); every door checks the signature with the public key only, applies the
newest version of each person (hybrid logical clock, last writer wins) to its own SQLite gallery and keeps working
offline. Standard MQTT only: retained per-person topics are the snapshot a new or wiped door catches up from.
"""
from edgeface.fleet.changes import PersonChange, Heartbeat, Rejected, Topics
from edgeface.fleet.hlc import HLC, HybridClock
from edgeface.fleet.signing import Signer, Verifier, generate_keypair

__all__ = ["HLC", "HybridClock", "PersonChange", "Heartbeat", "Rejected", "Topics", "Signer", "Verifier",
           "generate_keypair"]

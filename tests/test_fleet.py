"""Many doors, one access list: signed person changes through REAL mosquitto brokers (a site broker bridged to a
central one), three real daemons on folder cameras with MockFactory relays, each with its own SQLite gallery."""
from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from gpiozero.pins.mock import MockFactory

from edgeface.config import parse_config
from edgeface.daemon.app import Daemon
from edgeface.fleet.admin import FleetAdmin
from edgeface.fleet.changes import PERSON_KIND, PersonChange
from edgeface.fleet.door import FleetDoor
from edgeface.fleet.hlc import HLC, HybridClock
from edgeface.fleet.signing import Signer, generate_keypair
from edgeface.frames import FolderSource
from edgeface.gallery import Gallery
from edgeface.events.hass import validate_discovery
from edgeface.testing import Collector, MosquittoBroker, mosquitto_path, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow,
              pytest.mark.skipif(mosquitto_path() is None, reason="needs mosquitto (apt install mosquitto)")]

FACES = Path(__file__).resolve().parent / "fixtures" / "faces"
OBAMA_ENROLL = [FACES / "barack_obama" / f"barack_obama_0{i}.jpg" for i in (1, 2, 3)]
OBAMA_PROBE = FACES / "barack_obama" / "barack_obama_04.jpg"
GUIDO_ENROLL = [FACES / "guido_van_rossum" / f"guido_van_rossum_0{i}.jpg" for i in (1, 2, 3)]
GUIDO_PROBE = FACES / "guido_van_rossum" / "guido_van_rossum_05.jpg"
STALE_AFTER_S = 2.0


class BridgedBrokers:
    """central + site, the site broker bridging every topic both ways (`topic # both 0`)."""

    def __init__(self) -> None:
        self.central = MosquittoBroker().start()
        self.site = MosquittoBroker()
        with self.site.config.open("a") as f:
            f.write(f"connection site-to-central\naddress 127.0.0.1:{self.central.port}\ntopic # both 0\n"
                    "cleansession true\nrestart_timeout 1\n")
        self.site.start()

    def close(self) -> None:
        self.site.close()
        self.central.close()


@pytest.fixture()
def brokers():
    b = BridgedBrokers()
    yield b
    b.close()


@pytest.fixture()
def keys(tmp_path):
    generate_keypair(tmp_path / "keys" / "admin.key", tmp_path / "keys" / "admin.pub")
    return tmp_path / "keys"


@pytest.fixture(scope="module")
def embeddings(analyzer):
    from edgeface.enroll import enroll_images

    out = {}
    for name, files in (("barack_obama", OBAMA_ENROLL), ("guido_van_rossum", GUIDO_ENROLL)):
        items = enroll_images(analyzer, files)
        out[name] = np.stack([i.embedding for i in items if i.accepted])
    return out


def door_config(tmp_path: Path, door_id: str, broker: MosquittoBroker, keys: Path, **fleet):
    state = tmp_path / door_id
    state.mkdir(exist_ok=True)
    shutil.copyfile(keys / "admin.pub", state / "fleet_admin.pub")  # only the public key goes to a door
    return parse_config({
        "state_dir": str(state),
        "camera": {"source": str(FACES)},
        "policy": {"min_frames": 3, "window_frames": 5, "window_s": 5.0, "cooldown_s": 0.0,
                   "unknown_interval_s": 0.0},
        "door": {"door_id": door_id, "relay_pin": 17, "pulse_s": 0.05, "pin_factory": "mock"},
        "mqtt": {"port": broker.port, "keepalive_s": 5},
        "fleet": {"enabled": True, "stale_after_s": STALE_AFTER_S, **fleet},
    })


class DoorUnderTest:
    """A daemon on a folder camera: show() puts one photo in front of it for four frames."""

    def __init__(self, tmp_path: Path, cfg, analyzer) -> None:
        self.tmp_path = tmp_path
        self.events: list[dict] = []
        self.pins = MockFactory()
        self.t = time.time()
        self.daemon = Daemon(cfg, analyzer=analyzer, source=FolderSource(FACES), pin_factory=self.pins,
                             event_sink=self.events.append)
        self.daemon.rules.refresh_s = 0.0  # re-read the rules at every decision: visits here are seconds apart
        self.daemon.start()

    @property
    def fleet(self) -> FleetDoor:
        return self.daemon.fleet

    def _tick(self) -> float:
        self.t += 0.2
        return self.t

    def show(self, photo: Path) -> list[str]:
        """The access results (granted / denied / unknown) of one visit; a minute passes between visits."""
        self.t += 60
        folder = self.tmp_path / f"camera-{uuid.uuid4().hex[:6]}"
        folder.mkdir()
        shutil.copyfile(photo, folder / photo.name)
        results = []
        for frame in FolderSource(folder, repeat=4, clock=self._tick).frames():
            d = self.daemon.process_frame(frame)
            if d.result:
                results.append(d.result)
        return results

    def door_events(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("event_type") == kind]

    def close(self) -> None:
        self.daemon.close()
        self.pins.close()


class Heartbeats:
    """The admin host's heartbeat, every 0.3 s, in a thread (as `edgeface fleet heartbeat` does)."""

    def __init__(self, admin: FleetAdmin) -> None:
        self.admin = admin
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.3):
            try:
                self.admin.heartbeat()
            except Exception:  # noqa: BLE001  (a test broker restarting)
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def synced(*doors: FleetDoor, want: str) -> bool:
    return all(d.wait_idle(0.5) and d.report()["digest"] == want for d in doors)


def publish_raw(broker: MosquittoBroker, topic: str, payload: bytes, *, retain: bool = False) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"intruder-{uuid.uuid4().hex[:6]}")
    c.connect(broker.host, broker.port)
    c.loop_start()
    c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    c.disconnect()
    c.loop_stop()


def test_three_doors_share_one_list_through_bridged_brokers(tmp_path, analyzer, brokers, keys, embeddings, caplog):
    caplog.set_level(logging.INFO, logger="edgeface.fleet")
    model = analyzer.embedder.model_id
    admin_cfg = door_config(tmp_path, "admin", brokers.central, keys)
    doors = {name: DoorUnderTest(tmp_path, door_config(tmp_path, name, broker, keys), analyzer)
             for name, broker in (("lobby", brokers.central), ("garage", brokers.central), ("annex", brokers.site))}
    lobby, garage, annex = doors["lobby"], doors["garage"], doors["annex"]
    admin = FleetAdmin(admin_cfg.mqtt, Signer.load(keys / "admin.key"), node="admin-a").start()
    beats = Heartbeats(admin)
    try:
        assert all(wait_until(d.fleet.wait_connected, 10) for d in doors.values())
        # enroll on the admin host -> granted on every door, also across the bridge
        admin.put("barack_obama", embeddings["barack_obama"], model_id=model)
        admin.put("guido_van_rossum", embeddings["guido_van_rossum"], model_id=model)
        fleets = [d.fleet for d in doors.values()]
        assert wait_until(lambda: synced(*fleets, want=admin.expected_digest()), 15)
        for door in doors.values():
            assert door.show(OBAMA_PROBE) == ["granted"], door.daemon.door_id
        assert annex.show(GUIDO_PROBE) == ["granted"]

        # partition the annex (its site broker, the bridge, goes down) and revoke obama meanwhile
        brokers.site.stop()
        revoke = admin.set_enabled("barack_obama", False)
        assert wait_until(lambda: synced(lobby.fleet, garage.fleet, want=admin.expected_digest()), 10)
        assert lobby.show(OBAMA_PROBE) == garage.show(OBAMA_PROBE) == ["denied"]
        assert annex.show(OBAMA_PROBE) == ["granted"]  # offline: it keeps its old list
        # the admin sees who is behind (the annex's last report came over the bridge before the partition)
        assert wait_until(lambda: {r["door_id"]: r["in_sync"] for r in admin.status()} ==
                          {"lobby": True, "garage": True, "annex": False}, 10)
        assert wait_until(lambda: annex.door_events("fleet_stale"), STALE_AFTER_S + 5)
        assert annex.fleet.stale and not lobby.fleet.stale and not garage.fleet.stale
        assert any("no signed heartbeat" in r.getMessage() for r in caplog.records)

        # heal: the annex converges, refuses obama, and the alarm clears
        brokers.site.start()
        assert wait_until(lambda: synced(annex.fleet, want=admin.expected_digest()), 20)
        assert annex.show(OBAMA_PROBE) == ["denied"]
        assert wait_until(lambda: annex.door_events("fleet_ok"), 10)
        stale_event = annex.door_events("fleet_stale")[0]
        assert stale_event["door_id"] == "annex"
        assert wait_until(lambda: {r["door_id"]: r["in_sync"] for r in admin.status()} ==
                          {"lobby": True, "garage": True, "annex": True}, 10)

        # refused: another key, unsigned, a replay, an older version; obama stays refused everywhere
        topic = admin.topics.person(revoke.person_key)
        enabled = PersonChange(revoke.person_key, admin.clock.now(), "barack_obama", True, None, model,
                               embeddings["barack_obama"])
        intruder = Signer(Ed25519PrivateKey.generate())
        publish_raw(brokers.central, topic, intruder.envelope(PERSON_KIND, enabled.body()))
        publish_raw(brokers.central, topic, json.dumps({"kind": PERSON_KIND, "body": enabled.body()}).encode())
        current = admin.signer.envelope(PERSON_KIND, revoke.body())
        publish_raw(brokers.central, topic, current)  # the applied version again, live: a replay
        first = admin.signer.envelope(PERSON_KIND, PersonChange(
            revoke.person_key, HLC(revoke.version.wall_ms - 1, 0, "admin-a"), "barack_obama", True, None, model,
            embeddings["barack_obama"]).body())
        publish_raw(brokers.central, topic, first, retain=True)  # an older signed version, retained on the broker
        for why in ("a change signed with another key", "an unsigned change", "a replay", "a stale version"):
            assert wait_until(lambda: all(d.fleet.rejected[why] >= 1 for d in doors.values()), 10), why
            assert any(f"refused {why}" in r.getMessage() for r in caplog.records), why
        for door in doors.values():
            assert door.show(OBAMA_PROBE) == ["denied"], door.daemon.door_id
        # the doors put the newer signed change back on the broker in place of the older one
        fresh = FleetAdmin(admin_cfg.mqtt, Signer.load(keys / "admin.key"), node="checker").start()
        fresh.load()
        assert fresh.people[revoke.person_key].version == revoke.version
        fresh.close()
    finally:
        beats.close()
        admin.close()
        for door in doors.values():
            door.close()


def test_concurrent_admins_converge_and_a_new_door_catches_up_without_an_admin(tmp_path, analyzer, brokers, keys,
                                                                                embeddings, caplog):
    caplog.set_level(logging.INFO, logger="edgeface.fleet")
    model = analyzer.embedder.model_id
    admin_cfg = door_config(tmp_path, "admin", brokers.central, keys)
    gallery_kw = dict(model_id=model, embedding_dim=analyzer.embedder.spec.embedding_dim, max_distance=0.5)

    def sync_door(name: str, broker: MosquittoBroker) -> FleetDoor:
        cfg = door_config(tmp_path, name, broker, keys)
        return FleetDoor(cfg, Gallery.open(tmp_path / name / "gallery.db", **gallery_kw)).start()

    doors = [sync_door("d1", brokers.central), sync_door("d2", brokers.central), sync_door("d3", brokers.site)]
    a = FleetAdmin(admin_cfg.mqtt, Signer.load(keys / "admin.key"), node="admin-a").start()
    b = FleetAdmin(admin_cfg.mqtt, Signer.load(keys / "admin.key"), node="admin-b").start()
    try:
        assert all(d.wait_connected(10) for d in doors)
        base = a.put("barack_obama", embeddings["barack_obama"], model_id=model)
        a.put("guido_van_rossum", embeddings["guido_van_rossum"], model_id=model)
        b.load()
        assert b.people[base.person_key].version == base.version
        # both edit obama "at once": the same wall-clock millisecond and counter, so only the node id decides
        same = time.time() + 5
        a.clock, b.clock = HybridClock("admin-a", wall=lambda: same), HybridClock("admin-b", wall=lambda: same)
        # (each made its change before seeing the other's); the loser is published last, so the broker retains it
        edit_b = PersonChange(base.person_key, b.clock.now(), "barack_obama", False, None, model,
                              embeddings["barack_obama"][:1])
        edit_a = PersonChange(base.person_key, a.clock.now(), "barack_obama", True, None, model,
                              embeddings["barack_obama"])
        b.publish(edit_b)
        a.publish(edit_a)
        winner = HLC(int(same * 1000), 0, "admin-b")  # ties go to the greater node id, on every door
        for d in doors:
            assert wait_until(lambda: d.wait_idle(0.5) and d.state.versions[base.person_key][0] == str(winner), 15)
        reports = [d.report()["digest"] for d in doors]
        assert len(set(reports)) == 1
        people = [[(p.name, p.enabled, p.n_embeddings) for p in d.gallery.people()] for d in doors]
        # the doors put the winner back on the broker in place of the loser it retained
        checker = FleetAdmin(admin_cfg.mqtt, Signer.load(keys / "admin.key"), node="checker").start()
        checker.load()
        assert checker.people[base.person_key].version == winner
        checker.close()
        assert people[0] == people[1] == people[2] == [("barack_obama", False, 1), ("guido_van_rossum", True, 3)]
        # a deletion is a retained tombstone
        a.clock = HybridClock("admin-a")
        gone = a.delete("guido_van_rossum")
        for d in doors:
            assert wait_until(lambda: d.wait_idle(0.5) and d.state.versions[gone.person_key] == (str(gone.version),
                                                                                              True), 10)
            assert [p.name for p in d.gallery.people()] == ["barack_obama"]
        want = doors[0].report()["digest"]
    finally:
        a.close()
        b.close()
    # a new door, no admin anywhere: it catches up from the broker's retained messages alone
    late = sync_door("late", brokers.site)
    try:
        assert wait_until(lambda: late.wait_idle(0.5) and late.report()["digest"] == want, 15)
        assert [(p.name, p.enabled) for p in late.gallery.people()] == [("barack_obama", False)]
    finally:
        late.close()
        for d in doors:
            d.close()
            d.gallery.close()
        late.gallery.close()


def test_stale_door_lets_in_only_the_allow_list_and_refuses_other_models(tmp_path, analyzer, keys, embeddings,
                                                                         caplog):
    caplog.set_level(logging.INFO, logger="edgeface.fleet")
    model = analyzer.embedder.model_id
    with MosquittoBroker() as broker:
        door = DoorUnderTest(tmp_path, door_config(tmp_path, "gate", broker, keys, deny_when_stale=True,
                                              allow_when_stale=["guido_van_rossum"]), analyzer)
        admin = FleetAdmin(door.daemon.cfg.mqtt, Signer.load(keys / "admin.key"), node="admin-a").start()
        sub = Collector(broker.host, broker.port, ["edgeface/gate/fleet_stale", "homeassistant/#"])
        try:
            assert door.fleet.wait_connected(10)
            admin.put("barack_obama", embeddings["barack_obama"], model_id=model)
            admin.put("guido_van_rossum", embeddings["guido_van_rossum"], model_id=model)
            admin.put("kit_harington", np.ones((2, 64), np.float32) / 8.0, model_id="facenet_int8")
            admin.heartbeat()
            assert wait_until(lambda: door.fleet.wait_idle(0.5) and door.fleet.report()["people"] == 3, 10)
            assert door.show(OBAMA_PROBE) == ["granted"] and not door.fleet.stale
            kit = next(p for p in door.daemon.gallery.people() if p.name == "kit_harington")
            assert kit.n_embeddings == 0  # stored without the other model's vectors: never compared
            assert door.fleet.rejected["embeddings of another model"] == 1
            assert any("of model 'facenet_int8'" in r.getMessage() and "never compared" in r.getMessage()
                       for r in caplog.records)
            # no heartbeat any more: stale, and only the allow list opens the door
            assert wait_until(lambda: door.fleet.stale, STALE_AFTER_S + 5)
            assert wait_until(lambda: sub.on_topic("edgeface/gate/fleet_stale")[-1:] == [b"ON"], 10)
            assert door.show(OBAMA_PROBE) == ["denied"]
            assert door.show(GUIDO_PROBE) == ["granted"]
            denied = [e for e in door.events if e.get("result") == "denied"][-1]
            assert "deny_when_stale" in denied["reason"]
            admin.heartbeat()
            assert wait_until(lambda: not door.fleet.stale, 5)
            assert wait_until(lambda: sub.on_topic("edgeface/gate/fleet_stale")[-1:] == [b"OFF"], 10)
            assert door.show(OBAMA_PROBE) == ["granted"]
            # Home Assistant shows the alarm as a problem sensor on the door's device
            discovery = json.loads(sub.last("homeassistant/device/edgeface_gate/config"))
            assert validate_discovery(discovery) == []
            sensor = discovery["cmps"]["edgeface_gate_fleet_stale"]
            assert (sensor["p"], sensor["state_topic"], sensor["device_class"]) == (
                "binary_sensor", "edgeface/gate/fleet_stale", "problem")
        finally:
            sub.close()
            admin.close()
            door.close()


def test_fleet_commands_enroll_disable_and_show_status(tmp_path, analyzer, keys, capsys):
    from conftest import run_cli

    with MosquittoBroker() as broker:
        cfg = door_config(tmp_path, "porch", broker, keys)
        door = FleetDoor(cfg, Gallery.open(tmp_path / "porch" / "gallery.db", model_id=analyzer.embedder.model_id,
                                           embedding_dim=analyzer.embedder.spec.embedding_dim,
                                           max_distance=0.5)).start()
        config = tmp_path / "admin.yaml"
        config.write_text(f"state_dir: {tmp_path / 'porch'}\nmqtt:\n  port: {broker.port}\n")
        try:
            assert door.wait_connected(10)
            rc, out, err = run_cli(capsys, config, "fleet", "keygen", "--out", tmp_path / "newkeys")
            assert rc == 0 and "fleet_admin.pub" in out[0]
            rc, out, err = run_cli(capsys, config, "fleet", "keygen", "--out", tmp_path / "newkeys")
            assert rc != 0 and "refusing to overwrite" in err
            key = keys / "admin.key"
            rc, out, err = run_cli(capsys, config, "fleet", "enroll", "barack_obama", *OBAMA_ENROLL, "--key", key,
                                   "--node", "desk")
            assert rc == 0 and out[0].startswith("barack_obama: 3 embedding(s)"), (out, err)
            assert wait_until(lambda: [p.name for p in door.gallery.people()] == ["barack_obama"], 10)
            rc, out, err = run_cli(capsys, config, "fleet", "disable", "barack_obama", "--key", key)
            assert rc == 0 and "disabled on every door" in out[0]
            assert wait_until(lambda: not door.gallery.person("barack_obama").enabled, 10)
            assert wait_until(lambda: door.wait_idle(0.5) and run_cli(capsys, config, "fleet", "status")[0] == 0, 10)
            rc, out, err = run_cli(capsys, config, "fleet", "status", "--json")
            status = json.loads(out[0])
            assert status["people"] == 1 and status["disabled"] == 1
            assert [(d["door_id"], d["in_sync"]) for d in status["doors"]] == [("porch", True)]
            rc, out, err = run_cli(capsys, config, "fleet", "schedule", "barack_obama", "--days", "mon,tue",
                                   "--window", "08:00-18:00", "--key", key)
            assert rc == 0, err
            assert wait_until(lambda: door.gallery.person("barack_obama").schedule ==
                              {"days": ["mon", "tue"], "windows": [["08:00", "18:00"]]}, 10)
            rc, out, err = run_cli(capsys, config, "fleet", "schedule", "barack_obama", "--window", "25:00-26:00",
                                   "--key", key)
            assert rc != 0 and "25:00" in err
            rc, out, err = run_cli(capsys, config, "fleet", "disable", "nobody", "--key", key)
            assert rc != 0 and "no person 'nobody'" in err
        finally:
            door.close()
            door.gallery.close()


def test_a_retained_heartbeat_of_an_admin_long_gone_does_not_count_as_fresh(tmp_path, keys):
    from edgeface.fleet.changes import HEARTBEAT_KIND, Heartbeat

    signer = Signer.load(keys / "admin.key")
    with MosquittoBroker() as broker:
        old = Heartbeat(HLC(int((time.time() - 60) * 1000), 0, "admin-a"))
        publish_raw(broker, "edgeface/fleet/heartbeat", signer.envelope(HEARTBEAT_KIND, old.body()), retain=True)
        cfg = door_config(tmp_path, "shed", broker, keys, stale_after_s=30)
        door = FleetDoor(cfg, Gallery.open(tmp_path / "shed" / "gallery.db", model_id="m", embedding_dim=4,
                                           max_distance=0.5)).start()
        try:
            assert wait_until(lambda: door.state.meta("heartbeat") == str(old.version), 10)  # heard, and...
            assert wait_until(lambda: door.stale, 5)  # ...60 s old: stale at once, not 30 s from now
            fresh = Heartbeat(HLC(int(time.time() * 1000), 0, "admin-a"))
            publish_raw(broker, "edgeface/fleet/heartbeat", signer.envelope(HEARTBEAT_KIND, fresh.body()))
            assert wait_until(lambda: not door.stale, 5)
        finally:
            door.close()
            door.gallery.close()

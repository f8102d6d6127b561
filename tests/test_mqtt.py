"""MqttPublisher against a real mosquitto on 127.0.0.1: availability + Last Will, retained states,
ordered QoS 1 delivery from the persistent outbox across a broker outage, HA status re-discovery."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from edgeface.config import MqttConfig
from edgeface.events.outbox import Outbox
from edgeface.testing import Collector, MosquittoBroker, wait_until, mosquitto_path

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(mosquitto_path() is None, reason="needs mosquitto (apt install mosquitto)")]


@pytest.fixture()
def broker():
    b = MosquittoBroker().start()
    yield b
    b.close()


def publisher(broker, tmp_path, **kw):
    from edgeface.events.mqtt import MqttPublisher

    cfg = MqttConfig(host=broker.host, port=broker.port, keepalive_s=5, outbox_path=str(tmp_path / "o.db"),
                     **kw.pop("cfg", {}))
    box = Outbox(cfg.outbox_path, max_events=1000)
    pub = MqttPublisher(cfg, door_id="front", outbox=box, reconnect_min_s=1, reconnect_max_s=1, **kw)
    return pub, box


def test_online_state_and_events_in_order(broker, tmp_path):
    with Collector(broker.host, broker.port, "edgeface/#") as sub:
        pub, box = publisher(broker, tmp_path)
        pub.set_state("edgeface/front/relay", "locked")
        pub.start()
        assert pub.wait_connected(10)
        for i in range(20):
            pub.send_event(f"id{i}", "edgeface/front/event", {"event_id": f"id{i}", "n": i})
        got = sub.wait_for("edgeface/front/event", 20)
        assert [json.loads(p)["n"] for p in got] == list(range(20))
        assert sub.last("edgeface/front/availability") == b"online"
        assert sub.last("edgeface/front/relay") == b"locked"
        assert wait_until(lambda: len(box) == 0)
        pub.stop()
        assert sub.wait_for("edgeface/front/availability", 2)[-1] == b"offline"
        box.close()
    # event messages are not retained; states and availability are
    with Collector(broker.host, broker.port, "edgeface/#") as late:
        time.sleep(0.5)
        assert late.on_topic("edgeface/front/event") == []
        assert late.last("edgeface/front/relay") == b"locked"
        assert late.last("edgeface/front/availability") == b"offline"


def test_events_wait_in_the_outbox_while_the_broker_is_down(broker, tmp_path):
    pub, box = publisher(broker, tmp_path)
    pub.start()
    assert pub.wait_connected(10)
    broker.stop()
    assert wait_until(lambda: not pub.connected)
    for i in range(5):
        assert pub.send_event(f"id{i}", "edgeface/front/event", {"n": i})  # never blocks, never raises
    assert len(box) == 5
    broker.start()
    with Collector(broker.host, broker.port, "edgeface/front/event") as sub:
        got = sub.wait_for("edgeface/front/event", 5, timeout=20)
        assert [json.loads(p)["n"] for p in got] == [0, 1, 2, 3, 4]
        time.sleep(0.5)
        assert len(sub.on_topic("edgeface/front/event")) == 5  # exactly once
    assert wait_until(lambda: len(box) == 0)
    pub.stop()
    box.close()


def test_last_will_says_offline_when_the_process_dies(broker, tmp_path):
    """A real crash: a child process connects, then is SIGKILLed; the broker publishes the will."""
    code = f"""
import time
from edgeface.config import MqttConfig
from edgeface.events.mqtt import MqttPublisher
from edgeface.events.outbox import Outbox
cfg = MqttConfig(host="127.0.0.1", port={broker.port}, keepalive_s=5, outbox_path={str(tmp_path / 'c.db')!r})
pub = MqttPublisher(cfg, door_id="front", outbox=Outbox(cfg.outbox_path))
pub.start()
assert pub.wait_connected(10)
print("up", flush=True)
time.sleep(60)
"""
    with Collector(broker.host, broker.port, "edgeface/front/availability") as sub:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "up"
            assert sub.wait_for("edgeface/front/availability", 1)[-1] == b"online"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            # keepalive 5 s -> the broker notices within 1.5 x keepalive
            got = sub.wait_for("edgeface/front/availability", 2, timeout=15)
            assert got[-1] == b"offline"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_discovery_resent_when_home_assistant_comes_online(broker, tmp_path):
    calls = []

    def discovery():
        calls.append(1)
        return [("homeassistant/device/edgeface_front/config", '{"x": 1}')]

    pub, box = publisher(broker, tmp_path, discovery=discovery)
    pub.start()
    assert pub.wait_connected(10)
    assert wait_until(lambda: len(calls) == 1)
    with Collector(broker.host, broker.port, "homeassistant/device/#") as sub:
        assert sub.last("homeassistant/device/edgeface_front/config") == b'{"x": 1}'  # retained
        sub.client.publish("homeassistant/status", "online", qos=1)
        assert wait_until(lambda: len(calls) == 2)
    pub.stop()
    box.close()


def test_unreachable_broker_never_blocks_the_caller(tmp_path):
    from edgeface.events.mqtt import MqttPublisher
    from edgeface.testing import free_port

    cfg = MqttConfig(host="127.0.0.1", port=free_port(), outbox_path=str(tmp_path / "o.db"))
    box = Outbox(cfg.outbox_path, max_events=1000)
    pub = MqttPublisher(cfg, door_id="front", outbox=box)
    pub.start()
    for i in range(50):  # returns at once although nothing listens (it only writes local SQLite)
        assert pub.send_event(f"e{i}", "edgeface/front/event", {"n": i})
        pub.set_state("edgeface/front/relay", "locked" if i % 2 else "unlocked")
    assert not pub.connected
    pub.stop(timeout=0.1)
    assert len(box) == 50
    box.close()


def test_events_replayed_after_an_outage_are_marked_queued_with_their_original_time(broker, tmp_path):
    pub, box = publisher(broker, tmp_path, queued_after_s=0.5)
    pub.start()
    assert pub.wait_connected(10)
    with Collector(broker.host, broker.port, "edgeface/front/event") as sub:
        pub.send_event("live", "edgeface/front/event", {"event_id": "live", "timestamp": "2026-01-01T10:00:00+00:00"})
        live = json.loads(sub.wait_for("edgeface/front/event", 1)[0])
    assert live == {"event_id": "live", "timestamp": "2026-01-01T10:00:00+00:00"}  # a live event is sent as it is
    broker.stop()
    assert wait_until(lambda: not pub.connected)
    pub.send_event("late", "edgeface/front/event", {"event_id": "late", "timestamp": "2026-01-01T10:00:01+00:00"})
    time.sleep(0.8)
    broker.start()
    with Collector(broker.host, broker.port, ["edgeface/front/event", "edgeface/front/outbox"]) as sub:
        late = json.loads(sub.wait_for("edgeface/front/event", 1, timeout=20)[0])
        assert wait_until(lambda: json.loads(sub.on_topic("edgeface/front/outbox")[-1] or b"{}").get("waiting") == 0
                          if sub.on_topic("edgeface/front/outbox") else False)
        backlog = [json.loads(p) for p in sub.on_topic("edgeface/front/outbox")]
    assert late["event_id"] == "late" and late["timestamp"] == "2026-01-01T10:00:01+00:00"
    assert late["queued"] is True and late["queued_s"] >= 0.8
    # the Outbox sensor: the backlog on reconnect, then empty
    assert backlog[0]["waiting"] == 1 and backlog[-1]["waiting"] == 0
    assert backlog[-1]["delivered"] == 2 and backlog[-1]["disconnects"] == 1 and backlog[-1]["dropped"] == 0
    pub.stop()
    box.close()


def test_ha_discovery_off_removes_the_retained_device_config(broker, tmp_path):
    from edgeface.config import parse_config
    from edgeface.events.hass import discovery_messages
    from edgeface.events.mqtt import MqttPublisher

    def run(prefix: str, discovery: bool) -> None:
        cfg = parse_config({"mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": prefix,
                                     "ha_discovery": discovery, "outbox_path": str(tmp_path / f"{prefix}.db")}})
        box = Outbox(cfg.mqtt.outbox_path)
        pub = MqttPublisher(cfg.mqtt, door_id="front", outbox=box, discovery=lambda: discovery_messages(cfg))
        pub.start()
        assert pub.wait_connected(10)
        pub.stop()
        box.close()

    run("edgeface", True)
    run("garage", True)  # a second daemon with the same door id: its own device
    with Collector(broker.host, broker.port, "homeassistant/device/#") as sub:
        assert wait_until(lambda: len(sub.messages) == 2)
        assert {t for t, _p, retained in sub.messages if retained} == {
            "homeassistant/device/edgeface_front/config", "homeassistant/device/garage_front/config"}
    run("edgeface", False)
    with Collector(broker.host, broker.port, "homeassistant/device/#") as sub:
        time.sleep(0.5)
        assert [t for t, _p, _r in sub.messages] == ["homeassistant/device/garage_front/config"]


def test_an_unreachable_broker_is_a_warning_with_address_reason_and_backlog(tmp_path, caplog):
    """Nothing listens on the port: the first failed attempt says where, why and how much waits; connecting later
    says so too."""
    import logging

    from edgeface.events.mqtt import MqttPublisher
    from edgeface.testing import free_port

    caplog.set_level(logging.INFO, logger="edgeface.events.mqtt")
    port = free_port()
    cfg = MqttConfig(host="127.0.0.1", port=port, keepalive_s=5, outbox_path=str(tmp_path / "o.db"))
    box = Outbox(cfg.outbox_path, max_events=1000)
    for i in range(3):
        box.add(f"id{i}", "edgeface/front/event", "{}")
    pub = MqttPublisher(cfg, door_id="front", outbox=box, reconnect_min_s=1, reconnect_max_s=1)
    pub.start()
    try:
        assert wait_until(lambda: any("unreachable" in r.getMessage() for r in caplog.records), timeout=15)
        first = next(r for r in caplog.records if "unreachable" in r.getMessage())
        assert first.levelno == logging.WARNING
        text = first.getMessage()
        assert f"127.0.0.1:{port}" in text and "refused" in text.lower() and "3 event(s) waiting" in text
        assert pub.backlog()["last_error"].startswith("broker unreachable")
        with MosquittoBroker(port=port):
            assert pub.wait_connected(20)
            assert wait_until(lambda: any("connected" in r.getMessage() and "after" in r.getMessage()
                                          for r in caplog.records))
            assert wait_until(lambda: len(box) == 0)
            caplog.clear()
            pub.stop()
        # a requested disconnect is no warning
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
        assert any(r.getMessage() == "MQTT disconnected (stopping)" for r in caplog.records)
    finally:
        pub.stop()
        box.close()


def test_broker_outage_reminders_are_bounded():
    """Hundreds of failed reconnects in an hour give one warning a minute, not one each."""
    import logging

    from edgeface.events.mqtt import BrokerOutageLog

    records: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("outage-test")
    logger.addHandler(ListHandler())
    logger.setLevel(logging.INFO)
    now = [0.0]
    outage = BrokerOutageLog(logger, "broker:1883", every_s=60.0, clock=lambda: now[0])
    for i in range(3600 // 5):
        now[0] = i * 5.0
        outage.failed("Connection refused", i)
    assert len(records) == 60
    assert records[0] == "MQTT broker broker:1883 unreachable (Connection refused); 0 event(s) waiting in the outbox, retrying"
    assert "still unreachable after 60 s" in records[1]
    outage.connected(7)
    assert records[-1] == ("MQTT connected to broker:1883 after 3595 s unreachable; 7 event(s) waiting in the outbox "
                           "are sent now")

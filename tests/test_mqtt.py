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
from edgeface.outbox import Outbox
from edgeface.testing import Collector, MosquittoBroker, wait_until, mosquitto_path

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(mosquitto_path() is None, reason="needs mosquitto (apt install mosquitto)")]


@pytest.fixture()
def broker():
    b = MosquittoBroker().start()
    yield b
    b.close()


def publisher(broker, tmp_path, **kw):
    from edgeface.mqtt import MqttPublisher

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
from edgeface.mqtt import MqttPublisher
from edgeface.outbox import Outbox
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
    from edgeface.mqtt import MqttPublisher
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

"""The retained relay state ends at the true state after reconnects.

What a user relies on: Home Assistant shows `locked` when the door is locked. An `unlocked` published just
before the broker died is still unacknowledged; paho re-sends it after the reconnect, after the fresh
`locked` that on_connect published, so the retained state read `unlocked` with the door locked. Real
mosquitto, frozen (SIGSTOP) so it never acknowledges, then SIGKILLed and restarted on the same port.
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from edgeface.config import MqttConfig
from edgeface.events.mqtt import MqttPublisher
from edgeface.events.outbox import Outbox
from edgeface.testing import Collector, MosquittoBroker, mosquitto_path, wait_until

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(mosquitto_path() is None, reason="needs mosquitto (apt install mosquitto)")]


def _retained(broker: MosquittoBroker, topic: str) -> bytes | None:
    """What a new subscriber (Home Assistant after a restart) is given for `topic`."""
    with Collector(broker.host, broker.port, topic) as sub:
        return sub.last(topic, timeout=3)


@pytest.mark.parametrize("rounds", [3])
def test_retained_relay_state_is_the_true_state_after_broker_crashes(tmp_path, rounds):
    broker = MosquittoBroker().start()
    outbox = Outbox(tmp_path / "outbox.db")
    pub = MqttPublisher(MqttConfig(host=broker.host, port=broker.port, ha_discovery=False, keepalive_s=5),
                        door_id="front", outbox=outbox, reconnect_min_s=1, reconnect_max_s=1)
    relay = pub.topics.relay
    try:
        pub.set_state(relay, "locked")
        pub.start()
        assert pub.wait_connected(10)
        assert wait_until(lambda: _retained(broker, relay) == b"locked", 10)
        for _ in range(rounds):
            proc = broker._proc
            os.kill(proc.pid, signal.SIGSTOP)  # the broker freezes: what comes next is never acknowledged
            pub.set_state(relay, "unlocked")
            time.sleep(0.3)
            os.kill(proc.pid, signal.SIGKILL)  # and dies
            proc.wait(5)
            broker.stop()
            assert wait_until(lambda: not pub.connected, 15), "the publisher did not notice the broker crash"
            pub.set_state(relay, "locked")  # the pulse ended while the broker was away
            broker.start()
            assert pub.wait_connected(15)
            time.sleep(1.5)  # paho's re-sends and our state publishes are done
            assert _retained(broker, relay) == b"locked", "retained relay state says unlocked, the door is locked"
        # and a state change while connected still goes out at once
        pub.set_state(relay, "unlocked")
        assert wait_until(lambda: _retained(broker, relay) == b"unlocked", 10)
    finally:
        pub.stop(timeout=1)
        outbox.close()
        broker.close()

"""The fleet's own paho client (one per door or admin host), built from the `mqtt:` config section."""
from __future__ import annotations

import ssl
from typing import Any

import paho.mqtt.client as mqtt

from edgeface.config import MqttConfig, read_secret


def make_client(cfg: MqttConfig, client_id: str) -> Any:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                    protocol=mqtt.MQTTv311)
    if cfg.username:
        c.username_pw_set(cfg.username, read_secret(cfg.password_env))
    if cfg.tls:
        c.tls_set(ca_certs=cfg.ca_cert, certfile=cfg.client_cert, keyfile=cfg.client_key,
                  cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    c.reconnect_delay_set(min_delay=1, max_delay=5)
    c.max_inflight_messages_set(200)
    c.max_queued_messages_set(0)
    return c

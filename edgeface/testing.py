"""Reusable test helpers with REAL substitutes: a private mosquitto broker and an MQTT collector.

Used by the test suite and handy for trying the daemon by hand. Network use is 127.0.0.1 only.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

MOSQUITTO = os.environ.get("EDGEFACE_MOSQUITTO", "/usr/sbin/mosquitto")

def wait_until(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll `cond` until it is true or `timeout` seconds pass; its final truth value (threads, brokers, pins)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())


def pin_levels(pin: Any) -> list[bool]:
    """The distinct levels a gpiozero mock pin went through, in order (its `states` record every write)."""
    out: list[bool] = []
    for s in pin.states:
        if not out or out[-1] != s.state:
            out.append(s.state)
    return out


#: Brokers started by this process and not stopped yet: stopped at exit, so a failing test never leaks one.
_RUNNING: "set[MosquittoBroker]" = set()


@atexit.register
def _stop_leftover_brokers() -> None:
    for broker in list(_RUNNING):
        broker.stop()


def mosquitto_path() -> Optional[str]:
    """The mosquitto binary, or None when it is not installed."""
    if os.access(MOSQUITTO, os.X_OK):
        return MOSQUITTO
    return shutil.which("mosquitto")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(proc: "subprocess.Popen[bytes]", host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until a just-started mosquitto accepts TCP connections on host:port. Raises a clear error when it exits
    first (with its stderr, when that was piped) or does not listen within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            raise RuntimeError(f"mosquitto exited with {proc.returncode}: {err}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"mosquitto did not listen on {host}:{port} within {timeout} s")


def stop_process(proc: "subprocess.Popen[bytes]", timeout: float = 5.0) -> None:
    """SIGTERM, SIGKILL when it has not exited within `timeout`; closes a piped stderr."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    if proc.stderr:
        proc.stderr.close()


class MosquittoBroker:
    """mosquitto on 127.0.0.1:<free port> with a temp config (anonymous, no persistence).

    stop() then start() comes back on the SAME port, to test broker outages.
    """

    def __init__(self, port: Optional[int] = None, *, binary: Optional[str] = None) -> None:
        self.binary = binary or mosquitto_path()
        if not self.binary:
            raise FileNotFoundError("mosquitto is not installed (apt install mosquitto)")
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="edgeface-mosquitto-"))
        self.config = self._dir / "mosquitto.conf"
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                               f"log_dest file {self._dir / 'mosquitto.log'}\nlog_type error\nlog_type warning\n")
        self._proc: Optional[subprocess.Popen[bytes]] = None

    def start(self, timeout: float = 10.0) -> "MosquittoBroker":
        if self.running:
            return self
        self._proc = subprocess.Popen([self.binary, "-c", str(self.config)], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _RUNNING.add(self)
        try:
            wait_listening(self._proc, self.host, self.port, timeout)
        except RuntimeError:
            self.stop()
            raise
        return self

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        _RUNNING.discard(self)
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "MosquittoBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class Collector:
    """An MQTT subscriber (paho v2) that records every message; wait_for() polls with a deadline."""

    def __init__(self, host: str, port: int, topics: str | list[str] = "#", *, client_id: str = "") -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._topics = [topics] if isinstance(topics, str) else list(topics)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.reconnect_delay_set(0.1, 1)
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError(f"collector could not subscribe on {host}:{port}")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        client.subscribe([(t, 1) for t in self._topics])

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def on_topic(self, topic: str) -> list[bytes]:
        with self._lock:
            return [p for t, p, _r in self.messages if t == topic]

    def json_on(self, topic: str) -> list[dict[str, Any]]:
        return [json.loads(p) for p in self.on_topic(topic)]

    def wait_for(self, topic: str, count: int = 1, timeout: float = 10.0) -> list[bytes]:
        wait_until(lambda: len(self.on_topic(topic)) >= count, timeout)
        return self.on_topic(topic)

    def last(self, topic: str, timeout: float = 10.0) -> Optional[bytes]:
        got = self.wait_for(topic, 1, timeout)
        return got[-1] if got else None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def __enter__(self) -> "Collector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tiff_image(w: int, h: int, *, channels: int = 1, hidden_by: Optional[tuple[int, int]] = None,
               truncated: bool = False) -> bytes:
    """A little-endian TIFF of w x h black pixels (8-bit grey or RGB), one deflate-compressed strip, compressed
    as it is built (never held decoded). `hidden_by=(w2, h2)`: the width and height tags appear twice, the
    real size first (libtiff uses it) and w2 x h2 after it; `truncated`: only a few bytes of the strip (a
    header bomb of a few hundred bytes). For tests and bench/image_bombs.py."""
    import struct
    import zlib

    if truncated:
        body = zlib.compress(b"\0" * 4096)
    else:
        comp = zlib.compressobj(9)
        row = b"\0" * (w * channels)
        body = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    widths, heights = ([w, hidden_by[0]], [h, hidden_by[1]]) if hidden_by else ([w], [h])
    entries = [(256, 4, 1, v) for v in widths] + [(257, 4, 1, v) for v in heights] + [
        (258, 3, channels, 8), (259, 3, 1, 8), (262, 3, 1, 2 if channels == 3 else 1), (273, 4, 1, 0),
        (277, 3, 1, channels), (278, 4, 1, h), (279, 4, 1, len(body))]
    extra_at = 8 + 2 + 12 * len(entries) + 4
    extra = struct.pack("<HHH", 8, 8, 8) if channels == 3 else b""  # RGB: three BitsPerSample values, outside
    bits_at = extra_at
    data_at = extra_at + len(extra)
    out = b"II*\0" + struct.pack("<IH", 8, len(entries))
    for tag, typ, n, v in entries:
        if tag == 273:
            v = data_at
        if tag == 258 and n == 3:
            out += struct.pack("<HHII", tag, typ, n, bits_at)
        elif typ == 3:
            out += struct.pack("<HHIHH", tag, typ, n, v, 0)
        else:
            out += struct.pack("<HHII", tag, typ, n, v)
    return out + b"\0\0\0\0" + extra + body


def jpeg_header_bomb(w: int, h: int) -> bytes:
    """A real 64x64 JPEG whose frame header (SOF) says w x h: libjpeg would allocate and fill every missing row
    (a decompression bomb of a few hundred bytes, for tests and bench/image_bombs.py)."""
    import cv2
    import numpy as np

    ok, enc = cv2.imencode(".jpg", np.full((64, 64, 3), 128, np.uint8))
    data = bytearray(enc.tobytes())
    at = data.find(b"\xff\xc0")
    data[at + 5:at + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    return bytes(data)

"""Bad input: damaged/huge images, wrong model files, malformed config, a gallery from a newer edgeface,
hostile MQTT commands. Each gives a clear one-line error or is ignored with a log line; none crashes the
daemon or opens the door."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from gpiozero.pins.mock import MockFactory

from edgeface.config import load_config, parse_config
from edgeface.errors import ConfigError, GalleryError, ImageError, ModelError
from edgeface.vision.images import MAX_FILE_BYTES, load_image
from edgeface.testing import Collector, MosquittoBroker, jpeg_header_bomb, mosquitto_path, pin_levels, wait_until

REPO = Path(__file__).resolve().parents[1]
FACES = REPO / "tests" / "fixtures" / "faces"
PHOTO = FACES / "elon_musk" / sorted(p.name for p in (FACES / "elon_musk").glob("*.jpg"))[0]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
SECRET = "input-fault-secret-4f0b9c"


# ------------------------------------------------------------------------------------------------ images

@pytest.mark.parametrize("damage", ["truncated_header", "empty", "text", "huge_file", "directory", "missing"])
def test_bad_image_files_give_one_line_errors(tmp_path, damage):
    p = tmp_path / "img.jpg"
    data = PHOTO.read_bytes()
    if damage == "truncated_header":
        p.write_bytes(data[:200])
    elif damage == "empty":
        p.write_bytes(b"")
    elif damage == "text":
        p.write_text("this is not a jpeg\n")
    elif damage == "huge_file":
        with open(p, "wb") as f:  # sparse: no disk used
            f.seek(MAX_FILE_BYTES + 1)
            f.write(b"\0")
    elif damage == "directory":
        p.mkdir()
    with pytest.raises(ImageError) as info:
        load_image(p)
    msg = str(info.value)
    assert "\n" not in msg and str(p) in msg


def test_identify_cli_reports_bad_images_and_goes_on(tmp_path):
    """A folder with one good and three bad images: one line per bad file, the good one is answered."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copyfile(PHOTO, folder / "good.jpg")
    (folder / "trunc.jpg").write_bytes(PHOTO.read_bytes()[:300])
    (folder / "noise.png").write_bytes(os.urandom(2000))
    (folder / "empty.jpg").write_bytes(b"")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "gallery": {"path": "g.db"}}))
    enrolled = subprocess.run([sys.executable, "-m", "edgeface", "--config", str(cfg), "enroll", "elon", str(PHOTO)],
                              env=ENV, capture_output=True, text=True, timeout=120)
    assert enrolled.returncode == 0, enrolled.stderr
    done = subprocess.run([sys.executable, "-m", "edgeface", "--config", str(cfg), "identify", str(folder)],
                          env=ENV, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert "Traceback" not in out
    for name in ("trunc.jpg", "noise.png", "empty.jpg"):
        assert name in out, name
    good = [line for line in done.stdout.splitlines() if "good.jpg" in line]
    assert good and "elon" in good[0], done.stdout


# ------------------------------------------------------------------------------------------------ models

@pytest.mark.parametrize("kind", ["truncated", "zero", "text", "wrong_model"])
def test_wrong_model_files_raise_model_error(tmp_path, kind):
    from edgeface.vision.detect import BlazeFaceDetector
    from edgeface.vision.embed import TFLiteEmbedder

    real = REPO / "models" / "face_detection_short_range.tflite"
    p = tmp_path / "model.tflite"
    if kind == "truncated":
        p.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    elif kind == "zero":
        p.write_bytes(b"")
    elif kind == "text":
        p.write_text("<html>404 not found</html>")
    else:
        shutil.copyfile(REPO / "models" / "face_landmark.tflite", p)  # a valid model, the wrong one
    with pytest.raises(ModelError) as info:
        if kind == "wrong_model":
            BlazeFaceDetector(model=str(p))
        else:
            TFLiteEmbedder(str(p))
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_manifest_model_with_wrong_bytes_is_refused(tmp_path):
    from edgeface.models import resolve_model

    models = tmp_path / "models"
    shutil.copytree(REPO / "models", models, ignore=shutil.ignore_patterns("facenet*"))
    data = bytearray((models / "face_landmark.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit, same size
    (models / "face_landmark.tflite").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        resolve_model("face_landmark", models)


# ------------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("text, key", [
    ("door:\n  relay_pin: 99\n", "door.relay_pin"),
    ("door:\n  pulse_s: -1\n", "door.pulse_s"),
    ("camera:\n  max_fps: .nan\n", "camera.max_fps"),
    ("policy:\n  min_frames: 9\n  window_frames: 3\n", "policy"),
    ("mqtt:\n  port: '1883; rm -rf /'\n", "mqtt.port"),
    ("mqtt:\n  topic_prefix: 'a/#'\n", "mqtt.topic_prefix"),
    ("mqtt:\n  ca_cert: /etc/ca.pem\n", "mqtt"),
    ("door:\n  door_id: '../../etc'\n", "door.door_id"),
    ("liveness:\n  method: magic\n", "liveness.method"),
    ("gallery: [1, 2]\n", "gallery"),
    ("door:\n  relay_pin: 17\n  relay_pin: 18\n  pulse_s: 3\n\tbad: tab\n", "config.yaml"),
    ("{{{{", "config.yaml"),
])
def test_malformed_config_values_name_the_key(tmp_path, text, key):
    p = tmp_path / "config.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert key in str(info.value)
    assert str(p) in str(info.value)


def test_binary_config_file_is_a_config_error(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(ConfigError):
        load_config(p)


# ------------------------------------------------------------------------------------------------ gallery

def test_gallery_from_a_newer_schema_is_refused_untouched(tmp_path):
    from edgeface.gallery import Gallery

    path = tmp_path / "g.db"
    Gallery.open(path, model_id="m", max_distance=0.4).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    before = path.read_bytes()
    with pytest.raises(GalleryError, match="upgrade edgeface"):
        Gallery.open(path, model_id="m", max_distance=0.4)
    assert path.read_bytes() == before


@pytest.mark.parametrize("content", [b"SQLite format 3\0" + b"\x00" * 50, os.urandom(4096)])
def test_corrupt_or_foreign_gallery_is_a_gallery_error(tmp_path, content):
    from edgeface.gallery import Gallery

    path = tmp_path / "g.db"
    path.write_bytes(content)
    with pytest.raises(GalleryError):
        Gallery.open(path, model_id="m", max_distance=0.4)


# ------------------------------------------------------------------------------------------------ MQTT commands

@pytest.mark.broker
@pytest.mark.skipif(mosquitto_path() is None, reason="needs mosquitto (apt install mosquitto)")
def test_hostile_mqtt_commands_are_refused_audited_and_never_unlock(tmp_path, analyzer, monkeypatch):
    from edgeface.daemon.app import Daemon
    from edgeface.frames import FolderSource
    from edgeface.events.remote import make_command

    monkeypatch.setenv("EDGEFACE_UNLOCK_SECRET", SECRET)
    broker = MosquittoBroker().start()
    pins = MockFactory()
    cfg = parse_config({"state_dir": str(tmp_path / "state"),
                        "door": {"pin_factory": "mock", "pulse_s": 0.3},
                        "gallery": {"path": "gallery.db"}, "audit": {"path": "audit.db"},
                        "mqtt": {"outbox_path": "outbox.db", "host": broker.host, "port": broker.port, "ha_discovery": False,
                                 "remote_unlock": True, "keepalive_s": 5}})
    topic = "edgeface/front/unlock/set"
    good = make_command(SECRET, "front")
    hostile = [
        b"x" * 1_000_000,  # oversized
        b"[" * 200_000,  # nesting bomb (json raises RecursionError)
        b"\xff\xfe\xfa invalid utf-8",
        b'{"nonce": "aaaaaaaaaaaa", "ts": NaN, "sig": "00"}',
        # Tampered: the last hex digit changed (always a different digit; hex case alone is not a change).
        json.dumps({"nonce": good["nonce"], "ts": good["ts"],
                    "sig": good["sig"][:-1] + ("1" if good["sig"][-1] == "0" else "0")}).encode(),
        json.dumps([good]).encode(),
        b"",
        b"UNLOCK",
    ]
    try:
        with Collector(broker.host, broker.port, "edgeface/front/door_event") as sub:
            with Daemon(cfg, analyzer=analyzer, source=FolderSource(FACES), pin_factory=pins) as daemon:
                daemon.start()
                assert daemon.mqtt.wait_connected(10)
                time.sleep(0.3)
                for payload in hostile:
                    sub.client.publish(topic, payload, qos=1).wait_for_publish(5)
                got = sub.wait_for("edgeface/front/door_event", len(hostile), timeout=20)
                assert pin_levels(pins.pin(17)) == [False]
                # A valid command published with retain=True: live subscribers get it without the retain
                # flag, so it is accepted once (fresh, signed, unused nonce)...
                sub.client.publish(topic, json.dumps(make_command(SECRET, "front")), qos=1,
                                   retain=True).wait_for_publish(5)
                assert wait_until(lambda: len(pin_levels(pins.pin(17))) >= 3, 10), "a valid command should unlock"
                first_run = pin_levels(pins.pin(17))
            # ...but after a restart the broker hands the retained copy to the new subscription: refused.
            with Daemon(cfg, analyzer=analyzer, source=FolderSource(FACES), pin_factory=pins) as daemon:
                daemon.start()
                assert daemon.mqtt.wait_connected(10)
                got = sub.wait_for("edgeface/front/door_event", len(hostile) + 2, timeout=20)
                audit = daemon.audit.rows("remote_unlock")
                second_run = pin_levels(pins.pin(17))
            sub.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)  # clear the retained message
    finally:
        pins.close()
        broker.close()
    events = [json.loads(p) for p in got]
    types = [e["event_type"] for e in events]
    assert types == ["remote_unlock_refused"] * len(hostile) + ["remote_unlock", "remote_unlock_refused"], types
    assert "retained" in events[-1]["detail"]["reason"]
    assert "too large" in events[0]["detail"]["reason"]
    assert [r["result"] for r in audit] == ["refused"] * len(hostile) + ["accepted", "refused"]
    assert first_run == [False, True, False], "exactly one unlock: the valid live command"
    assert second_run == first_run, "the retained copy must not unlock after the restart"


@pytest.mark.broker
@pytest.mark.skipif(mosquitto_path() is None, reason="needs mosquitto (apt install mosquitto)")
def test_remote_unlock_off_ignores_even_valid_commands(tmp_path, analyzer, monkeypatch):
    from edgeface.daemon.app import Daemon
    from edgeface.frames import FolderSource
    from edgeface.events.remote import make_command

    monkeypatch.setenv("EDGEFACE_UNLOCK_SECRET", SECRET)
    broker = MosquittoBroker().start()
    pins = MockFactory()
    cfg = parse_config({"state_dir": str(tmp_path / "state"),
                        "door": {"pin_factory": "mock"},
                        "gallery": {"path": "gallery.db"}, "audit": {"path": "audit.db"},
                        "mqtt": {"outbox_path": "outbox.db", "host": broker.host, "port": broker.port, "ha_discovery": False}})
    assert cfg.mqtt.remote_unlock is False
    try:
        with Collector(broker.host, broker.port, "#") as sub:
            with Daemon(cfg, analyzer=analyzer, source=FolderSource(FACES), pin_factory=pins) as daemon:
                daemon.start()
                assert daemon.mqtt.wait_connected(10)
                time.sleep(0.3)
                sub.client.publish("edgeface/front/unlock/set", json.dumps(make_command(SECRET, "front")), qos=1)
                time.sleep(1.0)
                audit = daemon.audit.rows("remote_unlock")
    finally:
        pins.close()
        broker.close()
    assert pin_levels(pins.pin(17)) == [False]
    assert audit == [], audit[:2]


# ------------------------------------------------------------------------------------------------ bombs
# A small file that decodes to gigabytes. The size must be read from the header and refused BEFORE OpenCV
# allocates anything: its own pixel cap (OPENCV_IO_MAX_IMAGE_PIXELS) only works if set before cv2 is first
# imported, which edgeface cannot promise (a caller, or another module, may import cv2 first). The decode runs
# in a child process whose address space is capped, like a 2 GB Pi: decoding first fails there with a
# memory error; checking the header first refuses with the limit.

_BOMB_CHILD = r"""
import resource, sys
import cv2  # imported first, on purpose: OpenCV's own env cap cannot help any more
from edgeface.errors import ImageError
from edgeface.vision.images import decode_image
data = open(sys.argv[1], "rb").read()
with open("/proc/self/status") as fh:
    vm = next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmSize:"))
limit = vm + 600 * 1024 * 1024
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    decode_image(data, name=sys.argv[1])
    print("DECODED")
except ImageError as exc:
    print("IMAGEERROR", exc)
except MemoryError:
    print("MEMORYERROR")
"""


def _png_header_bomb(w: int, h: int, color_type: int = 0) -> bytes:
    """A valid PNG signature and IHDR for w x h, then one tiny (truncated) IDAT."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))



@pytest.mark.parametrize("kind, w, h", [("png", 30000, 30000), ("png_rgb", 20000, 20000), ("jpeg", 20000, 20000),
                                        ("jpeg", 65000, 800), ("tiff", 20000, 20000),
                                        ("tiff_size_tags_twice", 20000, 20000)])
def test_decompression_bomb_is_refused_from_its_header_before_decoding(tmp_path, kind, w, h):
    """tiff_size_tags_twice: the real size first (what libtiff decodes), a 100x100 width/height after it."""
    from edgeface.testing import tiff_image

    if kind.startswith("tiff"):
        data = tiff_image(w, h, truncated=True, hidden_by=(100, 100) if kind == "tiff_size_tags_twice" else None)
    else:
        data = jpeg_header_bomb(w, h) if kind == "jpeg" else _png_header_bomb(w, h, 2 if kind == "png_rgb" else 0)
    assert len(data) < 10_000
    path = tmp_path / f"bomb.{kind[:3]}"
    path.write_bytes(data)
    child = tmp_path / "child.py"
    child.write_text(_BOMB_CHILD)
    env = {k: v for k, v in ENV.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}  # as in a fresh service process
    done = subprocess.run([sys.executable, str(child), str(path)], env=env, capture_output=True, text=True,
                          timeout=120)
    out = done.stdout.strip()
    assert out.startswith("IMAGEERROR"), (out, done.stderr[-1500:])
    assert f"is {w}x{h}" in out and "the limit is 50000000 pixels" in out and str(path) in out, out


def test_unknown_image_formats_are_refused_before_decoding():
    from edgeface.vision.images import decode_image

    for data in (b"P5\n30000 30000\n255\n" + b"\0" * 100, b"#?RADIANCE\n" + b"\0" * 100):
        with pytest.raises(ImageError, match="not a supported image"):
            decode_image(data, name="odd")

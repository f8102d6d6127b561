"""The presence gate before detection: replayed doorway sequences (fixture faces walking into a synthetic door scene
with flicker and camera noise) through the real daemon (real models, SQLite gallery, K-of-N policy, MockFactory
relay), and the gate itself on plain images. No timing is asserted: speed is bench/bench_doorway.py's job."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from gpiozero.pins.mock import MockFactory

from edgeface.config import PresenceConfig, parse_config
from edgeface.daemon.app import Daemon
from edgeface.frames import lores_size, yuv420_to_rgb
from edgeface.replay import DoorwaySequence, entrance, standing_still
from edgeface.types import Frame
from edgeface.vision.presence import PresenceGate

REPO = Path(__file__).resolve().parents[1]
FACES = REPO / "tests" / "fixtures" / "faces"
KNOWN = {"barack_obama": ["barack_obama_01.jpg", "barack_obama_02.jpg", "barack_obama_04.jpg"],
         "guido_van_rossum": ["guido_van_rossum_01.jpg", "guido_van_rossum_02.jpg", "guido_van_rossum_03.jpg"]}
#: Never enrolled photos of the enrolled people, and a stranger far from both (see tests/test_daemon.py).
OBAMA_PROBE = FACES / "barack_obama" / "barack_obama_03.jpg"
GUIDO_PROBE = FACES / "guido_van_rossum" / "guido_van_rossum_04.jpg"
STRANGER = FACES / "kit_harington" / "kit_harington_02.jpg"


@pytest.fixture(scope="module")
def gallery_file(analyzer, tmp_path_factory) -> Path:
    from edgeface.enroll import enroll_images
    from edgeface.gallery import Gallery, resolve_max_distance

    cfg = parse_config({})
    path = tmp_path_factory.mktemp("gallery") / "gallery.db"
    with Gallery.open(path, model_id=analyzer.embedder.model_id, embedding_dim=analyzer.embedder.spec.embedding_dim,
                      max_distance=resolve_max_distance(cfg.gallery, cfg.embedder, cfg.models_dir)) as g:
        for name, files in KNOWN.items():
            g.enroll(name, enroll_images(analyzer, [FACES / name / f for f in files]))
    return path


def replay(tmp_path: Path, analyzer, gallery_file: Path, seq: DoorwaySequence, **presence) -> dict:
    """Every frame of the sequence through a fresh daemon; what happened, frame by frame."""
    state = tmp_path / "state"
    state.mkdir(parents=True)
    shutil.copyfile(gallery_file, state / "gallery.db")
    cfg = parse_config({"state_dir": str(state), "camera": {"source": str(FACES)}, "gallery": {"path": "gallery.db"},
                        "door": {"pin_factory": "mock"}, "mqtt": {"enabled": False}, "presence": presence})
    pins = MockFactory()
    events: list[dict] = []
    grants, detected = [], []
    try:
        with Daemon(cfg, analyzer=analyzer, pin_factory=pins, event_sink=events.append) as daemon:
            for frame in seq.frames():
                d = daemon.process_frame(frame)
                if daemon.presence.state.detect:
                    detected.append(frame.index)
                if d.action == "grant":
                    assert daemon.door.unlocked  # the relay moved
                    grants.append((frame.index, d.person_name))
    finally:
        pins.close()
    return {"grants": grants, "detected": detected, "events": events}


def test_a_face_entering_after_a_long_empty_stretch_is_granted(tmp_path, analyzer, gallery_file):
    seq, person = entrance(OBAMA_PROBE, empty_frames=150, stay_frames=20, after_frames=5, height_frac=1.0, seed=1)
    out = replay(tmp_path, analyzer, gallery_file, seq)
    assert [name for _k, name in out["grants"]] == ["barack_obama"]
    k, _ = out["grants"][0]
    assert person.start <= k < person.end
    empty_detections = [i for i in out["detected"] if i < person.start]
    assert len(empty_detections) < 150 / 4, "the gate should skip most of an empty doorway"
    # from the first frame the person is in view, every frame went to the detector (no added latency)
    assert set(range(person.start, k + 1)) <= set(out["detected"])


def test_the_gate_grants_on_the_same_frame_as_no_gate(tmp_path, analyzer, gallery_file):
    seq, _person = entrance(GUIDO_PROBE, empty_frames=60, stay_frames=20, after_frames=5, side="right", seed=2)
    gated = replay(tmp_path / "on", analyzer, gallery_file, seq)
    ungated = replay(tmp_path / "off", analyzer, gallery_file, seq, enabled=False)
    assert gated["grants"] == ungated["grants"] != []
    assert len(gated["detected"]) < len(ungated["detected"]) == seq.n_frames


def test_a_person_standing_still_in_view_is_still_decided(tmp_path, analyzer, gallery_file):
    seq, _person = standing_still(OBAMA_PROBE, frames=40, height_frac=1.0, seed=4)
    out = replay(tmp_path, analyzer, gallery_file, seq)
    assert [name for _k, name in out["grants"]] == ["barack_obama"]


def test_a_stranger_still_is_not_let_in(tmp_path, analyzer, gallery_file):
    seq, _person = entrance(STRANGER, empty_frames=60, stay_frames=25, after_frames=5, height_frac=0.5, seed=5)
    out = replay(tmp_path, analyzer, gallery_file, seq)
    assert out["grants"] == []
    assert any(e.get("result") == "unknown" for e in out["events"])


# ---------------------------------------------------------------------------------------------- the gate alone
def _frames(images: list[np.ndarray], fps: float = 10.0) -> list[Frame]:
    return [Frame(image=im, timestamp=100.0 + i / fps, index=i) for i, im in enumerate(images)]


def test_an_unchanging_scene_is_detected_only_every_detect_every_s():
    gate = PresenceGate(PresenceConfig(detect_every_s=1.0, hold_s=0.5))
    seq = DoorwaySequence(60, [], width=320, height=180, seed=7)
    decisions = [gate.should_detect(f.image, f.timestamp) for f in seq.frames()]
    assert [i for i, d in enumerate(decisions) if d] == [0, 10, 20, 30, 40, 50]


def test_flicker_and_noise_are_not_motion_but_a_face_sliding_in_is():
    seq, person = entrance(OBAMA_PROBE, empty_frames=40, stay_frames=10, after_frames=0, width=320, height=180,
                           height_frac=1.0, seed=3)
    gate = PresenceGate(PresenceConfig(detect_every_s=60.0))
    reasons = [(gate.should_detect(f.image, f.timestamp), gate.state.reason) for f in seq.frames()]
    assert [r for d, r in reasons[1:person.start] if d] == []
    first_visible = next(k for k in range(seq.n_frames) if seq.face_visible(k, person))
    first_motion = next(k for k in range(person.start, seq.n_frames) if reasons[k][1] == "motion")
    assert first_motion <= first_visible
    assert all(d for d, _r in reasons[first_motion:])


def test_a_face_found_keeps_every_frame_detected_for_hold_s():
    gate = PresenceGate(PresenceConfig(detect_every_s=60.0, hold_s=1.0))
    still = np.full((90, 160, 3), 120, np.uint8)
    frames = _frames([still] * 30)
    out = []
    for f in frames:
        d = gate.should_detect(f.image, f.timestamp)
        out.append(d)
        if d and f.index < 5:
            gate.found(f.timestamp, face=True)
    # face seen on frames 0..4 (each one detected), then nothing: detected up to 1 s after the last face
    assert out[:15] == [True] * 15 and not any(out[15:])


def test_the_gate_off_detects_every_frame():
    gate = PresenceGate(PresenceConfig(enabled=False))
    still = np.zeros((90, 160, 3), np.uint8)
    assert all(gate.should_detect(f.image, f.timestamp) for f in _frames([still] * 10))


def test_the_gate_takes_a_grey_low_resolution_image():
    gate = PresenceGate(PresenceConfig(detect_every_s=60.0))
    grey = np.full((90, 160), 100, np.uint8)
    moved = grey.copy()
    moved[20:70, 40:90] = 220
    frames = _frames([grey, grey, moved])
    assert [gate.should_detect(f.image, f.timestamp) for f in frames] == [True, False, True]


def test_config_rejects_a_gate_out_of_bounds():
    from edgeface.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match="min_changed"):
        parse_config({"presence": {"min_changed": 0}})


# ---------------------------------------------------------------------------------------------- Pi camera lores
def test_lores_size_keeps_the_aspect_and_even_sides():
    assert lores_size(1280, 720, 640) == (640, 360)
    assert lores_size(1296, 972, 321) == (320, 240)
    assert lores_size(1280, 720, 0) is None
    assert lores_size(640, 480, 640) is None


def test_yuv420_with_padded_rows_decodes_like_unpadded():
    rng = np.random.default_rng(0)
    w, h = 64, 36
    y = rng.integers(16, 235, (h, w), dtype=np.uint8)
    u = rng.integers(16, 240, (h // 2, w // 2), dtype=np.uint8)
    v = rng.integers(16, 240, (h // 2, w // 2), dtype=np.uint8)
    packed = np.concatenate([y.ravel(), u.ravel(), v.ravel()]).reshape(h * 3 // 2, w)
    stride = 96  # the camera pads each row to its stride; chroma rows use half of it
    padded = np.zeros((h * 3 // 2, stride), np.uint8)
    padded[:h, :w] = y
    chroma = np.zeros((h, stride // 2), np.uint8)
    chroma[: h // 2, : w // 2] = u
    chroma[h // 2:, : w // 2] = v
    padded[h:] = chroma.reshape(h // 2, stride)
    expected = yuv420_to_rgb(packed, (w, h))
    assert expected.shape == (h, w, 3)
    assert np.array_equal(yuv420_to_rgb(padded, (w, h)), expected)


def test_detection_on_a_low_resolution_copy_lands_on_the_full_image(analyzer):
    import cv2

    from edgeface.vision.images import load_image

    image = cv2.resize(load_image(GUIDO_PROBE), (1280, 720))
    full, _n = analyzer.analyze_main(image)
    small, _n = analyzer.analyze_main(image, detect_on=cv2.resize(image, (640, 360), interpolation=cv2.INTER_AREA))
    assert full is not None and small is not None
    assert np.allclose(small.face.box, full.face.box, atol=0.06 * full.face.size)
    assert float(small.embedding @ full.embedding) > 0.9


#: A stand-in for picamera2 (it only exists on a Pi): the calls PiCameraSource makes, with picamera2's array layouts
#: ("RGB888" main is B,G,R in memory; lores is YUV420 with rows padded to a stride), serving one fixed scene.
FAKE_PICAMERA2 = '''
import numpy as np, cv2
SCENE = None  # RGB, set by the test
class Picamera2:
    def create_video_configuration(self, main, lores=None, buffer_count=4):
        assert main["format"] == "RGB888" and (lores is None or lores["format"] == "YUV420")
        return {"main": main, "lores": lores, "buffer_count": buffer_count}
    def configure(self, config):
        self.config = config
    def start(self):
        self.frames = 0
    def _main(self):
        w, h = self.config["main"]["size"]
        return cv2.resize(SCENE, (w, h))[:, :, ::-1].copy()
    def capture_array(self, name="main"):
        assert name == "main"
        return self._main()
    def capture_arrays(self, names):
        assert names == ["main", "lores"]
        w, h = self.config["lores"]["size"]
        yuv = cv2.cvtColor(cv2.resize(SCENE, (w, h)), cv2.COLOR_RGB2YUV_I420)
        stride = w + 64
        padded = np.zeros((h * 3 // 2, stride), np.uint8)
        padded[:h, :w] = yuv[:h]
        chroma = np.zeros((h, stride // 2), np.uint8)
        chroma[:, : w // 2] = yuv[h:].reshape(h, w // 2)
        padded[h:] = chroma.reshape(h // 2, stride)
        self.frames += 1
        return [self._main(), padded], {"SensorTimestamp": self.frames}
    def stop(self):
        pass
    def close(self):
        pass
'''


def test_pi_camera_frames_carry_the_low_resolution_stream_and_the_face_is_cropped_from_main(
        tmp_path, monkeypatch, analyzer):
    import sys

    import cv2

    from edgeface.config import CameraConfig
    from edgeface.frames import open_source
    from edgeface.vision.images import load_image

    import importlib.util

    path = tmp_path / "picamera2.py"
    path.write_text(FAKE_PICAMERA2, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("picamera2", path)
    picamera2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(picamera2)
    monkeypatch.setitem(sys.modules, "picamera2", picamera2)  # gone again after the test

    scene = cv2.resize(load_image(GUIDO_PROBE), (1280, 720))
    picamera2.SCENE = scene
    source = open_source(CameraConfig(source="picamera", width=1280, height=720, lores_width=640, max_fps=50))
    try:
        frame = next(iter(source.frames()))
    finally:
        source.close()
    assert frame.image.shape == (720, 1280, 3) and frame.lores is not None and frame.lores.shape == (360, 640, 3)
    assert np.abs(frame.image.astype(int) - scene).mean() < 1  # B,G,R flipped back to RGB
    assert np.abs(frame.lores.astype(int) - cv2.resize(scene, (640, 360))).mean() < 6  # YUV 4:2:0 round trip
    gate = PresenceGate(PresenceConfig())
    result = gate.analyze(analyzer, frame)
    full, _n = analyzer.analyze_main(frame.image)
    assert result is not None and full is not None
    assert result.crop.shape == full.crop.shape and float(result.embedding @ full.embedding) > 0.9

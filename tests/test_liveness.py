"""Liveness gate: a flat photo moved in front of the camera is refused; 3-D head motion or a blink passes.

The photo attacks are REAL: a committed photo warped by plane-pose homographies, then the real detector and
face mesh. The live side can only be geometric here (no video of real people in the repo): 3-D points of
a head-like surface rotated, and eyelids closed, on top of a real mesh.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from edgeface.config import LivenessConfig, parse_config
from edgeface.vision.detect import BlazeFaceDetector
from edgeface.errors import ConfigError
from edgeface.vision.images import load_image
from edgeface.vision.landmarks import LandmarkRefiner
from edgeface.vision.liveness import (LEFT_EYE, RIGHT_EYE, LivenessGate, MeshLiveness, eye_openness, inter_ocular,
                               planar_residual)


@pytest.fixture(scope="module")
def models():
    det = BlazeFaceDetector()
    ref = LandmarkRefiner(num_threads=2)
    yield det, ref
    ref.close()


@pytest.fixture(scope="module")
def photo(fixture_faces):
    return load_image(fixture_faces / "barack_obama" / sorted(p.name for p in (fixture_faces / "barack_obama").iterdir())[0])


@pytest.fixture(scope="module")
def real_mesh(models, photo):
    det, ref = models
    face = max(det.detect(photo), key=lambda f: f.size)
    points, presence = ref.mesh(photo, face)
    assert presence > 0.5
    return points.astype(np.float64)


def _rot(yaw: float, pitch: float = 0.0) -> np.ndarray:
    y, p = np.radians([yaw, pitch])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    return ry @ rx


def _head(points2d: np.ndarray) -> np.ndarray:
    """A head-like 3-D surface under the real 2-D mesh: depth from an ellipsoid (nose forward, edges back)."""
    c = points2d.mean(axis=0)
    half = (points2d.max(axis=0) - points2d.min(axis=0)) / 2
    r2 = np.clip((((points2d - c) / half) ** 2).sum(axis=1), 0, 1)
    z = -0.8 * half.mean() * np.sqrt(1 - r2)  # towards the camera
    return np.c_[points2d, z]


def _plane_homography(w: int, h: int, yaw: float, pitch: float, roll: float, dist: float, dx: float, dy: float):
    f = 1.2 * max(w, h)
    corners = np.array([[-w / 2, -h / 2, 0], [w / 2, -h / 2, 0], [w / 2, h / 2, 0], [-w / 2, h / 2, 0]], float)
    r = _rot(yaw, pitch)
    c, s = np.cos(np.radians(roll)), np.sin(np.radians(roll))
    r = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ r
    p3 = corners @ r.T + np.array([dx, dy, dist * f])
    dst = np.float32(np.c_[f * p3[:, 0] / p3[:, 2] + w / 2, f * p3[:, 1] / p3[:, 2] + h / 2])
    return cv2.getPerspectiveTransform(np.float32([[0, 0], [w, 0], [w, h], [0, h]]), dst)


def _photo_attack(models, photo, seed: int, n: int = 10, tilt: float = 15.0) -> MeshLiveness:
    """A print held in front of the camera and moved (tilted, turned, closer/further) for n frames."""
    det, ref = models
    rng = np.random.default_rng(seed)
    h, w = photo.shape[:2]
    live = MeshLiveness(LivenessGate(), ref)
    phase = rng.uniform(0, 2 * np.pi, 5)
    for i in range(n):
        t = i / (n - 1)
        hm = _plane_homography(w, h, tilt * np.sin(2 * np.pi * t + phase[0]), tilt * np.sin(2 * np.pi * t + phase[1]),
                               8 * np.sin(2 * np.pi * t + phase[2]), 1.1 + 0.15 * np.sin(2 * np.pi * t + phase[3]),
                               0.05 * w * np.sin(2 * np.pi * t + phase[4]), 0.0)
        frame = cv2.warpPerspective(photo, hm, (w, h), borderValue=(90, 90, 90))
        faces = det.detect(frame)
        assert faces, f"seed {seed} frame {i}: the warped photo should still show a face"
        live.observe(i * 0.25, frame, max(faces, key=lambda f: f.size))
    return live


def test_moved_photo_is_not_live(models, photo):
    """The commonest attack: a printed photo moved/tilted in front of the camera never passes."""
    verdicts = [_photo_attack(models, photo, seed).verdict() for seed in range(4)]
    for v in verdicts:
        assert v.frames == 10
        assert v.motion > 0.05, "the photo did move (the test is not about a still picture)"
    assert not any(v.live for v in verdicts), [v.as_dict() for v in verdicts]
    assert all("flat picture" in v.reason for v in verdicts)


def test_still_photo_is_not_live(models, photo):
    det, ref = models
    gate = MeshLiveness(LivenessGate(), ref)
    face = max(det.detect(photo), key=lambda f: f.size)
    for i in range(6):
        gate.observe(i * 0.2, photo, face)
    v = gate.verdict()
    assert not v.live and "no head motion and no blink" in v.reason


def test_turning_head_is_live(real_mesh):
    head = _head(real_mesh)
    c = head.mean(axis=0)
    gate = LivenessGate(method="parallax")
    for i, yaw in enumerate(np.linspace(-12, 12, 8)):
        gate.observe(i * 0.3, ((head - c) @ _rot(yaw, yaw / 3).T + c)[:, :2])
    v = gate.verdict()
    assert v.live, v.as_dict()
    assert v.parallax > gate.min_parallax


def test_head_in_pure_plane_motion_is_not_live(real_mesh):
    """The same mesh moved by homographies only (what a photo does) stays below the parallax threshold."""
    gate = LivenessGate()
    rng = np.random.default_rng(0)
    for i in range(8):
        hm = np.eye(3) + np.r_[rng.normal(0, 0.05, 6), rng.normal(0, 2e-4, 2), 0].reshape(3, 3)
        hm[0, 2] *= 500
        hm[1, 2] *= 500
        pts = cv2.perspectiveTransform(real_mesh[None], hm)[0]
        gate.observe(i * 0.3, pts)
    v = gate.verdict()
    assert v.motion > gate.min_motion
    assert v.parallax < 1e-6 and not v.live


def _close_eyes(points: np.ndarray, amount: float) -> np.ndarray:
    out = points.copy()
    for eye in (RIGHT_EYE, LEFT_EYE):
        for up, down in eye["lids"]:
            mid = (out[up] + out[down]) / 2
            out[up] = mid + (out[up] - mid) * (1 - amount)
            out[down] = mid + (out[down] - mid) * (1 - amount)
    return out


def test_blink_is_live_and_tilt_is_not_a_blink(real_mesh):
    open_ratio = eye_openness(real_mesh)
    assert 0.1 < open_ratio < 0.6
    blink = LivenessGate(method="blink")
    for i, amount in enumerate([0, 0, 0.8, 0.9, 0.2, 0]):
        blink.observe(i * 0.1, _close_eyes(real_mesh, amount))
    assert blink.verdict().live
    # A photo tilted back 35 degrees squashes the eyes vertically by cos(35) = 0.82 without any blink.
    tilt = LivenessGate(method="blink")
    c = real_mesh.mean(axis=0)
    for i, pitch in enumerate([0, 15, 35, 35, 15, 0]):
        squash = np.array([1.0, np.cos(np.radians(pitch))])
        tilt.observe(i * 0.1, (real_mesh - c) * squash + c)
    v = tilt.verdict()
    assert not v.live and v.blink < 0.05, v.as_dict()


def test_window_expires_and_broken_meshes_are_ignored(real_mesh):
    gate = LivenessGate(window_s=1.0, min_frames=3)
    gate.observe(0.0, real_mesh)
    gate.observe(0.1, np.full((468, 2), np.nan))
    gate.observe(0.2, real_mesh[:100])
    gate.observe(0.3, np.zeros((468, 2)))  # inter-ocular distance 0
    assert len(gate) == 1
    for t in (5.0, 5.1):
        gate.observe(t, real_mesh)
    v = gate.verdict(now=5.2)
    assert v.frames == 2 and not v.live and "2/3 frames" in v.reason
    gate.reset()
    assert len(gate) == 0


def test_planar_residual_and_scale_helpers(real_mesh):
    assert planar_residual(real_mesh, real_mesh * 1.5 + 7) < 1e-3  # pixels
    assert inter_ocular(real_mesh * 2) == pytest.approx(2 * inter_ocular(real_mesh))


def test_config_section():
    cfg = parse_config({"liveness": {"enabled": True, "method": "parallax", "min_parallax": 0.05}})
    gate = LivenessGate.from_config(cfg.liveness)
    assert gate.method == "parallax" and gate.min_parallax == 0.05
    assert LivenessConfig().enabled is False
    with pytest.raises(ConfigError, match="liveness.method"):
        parse_config({"liveness": {"method": "magic"}})
    with pytest.raises(ValueError, match="liveness.method"):
        LivenessGate(method="magic")


# ------------------------------------------------------------------------------------------------ policy

def _policy():
    from edgeface.config import PolicyConfig
    from edgeface.decide import Policy

    return Policy(PolicyConfig(min_frames=3, window_frames=5, window_s=3.0, cooldown_s=10.0, unknown_interval_s=5.0))


def _obama(distance: float = 0.2):
    from edgeface.types import Match

    return Match(1, "obama", distance, 0.4)


def test_liveness_policy_refuses_a_moved_photo_once_and_grants_a_turning_head(real_mesh):
    from edgeface.vision.liveness import LivenessPolicy

    # a photo: the mesh only moves by homographies
    gate = LivenessGate(window_s=4.0)
    lp = LivenessPolicy(_policy(), gate)
    rng = np.random.default_rng(1)
    actions = []
    for i in range(81):  # 16 s at 5 fps
        t = 1000.0 + i * 0.2
        hm = np.eye(3) + np.r_[rng.normal(0, 0.03, 6), rng.normal(0, 1e-4, 2), 0].reshape(3, 3)
        gate.observe(t, cv2.perspectiveTransform(real_mesh[None], hm)[0])
        d = lp.observe(t, _obama(), face_size=200, box=(0, 0, 200, 200))
        actions.append((round(t - 1000, 1), d.action, d.reason))
    acted = [a for a in actions if a[1] != "none"]
    # never a grant; a deny after each 4 s window, at most one per 10 s cooldown (at 4 s and 16 s)
    assert [(a[0], a[1]) for a in acted] == [(4.0, "deny"), (16.0, "deny")], acted
    assert "flat picture" in acted[0][2]
    assert all("waiting for liveness" in a[2] for a in actions if a[1] == "none")

    # a head that turns: granted as soon as the gate says live, from the held frames
    head = _head(real_mesh)
    c = head.mean(axis=0)
    gate = LivenessGate(window_s=4.0)
    lp = LivenessPolicy(_policy(), gate)
    actions, live = [], []
    for i, yaw in enumerate(np.linspace(0, 18, 12)):
        t = 2000.0 + i * 0.2
        gate.observe(t, ((head - c) @ _rot(yaw).T + c)[:, :2])
        live.append(gate.verdict(t).live)
        actions.append(lp.observe(t, _obama(), face_size=200).action)
    assert actions.count("grant") == 1 and "deny" not in actions
    # granted on the very frame the gate turns live (>= K = 3 frames held): no extra K-frame wait
    assert actions.index("grant") == live.index(True) >= 3, (actions, live)


def test_liveness_policy_passes_strangers_and_resets_on_no_face(real_mesh):
    from edgeface.vision.liveness import LivenessPolicy
    from edgeface.types import Match

    gate = LivenessGate()
    lp = LivenessPolicy(_policy(), gate)
    stranger = Match(None, None, 0.9, 0.4)
    out = [lp.observe(10 + i * 0.2, stranger, face_size=200).action for i in range(3)]
    assert out == ["none", "none", "unknown"]  # the policy's own K-of-N, liveness not involved
    gate.observe(20.0, real_mesh)
    lp.observe(20.0, _obama(), face_size=200)
    assert len(gate) == 1
    lp.observe(20.2, None)  # one missed detection keeps the track
    assert len(gate) == 1
    lp.observe(21.5, None)  # gone for more than gap_s: a new track
    assert len(gate) == 0
    small = lp.observe(21.7, _obama(), face_size=10)
    assert small.action == "none" and "too small" in small.reason


# ------------------------------------------------------------------------------------------------ daemon

@pytest.mark.slow
@pytest.mark.parametrize("liveness", [False, True])
def test_daemon_with_liveness_refuses_a_moved_photo_of_an_enrolled_person(tmp_path, fixture_faces, liveness,
                                                                         analyzer):
    """The attack: a print of an enrolled person's (never enrolled) photo held up and moved for 6 s.
    Without the gate the door opens (the control); with liveness.enabled it stays shut and one `denied`
    event says why."""
    from gpiozero.pins.mock import MockFactory

    from edgeface.daemon.app import Daemon
    from edgeface.enroll import enroll_images
    from edgeface.frames import FolderSource
    from edgeface.gallery import Gallery, resolve_max_distance
    from edgeface.vision.images import save_image

    obama = sorted((fixture_faces / "barack_obama").glob("*.jpg"))
    cfg = parse_config({
        "state_dir": str(tmp_path / "state"),
        "gallery": {"path": "gallery.db"}, "audit": {"path": "audit.db"}, "mqtt": {"enabled": False},
        "policy": {"min_frames": 3, "window_frames": 5, "window_s": 3.0},
        "door": {"pin_factory": "mock"}, "liveness": {"enabled": liveness}})
    g = Gallery.open(tmp_path / "state" / "gallery.db", model_id=analyzer.embedder.model_id,
                     embedding_dim=analyzer.embedder.spec.embedding_dim,
                     max_distance=resolve_max_distance(cfg.gallery, cfg.embedder, cfg.models_dir))
    g.enroll("barack_obama", enroll_images(analyzer, obama[:3]))
    g.close()
    photo = load_image(obama[3])
    h, w = photo.shape[:2]
    cam = tmp_path / "cam"
    cam.mkdir()
    for i in range(30):  # 6 s at 5 fps: the print tilted and turned, +-12 degrees
        t = i / 29
        hm = _plane_homography(w, h, 12 * np.sin(2 * np.pi * t), 8 * np.cos(2 * np.pi * t), 4 * np.sin(4 * t),
                               1.1, 0.03 * w * np.sin(2 * np.pi * t), 0.0)
        save_image(cam / f"{i:03d}.jpg", cv2.warpPerspective(photo, hm, (w, h), borderValue=(90, 90, 90)))
    clock = iter(1_700_000_000.0 + 0.2 * np.arange(1000))
    events: list[dict] = []
    pins = MockFactory()
    try:
        with Daemon(cfg, analyzer=analyzer, source=FolderSource(cam, clock=lambda: float(next(clock))),
                    pin_factory=pins, event_sink=events.append) as daemon:
            daemon.start()
            daemon.run()
            relay = [s.state for s in pins.pin(17).states]
    finally:
        pins.close()
    results = [(e["result"], e["reason"]) for e in events]
    if not liveness:
        assert [r for r, _ in results] == ["granted"], results  # the attack works without the gate
        assert True in relay
    else:
        assert [r for r, _ in results] == ["denied"], results
        assert "liveness failed" in results[0][1]
        assert True not in relay, "a photo must never open the door with liveness enabled"

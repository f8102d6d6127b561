"""`edgeface demo`: the real daemon on the shipped sample faces, with a mock relay and events as JSON lines.

A few fixture people are enrolled from their first photos, everyone else is a stranger; each remaining photo is
shown to a folder "camera" for 4 frames at a fixed 5 fps clock, so the decisions do not depend on this machine's
speed (the demo is also the end-to-end check the layout moves are held to: 9 decisions, 3 granted).
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Optional

from edgeface.config import EdgefaceConfig, parse_config
from edgeface.errors import EdgefaceError, ModelError

log = logging.getLogger(__name__)

#: These fixture people are enrolled from their first two photos; everyone else is a stranger. Chosen for margins
#: that hold on a Pi (arm64 and x86 distances differ by up to 0.016): with sface_int8 (blend, threshold 0.49) every
#: demo grant and every demo stranger is at least 0.22 from the threshold on x86 (paul_allen, enrolled before, was
#: granted at 0.48: 0.01 under it). tests/test_daemon.py checks a 0.03 margin on every decision.
DEMO_KNOWN = ("barack_obama", "kit_harington", "steve_wozniak")
DEMO_ENROLL_PHOTOS = 2


def demo_analyzer(cfg: EdgefaceConfig) -> tuple[EdgefaceConfig, Any]:
    """The configured embedder; in a development checkout without the model file (models/sface_int8.tflite) fall
    back to MobileFaceNet from ../shared so the demo still runs (the config returned says which)."""
    from edgeface.vision.analyzer import FaceAnalyzer

    try:
        return cfg, FaceAnalyzer.from_config(cfg.detector, cfg.embedder, cfg.models_dir)
    except ModelError:
        alt = Path(__file__).resolve().parents[3] / "shared" / "weights" / "mobilefacenet" / "mobilefacenet.tflite"
        if not alt.is_file():
            raise
        log.warning("embedder %s is missing; the demo uses %s instead", cfg.embedder.model, alt)
        data = cfg.model_dump()
        data["embedder"].update(model=str(alt), preprocessing="arcface", template="arcface112")
        cfg = parse_config(data)
        return cfg, FaceAnalyzer.from_config(cfg.detector, cfg.embedder, cfg.models_dir)


def demo_config(state_dir: Path, *, loop: bool, mqtt_host: str, mqtt_port: int) -> EdgefaceConfig:
    """The demo's config: the folder camera, a mock relay, a quick policy, an optional broker."""
    return parse_config({
        "state_dir": str(state_dir),
        "camera": {"source": "demo", "loop": loop, "max_fps": 50},
        "gallery": {"path": "gallery.db"},
        "policy": {"min_frames": 3, "window_frames": 5, "window_s": 3.0, "cooldown_s": 2.0,
                   "unknown_interval_s": 2.0},
        "door": {"door_id": "demo", "pin_factory": "mock", "pulse_s": 1.0},
        "mqtt": {"host": mqtt_host, "port": mqtt_port, "outbox_path": "outbox.db", "ha_discovery": False},
        "audit": {"path": "audit.db"},
    })


class DemoClock:
    """Frame times of a 5 fps camera (so the demo's decisions do not depend on this machine's speed)."""

    def __init__(self, fps: float = 5.0) -> None:
        self.t = time.time()
        self.step = 1.0 / fps

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)  # progress for the person watching; stdout carries the events


def run_demo(*, loop: bool = False, mqtt_host: str = "127.0.0.1", mqtt_port: int = 1883,
             out: Optional[IO[str]] = None, state_dir: Optional[Path] = None, web: Optional[str] = None) -> int:
    """The daemon on the sample faces: a few people enrolled from 2 photos each, the rest are strangers;
    each remaining photo is shown for 4 frames; events are printed as JSON lines to `out` (stdout)."""
    from edgeface.daemon.app import Daemon
    from edgeface.daemon.service import run_daemon
    from edgeface.enroll import enroll_images
    from edgeface.frames import DEMO_FACES, FolderSource
    from edgeface.gallery import analyzer_model, open_gallery

    stream = out or sys.stdout
    if not DEMO_FACES.is_dir():
        raise EdgefaceError(f"the demo needs the sample faces in {DEMO_FACES} (installed with the package; "
                            "reinstall edgeface)")
    tmp = Path(tempfile.mkdtemp(prefix="edgeface-demo-")) if state_dir is None else state_dir
    try:
        cfg = demo_config(tmp, loop=loop, mqtt_host=mqtt_host, mqtt_port=mqtt_port)
        cfg, analyzer = demo_analyzer(cfg)
        # Matched as the service matches: the config's mode with the threshold calibrated for that mode.
        gallery = open_gallery(cfg, model=analyzer_model(analyzer), create=True)  # state_dir/gallery.db
        frames_dir = tmp / "frames"
        for person in sorted(p for p in DEMO_FACES.iterdir() if p.is_dir()):
            photos = sorted(person.glob("*.jpg"))
            shown = photos
            if person.name in DEMO_KNOWN:
                enrolled, shown = photos[:DEMO_ENROLL_PHOTOS], photos[DEMO_ENROLL_PHOTOS:]
                report = gallery.enroll(person.name, enroll_images(analyzer, enrolled))
                _note(f"enrolled {person.name} from {len(report.added)} photos")
            (frames_dir / person.name).mkdir(parents=True, exist_ok=True)
            for photo in shown:  # photos used for enrollment are never shown to the camera
                shutil.copyfile(photo, frames_dir / person.name / photo.name)
        source = FolderSource(frames_dir, loop=loop, repeat=4, max_fps=cfg.camera.max_fps, clock=DemoClock())

        def sink(event: dict) -> None:
            stream.write(json.dumps(event, sort_keys=True) + "\n")
            stream.flush()

        strangers = ", ".join(p.name for p in sorted(DEMO_FACES.iterdir()) if p.is_dir() and p.name not in DEMO_KNOWN)
        _note(f"demo state in {tmp}; strangers: {strangers}")
        web_proc = None
        try:
            daemon = Daemon(cfg, analyzer=analyzer, gallery=gallery, source=source, event_sink=sink)
            for line in daemon.summary():
                log.info("%s", line)
            if web:  # the web app as its own process on the demo's state (edgeface.web.demo)
                from edgeface.web.demo import start_demo_web

                web_proc = start_demo_web(cfg, tmp, web)
            run_daemon(daemon)
        finally:
            gallery.close()
            analyzer.close()
            if web_proc is not None:
                web_proc.terminate()
                web_proc.wait(timeout=10)
        return 0
    finally:
        if state_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)

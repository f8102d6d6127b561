"""Decision thumbnails: bounded by age and count, erased with the person, and written by the real daemon."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from edgeface.daemon.thumbnails import ThumbnailStore, face_thumbnail
from edgeface.vision.images import decode_image, load_image

FACES = Path(__file__).resolve().parent / "fixtures" / "faces"


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def test_thumbnails_are_bounded_by_age_and_count_and_go_with_the_person(tmp_path):
    clock = Clock()
    store = ThumbnailStore(tmp_path / "thumbnails.db", retention_days=1, max_rows=10, clock=clock)
    rgb = load_image(FACES / "barack_obama" / "barack_obama_01.jpg")
    jpeg = face_thumbnail(rgb, (100, 100, 200, 200))
    assert max(decode_image(jpeg).shape[:2]) <= 160
    for i in range(3):
        store.save(f"old{i}", result="granted", person_id=1, person_name="a", jpeg=jpeg, embedding=np.ones(4))
    clock.t += 2 * 86400
    for i in range(12):
        clock.t += 1
        store.save(f"new{i}", result="unknown", person_id=None if i % 2 else 2, person_name=None, jpeg=jpeg,
                   embedding=None)
    store.rotate()
    assert store.event_ids() == {f"new{i}" for i in range(2, 12)}  # the oldest first, then beyond max_rows
    assert store.delete_person(2) == 5 and len(store) == 5
    assert store.get("new11").embedding is None and store.get("new11").jpeg == jpeg
    store.close()


def test_the_daemon_keeps_a_thumbnail_and_embedding_per_decision(analyzer, tmp_path):
    from gpiozero.pins.mock import MockFactory

    from edgeface.config import parse_config
    from edgeface.daemon.app import Daemon
    from edgeface.frames import FolderSource

    folder = tmp_path / "camera"
    folder.mkdir()
    shutil.copyfile(FACES / "kit_harington" / "kit_harington_02.jpg", folder / "kit.jpg")
    cfg = parse_config({"state_dir": str(tmp_path / "state"), "mqtt": {"enabled": False},
                        "door": {"pin_factory": "mock"}, "policy": {"window_s": 30.0}})
    with Daemon(cfg, analyzer=analyzer, source=FolderSource(folder, repeat=5), pin_factory=MockFactory()) as d:
        d.run()
        decisions = [r for r in d.audit.rows("access")]
    assert [r["result"] for r in decisions] == ["unknown"]
    store = ThumbnailStore(tmp_path / "state" / "thumbnails.db")
    thumb = store.get(decisions[0]["event_id"])
    assert thumb is not None and thumb.result == "unknown" and thumb.embedding.shape == (128,)
    assert decode_image(thumb.jpeg).shape[2] == 3
    store.close()


def test_people_remove_erases_the_persons_thumbnails(tmp_path, capsys, obama_gallery_file):
    from conftest import run_cli

    state = tmp_path / "state"
    state.mkdir()
    shutil.copyfile(obama_gallery_file, state / "gallery.db")
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {state}\nmqtt: {{enabled: false}}\n")
    store = ThumbnailStore(state / "thumbnails.db")
    jpeg = face_thumbnail(load_image(FACES / "barack_obama" / "barack_obama_01.jpg"), (100, 100, 200, 200))
    store.save("e1", result="granted", person_id=1, person_name="barack_obama", jpeg=jpeg, embedding=None)
    store.save("e2", result="unknown", person_id=None, person_name=None, jpeg=jpeg, embedding=None)
    rc, _out, err = run_cli(capsys, config, "people", "remove", "barack_obama", "--yes")
    assert rc == 0 and "1 decision thumbnails" in err
    assert store.event_ids() == {"e2"}
    store.close()

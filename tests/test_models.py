"""Shipped models: the manifest matches the files, and a wrong or truncated file is refused before use."""
from __future__ import annotations

import shutil

import pytest

from edgeface.cli import main
from edgeface.errors import ModelError
from edgeface.models import load_manifest, resolve_model, sha256_file, verify_model_file
from edgeface.vision.runtime import INTERPRETER_BACKEND, load_interpreter

from conftest import REPO


def test_every_manifest_entry_matches_its_file() -> None:
    manifest = load_manifest(REPO / "models")
    assert {"blazeface_short", "blazeface_full", "face_landmark"} <= set(manifest)
    for info in manifest.values():
        path = REPO / "models" / info.file
        assert path.stat().st_size == info.bytes
        assert sha256_file(path) == info.sha256
        for key in ("source", "license", "preprocessing", "output"):
            assert info.extra.get(key), f"{info.name} lacks {key} in the manifest"
        interpreter = load_interpreter(path, 1)
        shape = tuple(int(v) for v in interpreter.get_input_details()[0]["shape"])
        assert shape[1:] == info.input_shape[1:]


def test_interpreter_backend_is_chosen() -> None:
    assert INTERPRETER_BACKEND in ("ai_edge_litert", "tflite_runtime")


def test_truncated_and_substituted_models_are_refused(tmp_path) -> None:
    models = tmp_path / "models"
    shutil.copytree(REPO / "models", models, ignore=shutil.ignore_patterns("facenet*"))
    manifest = load_manifest(models)
    info = manifest["blazeface_short"]
    path = models / info.file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated or a different model"):
        verify_model_file(path, info)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(ModelError, match="has sha256"):
        resolve_model("blazeface_short", models)
    path.unlink()
    with pytest.raises(ModelError, match="model file not found"):
        resolve_model("blazeface_short", models)
    with pytest.raises(ModelError, match="unknown model 'nonexistent'"):
        resolve_model("nonexistent", models)


def test_models_command_reports_a_bad_file(tmp_path, capsys, monkeypatch) -> None:
    models = tmp_path / "models"
    shutil.copytree(REPO / "models", models)
    assert main(["--config", str(_config(tmp_path, models)), "models"]) == 0
    assert "blazeface_short" in capsys.readouterr().out
    (models / "face_landmark.tflite").write_bytes(b"x")
    assert main(["--config", str(_config(tmp_path, models)), "models"]) == 1
    out = capsys.readouterr().out
    assert "face_landmark" in out and "1 bytes, expected" in out


def _config(tmp_path, models):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"models_dir: {models}\n")
    return cfg


def test_loading_a_model_prints_no_delegate_notice_but_keeps_other_stderr() -> None:
    """The TFLite runtime's 'Created TensorFlow Lite XNNPACK delegate' INFO line came before every command's
    output; it is dropped where interpreters are made, and anything else written to stderr meanwhile still shows."""
    import subprocess
    import sys

    script = (
        "import os\n"
        "from edgeface.vision.runtime import load_interpreter, without_delegate_notice, DELEGATE_NOTICE\n"
        f"load_interpreter({str(REPO / 'models' / 'face_detection_short_range.tflite')!r}, 1)\n"
        "with without_delegate_notice():\n"
        "    os.write(2, b'ERROR: a real problem\\n' + DELEGATE_NOTICE + b'\\nWARNING: another\\n')\n"
        "print('done')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "done\n"
    assert run.stderr == "ERROR: a real problem\nWARNING: another\n"


def test_convert_help_names_the_options_that_made_the_shipped_embedder(capsys) -> None:
    """`convert --help` said float16 was what models/ ships; the shipped default embedder is sface_int8, and the
    help now gives the options its report says it was made with."""
    import json
    import shlex

    from edgeface.config import EmbedderConfig

    shipped = EmbedderConfig().model
    command = shlex.split(json.loads((REPO / "models" / f"{shipped}.report.json").read_text())["command"])
    from edgeface.cli.model import convert_cmd

    main(["convert", "--help"])
    assert "--quantization" in capsys.readouterr().out
    help_text = next(p.help for p in convert_cmd.params if p.name == "quantization")  # unwrapped
    assert "what models/ ships" not in help_text
    assert f"The shipped embedder, {shipped}, is" in help_text
    for flag in ("--model", "--quantization", "--equalise"):
        value = command[command.index(flag) + 1]
        assert f"{flag} {value}" in help_text, (flag, value)
    assert "--float-prelu" in command and "--float-prelu (models/" in help_text

"""Configuration: defaults, the shipped config.yaml, and one clear line per bad value."""
from __future__ import annotations

import pytest

from pydantic import BaseModel

from edgeface.cli import main
from edgeface.config import EdgefaceConfig, load_config, read_secret
from edgeface.errors import ConfigError

from conftest import REPO


def test_shipped_config_yaml_is_valid_and_documents_every_key() -> None:
    cfg = load_config(REPO / "config.yaml")
    assert isinstance(cfg, EdgefaceConfig)
    text = (REPO / "config.yaml").read_text()
    for section, model in EdgefaceConfig.model_fields.items():
        sub = getattr(cfg, section)
        if isinstance(sub, BaseModel):
            for key in type(sub).model_fields:
                assert f"{key}:" in text, f"config.yaml does not mention {section}.{key}"


def test_bad_value_names_file_line_key_and_expectation(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("door:\n  relay_pin: 17\n  pulse_s: -1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:3: door.pulse_s = -1: Input should be greater than 0"


def test_unknown_key_and_cross_field_rule(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("policy:\n  min_frames: 9\n  window_frames: 5\nmqtt:\n  hots: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert lines[0].startswith(f"{path}:1: policy: Value error, min_frames (9) must be <= window_frames (5)")
    assert lines[1] == f"{path}:5: mqtt.hots: unknown key (check the spelling; see config.yaml for every key)"


def test_invalid_yaml_and_missing_file(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("door: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(path)


def test_check_config_cli_exit_codes(tmp_path, capsys) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("door:\n  pulse_s: 2\n")
    assert main(["--config", str(good), "check-config"]) == 0
    assert capsys.readouterr().out.strip() == f"config OK ({good})"
    bad = tmp_path / "bad.yaml"
    bad.write_text("door:\n  pulse_s: 0\n")
    assert main(["--config", str(bad), "check-config"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}:2: door.pulse_s = 0: Input should be greater than 0"


def test_secrets_come_from_credentials_directory_before_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EDGEFACE_TEST_SECRET", "from-env")
    assert read_secret("EDGEFACE_TEST_SECRET") == "from-env"
    (tmp_path / "EDGEFACE_TEST_SECRET").write_text("from-credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_secret("EDGEFACE_TEST_SECRET") == "from-credential"
    assert read_secret("EDGEFACE_ABSENT_SECRET") is None


def test_repository_config_yaml_is_the_generated_default() -> None:
    """config.yaml is `edgeface check-config --print-defaults`, so it can never drift from the code."""
    from edgeface.config import render_default_yaml

    assert (REPO / "config.yaml").read_text() == render_default_yaml()


def test_camera_index_written_unquoted_is_accepted(tmp_path) -> None:
    """`source: 0` as the README writes it is YAML's integer 0: it is the device index, not a type error."""
    path = tmp_path / "c.yaml"
    path.write_text("camera:\n  source: 0\n")
    assert load_config(path).camera.source == "0"
    path.write_text("camera:\n  source: -1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "camera.source = -1" in str(info.value) and "index is 0 or more" in str(info.value)

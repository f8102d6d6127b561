"""`edgeface demo --web HOST:PORT`: the web app beside the demo daemon, as its own process on the demo's state."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml


def start_demo_web(cfg: Any, state_dir: Path, listen: str) -> "subprocess.Popen[bytes]":
    """Write the demo's config beside its state and start `edgeface web` on it (stopped by the caller)."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        from edgeface.errors import ConfigError

        raise ConfigError(f"--web {listen!r}: expected HOST:PORT (e.g. 0.0.0.0:8080)")
    path = state_dir / "web-config.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    return subprocess.Popen([sys.executable, "-m", "edgeface", "--config", str(path), "web", "--host", host,
                             "--port", port])

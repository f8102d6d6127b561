"""The `edgeface` command: one click group; errors become one line and a named exit status here only."""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import click

from edgeface.errors import EdgefaceError, ExitStatus

if TYPE_CHECKING:
    from edgeface.config import EdgefaceConfig

#: Modules that add subcommands; each defines `register(group: click.Group) -> None`. They are imported when
#: main() runs, not when this module is imported: `edgeface door release` (systemd ExecStopPost) must not
#: import pydantic, numpy or OpenCV, and must not depend on anything but the door's pin settings.
COMMAND_MODULES: list[str] = ["model", "eval", "people", "service", "train", "fleet"]
#: Same as edgeface.config.DEFAULT_CONFIG_PATH (repeated here so the CLI can start without importing pydantic).
DEFAULT_CONFIG_PATH = Path("/etc/edgeface/config.yaml")


class CliContext:
    """What every subcommand can reach: the config (loaded once, lazily) and output style."""

    def __init__(self, config_path: Optional[str], traceback: bool) -> None:
        self.config_path = config_path
        self.traceback = traceback
        self._config: Optional[EdgefaceConfig] = None

    def resolved_config_path(self) -> Optional[Path]:
        """--config, else $EDGEFACE_CONFIG, else ./config.yaml, else /etc/edgeface/config.yaml, else defaults."""
        for candidate in (self.config_path, os.environ.get("EDGEFACE_CONFIG")):
            if candidate:
                return Path(candidate)
        for candidate in (Path("config.yaml"), DEFAULT_CONFIG_PATH):
            if candidate.is_file():
                return candidate
        return None

    @property
    def config(self) -> "EdgefaceConfig":
        if self._config is None:
            from edgeface.config import load_config

            self._config = load_config(self.resolved_config_path())
        return self._config


pass_ctx = click.make_pass_decorator(CliContext)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", metavar="PATH", default=None,
              help="Config file (default: $EDGEFACE_CONFIG, ./config.yaml, /etc/edgeface/config.yaml).")
@click.option("--traceback", is_flag=True, help="Show the full traceback of an error.")
@click.version_option(package_name="edgeface")
@click.pass_context
def cli(ctx: click.Context, config_path: Optional[str], traceback: bool) -> None:
    """edgeface: offline face-recognition door access."""
    ctx.obj = CliContext(config_path, traceback)


@cli.command("check-config")
@click.option("--print-defaults", is_flag=True, help="Print every key with its default and description, then exit.")
@pass_ctx
def check_config(obj: CliContext, print_defaults: bool) -> None:
    """Validate the config file and exit (0 = OK, 2 = invalid)."""
    if print_defaults:
        from edgeface.config import render_default_yaml

        click.echo(render_default_yaml(), nl=False)
        return
    path = obj.resolved_config_path()
    obj.config  # noqa: B018  (loading is the check)
    click.echo(f"config OK ({path if path else 'built-in defaults'})")


@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def models_cmd(obj: CliContext, as_json: bool) -> None:
    """List the shipped models and verify each file's size and sha256 against the manifest."""
    from edgeface.models import default_models_dir, load_manifest, verify_model_file

    models_dir = Path(obj.config.models_dir) if obj.config.models_dir else default_models_dir()
    rows = []
    failed = False
    for info in load_manifest(models_dir).values():
        try:
            verify_model_file(models_dir / info.file, info)
            status = "ok"
        except EdgefaceError as exc:
            status, failed = str(exc), True
        rows.append({"name": info.name, "kind": info.kind, "file": info.file, "bytes": info.bytes, "status": status})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for r in rows:
            click.echo(f"{r['name']:<18} {r['kind']:<10} {r['bytes']:>10}  {r['file']}  {r['status']}")
    if failed:
        raise click.exceptions.Exit(int(ExitStatus.ERROR))


@cli.command("quantize")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--template", type=click.Choice(["arcface112", "facenet160"]), required=True,
              help="Alignment template the model was trained with.")
@click.option("--preprocessing", type=click.Choice(["arcface", "prewhiten"]), required=True,
              help="Pixel normalisation the model expects.")
@click.option("--representative", "representative", type=click.Path(exists=True, file_okay=False), required=True,
              help="Folder of face photos (any depth) used to calibrate activation ranges.")
@click.option("--limit", default=200, show_default=True, help="Calibration faces to use at most.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True, help="Output .tflite file.")
@pass_ctx
def quantize_cmd(obj: CliContext, model: str, template: str, preprocessing: str, representative: str,
                 limit: int, out_path: str) -> None:
    """Quantize a float TFLite embedder to int8 (weights and activations) with real aligned faces."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    from edgeface.vision.analyzer import FaceAnalyzer
    from edgeface.vision.embed import PREPROCESSING
    from edgeface.vision.images import IMAGE_SUFFIXES
    from edgeface.convert.quantize import calibration_crops, quantize_int8

    cfg = obj.config.model_copy(deep=True)
    cfg.embedder.model, cfg.embedder.template, cfg.embedder.preprocessing = model, template, preprocessing
    images = sorted(p for p in Path(representative).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    with FaceAnalyzer.from_config(cfg.detector, cfg.embedder, cfg.models_dir) as analyzer:
        crops = calibration_crops(images, analyzer, limit=limit)
    click.echo(f"calibrating on {len(crops)} aligned faces from {representative}", err=True)
    norm = PREPROCESSING[preprocessing]
    out = quantize_int8(model, (norm(c[None]) for c in crops), out_path)
    from edgeface.models import sha256_file

    click.echo(f"{out} {out.stat().st_size} bytes sha256 {sha256_file(out)}")


_registered = False


def _register_commands() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    for name in COMMAND_MODULES:
        importlib.import_module(f".{name}", __package__).register(cli)


def _is_door_release(args: Sequence[str]) -> bool:
    """True for `[--config PATH] [--traceback] door release ...`: then only that command is loaded."""
    i = 0
    while i < len(args):
        if args[i] == "--config":
            i += 2
        elif args[i].startswith("--config=") or args[i] == "--traceback":
            i += 1
        else:
            break
    return list(args[i:i + 2]) == ["door", "release"]


def describe_os_error(exc: OSError) -> str:
    """`permission denied: /var/lib/edgeface/gallery.db` (what failed, on which path), for one-line errors."""
    what = exc.strerror or str(exc) or type(exc).__name__
    what = what[:1].lower() + what[1:]
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    if not paths:
        return what
    hint = " (check its owner and mode)" if isinstance(exc, PermissionError) else ""
    return f"{what}: {' -> '.join(paths)}{hint}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI and return its exit status (for tests and the console script alike)."""
    args = list(sys.argv[1:] if argv is None else argv)
    traceback = "--traceback" in args
    if _is_door_release(args) and not _registered:
        from edgeface.daemon.release import door_group

        cli.add_command(door_group)
    else:
        _register_commands()
    try:
        result = cli.main(args=args, prog_name="edgeface", standalone_mode=False)
        return int(result) if isinstance(result, int) else int(ExitStatus.OK)
    except EdgefaceError as exc:
        if traceback:
            raise
        click.echo(f"error: {exc}", err=True)
        return int(exc.exit_status)
    except OSError as exc:  # PermissionError, disk full, read-only file system...: one line naming the path
        if traceback:
            raise
        click.echo(f"error: {describe_os_error(exc)}", err=True)
        return int(ExitStatus.ERROR)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return int(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("interrupted", err=True)
        return int(ExitStatus.INTERRUPTED)

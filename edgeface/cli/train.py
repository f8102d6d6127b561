"""`edgeface train-head`: train an embedding head with triplet loss on a PC (needs edgeface[train])."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click


@click.command("train-head")
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The head file to write (.tflite); its manifest entry (.json) and report (.md) go beside it.")
@click.option("--backbone", default="sface_int8", show_default=True,
              help="The frozen embedder whose embeddings the head maps (manifest name); the daemon's embedder.model "
                   "must be the same.")
@click.option("--name", default=None, help="The head's name (default: the --out file's stem).")
@click.option("--arch", type=click.Choice(["residual", "mlp", "linear"]), default="residual", show_default=True,
              help="mlp: 512-256-128 with batch norm and dropout; residual: the same MLP added to its input, "
                   "starting as the identity; linear: one matrix starting as the identity.")
@click.option("--margin", type=click.FloatRange(0, 2, min_open=True), default=0.2, show_default=True,
              help="Triplet margin on squared distances of unit vectors.")
@click.option("--mining", type=click.Choice(["semi-hard", "batch-hard"]), default="semi-hard", show_default=True)
@click.option("--epochs", type=click.IntRange(1, 10000), default=60, show_default=True)
@click.option("--patience", type=click.IntRange(1, 1000), default=8, show_default=True,
              help="Stop after this many epochs without a better validation figure.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.25,
              show_default=True, help="Share of the identities held out for validation (nobody in both).")
@click.option("--split", type=click.Choice(["all", "tune", "report"]), default="all", show_default=True,
              help="Keep one half of the identities by the open-set study's fixed hash (tune: train on the tuning "
                   "half only, so `edgeface eval --open-set --split report` measures the head honestly).")
@click.option("--exclude", type=click.Path(dir_okay=False), default=None,
              help="Persons or person/photo lines to leave out (as `edgeface eval --exclude`).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path.home() / ".cache" / "edgeface" / "eval", show_default=True,
              help="Backbone embeddings are cached here (shared with `edgeface eval`).")
@click.option("--quiet", is_flag=True, help="No progress bar and no per-epoch lines.")
def train_head_cmd(folders: tuple[Path, ...], out: Path, backbone: str, name: Optional[str], arch: str, margin: float,
                   mining: str, epochs: int, patience: int, val_fraction: float, split: str, exclude: Optional[str],
                   seed: int, cache_dir: Path, quiet: bool) -> None:
    """Train a head on FOLDERS (each one sub-folder of photos per person) with triplet loss.

    Use it in the daemon with `embedder.head: PATH.tflite`, then `edgeface gallery reembed` (or re-enroll)."""
    from edgeface.training.headfile import run_training
    from edgeface.training.triplet import TrainSettings

    settings = TrainSettings(arch=arch, margin=margin, mining=mining, epochs=epochs, patience=patience,
                             val_fraction=val_fraction, seed=seed)
    log = None if quiet else (lambda line: click.echo(line, err=True))
    done = run_training(list(folders), out, backbone=backbone, name=name, settings=settings, split=split,
                        exclude=exclude, cache_dir=cache_dir, progress=not quiet, log=log)
    t = done.report["entry"]["training"]
    v = t["validation_correct_accept_at_1pct"]
    click.echo(f"{out}: best epoch {t['best_epoch']}, validation correct accept @1% {100 * v['without_head']:.1f}% "
               f"without head -> {100 * v['with_head']:.1f}% with; wrote {', '.join(str(p) for p in done.files)}")


def register(group: click.Group) -> None:
    group.add_command(train_head_cmd)

"""From labeled photo folders to a shipped head file: embed once (cached), split, train, export, report."""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from edgeface.errors import ConfigError
from edgeface.training.triplet import Samples, TrainResult, TrainSettings, identity_disjoint_split, \
    impostor_threshold, open_set_accept, train_head
from edgeface.vision.head import HEAD_KIND, sidecar_path


@dataclass(frozen=True)
class TrainingData:
    """Every photo's backbone embeddings (probe view and crop+mirror view), labels and where they came from."""

    samples: Samples
    folders: list[str]
    n_photos: int
    n_without_face: int


def embed_folders(folders: Sequence[str | Path], backbone: str, *, split: str = "all", exclude: Optional[str] = None,
                  cache_dir: Optional[Path] = None, progress: bool = False) -> TrainingData:
    """Embed `folders` (each `<person>/*.jpg`) with the backbone through the evaluation's cached face path.

    Person names are prefixed by their folder when several folders are given, so two `alice` folders stay apart.
    `split` keeps one half of the identities by the evaluation's fixed hash (`tune` for the open-set tuning half)."""
    from edgeface.evaluation.dataset import load_folder_dataset, read_exclusions, split_persons
    from edgeface.evaluation.embedding import ModelChoice, embed_dataset

    choice = ModelChoice.parse(backbone)
    xs, ys, photos, persons = [], [], [], []
    n_photos = n_missing = 0
    for folder in folders:
        ds = load_folder_dataset(folder)
        if exclude:
            ds, _ = ds.without(read_exclusions(exclude))
        ds = ds.subset(split_persons(ds.persons, split))
        es = embed_dataset(ds, choice, cache_dir=cache_dir, progress=progress)
        found = es.found & np.isfinite(es.emb).all(axis=1)
        base = n_photos
        n_photos += len(ds)
        n_missing += int((~found).sum())
        offset = len(persons)
        prefix = f"{Path(folder).name}/" if len(folders) > 1 else ""
        persons.extend(prefix + p for p in ds.persons)
        idx = np.flatnonzero(found)
        for view in (es.emb, es.for_enrollment()):  # two views per photo: the probe crop and crop+mirror
            xs.append(view[idx])
            ys.append(ds.labels[idx] + offset)
            photos.append(idx + base)
    if not xs:
        raise ConfigError("no photos to train on")
    samples = Samples(np.concatenate(xs).astype(np.float32), np.concatenate(ys), persons, np.concatenate(photos))
    return TrainingData(samples, [str(f) for f in folders], n_photos, n_missing)


def split_samples(s: Samples, val_persons: Sequence[str]) -> tuple[Samples, Samples]:
    is_val = np.isin(np.array(s.persons)[s.y], list(val_persons))
    return (Samples(s.x[~is_val], s.y[~is_val], s.persons, s.photo[~is_val]),
            Samples(s.x[is_val], s.y[is_val], s.persons, s.photo[is_val]))


@dataclass
class HeadTraining:
    """A finished training: the result, the report and the files written."""

    result: TrainResult
    report: dict[str, Any]
    files: list[Path]


def run_training(folders: Sequence[str | Path], out: Path, *, backbone: str = "sface_int8", name: Optional[str] = None,
                 settings: TrainSettings = TrainSettings(), split: str = "all", exclude: Optional[str] = None,
                 cache_dir: Optional[Path] = None, progress: bool = False, log: Any = None) -> HeadTraining:
    """Embed, split by identity, train, export `out` (.tflite) with its `.json` entry and `.md` report."""
    from edgeface.convert.tflite import to_tflite, write_atomic
    from edgeface.models import sha256_file

    if out.suffix != ".tflite":
        raise ConfigError(f"--out {out}: expected a .tflite path (its .json and .md are written beside it)")
    settings.check()
    data = embed_folders(folders, backbone, split=split, exclude=exclude, cache_dir=cache_dir, progress=progress)
    s = data.samples
    present = sorted({s.persons[i] for i in np.unique(s.y)})
    train_p, val_p = identity_disjoint_split(present, settings.val_fraction, settings.seed)
    train, val = split_samples(s, val_p)

    def on_epoch(row: dict[str, float]) -> None:
        if log:
            log(f"epoch {row['epoch']:3d}: batch loss {row['batch_loss']:.4f}, train loss {row['train_loss']:.4f}, "
                f"validation correct accept @1% {100 * row['val_correct_accept_at_1pct']:.1f}%")

    result = train_head(train, val, settings, on_epoch=on_epoch)
    data_bytes = to_tflite(result.model, "float")
    write_atomic(out, data_bytes)
    val_proj = result.project(val.x)
    threshold = impostor_threshold(val_proj, val.y, 1e-3)
    name = name or out.stem
    from edgeface.models import resolve_model
    backbone_path, backbone_info = resolve_model(_backbone_name(backbone))
    backbone_id = backbone_info.extra.get("model_id", backbone_info.name) if backbone_info else backbone_path.stem
    entry = {
        "name": name, "kind": HEAD_KIND, "file": out.name, "sha256": sha256_file(out), "bytes": out.stat().st_size,
        "input_shape": [1, int(s.x.shape[1])], "input_dtype": "float32",
        "backbone": backbone_id, "backbone_sha256": backbone_info.sha256 if backbone_info else sha256_file(backbone_path),
        "input_dim": int(s.x.shape[1]), "output_dim": int(s.x.shape[1]),
        "default_max_distance": round(threshold, 4),
        "default_max_distance_note": "provisional: 0.1% of the validation identities' different-person pairs; "
                                     "calibrate an open-set threshold with `edgeface eval --open-set`",
        "training": {"folders": [Path(f).name for f in folders], "split": split, "identities": len(present),
                     "train_identities": len(train_p), "validation_identities": len(val_p), "photos": data.n_photos,
                     "photos_without_face": data.n_without_face, "settings": asdict(settings),
                     "best_epoch": result.best_epoch, "epochs_run": len(result.history),
                     "validation_correct_accept_at_1pct": {"without_head": result.baseline_val,
                                                           "with_head": result.best_val},
                     "triplet_loss": {"before": result.initial_loss, "after": result.final_loss},
                     "date": _dt.date.today().isoformat()},
        "source": "trained with `edgeface train-head` on the user's own photos",
        "license": "the user's: whatever their training photos allow",
    }
    side = sidecar_path(out)
    write_atomic(side, (json.dumps(entry, indent=1) + "\n").encode())
    report = {"entry": entry, "history": result.history}
    md = out.with_suffix(".md")
    write_atomic(md, render_report(report).encode())
    return HeadTraining(result, report, [out, side, md])


def _backbone_name(backbone: str) -> str:
    """The backbone's manifest name or path without the eval's +flags."""
    return backbone.split("+", 1)[0].split(":", 1)[0]


def render_report(report: dict[str, Any]) -> str:
    e = report["entry"]
    t = e["training"]
    pct = lambda v: "-" if v is None or v != v else f"{100 * v:.1f}%"  # noqa: E731
    lines = [f"# Embedding head {e['name']}", "",
             f"Backbone {e['backbone']}; {t['identities']} identities ({t['train_identities']} train, "
             f"{t['validation_identities']} validation, no person in both), {t['photos']} photos "
             f"({t['photos_without_face']} without a face); folders {', '.join(t['folders'])}, split {t['split']}.",
             f"Settings: {json.dumps(t['settings'], sort_keys=True)}.", "",
             f"Best epoch {t['best_epoch']} of {t['epochs_run']} run (early stopping on the validation figure).",
             f"Validation correct accept at 1% stranger false-accept (half the validation identities enrolled with 2 "
             f"photos, half strangers): without head {pct(t['validation_correct_accept_at_1pct']['without_head'])}, "
             f"with head {pct(t['validation_correct_accept_at_1pct']['with_head'])}.",
             f"Triplet loss on fixed training batches: {t['triplet_loss']['before']:.4f} before, "
             f"{t['triplet_loss']['after']:.4f} after.",
             f"Provisional threshold {e['default_max_distance']} ({e['default_max_distance_note']}).", "",
             "| epoch | batch loss | train loss | validation correct accept @1% |", "|---|---|---|---|"]
    for row in report["history"]:
        lines.append(f"| {row['epoch']} | {row['batch_loss']:.4f} | {row['train_loss']:.4f} | "
                     f"{pct(row['val_correct_accept_at_1pct'])} |")
    return "\n".join(lines) + "\n"


__all__ = ["TrainingData", "HeadTraining", "embed_folders", "split_samples", "run_training", "render_report",
           "open_set_accept"]

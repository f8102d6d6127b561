"""The labelled photo set: a folder per person, exclusion lists (label errors found by eye) and the fixed split of
identities into a tuning half and a reporting half (settings are chosen on one half, figures stated on the other)."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from edgeface.errors import ConfigError
from edgeface.vision.images import list_images


@dataclass(frozen=True)
class Dataset:
    """A folder-per-person photo set: `root/<person>/<photo>`; `labels[i]` indexes `persons`."""

    root: Path
    persons: list[str]
    paths: list[Path]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def without(self, exclude: Iterable[str]) -> tuple["Dataset", np.ndarray]:
        """Leave out whole persons (`name`) or single photos (`name/file`), e.g. label errors found by eye.
        Returns the smaller set and the indices of the kept photos (to cut embeddings made on the full set)."""
        exclude = set(exclude)
        keep = np.array([i for i, p in enumerate(self.paths)
                         if p.parent.name not in exclude and f"{p.parent.name}/{p.name}" not in exclude], np.int64)
        kept_persons = sorted({self.paths[i].parent.name for i in keep})
        remap = {n: k for k, n in enumerate(kept_persons)}
        return (Dataset(self.root, kept_persons, [self.paths[i] for i in keep],
                        np.array([remap[self.paths[i].parent.name] for i in keep], np.int64)), keep)

    def subset(self, persons: Iterable[str]) -> "Dataset":
        keep = set(persons)
        idx = [i for i, lab in enumerate(self.labels) if self.persons[lab] in keep]
        names = sorted(keep & set(self.persons))
        remap = {n: k for k, n in enumerate(names)}
        return Dataset(self.root, names, [self.paths[i] for i in idx],
                       np.array([remap[self.persons[self.labels[i]]] for i in idx], np.int64))


def read_exclusions(path: str | os.PathLike[str]) -> set[str]:
    """An exclusion list: one `person` or `person/photo.jpg` per line, `#` starts a comment (say why)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read exclusion list {path}: {exc.strerror}") from None
    out = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if entry.count("/") > 1 or entry.startswith("/"):
            raise ConfigError(f"{path}:{lineno}: expected 'person' or 'person/photo.jpg', got {entry!r}")
        out.add(entry)
    return out


def load_folder_dataset(root: str | os.PathLike[str]) -> Dataset:
    """Read `root/<person>/*.jpg`; persons sorted by name, photos sorted by file name."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"data set {root} is not a folder; expected one sub-folder of photos per person")
    persons, paths, labels = [], [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        imgs = list_images(sub)
        if not imgs:
            continue
        persons.append(sub.name)
        paths.extend(p.resolve() for p in imgs)
        labels.extend([len(persons) - 1] * len(imgs))
    if len(persons) < 2:
        raise ConfigError(f"data set {root} has {len(persons)} person folder(s) with photos; need at least 2")
    return Dataset(root, persons, paths, np.array(labels, np.int64))


def identity_split(name: str) -> str:
    """'tune' or 'report', fixed by a hash of the identity name: settings are chosen on one half only."""
    return "tune" if hashlib.sha256(name.encode("utf-8")).digest()[0] % 2 == 0 else "report"


def split_persons(persons: Sequence[str], split: str) -> list[str]:
    if split == "all":
        return list(persons)
    if split not in ("tune", "report"):
        raise ConfigError(f"split {split!r} is not one of tune, report, all")
    return [p for p in persons if identity_split(p) == split]

"""The in-memory 1:N index and the match modes (best, top-k mean, centroid, blend): pure numpy over unit vectors.

Also the checks a stored vector must pass before it may take part in a match (size, finite, unit length, checksum):
a damaged vector must never match (a NaN became distance 0.0, i.e. everyone matched); and the match threshold a
model's manifest entry calibrates per match mode (read lazily, so importing the index loads only numpy)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from edgeface.errors import GalleryError

#: A stored vector is unit length; float32 rounding stays far below this. A larger error means damage.
NORM_TOLERANCE = 1e-3
#: Largest cosine distance (opposite vectors): reported when the gallery is empty.
MAX_COSINE_DISTANCE = 2.0

#: Used only when neither the config nor the model's manifest entry gives a threshold (see docs/gallery.md).
FALLBACK_MAX_DISTANCE = 0.40


def default_max_distance(model: str, models_dir: Optional[str | os.PathLike[str]] = None,
                         match_mode: Optional[str] = None) -> float:
    """The embedder's calibrated threshold: manifest "default_max_distance_by_mode"[match_mode] (per-person scores
    differ by match mode, so each has its own operating point), else "default_max_distance", else
    FALLBACK_MAX_DISTANCE."""
    from edgeface.models import MANIFEST_NAME, default_models_dir, load_manifest

    mdir = Path(models_dir) if models_dir else default_models_dir()
    if not (mdir / MANIFEST_NAME).is_file():
        return FALLBACK_MAX_DISTANCE
    manifest = load_manifest(mdir)
    key = str(model)
    info = manifest.get(key) or next((m for m in manifest.values() if m.file == Path(key).name), None)
    value = info.extra.get("default_max_distance") if info is not None else None
    by_mode = info.extra.get("default_max_distance_by_mode") if info is not None else None
    if match_mode and isinstance(by_mode, dict) and match_mode in by_mode:
        value = by_mode[match_mode]
    return float(value) if isinstance(value, (int, float)) and 0 < value <= 2 else FALLBACK_MAX_DISTANCE


def resolve_max_distance(gallery_cfg: Any, embedder_cfg: Any, models_dir: Optional[str] = None) -> float:
    """gallery.max_distance when set, else the embedder model's manifest default."""
    if getattr(gallery_cfg, "max_distance", None) is not None:
        return float(gallery_cfg.max_distance)
    if getattr(embedder_cfg, "head", None):  # a head has its own distance scale, calibrated when it was trained
        from edgeface.vision.head import head_threshold
        value = head_threshold(embedder_cfg.head, models_dir)
        return float(value) if value is not None else FALLBACK_MAX_DISTANCE
    return default_max_distance(embedder_cfg.model, models_dir, getattr(gallery_cfg, "match_mode", None))


#: Per-person scores: nearest enrolled embedding, mean of the k nearest, the person's mean template, or a blend of
#: the last and the first.
MATCH_MODES = ("best", "topk_mean", "centroid", "blend")
#: blend = this x the centroid distance + the rest x the nearest-embedding distance. The centroid is robust to one odd
#: enrollment photo; the nearest term rewards a face that closely matches one particular photo (glasses, beard).
#: 0.75 was chosen on the open-set tuning half (0.25 / 0.5 / 0.75 tried over four seeds of galleries; docs/gallery.md).
BLEND_CENTROID_WEIGHT = 0.75


def blend_distances(centroid: np.ndarray, nearest: np.ndarray) -> np.ndarray:
    """The blend match mode's per-person distance from the centroid and the nearest-embedding distances."""
    return BLEND_CENTROID_WEIGHT * centroid + (1.0 - BLEND_CENTROID_WEIGHT) * nearest


class _Index:
    """All enabled people's embeddings as one (M, D) matrix, rows grouped by person (for reduceat)."""

    def __init__(self, vectors: np.ndarray, owners: np.ndarray, ids: list[int], names: list[str]) -> None:
        self.vectors = vectors            # (M, D) float32 unit rows, sorted by owner
        self.owners = owners              # (M,) int: index into ids/names
        self.ids = ids
        self.names = names
        self.starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]]) if len(owners) else np.zeros(0, int)
        self.counts = np.diff(np.r_[self.starts, len(owners)]) if len(owners) else np.zeros(0, int)
        self._padded: Optional[np.ndarray] = None
        self._centroids: Optional[np.ndarray] = None

    def padded(self) -> np.ndarray:
        """(P, max rows per person) row numbers padded with M (an +inf distance); built on first top-k use."""
        if self._padded is None:
            width = int(self.counts.max()) if len(self.counts) else 0
            cols = np.arange(width)
            self._padded = np.where(cols[None, :] < self.counts[:, None], self.starts[:, None] + cols[None, :],
                                    len(self.owners))
        return self._padded

    def centroids(self) -> np.ndarray:
        """(P, D) one unit template per person: the normalised mean of their embeddings; built on first use."""
        if self._centroids is None:
            sums = np.add.reduceat(self.vectors, self.starts, axis=0) if len(self.owners) else self.vectors[:0]
            self._centroids = (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)
        return self._centroids

    def person_distances(self, q: np.ndarray, mode: str, k: int) -> np.ndarray:
        """Per-person distance of query q: best (min), mean of the k best embeddings, to the person's centroid, or
        the blend of centroid and best."""
        if mode == "centroid":
            return _no_nan(1.0 - self.centroids() @ q)
        d = 1.0 - self.vectors @ q
        if mode == "blend":
            return blend_distances(_no_nan(1.0 - self.centroids() @ q), _no_nan(np.minimum.reduceat(d, self.starts)))
        if mode == "best" or k == 1:
            return _no_nan(np.minimum.reduceat(d, self.starts))
        # A person with any non-finite distance gets +inf (no match), whichever k of their rows are best.
        bad = np.logical_or.reduceat(~np.isfinite(d), self.starts)
        grid = np.append(d, np.inf)[self.padded()]
        kk = min(k, grid.shape[1])
        best = np.partition(grid, kk - 1, axis=1)[:, :kk] if kk < grid.shape[1] else grid
        best = np.where(np.isposinf(best), 0.0, best)  # the padding (+inf) of people with fewer than k rows
        out = best.sum(axis=1) / np.minimum(self.counts, kk)
        out[bad] = np.inf
        return _no_nan(out)


def _no_nan(dist: np.ndarray) -> np.ndarray:
    """NaN distances become +inf: a NaN must never compare as near (max(0.0, NaN) is 0.0, argmin picks NaN)."""
    return np.where(np.isnan(dist), np.inf, dist)


def _unit(vec: Any, dim: int, what: str = "embedding") -> np.ndarray:
    v = np.asarray(vec, dtype=np.float32).reshape(-1)
    if v.shape[0] != dim:
        raise GalleryError(f"{what} has {v.shape[0]} values, the gallery stores {dim}-D embeddings")
    if not np.isfinite(v).all():
        raise GalleryError(f"{what} has NaN or infinite values")
    n = float(np.linalg.norm(v))
    if n < 1e-6:
        raise GalleryError(f"{what} is all zeros")
    if abs(n - 1.0) < 1e-5:
        return v  # already unit: keep the exact bits (export -> import round-trips bit for bit)
    return (v / n).astype(np.float32)


def embedding_checksum(person_id: int, model_id: str, blob: bytes) -> str:
    """sha256 over the owner, the model and the vector bytes: a damaged byte (or a row moved to another person)
    no longer matches. Protects against corruption, not against someone who can rewrite the file."""
    h = hashlib.sha256(f"{int(person_id)}|{model_id}|".encode())
    h.update(blob)
    return h.hexdigest()


def vector_problem(blob: Any, dim: int) -> Optional[str]:
    """Why a stored vector cannot be used (None if it can): wrong size, NaN/inf values, not unit length."""
    if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) != 4 * dim:
        size = len(blob) if isinstance(blob, (bytes, bytearray, memoryview)) else type(blob).__name__
        return f"{size} bytes, expected {4 * dim} ({dim} float32 values)"
    v = np.frombuffer(blob, dtype="<f4")
    if not np.isfinite(v).all():
        return "NaN or infinite values"
    n = float(np.linalg.norm(v.astype(np.float64)))
    if abs(n - 1.0) > NORM_TOLERANCE:
        return f"not unit length (norm {n:.6g})"
    return None


def stored_vector_problem(blob: Any, dim: int, checksum: Optional[str], person_id: int, model_id: str) -> Optional[str]:
    """vector_problem, then the row's checksum (owner, model, bytes): None when the stored vector may be used."""
    why = vector_problem(blob, dim)
    if why is None and checksum != embedding_checksum(person_id, model_id, bytes(blob)):
        why = "checksum mismatch" if checksum else "no checksum"
    return why

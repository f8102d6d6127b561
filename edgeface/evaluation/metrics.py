"""Scores, thresholds and 1:1 verification. Scores are "lower is a better match" everywhere (cosine distance for
our embedders, Euclidean distance for dlib's face_recognition, minus the normalised similarity after cohort
normalisation), so one set of ROC/threshold code serves all of them."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from edgeface.errors import ConfigError
from edgeface.evaluation.dataset import Dataset
from edgeface.evaluation.embedding import EmbeddedSet

DEFAULT_FAR_TARGETS = (1e-2, 1e-3, 1e-4)


def distances(x: np.ndarray, y: np.ndarray, metric: str) -> np.ndarray:
    """Pairwise distances between rows (lower = more alike)."""
    if metric == "cosine":
        return 1.0 - x @ y.T
    if metric == "euclidean":
        sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
        return np.sqrt(np.maximum(sq, 0.0))
    raise ValueError(f"unknown metric {metric!r}")


def threshold_at_far(impostor: np.ndarray, target: float) -> Optional[float]:
    """The loosest threshold whose false-accept rate (score <= t) is at most `target`; None when the number of
    impostor trials is too small to measure that rate (fewer than 1/target)."""
    impostor = np.asarray(impostor, np.float64)
    n = len(impostor)
    if n == 0 or n * target < 1.0:
        return None
    allowed = int(math.floor(target * n + 1e-9))
    finite = np.sort(impostor[np.isfinite(impostor)])
    if allowed >= len(finite):
        return float(finite[-1]) if len(finite) else None
    nxt = finite[allowed]
    t = float(np.nextafter(nxt, -np.inf))
    return t


def rate(scores: np.ndarray, threshold: Optional[float]) -> Optional[float]:
    if threshold is None or len(scores) == 0:
        return None
    return float(np.mean(np.asarray(scores) <= threshold))


def roc_points(genuine: np.ndarray, impostor: np.ndarray, n_points: int = 400) -> dict[str, list[float]]:
    """(FAR, TAR, threshold) along thresholds spanning both score ranges, for plots and the JSON report."""
    finite = np.concatenate([genuine[np.isfinite(genuine)], impostor[np.isfinite(impostor)]])
    if len(finite) == 0:
        return {"far": [], "tar": [], "threshold": []}
    qs = np.unique(np.quantile(finite, np.linspace(0, 1, n_points)))
    imp_sorted, gen_sorted = np.sort(impostor), np.sort(genuine)
    far = np.searchsorted(imp_sorted, qs, side="right") / max(len(impostor), 1)
    tar = np.searchsorted(gen_sorted, qs, side="right") / max(len(genuine), 1)
    return {"far": far.tolist(), "tar": tar.tolist(), "threshold": qs.tolist()}


def equal_error_rate(genuine: np.ndarray, impostor: np.ndarray) -> tuple[Optional[float], Optional[float]]:
    """(EER, threshold at it): where false rejects of genuine pairs equal false accepts of impostor pairs."""
    finite = np.unique(np.concatenate([genuine[np.isfinite(genuine)], impostor[np.isfinite(impostor)]]))
    if len(finite) == 0 or len(genuine) == 0 or len(impostor) == 0:
        return None, None
    imp_sorted, gen_sorted = np.sort(impostor), np.sort(genuine)
    far = np.searchsorted(imp_sorted, finite, side="right") / len(impostor)
    frr = 1.0 - np.searchsorted(gen_sorted, finite, side="right") / len(genuine)
    i = int(np.argmin(np.abs(far - frr)))
    return float((far[i] + frr[i]) / 2.0), float(finite[i])


@dataclass(frozen=True)
class Pairs:
    """Verification trials as photo index pairs; `genuine[k]` says whether pair k is the same person."""

    a: np.ndarray
    b: np.ndarray
    genuine: np.ndarray
    source: str
    #: The cross-validation fold of each pair (a pairs file only): the LFW protocol's 10-fold accuracy.
    folds: Optional[np.ndarray] = None
    #: How the folds were formed, for the report.
    fold_rule: str = ""


def folder_pairs(ds: Dataset) -> Pairs:
    """Every pair of photos: same person = genuine, different persons = impostor."""
    a, b = np.triu_indices(len(ds), k=1)
    return Pairs(a, b, ds.labels[a] == ds.labels[b], "all photo pairs of the folder set")


def lfw_pairs(ds: Dataset, pairs_file: str | os.PathLike[str]) -> Pairs:
    """LFW `pairs.txt`: `name i j` (same person) or `name1 i name2 j`; photo k is `<name>/<name>_<k:04d>.<ext>`."""
    index = {(p.parent.name, p.stem): k for k, p in enumerate(ds.paths)}
    a, b, gen = [], [], []
    header: Optional[tuple[int, int]] = None
    pairs_file = Path(pairs_file)
    try:
        lines = pairs_file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read pairs file {pairs_file}: {exc.strerror}") from None

    def find(name: str, num: str, lineno: int) -> int:
        try:
            return index[(name, f"{name}_{int(num):04d}")]
        except (KeyError, ValueError):
            raise ConfigError(f"{pairs_file}:{lineno}: photo {name} #{num} is not in {ds.root}") from None

    for lineno, line in enumerate(lines, 1):
        parts = line.split()
        if len(parts) == 3:
            a.append(find(parts[0], parts[1], lineno)); b.append(find(parts[0], parts[2], lineno)); gen.append(True)
        elif len(parts) == 4:
            a.append(find(parts[0], parts[1], lineno)); b.append(find(parts[2], parts[3], lineno)); gen.append(False)
        elif len(parts) in (1, 2) and all(p.isdigit() for p in parts) and lineno == 1:
            if len(parts) == 2:
                header = (int(parts[0]), int(parts[1]))
            continue
        elif parts:
            raise ConfigError(f"{pairs_file}:{lineno}: expected 'name i j' or 'name1 i name2 j', got {line.strip()!r}")
    if not a:
        raise ConfigError(f"pairs file {pairs_file} holds no pairs")
    n = len(a)
    if header is not None and header[0] >= 2 and header[0] * 2 * header[1] == n:
        # LFW's layout: the header says "folds pairs-per-class"; each fold lists its genuine pairs, then its impostors.
        folds = np.arange(n) // (2 * header[1])
        rule = f"the file's {header[0]} folds ({header[1]} genuine + {header[1]} impostor pairs each, in file order)"
    else:
        folds = np.arange(n) % 10  # no usable header: every tenth pair, so each fold holds both kinds
        rule = "10 folds, pair i in fold i mod 10 (the file has no 'folds pairs-per-fold' header matching its length)"
    return Pairs(np.array(a), np.array(b), np.array(gen, bool), f"pairs file {pairs_file.name}", folds, rule)


def pair_scores(es: EmbeddedSet, pairs: Pairs) -> np.ndarray:
    """Distance of each pair; +inf where either photo has no face (never accepted)."""
    ea, eb = es.emb[pairs.a], es.emb[pairs.b]
    if es.metric == "cosine":
        d = 1.0 - np.einsum("ij,ij->i", ea, eb)
    else:
        d = np.linalg.norm(ea - eb, axis=1)
    d = d.astype(np.float64)
    d[~(es.found[pairs.a] & es.found[pairs.b])] = np.inf
    return d


def accuracy_at(scores: np.ndarray, genuine: np.ndarray, threshold: Optional[float]) -> Optional[float]:
    """Share of pairs decided right when a pair is accepted at score <= threshold (no-face pairs: rejected)."""
    if threshold is None or len(scores) == 0:
        return None
    return float(np.mean((np.asarray(scores) <= threshold) == np.asarray(genuine, bool)))


def best_accuracy_threshold(scores: np.ndarray, genuine: np.ndarray) -> float:
    """The threshold with the best accuracy on these pairs: midway between the accepted score and the next one."""
    finite = np.unique(scores[np.isfinite(scores)])
    if len(finite) == 0:
        return 0.0
    gen_sorted = np.sort(scores[genuine])
    imp_sorted = np.sort(scores[~genuine])
    # Accept everything at or under each candidate: right = genuine accepted + impostors rejected.
    right = np.searchsorted(gen_sorted, finite, side="right") + (len(imp_sorted) - np.searchsorted(imp_sorted, finite,
                                                                                                    side="right"))
    none_accepted = len(imp_sorted)
    i = int(np.argmax(right))
    if right[i] < none_accepted:
        return float(finite[0] - 1e-6)
    return float((finite[i] + finite[i + 1]) / 2.0) if i + 1 < len(finite) else float(finite[i])


def k_fold_accuracy(scores: np.ndarray, genuine: np.ndarray, folds: np.ndarray) -> dict[str, Any]:
    """The LFW protocol's figure: per fold, the best-accuracy threshold chosen on the other folds and applied to it;
    the mean and standard deviation (numpy's, over folds) of the fold accuracies."""
    per_fold = []
    for f in np.unique(folds):
        test = folds == f
        t = best_accuracy_threshold(scores[~test], genuine[~test])
        per_fold.append({"fold": int(f), "threshold": t, "pairs": int(test.sum()),
                         "accuracy": accuracy_at(scores[test], genuine[test], t)})
    accs = np.array([p["accuracy"] for p in per_fold], np.float64)
    return {"folds": len(per_fold), "accuracy_mean": float(accs.mean()), "accuracy_std": float(accs.std()),
            "per_fold": per_fold}


def verification(es: EmbeddedSet, pairs: Pairs, *, default_threshold: Optional[float],
                 far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
                 accuracy_thresholds: Sequence[float] = ()) -> dict[str, Any]:
    """1:1 verification metrics; failed detections count as rejections (genuine) and correct rejections.
    With a pairs file: the k-fold accuracy, accuracy at the default and at `accuracy_thresholds`, and every pair's
    distance (None where a photo has no face)."""
    scores = pair_scores(es, pairs)
    gen, imp = scores[pairs.genuine], scores[~pairs.genuine]
    eer, eer_t = equal_error_rate(gen, imp)
    at_far = []
    for target in far_targets:
        t = threshold_at_far(imp, target)
        at_far.append({"far_target": target, "threshold": t, "tar": rate(gen, t), "far": rate(imp, t)})
    out: dict[str, Any] = {
        "pairs_source": pairs.source,
        "n_genuine": int(len(gen)), "n_impostor": int(len(imp)),
        "n_genuine_no_face": int(np.isinf(gen).sum()), "n_impostor_no_face": int(np.isinf(imp).sum()),
        "eer": eer, "eer_threshold": eer_t,
        "at_far": at_far,
        "default_threshold": default_threshold,
        "tar_at_default": rate(gen, default_threshold), "far_at_default": rate(imp, default_threshold),
        "roc": roc_points(gen, imp),
        "_genuine": gen, "_impostor": imp,
    }
    if pairs.folds is not None:
        out["k_fold"] = dict(k_fold_accuracy(scores, pairs.genuine, pairs.folds), fold_rule=pairs.fold_rule)
        out["accuracy_at_default"] = accuracy_at(scores, pairs.genuine, default_threshold)
        out["accuracy_at"] = [{"threshold": float(t), "accuracy": accuracy_at(scores, pairs.genuine, t)}
                              for t in accuracy_thresholds]
        out["pair_distances"] = [float(d) if np.isfinite(d) else None for d in scores]
    return out


def far_name(f: float) -> str:
    return f"{f:.0e}".replace("e-0", "e-")

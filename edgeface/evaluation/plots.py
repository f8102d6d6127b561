"""The evaluation's figures (matplotlib, imported on first use: the reports are written without it)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, imported on first use (an optional dependency)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_roc(curves: dict[str, dict[str, list[float]]], path: Path, title: str, *, x_key: str = "far",
             y_key: str = "tar", x_label: str = "false-accept rate (impostor pairs)",
             y_label: str = "true-accept rate (genuine pairs)") -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=100)
    styles = ["-", "--", ":", "-."]
    for i, (name, c) in enumerate(curves.items()):
        x, y = np.asarray(c[x_key]), np.asarray(c[y_key])
        keep = x > 0
        if keep.any():
            ax.plot(x[keep], y[keep], label=name, lw=1.6, ls=styles[(i // 10) % len(styles)])
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_distributions(sets: dict[str, tuple[np.ndarray, np.ndarray, Optional[float]]], path: Path, title: str,
                       labels: tuple[str, str] = ("genuine", "impostor")) -> None:
    plt = pyplot()
    n = len(sets)
    fig, axes = plt.subplots(n, 1, figsize=(6.4, 2.2 * n + 0.6), dpi=100, squeeze=False)
    for ax, (name, (gen, imp, thr)) in zip(axes[:, 0], sets.items()):
        g, i = gen[np.isfinite(gen)], imp[np.isfinite(imp)]
        lo = min(g.min() if len(g) else 0, i.min() if len(i) else 0)
        hi = max(g.max() if len(g) else 1, i.max() if len(i) else 1)
        bins = np.linspace(lo, hi, 60)
        ax.hist(i, bins=bins, density=True, alpha=0.55, label=f"{labels[1]} ({len(i)})")
        ax.hist(g, bins=bins, density=True, alpha=0.55, label=f"{labels[0]} ({len(g)})")
        if thr is not None:
            ax.axvline(thr, color="k", ls="--", lw=1, label=f"threshold {thr:.3f}")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("score (distance: lower = more alike)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def eval_plots(report: dict[str, Any], plot_dir: Path, prefix: str, link_base: Path) -> dict[str, str]:
    roc = {m["label"]: m["verification"]["roc"] for m in report["models"]}
    out: dict[str, str] = {}
    p = plot_dir / f"{prefix}_roc.png"
    plot_roc(roc, p, f"Verification ROC: {Path(report['dataset']).name}")
    out["verification ROC"] = os.path.relpath(p, link_base)
    p = plot_dir / f"{prefix}_scores.png"
    plot_distributions({m["label"]: (m["verification"]["_genuine"], m["verification"]["_impostor"],
                                     m["verification"]["default_threshold"]) for m in report["models"]}, p,
                       "Pair scores (no-face pairs left out of the histogram, counted in the tables)")
    out["score distributions"] = os.path.relpath(p, link_base)
    p = plot_dir / f"{prefix}_openset.png"
    plot_roc({m["label"]: m["identification"]["det"] for m in report["models"]}, p, "Open-set identification",
             x_key="stranger_accept", y_key="correct_accept", x_label="stranger false-accept rate",
             y_label="correct accept (right person)")
    out["open-set identification"] = os.path.relpath(p, link_base)
    return out


def open_set_plots(study: dict[str, Any], plot_dir: Path, prefix: str, link_base: Path, k: int, e: int) -> dict[str, str]:
    out: dict[str, str] = {}
    rows = [r for r in study["results"] if r["k"] == k and r["enroll"] == e]
    base = [r for r in rows if r["levers"] in ("as configured", "its defaults")] or rows[:1]
    curves = {r["variant"]: r["report"]["det"] for r in base}
    p = plot_dir / f"{prefix}_openset_k{k}_e{e}.png"
    plot_roc(curves, p, f"Open-set, reporting half, K={k}, E={e}", x_key="stranger_accept", y_key="correct_accept",
             x_label="stranger false-accept rate", y_label="correct accept (right person)")
    out[f"open-set ROC K={k} E={e}"] = os.path.relpath(p, link_base)
    first = base[0]["labels"][0]
    levers = [r for r in rows if all(r is not b for b in base)
              and (r["labels"][0].startswith(first) or len(r["labels"]) > 1)]
    if levers:
        p = plot_dir / f"{prefix}_levers_k{k}_e{e}.png"
        plot_roc({r["variant"]: r["report"]["det"] for r in [base[0]] + levers}, p,
                 f"Levers on {first}, reporting half, K={k}, E={e}", x_key="stranger_accept", y_key="correct_accept",
                 x_label="stranger false-accept rate", y_label="correct accept (right person)")
        out[f"levers K={k} E={e}"] = os.path.relpath(p, link_base)
    # DET: miss rate (1 - correct accept) against stranger accept, both log.
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=100)
    plotted = 0
    for name, c in {r["variant"]: r["report"]["det"] for r in base}.items():
        x, y = np.asarray(c["stranger_accept"]), 1.0 - np.asarray(c["correct_accept"])
        keep = (x > 0) & (y > 0)
        if keep.any():
            ax.plot(x[keep], y[keep], label=name, lw=1.4)
            plotted += 1
    if plotted:
        ax.set_xscale("log"); ax.set_yscale("log"); ax.set_xlim(1e-4, 1)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no point with both rates above zero", ha="center", transform=ax.transAxes)
    ax.set_xlabel("stranger false-accept rate"); ax.set_ylabel("miss rate (1 - correct accept)")
    ax.set_title(f"Open-set DET, reporting half, K={k}, E={e}"); ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    p = plot_dir / f"{prefix}_det_k{k}_e{e}.png"
    fig.savefig(p)
    plt.close(fig)
    out[f"open-set DET K={k} E={e}"] = os.path.relpath(p, link_base)
    first = base[:4]
    if first:
        p = plot_dir / f"{prefix}_openset_scores_k{k}_e{e}.png"
        plot_distributions({r["variant"]: (r["report"]["_genuine"][r["report"]["_correct"]], r["report"]["_stranger"],
                                           next((a["threshold"] for a in r["report"]["at_far"]), None)) for r in first}, p,
                           "Best-match score: enrolled probes (right person) vs strangers, reporting half",
                           labels=("enrolled probe, right person", "stranger"))
        out[f"open-set scores K={k} E={e}"] = os.path.relpath(p, link_base)
    return out

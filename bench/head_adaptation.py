"""Adapting a head to one door: train on the door's enrollment photos plus a background of strangers, then measure
open-set identification on the door people's other photos against strangers nobody trained on.

The door: ../shared/data/faces (18 people; the first --enroll photos of each are "enrolled" and trained on, the rest
are probes). Background (trained on): the open-set set's tuning half. Strangers at the door (never trained on): its
reporting half. Scores: the gallery's centroid match (mean of enrolled crop+mirror embeddings), with and without the
head, same photos.

Usage: python bench/head_adaptation.py [--shared ../shared] [--enroll 3] [--arch residual] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeface.training.headfile import embed_folders  # noqa: E402
from edgeface.training.triplet import Samples, TrainSettings, identity_disjoint_split, train_head  # noqa: E402


def open_set(gal: np.ndarray, gal_y: np.ndarray, probes: np.ndarray, probe_y: np.ndarray, strangers: np.ndarray,
             fars: tuple[float, ...]) -> dict[str, dict[str, float]]:
    ids = np.unique(gal_y)
    cents = np.stack([gal[gal_y == i].mean(axis=0) for i in ids])
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)
    dg = 1.0 - probes @ cents.T
    ds = (1.0 - strangers @ cents.T).min(axis=1)
    out = {}
    for far in fars:
        thr = float(np.quantile(ds, far))
        best = dg.argmin(axis=1)
        accepted = dg.min(axis=1) <= thr
        right = ids[best] == probe_y
        out[f"{far:g}"] = {"threshold": thr, "correct_accept": float(np.mean(accepted & right)),
                           "wrong_person": float(np.mean(accepted & ~right))}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--enroll", type=int, default=3)
    ap.add_argument("--arch", default="residual")
    ap.add_argument("--margin", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "edgeface" / "eval")
    args = ap.parse_args()
    door = embed_folders([args.shared / "data" / "faces"], "sface_int8", cache_dir=args.cache_dir).samples
    openset = args.shared / "data" / "openset" / "celeba_wild"
    exclude = str(REPO / "bench" / "openset_exclude.txt")
    background = embed_folders([openset], "sface_int8", split="tune", exclude=exclude, cache_dir=args.cache_dir).samples
    strangers = embed_folders([openset], "sface_int8", split="report", exclude=exclude, cache_dir=args.cache_dir).samples

    # the door's enrolled photos: the first --enroll photos of each person (both views); the rest are probes
    enrolled = np.zeros(len(door.y), bool)
    for pid in np.unique(door.y):
        photos = np.unique(door.photo[door.y == pid])
        enrolled |= (door.y == pid) & np.isin(door.photo, photos[: args.enroll])
    probe_rows = ~enrolled & (np.arange(len(door.y)) < len(door.y) // 2)  # probe view only (first half of rows)
    train_bg, val_bg = identity_disjoint_split(sorted(set(background.persons)), 0.25, args.seed)
    bg_names = np.array(background.persons)[background.y]
    is_val = np.isin(bg_names, val_bg)
    offset = len(door.persons)
    train = Samples(np.concatenate([door.x[enrolled], background.x[~is_val]]),
                    np.concatenate([door.y[enrolled], background.y[~is_val] + offset]),
                    door.persons + background.persons,
                    np.concatenate([door.photo[enrolled], background.photo[~is_val] + 10_000_000]))
    val = Samples(background.x[is_val], background.y[is_val], background.persons, background.photo[is_val])
    settings = TrainSettings(arch=args.arch, margin=args.margin, seed=args.seed)
    result = train_head(train, val, settings)
    fars = (1e-2, 1e-3)
    rows = {}
    stranger_x = strangers.x[: len(strangers.y) // 2]  # probe view of each stranger photo
    gal_rows = enrolled & (np.arange(len(door.y)) >= len(door.y) // 2)  # crop+mirror view, as enrollment stores
    for label, f in (("sface_int8", lambda x: x), (f"sface_int8 + door-adapted {args.arch} head", result.project)):
        rows[label] = open_set(f(door.x[gal_rows]), door.y[gal_rows], f(door.x[probe_rows]), door.y[probe_rows],
                               f(stranger_x), fars)
    report = {"command": " ".join(sys.argv), "door_people": len(door.persons), "enroll": args.enroll,
              "probes": int(probe_rows.sum()), "strangers": int(len(stranger_x)), "best_epoch": result.best_epoch,
              "settings": {"enroll": args.enroll, "arch": args.arch, "margin": args.margin, "seed": args.seed},
              "results": rows}
    lines = ["# A head adapted to one door (data/faces people + open-set tuning half as background)", "",
             f"Command: `python bench/head_adaptation.py {' '.join(sys.argv[1:])}`", "",
             f"{len(door.persons)} door people, {args.enroll} enrolled photos each (trained on), "
             f"{int(probe_rows.sum())} probe photos of them, {len(stranger_x)} stranger photos (open-set reporting "
             f"half, never trained on); best epoch {result.best_epoch}.", "",
             "| setting | correct accept @1% | wrong person @1% | correct accept @0.1% | wrong person @0.1% |",
             "|---|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {100 * r['0.01']['correct_accept']:.1f}% | {100 * r['0.01']['wrong_person']:.2f}% | "
                     f"{100 * r['0.001']['correct_accept']:.1f}% | {100 * r['0.001']['wrong_person']:.2f}% |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "head_adaptation.md").write_text(text)
    (args.out / "head_adaptation.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

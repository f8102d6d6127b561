"""Open-set identification the way a door meets people: galleries of K enrolled residents drawn at random, their
other photos as probes and never-seen strangers; the study of levers on the tuning half and the reporting half, and
the recommended default chosen on the tuning half."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import numpy as np

from edgeface.errors import ConfigError
from edgeface.evaluation.dataset import Dataset, split_persons
from edgeface.evaluation.embedding import EmbeddedSet, fuse, machine_description
from edgeface.evaluation.metrics import distances, far_name, threshold_at_far
from edgeface.gallery import blend_distances

OPEN_SET_FAR_TARGETS = (1e-2, 1e-3)


@dataclass(frozen=True)
class OpenSetSettings:
    """Galleries of `k` people drawn at random, `enroll` photos each; probes = their other photos; strangers =
    every photo of everyone not enrolled (within the split); `draws` galleries, seeded."""

    k: int = 100
    enroll: int = 3
    draws: int = 20
    seed: int = 0
    #: "mean": one unit-mean template per person; "best": best of the E photos; "blend": the gallery's blend mode
    template: str = "mean"
    cohort_top: int = 0  # >0: adaptive s-norm against the `cohort_top` most similar cohort photos
    #: >0: the product's face-size rules: enrollment refuses, and the door never accepts, a face smaller than this.
    min_face_px: float = 0.0


def _draw_gallery(rng: np.random.Generator, eligible: np.ndarray, photos_by_person: dict[int, np.ndarray],
                  found: np.ndarray, k: int, e: int) -> tuple[np.ndarray, dict[int, np.ndarray], int, int]:
    """Choose k people (from photo counts only, so every model sees the same galleries), then per person the
    first E photos in a random order that have a face (an enrollment tool refuses a photo without one).
    Returns (people, enrolled photos per person, photos refused for no face, people enrolled with < E photos)."""
    chosen = np.sort(rng.choice(eligible, size=k, replace=False))
    enrolled: dict[int, np.ndarray] = {}
    refused = short = 0
    for person in chosen:
        taken: list[int] = []
        for p in rng.permutation(photos_by_person[int(person)]):
            if len(taken) == e:
                break
            if found[p]:
                taken.append(int(p))
            else:
                refused += 1
        short += len(taken) < e
        enrolled[int(person)] = np.array(taken, np.int64)
    return chosen, enrolled, refused, short


class _Cohort:
    """Adaptive symmetric score normalisation (s-norm) against photos of people outside the evaluated split."""

    def __init__(self, cohort: np.ndarray, top: int) -> None:
        self.cohort = cohort[np.isfinite(cohort).all(axis=1)]
        self.top = max(2, min(top, len(self.cohort)))

    def stats(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sims = x @ self.cohort.T
        part = -np.partition(-sims, self.top - 1, axis=1)[:, : self.top]
        return part.mean(axis=1), np.maximum(part.std(axis=1), 1e-6)

    def normalise(self, probes: np.ndarray, templates: np.ndarray) -> np.ndarray:
        """Scores (lower = more alike) = minus the s-normalised cosine similarity."""
        sim = probes @ templates.T
        mp, sp = self.stats(probes)
        mt, st = self.stats(templates)
        return -0.5 * ((sim - mp[:, None]) / sp[:, None] + (sim - mt[None, :]) / st[None, :])


def open_set(es: EmbeddedSet, ds: Dataset, persons: Sequence[str], settings: OpenSetSettings, *,
             far_targets: Sequence[float] = OPEN_SET_FAR_TARGETS, fixed_thresholds: Optional[dict[str, float]] = None,
             cohort: Optional[np.ndarray] = None) -> dict[str, Any]:
    """Open-set identification over `settings.draws` random galleries of the given persons (seeded).

    Per probe the gallery answers its nearest person and score; accepted when score <= threshold. Reported at
    thresholds where the pooled stranger false-accept rate is each target, and at `fixed_thresholds`:
    correct accept (right person accepted), wrong-person accept (someone else accepted), stranger accept.
    """
    name_to_label = {n: i for i, n in enumerate(ds.persons)}
    labels_in = np.array(sorted(name_to_label[p] for p in persons if p in name_to_label), np.int64)
    photos_by_person = {int(lab): np.flatnonzero(ds.labels == lab) for lab in labels_in}
    found = es.found
    too_small = np.zeros(len(found), bool)
    if settings.min_face_px > 0:
        if es.face_px is None:
            raise ConfigError(f"{es.label}: cached embeddings lack face sizes; re-embed (--no-cache) for a face-size rule")
        too_small = found & ~(np.nan_to_num(es.face_px) >= settings.min_face_px)
        found = found & ~too_small  # usable faces: a too-small face is a rejection, like no face
    e = settings.enroll
    eligible = np.array([lab for lab in labels_in if len(photos_by_person[int(lab)]) > e], np.int64)
    if len(eligible) < 2:
        raise ConfigError(f"open set: only {len(eligible)} person(s) have more than {e} photos; need at least 2")
    # A gallery must leave strangers: with too few people, enroll half of them.
    k = settings.k if settings.k < len(eligible) else max(1, len(eligible) // 2)
    norm = _Cohort(cohort, settings.cohort_top) if (cohort is not None and settings.cohort_top > 0) else None
    if norm is not None and es.metric != "cosine":
        raise ConfigError("cohort normalisation needs a cosine-distance embedder")
    if norm is not None and settings.template == "blend":
        raise ConfigError("cohort normalisation is not measured with the blend template")
    gen_scores, gen_correct, str_scores = [], [], []
    per_draw: list[tuple[int, int]] = []  # (first probe index, first stranger index) into the pooled arrays
    counts = {"probe": 0, "probe_no_face": 0, "stranger": 0, "stranger_no_face": 0, "enroll_refused_no_face": 0,
              "probe_face_too_small": 0, "stranger_face_too_small": 0,
              "enrolled_with_fewer_photos": 0, "enrolled_with_no_photo": 0}
    for draw in range(settings.draws):
        rng = np.random.default_rng([settings.seed, draw])
        chosen, enrolled, refused, short = _draw_gallery(rng, eligible, photos_by_person, found, k, e)
        counts["enroll_refused_no_face"] += refused
        counts["enrolled_with_fewer_photos"] += short
        counts["enrolled_with_no_photo"] += sum(1 for v in enrolled.values() if len(v) == 0)
        enrolled_set = set(int(p) for v in enrolled.values() for p in v)
        chosen_set = set(int(c) for c in chosen)
        probe_idx = np.array([p for lab in chosen for p in photos_by_person[int(lab)] if int(p) not in enrolled_set], np.int64)
        stranger_idx = np.array([p for lab in labels_in if int(lab) not in chosen_set for p in photos_by_person[int(lab)]], np.int64)
        # Per person: a unit-mean template and their enrollment photos (rows grouped by person), scored as the
        # gallery's match modes score them (centroid / best / blend).
        people, means, photos = [], [], []
        for lab in chosen:
            vecs = es.for_enrollment()[enrolled[int(lab)]]
            if len(vecs) == 0:
                continue  # nobody could be enrolled from these photos: their probes can only be rejected
            m = vecs.mean(axis=0)
            if es.metric == "cosine":
                m = m / max(float(np.linalg.norm(m)), 1e-12)
            people.append(int(lab)); means.append(m[None]); photos.append(vecs)
        mean_tmpl = np.concatenate(means).astype(np.float32)
        photo_tmpl = np.concatenate(photos).astype(np.float32)
        photo_starts = np.cumsum([0] + [len(v) for v in photos[:-1]])
        owners_arr = np.array(people)

        def person_scores(x: np.ndarray) -> np.ndarray:
            def score(t: np.ndarray) -> np.ndarray:
                return norm.normalise(x, t) if norm is not None else distances(x, t, es.metric)
            if settings.template == "mean":
                return score(mean_tmpl)
            nearest = np.minimum.reduceat(score(photo_tmpl), photo_starts, axis=1)
            return nearest if settings.template == "best" else blend_distances(score(mean_tmpl), nearest)

        per_draw.append((len(gen_scores), len(str_scores)))
        for idx, is_probe in ((probe_idx, True), (stranger_idx, False)):
            ok = found[idx]
            scores = np.full(len(idx), np.inf)
            best_owner = np.full(len(idx), -1)
            if ok.any():
                x = es.emb[idx[ok]]
                s = person_scores(x)
                j = np.argmin(s, axis=1)
                scores[ok] = s[np.arange(len(j)), j]
                best_owner[ok] = owners_arr[j]
            key = "probe" if is_probe else "stranger"
            counts[key] += len(idx)
            counts[f"{key}_no_face"] += int((~ok).sum())  # includes faces under the size rule
            counts[f"{key}_face_too_small"] += int(too_small[idx].sum())
            if is_probe:
                gen_scores.extend(scores.tolist())
                gen_correct.extend((best_owner == ds.labels[idx]).tolist())
            else:
                str_scores.extend(scores.tolist())
    gs, gc, ss = np.array(gen_scores), np.array(gen_correct, bool), np.array(str_scores)
    bounds = per_draw + [(len(gs), len(ss))]

    def at(t: Optional[float]) -> dict[str, Any]:
        if t is None:
            return {"threshold": None, "correct_accept": None, "wrong_person_accept": None, "stranger_accept": None,
                    "correct_accept_std": None}
        acc = gs <= t
        per = [float(np.mean(acc[a:b] & gc[a:b])) for (a, _), (b, _) in zip(bounds[:-1], bounds[1:]) if b > a]
        return {"threshold": float(t), "correct_accept": float(np.mean(acc & gc)),
                "wrong_person_accept": float(np.mean(acc & ~gc)), "stranger_accept": float(np.mean(ss <= t)),
                "correct_accept_std": float(np.std(per)) if per else None}

    result = {
        "settings": {"k": int(k), "enroll": e, "draws": settings.draws, "seed": settings.seed,
                     "template": settings.template, "cohort_top": settings.cohort_top if norm is not None else 0,
                     "min_face_px": settings.min_face_px},
        "n_persons": int(len(labels_in)), "n_eligible": int(len(eligible)), "counts": counts,
        "rank1_of_probes_with_face": float(np.mean(gc[np.isfinite(gs)])) if np.isfinite(gs).any() else None,
        "at_far": [dict(far_target=target, **at(threshold_at_far(ss, target))) for target in far_targets],
        "fixed": {name: at(t) for name, t in (fixed_thresholds or {}).items()},
        "det": _det_curve(gs, gc, ss),
        "_genuine": gs, "_correct": gc, "_stranger": ss,
    }
    return result


def _det_curve(gs: np.ndarray, gc: np.ndarray, ss: np.ndarray, n_points: int = 300) -> dict[str, list[float]]:
    finite = np.concatenate([gs[np.isfinite(gs)], ss[np.isfinite(ss)]])
    if len(finite) == 0:
        return {"stranger_accept": [], "correct_accept": [], "threshold": []}
    qs = np.unique(np.quantile(finite, np.linspace(0, 1, n_points)))
    sa = [(ss <= t).mean() for t in qs]
    ca = [((gs <= t) & gc).mean() for t in qs]
    return {"stranger_accept": [float(v) for v in sa], "correct_accept": [float(v) for v in ca], "threshold": qs.tolist()}


@dataclass(frozen=True)
class Variant:
    """One pipeline setting to measure: which embedding set(s) (two = score fusion), template, cohort norm."""

    name: str
    levers: str
    labels: tuple[str, ...]
    template: str = "mean"
    cohort_top: int = 0
    min_face_px: float = 0.0
    #: Can the shipped daemon run it as it is (config switches only)? Only these are recommended as defaults.
    deployable: bool = True
    #: False: enroll with the plain embedding, as probes (the product always adds the mirror at enrollment).
    enroll_mirror: bool = True


def variant_set(v: Variant, sets: dict[str, EmbeddedSet]) -> EmbeddedSet:
    es = sets[v.labels[0]]
    for label in v.labels[1:]:
        es = fuse(es, sets[label])
    if not v.enroll_mirror:
        es = replace(es, enroll_emb=None)
    return es


def open_set_study(ds: Dataset, sets: dict[str, EmbeddedSet], variants: Sequence[Variant], *,
                   ks: Sequence[int], enrolls: Sequence[int], draws: int, seed: int,
                   thresholds: dict[str, Optional[float]], far_targets: Sequence[float] = OPEN_SET_FAR_TARGETS,
                   calibration_ks: Sequence[int] = (), calibrate: Sequence[str] = (),
                   only_tune: bool = False, all_identities: bool = False) -> dict[str, Any]:
    """Every variant on the tuning half and on the reporting half, same seeded galleries for all.

    Thresholds are picked where the stranger false-accept rate meets each target on the reporting half itself
    (the figure the targets are stated in) and, separately, calibrated on the tuning half and then applied to
    the reporting half (what a deployment would see). Cohort normalisation of reporting-half scores uses only
    tuning-half photos (and vice versa when tuning), so no reported identity shapes its own scores.
    """
    halves = {h: split_persons(ds.persons, h) for h in ("tune", "report")}
    if all_identities:  # --split all: every identity in both roles; thresholds are chosen and reported on them
        if any(v.cohort_top for v in variants):
            raise ConfigError("--split all: cohort normalisation needs identities outside the scored ones "
                              "(use --split report, or leave out --ablation)")
        halves = {"tune": list(ds.persons), "report": list(ds.persons)}
    elif only_tune:  # tuning without looking at the reporting half: its tables show the tuning half instead
        halves["report"] = halves["tune"]
    label_of = np.array(ds.persons)[ds.labels]
    half_mask = {h: np.isin(label_of, halves[h]) for h in halves}
    results = []
    for v in variants:
        es = variant_set(v, sets)
        ms = es.ms_per_face()
        for k in ks:
            for e in enrolls:
                st = OpenSetSettings(k=k, enroll=e, draws=draws, seed=seed, template=v.template, cohort_top=v.cohort_top,
                                     min_face_px=v.min_face_px)
                cohort_for = {"tune": es.emb[half_mask["report"]], "report": es.emb[half_mask["tune"]]}
                tune = open_set(es, ds, halves["tune"], st, far_targets=far_targets,
                                cohort=cohort_for["tune"] if v.cohort_top else None)
                fixed = {f"tune-calibrated {far_name(a['far_target'])}": a["threshold"] for a in tune["at_far"]
                         if a["threshold"] is not None}
                if len(v.labels) == 1 and not v.cohort_top and thresholds.get(v.labels[0]) is not None:
                    fixed["default"] = thresholds[v.labels[0]]
                report = open_set(es, ds, halves["report"], st, far_targets=far_targets, fixed_thresholds=fixed,
                                  cohort=cohort_for["report"] if v.cohort_top else None)
                results.append({"variant": v.name, "levers": v.levers, "labels": list(v.labels), "template": v.template,
                                "cohort_top": v.cohort_top, "deployable": v.deployable, "k": k, "enroll": e,
                                "tune": tune, "report": report, "ms": ms,
                                "photos_no_face": int((~es.found).sum()), "photos": len(ds)})
    calibration = []
    for v in variants:
        if not calibration_ks or v.name not in calibrate:
            continue
        es = variant_set(v, sets)
        base_thr = None
        rows = []
        for k in sorted(calibration_ks, reverse=True):
            st = OpenSetSettings(k=k, enroll=enrolls[0], draws=draws, seed=seed, template=v.template)
            tune = open_set(es, ds, halves["tune"], st, far_targets=far_targets)
            thr = {far_name(a["far_target"]): a["threshold"] for a in tune["at_far"]}
            if base_thr is None:
                base_thr = thr
            fixed = {}
            for f, t in thr.items():
                if t is not None:
                    fixed[f"per-K {f}"] = t
                if base_thr.get(f) is not None:
                    fixed[f"K={max(calibration_ks)} {f}"] = base_thr[f]
            rep = open_set(es, ds, halves["report"], st, far_targets=far_targets, fixed_thresholds=fixed)
            rows.append({"k": k, "tune_thresholds": thr, "report_fixed": rep["fixed"]})
        calibration.append({"variant": v.name, "enroll": enrolls[0], "rows": rows})
    out = {"kind": "open_set", "dataset": str(ds.root), "n_persons": len(ds.persons), "n_photos": len(ds),
           "halves": {h: {"persons": len(p), "photos": int(half_mask[h].sum())} for h, p in halves.items()},
           "draws": draws, "seed": seed, "far_targets": list(far_targets), "only_tune": only_tune,
           "machine": machine_description(), "results": results, "calibration": calibration}
    if all_identities:
        out["all_identities"] = True
    return out


#: A variant costs "no more per face" than the baseline within this factor of its measured detect+align+embed time
#: (variants that reuse the baseline's embeddings, such as another match template, cost exactly the same).
SAME_COST = 1.05


def _ms_per_face(r: dict[str, Any]) -> Optional[float]:
    return (r.get("ms") or {}).get("ms_face_total")


def recommend(study: dict[str, Any], *, k: int, enroll: int, far_target: float = 1e-3,
              max_wrong_person: float = 1e-3, baseline: Optional[str] = None,
              max_cost: Optional[float] = None) -> Optional[dict[str, Any]]:
    """The deployable variant with the best tuning-half correct-accept at the stranger-FAR target (wrong-person
    accept within bounds), with its tuning-half threshold and that threshold's reporting-half figures, and its
    per-face time as a multiple of the `baseline` variant's. With `max_cost`, only variants within that multiple
    compete (a lever that doubles the embedding work may not fit a Pi's latency budget)."""
    base = find_result(study, baseline, k, enroll) if baseline else None
    base_ms = _ms_per_face(base) if base else None
    best = None
    for r in study["results"]:
        if not r["deployable"] or r["k"] != k or r["enroll"] != enroll:
            continue
        ms = _ms_per_face(r)
        if max_cost is not None and (base_ms is None or ms is None or ms > base_ms * max_cost):
            continue
        a = next(x for x in r["tune"]["at_far"] if x["far_target"] == far_target)
        if a["correct_accept"] is None or (a["wrong_person_accept"] or 0) > max_wrong_person:
            continue
        if best is None or a["correct_accept"] > best[1]["correct_accept"]:
            best = (r, a)
    if best is None:
        return None
    r, a = best
    key = f"tune-calibrated {far_name(far_target)}"
    ms = _ms_per_face(r)
    return {"variant": r["variant"], "labels": r["labels"], "template": r["template"], "k": k, "enroll": enroll,
            "far_target": far_target, "threshold": a["threshold"], "tune": a, "max_cost": max_cost,
            "cost_vs_baseline": ms / base_ms if (ms is not None and base_ms) else None, "baseline": baseline,
            "report_at_tune_threshold": r["report"]["fixed"].get(key),
            "report_at_own_far": next(x for x in r["report"]["at_far"] if x["far_target"] == far_target)}


def find_result(study: dict[str, Any], variant: str, k: int, e: int) -> Optional[dict[str, Any]]:
    return next((r for r in study["results"] if r["variant"] == variant and r["k"] == k and r["enroll"] == e), None)


def k_of_n_rate(p: float, k: int, n: int) -> float:
    """Chance that at least k of n independent frames each pass with probability p."""
    from math import comb

    return float(sum(comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k, n + 1)))


#: The product's open-set targets on the reporting half, K=100, E=3: correct accept at each stranger-FAR, wrong person
#: at most (the 0.1% goal was raised from 75% to 85% when SFace became the default embedder).
TARGETS = {"k": 100, "enroll": 3, "correct_accept": {1e-2: 0.92, 1e-3: 0.85}, "wrong_person_max": 1e-3}

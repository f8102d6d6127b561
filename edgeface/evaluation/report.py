"""The evaluation reports: formatting helpers, the machine description, the eval report (pairs + 1:N) and the
open-set study's markdown, written atomically."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from edgeface.evaluation.dataset import Dataset
from edgeface.evaluation.embedding import EmbeddedSet, ModelChoice, machine_description
from edgeface.evaluation.metrics import Pairs, far_name, threshold_at_far, verification
from edgeface.evaluation.openset import TARGETS, OpenSetSettings, find_result, k_of_n_rate, open_set


def public(obj: Any) -> Any:
    """The report without private arrays (keys starting with '_'), JSON-safe."""
    if isinstance(obj, dict):
        return {k: public(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [public(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return float(f"{v:.6g}") if math.isfinite(v) else None  # 6 significant digits: plenty, and a smaller file
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def pct(v: Optional[float], digits: int = 1) -> str:
    return "n/a" if v is None else f"{100.0 * v:.{digits}f}%"


def num(v: Optional[float], digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def evaluate_models(ds: Dataset, sets: Sequence[tuple[ModelChoice, EmbeddedSet]], *, pairs: Pairs,
                    thresholds: dict[str, Optional[float]], id_settings: OpenSetSettings,
                    target_far: float = 1e-3, accuracy_thresholds: Sequence[float] = ()) -> dict[str, Any]:
    """Verification and open-set identification for each model on the same photos, pairs and galleries."""
    models = []
    for choice, es in sets:
        thr = thresholds.get(es.label)
        ver = verification(es, pairs, default_threshold=thr, accuracy_thresholds=accuracy_thresholds)
        recommended = threshold_at_far(ver["_impostor"], target_far)
        fixed = {"default": thr, f"recommended (1:1 FAR {far_name(target_far)})": recommended}
        ident = open_set(es, ds, ds.persons, id_settings, fixed_thresholds={k: v for k, v in fixed.items() if v is not None})
        ident["protocol"] = "all identities"  # not the --open-set study's tuning/reporting halves
        models.append({"label": es.label, "model": choice.model, "metric": es.metric,
                       "photos": len(ds), "photos_no_face": int((~es.found).sum()),
                       "photos_several_faces": int((es.n_faces > 1).sum()),
                       "verification": ver, "identification": ident,
                       "recommended_threshold": {"far_target": target_far, "threshold": recommended},
                       "ms": es.ms_per_face(), "from_cache": es.from_cache})
    report = {"kind": "eval", "dataset": str(ds.root), "n_persons": len(ds.persons), "n_photos": len(ds),
              "pairs_source": pairs.source, "machine": machine_description(), "models": models}
    if pairs.folds is not None:  # a pairs file: which photos each entry of a model's pair_distances compares
        name = [f"{p.parent.name}/{p.name}" for p in ds.paths]
        report["pairs"] = [{"a": name[i], "b": name[j], "same": bool(g), "fold": int(f)}
                           for i, j, g, f in zip(pairs.a, pairs.b, pairs.genuine, pairs.folds)]
    return report


def _excluded_lines(report: dict[str, Any]) -> list[str]:
    excl = report.get("excluded") or []
    if not excl:
        return []
    return [f"Left out (--exclude, label errors checked by eye): {', '.join(f'`{e}`' for e in excl)}.", ""]


def _k_fold_lines(report: dict[str, Any]) -> list[str]:
    """The LFW protocol's accuracy (thresholds chosen on the other folds) and accuracy at fixed thresholds."""
    m0 = report["models"][0]["verification"]
    kf = m0["k_fold"]
    fixed = [a["threshold"] for a in m0["accuracy_at"]]
    lines = ["", f"## {kf['folds']}-fold accuracy (LFW protocol)", "",
             f"Folds: {kf['fold_rule']}. Each fold's threshold is the best-accuracy threshold on the other "
             f"{kf['folds'] - 1} folds; accuracy = pairs decided right (a pair with a photo without a face is "
             "rejected). Standard deviation over the folds (numpy, ddof 0). Every pair's distance is in the JSON "
             "(`pair_distances`, in the order of `pairs`).", ""]
    rows = []
    for m in report["models"]:
        v = m["verification"]
        rows.append([m["label"], f"{pct(v['k_fold']['accuracy_mean'], 2)} ± {pct(v['k_fold']['accuracy_std'], 2)}",
                     f"{num(min(f['threshold'] for f in v['k_fold']['per_fold']))} - "
                     f"{num(max(f['threshold'] for f in v['k_fold']['per_fold']))}",
                     f"{pct(v['accuracy_at_default'], 2)} ({num(v['default_threshold'])})"]
                    + [pct(a["accuracy"], 2) for a in v["accuracy_at"]])
    lines.append(md_table(["model", "accuracy (mean ± std)", "fold thresholds", "accuracy at the default threshold"]
                          + [f"accuracy at {t:g}" for t in fixed], rows))
    return lines


def render_eval_markdown(report: dict[str, Any], plots: dict[str, str], command: str) -> str:
    m0 = report["models"][0]
    fars = [a["far_target"] for a in m0["verification"]["at_far"]]
    lines = [f"# edgeface eval: {Path(report['dataset']).name}", "",
             "Generated by `edgeface eval`; do not edit by hand.", "", f"Command: `{command}`", "",
             f"Data: {report['n_persons']} people, {report['n_photos']} photos ({report['dataset']}). "
             f"Machine: {report['machine']}.", ""] + _excluded_lines(report) + [
             "A photo in which no face is found is never dropped: in a genuine pair it counts as a false rejection, "
             "in an impostor pair or for a stranger as a correct rejection, and as a rejection for an enrolled probe.",
             "", "## Verification (1:1)", "",
             f"Pairs: {m0['verification']['n_genuine']} genuine, {m0['verification']['n_impostor']} impostor "
             f"({report['pairs_source']}). TAR at a FAR is 'n/a' when there are fewer than 1/FAR impostor pairs.", ""]
    rows = []
    for m in report["models"]:
        v = m["verification"]
        rows.append([m["label"], f"{m['photos_no_face']} / {m['photos']}", f"{v['n_genuine_no_face']}",
                     pct(v["eer"], 2)] + [pct(a["tar"]) for a in v["at_far"]] +
                    [num(v["default_threshold"]), pct(v["tar_at_default"]), pct(v["far_at_default"], 2),
                     num(m["recommended_threshold"]["threshold"])])
    rec = far_name(m0["recommended_threshold"]["far_target"])
    lines.append(md_table(["model", "photos without a face", "genuine pairs lost to it", "EER"] +
                          [f"TAR @ FAR {far_name(f)}" for f in fars] +
                          ["default threshold", "TAR @ default", "FAR @ default", f"threshold for FAR {rec}"], rows))
    if "k_fold" in m0["verification"]:
        lines += _k_fold_lines(report)
    s = m0["identification"]["settings"]
    lines += ["", "## Open-set identification (1:N), all-identities protocol", "",
              "Not the protocol of `edgeface eval --open-set` (docs/accuracy.md: identities split into a tuning and a "
              "reporting half, thresholds chosen on one and stated on the other): here galleries are drawn from every "
              "identity of the set and thresholds are measured on the same people, so these figures cannot be "
              "compared with that study's.", "",
              f"{s['draws']} random galleries (seed {s['seed']}) of K={s['k']} people enrolled with E={s['enroll']} "
              f"photo(s) each ({s['template']} template); probes: all their other photos; strangers: every photo of "
              "everyone not enrolled. Correct accept = the right person, at or under the threshold; wrong person = "
              "someone else accepted; stranger accept = a stranger accepted as anyone. Rates over all probes / strangers "
              "of all draws, photos without a face included.", ""]
    rows = []
    for m in report["models"]:
        o = m["identification"]
        c = o["counts"]
        for name, r in list(o["fixed"].items()) + [(f"stranger FAR {far_name(a['far_target'])}", a) for a in o["at_far"]]:
            rows.append([m["label"], name, num(r["threshold"]), pct(r["correct_accept"]), pct(r["wrong_person_accept"], 2),
                         pct(r["stranger_accept"], 2), f"{c['probe_no_face']} / {c['probe']}",
                         f"{c['stranger_no_face']} / {c['stranger']}"])
    lines.append(md_table(["model", "threshold chosen by", "threshold", "correct accept", "wrong person",
                           "stranger accept", "probes without a face", "strangers without a face"], rows))
    lines += ["", "## Time per photo in this run (median ms)", "",
              "Measured while evaluating (one process, default threads); see docs/benchmarks.md for controlled timings.", ""]
    rows = [[m["label"], num(m["ms"].get("ms_decode"), 1), num(m["ms"].get("ms_detect"), 1), num(m["ms"].get("ms_align"), 1),
             num(m["ms"].get("ms_embed"), 1), num(m["ms"].get("ms_face_total"), 1),
             "yes (timings from the run that filled it)" if m["from_cache"] else "no"] for m in report["models"]]
    lines.append(md_table(["model", "decode", "detect", "align", "embed", "detect+align+embed", "from cache"], rows))
    if plots:
        lines += ["", "## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()]
    return "\n".join(lines) + "\n"


def render_open_set_markdown(study: dict[str, Any], plots: dict[str, str], command: str,
                             rec: Optional[dict[str, Any]], baseline: Optional[str],
                             rec_same_cost: Optional[dict[str, Any]] = None) -> str:
    fars = study["far_targets"]
    h = study["halves"]
    lines = ["# edgeface open-set identification accuracy", "",
             "Generated by `edgeface eval --open-set`; do not edit by hand.", "", f"Command: `{command}`", "",
             f"Data: {study['n_persons']} people, {study['n_photos']} photos ({Path(study['dataset']).name}). "
             f"Identities are split by a hash of their name: tuning half {h['tune']['persons']} people "
             f"({h['tune']['photos']} photos), reporting half {h['report']['persons']} people ({h['report']['photos']} photos). "
             f"Machine: {study['machine']}.", ""] + _excluded_lines(study) + [
             f"Protocol: {study['draws']} random galleries (seed {study['seed']}, the same galleries for every model) of K "
             "people, each enrolled with E photos (the first E photos in a random order in which a face is found: an "
             "enrollment tool refuses a photo without one; enrolled photos are embedded as `edgeface enroll` stores them, "
             "crop and mirror image averaged); probes are all their other photos, strangers every photo of "
             "everyone in the same half who is not enrolled. A probe or stranger photo without a detected face is kept "
             "and counts as a rejection (a miss for a probe, a correct rejection for a stranger). Correct accept: the "
             "nearest enrolled person is the right one and the score is at or under the threshold; wrong person: "
             "someone else is accepted; rates are pooled over all draws. Thresholds: 'own' = where the pooled "
             "stranger false-accept on the reporting half meets the target (the figure the targets are stated in); "
             "'tune-calibrated' = the threshold chosen on the tuning half, applied unchanged to the reporting half "
             "(what a deployment gets). Cohort normalisation uses tuning-half photos only when scoring the "
             "reporting half.", ""]
    combos = sorted({(r["k"], r["enroll"]) for r in study["results"]}, key=lambda x: (-x[0], -x[1]))
    for k, e in combos:
        half = ("All identities (--split all; thresholds chosen and reported on the same people)"
                if study.get("all_identities") else
                "Tuning half (--split tune)" if study.get("only_tune") else "Reporting half")
        lines += [f"## {half}, K={k}, E={e}", ""]
        first = next(r for r in study["results"] if r["k"] == k and r["enroll"] == e)
        n_str = {h: first[h]["counts"]["stranger"] for h in ("tune", "report")}
        lines += [f"Stranger trials pooled over the draws: tuning half {n_str['tune']}, reporting half {n_str['report']}. "
                  f"The {pct(min(fars), 1)} point is set by the {int(min(fars) * n_str['report'])} most stranger-like trials "
                  "(a few photos that recur across draws), so differences there are noisier than at "
                  f"{pct(max(fars), 0)}; compare both halves before trusting one.", ""]
        rows = []
        for r in study["results"]:
            if r["k"] != k or r["enroll"] != e:
                continue
            rep = r["report"]
            c = rep["counts"]
            row = [r["variant"], r["levers"]]
            for a in rep["at_far"]:
                row += [pct(a["correct_accept"]), pct(a["wrong_person_accept"], 2), num(a["threshold"])]
            tc = rep["fixed"].get(f"tune-calibrated {far_name(fars[-1])}")
            row += [f"{pct(tc['stranger_accept'], 2)} / {pct(tc['correct_accept'])}" if tc else "n/a"]
            row += [f"{c['probe_no_face']}/{c['probe']}, {c['stranger_no_face']}/{c['stranger']}",
                    num(r["ms"].get("ms_face_total"), 1)]
            rows.append(row)
        header = ["variant", "levers"]
        for f in fars:
            header += [f"correct accept @ stranger {pct(f, 1)}", "wrong person", "threshold"]
        header += [f"tune-calibrated threshold ({pct(fars[-1], 1)}): stranger accept / correct accept",
                   "no-face probes, strangers (all draws)", "ms/face (detect+align+embed)"]
        lines.append(md_table(header, rows))
        lines.append("")
    if baseline:
        lines += ["## Ablation: what each lever adds", "",
                  f"Change in correct accept at each stranger-FAR target against `{baseline}` (same K, E), on the tuning "
                  "half (where choices are made) and on the reporting half.", ""]
        for k, e in combos:
            base = find_result(study, baseline, k, e)
            if base is None:
                continue
            rows = []
            for r in study["results"]:
                if r["k"] != k or r["enroll"] != e:
                    continue
                row = [r["variant"], r["levers"]]
                for half in ("tune", "report"):
                    for i, _ in enumerate(fars):
                        a, b = r[half]["at_far"][i]["correct_accept"], base[half]["at_far"][i]["correct_accept"]
                        row.append("n/a" if a is None or b is None else f"{pct(a)} ({100 * (a - b):+.1f})")
                rows.append(row)
            header = ["variant", "levers"] + [f"{half} @ {pct(f, 1)}" for half in ("tune", "report") for f in fars]
            lines += [f"### K={k}, E={e}", "", md_table(header, rows), ""]
    if study["calibration"]:
        lines += ["## Threshold against gallery size", "",
                  "A larger gallery gives a stranger more people to resemble, so the threshold for a given stranger "
                  "false-accept rate tightens as K grows. Thresholds calibrated on the tuning half per K, applied to the "
                  "reporting half, against one threshold calibrated at the largest K.", ""]
        for cal in study["calibration"]:
            rows = []
            for row in cal["rows"]:
                for f in (far_name(x) for x in fars):
                    per, big = row["report_fixed"].get(f"per-K {f}"), row["report_fixed"].get(f"K={max(r['k'] for r in cal['rows'])} {f}")
                    rows.append([row["k"], f, num(per["threshold"]) if per else "n/a",
                                 f"{pct(per['stranger_accept'], 2)} / {pct(per['correct_accept'])}" if per else "n/a",
                                 num(big["threshold"]) if big else "n/a",
                                 f"{pct(big['stranger_accept'], 2)} / {pct(big['correct_accept'])}" if big else "n/a"])
            lines += [f"### {cal['variant']} (E={cal['enroll']})", "",
                      md_table(["K", "target", "per-K threshold", "report: stranger accept / correct accept",
                                "largest-K threshold", "report: stranger accept / correct accept"], rows), ""]
    lines += _targets_lines(study)
    lines += _per_visit_lines(study, baseline)
    if rec:
        lines += ["## Recommended default (chosen on the tuning half)", "",
                  "Among settings the daemon can run as shipped (a model in models/manifest.json, config switches only), "
                  + _recommendation_text(rec)]
        if rec_same_cost and rec_same_cost["variant"] != rec["variant"]:
            lines += [f"At no more work per face than the configured pipeline (`{rec_same_cost['baseline']}`, within "
                      f"{rec_same_cost['max_cost']:g}x its detect+align+embed time; what a Pi's latency budget allows "
                      "without re-measuring it, docs/benchmarks.md), " + _recommendation_text(rec_same_cost)]
        elif rec_same_cost:
            lines += [f"It costs no more per face than the configured pipeline (`{rec_same_cost['baseline']}`, within "
                      f"{rec_same_cost['max_cost']:g}x its detect+align+embed time).", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()] + [""]
    return "\n".join(lines) + "\n"


def _recommendation_text(rec: dict[str, Any]) -> str:
    t, rp, ro = rec["tune"], rec["report_at_tune_threshold"], rec["report_at_own_far"]
    cost = rec.get("cost_vs_baseline")
    cost_text = f" Its detect+align+embed time per face: {cost:.2f}x `{rec['baseline']}`'s." if cost is not None else ""
    return (f"`{rec['variant']}` ({rec['template']} template) has the best tuning-half correct accept at a "
            f"{pct(rec['far_target'], 1)} stranger false-accept rate (K={rec['k']}, E={rec['enroll']}): "
            f"{pct(t['correct_accept'])} at threshold {num(t['threshold'], 4)} (wrong person "
            f"{pct(t['wrong_person_accept'], 2)}).{cost_text}\n\n"
            f"That threshold on the reporting half: correct accept {pct(rp['correct_accept']) if rp else 'n/a'}, "
            f"wrong person {pct(rp['wrong_person_accept'], 2) if rp else 'n/a'}, stranger accept "
            f"{pct(rp['stranger_accept'], 2) if rp else 'n/a'}. At the reporting half's own {pct(rec['far_target'], 1)} "
            f"point: correct accept {pct(ro['correct_accept'])}, wrong person {pct(ro['wrong_person_accept'], 2)}.\n")


def _per_visit_lines(study: dict[str, Any], baseline: Optional[str]) -> list[str]:
    """What the daemon's K-of-N frame vote makes of the per-photo rates (reporting half, tune-calibrated threshold)."""
    from edgeface.config import PolicyConfig

    policy = PolicyConfig()
    k, n = policy.min_frames, policy.window_frames
    rows = []
    for r in study["results"]:
        if r["variant"] != baseline or study.get("only_tune") or study.get("all_identities"):
            continue
        for name, fixed in sorted(r["report"]["fixed"].items()):
            if not name.startswith("tune-calibrated"):
                continue
            p, c = fixed["stranger_accept"], fixed["correct_accept"]
            if p is None or c is None:
                continue
            rows.append([f"K={r['k']}, E={r['enroll']}", name, num(fixed["threshold"]), pct(p, 3),
                         f"{k_of_n_rate(p, k, n):.1e}", pct(c), pct(k_of_n_rate(c, k, n))])
    if not rows:
        return []
    head = ["gallery", "threshold", "value", "stranger accept per photo",
            f"per visit, frames independent ({k} of {n})", "correct accept per photo",
            f"per visit, frames independent ({k} of {n})"]
    return ["## Per visit: what the daemon's frame vote implies", "",
            f"The daemon grants only when {k} of the last {n} frames (policy.min_frames / window_frames) match the "
            "same person. If frames were independent draws, a stranger would be let in with the binomial tail below; "
            "frames of one visit are strongly correlated (same face, light and pose), so the true per-visit stranger "
            "accept lies between that figure and the per-photo rate, and is closer to the per-photo rate for a "
            "stranger who resembles an enrolled person. The enrolled person's per-visit accept rises the same way "
            "because the vote runs over a stream of frames while they approach, not over one photo. Neither was "
            "measured on video here (no door footage in the data).", "", md_table(head, rows), ""]


def _targets_lines(study: dict[str, Any]) -> list[str]:
    t = TARGETS
    rows = []
    for r in study["results"]:
        if r["k"] != t["k"] or r["enroll"] != t["enroll"] or study.get("only_tune") or study.get("all_identities"):
            continue
        cells, ok_all = [r["variant"], "yes" if r["deployable"] else "no"], True
        for a in r["report"]["at_far"]:
            goal = t["correct_accept"].get(a["far_target"])
            if goal is None:
                continue
            ca, wp = a["correct_accept"], a["wrong_person_accept"]
            ok = ca is not None and ca >= goal and wp is not None and wp <= t["wrong_person_max"]
            ok_all &= ok
            cells.append(f"{pct(ca)} / {pct(wp, 2)} {'meets' if ok else 'misses'}")
        cells.append("**all met**" if ok_all else "not met")
        rows.append(cells)
    if not rows:
        return []
    head = ["variant", "shippable as configured"] + [
        f"stranger {pct(f, 1)}: correct accept (goal {pct(g, 0)}) / wrong person (goal <= {pct(t['wrong_person_max'], 1)})"
        for f, g in t["correct_accept"].items()] + ["targets"]
    return ["## Against the targets (reporting half, K=100, E=3)", "", md_table(head, rows), ""]

"""Write docs/benchmarks.md (and its plots) from bench/results/*.json. No number in that page is typed by hand.

    python bench/make_docs.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeface.evaluation.plots import pyplot  # noqa: E402
from edgeface.evaluation.metrics import far_name  # noqa: E402
from edgeface.evaluation.report import md_table, num, pct, write_text_atomic  # noqa: E402

RESULTS = REPO / "bench" / "results"
DOC = REPO / "docs" / "benchmarks.md"
IMG = REPO / "docs" / "img"


def load(name: str) -> Optional[dict[str, Any]]:
    p = RESULTS / name
    return json.loads(p.read_text()) if p.is_file() else None


def stage(r: dict, key: str, what: str = "median") -> Optional[float]:
    s = r["stages_ms"].get(key)
    return s[what] if s else None


def ratio_range(ref: dict, precision: str) -> tuple[float, float]:
    rs = [row["ratio_pi4_over_here"] for row in ref["rows"] if row["precision"] == precision]
    return min(rs), max(rs)


def pipeline_section(pipe: dict, ref: Optional[dict]) -> list[str]:
    lines = ["## Pipeline latency per stage", "",
             f"{pipe['n_images']} photos of `{Path(pipe['images']).name}` ({pipe['passes']} timed pass after a warm-up "
             "pass), each handled as one camera frame: decode JPEG -> BlazeFace -> face mesh (config default) -> align -> "
             "embed -> match against 100 people x 3 embeddings. Median / 95th percentile in ms. Each row is a fresh "
             f"process. Measured {pipe['when']}.", ""]
    rows = []
    for r in pipe["results"]:
        cells = [r["embedder"], r.get("precision") or ("int8" if r["quantized"] else "float32"), r["threads"]]
        for key in ("decode", "detect", "mesh", "align", "embed", "match", "frame", "empty_720p"):
            m, p = stage(r, key), stage(r, key, "p95")
            cells.append("-" if m is None else f"{m:.1f} / {p:.1f}")
        cells += [f"{r['fps']:.1f}", f"{r['decision']['median_ms']:.0f} / {r['decision']['p95_ms']:.0f}",
                  f"{sum(r['load_ms'].values()):.0f}", f"{r['rss_mb']['peak']:.0f}", f"{r['model_bytes'] / 2**20:.1f}"]
        rows.append(cells)
    k = pipe["results"][0]["decision"]["k_frames"] if pipe["results"] else "K"
    lines.append(md_table(["embedder", "precision", "threads", "decode", "detect", "mesh", "align", "embed", "match",
                           "whole frame", "empty 1280x720 frame", "frames/s", f"decision latency (K={k} frames)", "load + first inference ms",
                           "peak RSS MiB", "model MiB"], rows))
    lines += ["", f"Decision latency = K x the frame time (the policy needs K={k} matching frames before the relay "
              "fires), median / p95; camera exposure and relay switching time are not included. Threads above the "
              f"core count ({pipe['machine'].split(',')[1].strip()}) only add contention. \"Empty 1280x720 frame\": "
              "detection (and mesh) on a frame with no face, the work done on most frames at a door; with the default "
              "full-range fallback both BlazeFace models run on it.", ""]
    peer = pipe.get("peer")
    if peer:
        from edgeface.config import EdgefaceConfig
        default = EdgefaceConfig().embedder.model  # the shipped default embedder's rows
        ours = [r for r in pipe["results"] if r["embedder"] == default] or [r for r in pipe["results"] if r["quantized"]]
        best = min(ours, key=lambda r: stage(r, "frame")) if ours else None
        lines += ["### Against face_recognition (same photos, same run)", ""]
        rows = [[peer["embedder"], peer["threads"], f"{stage(peer, 'decode'):.1f}", f"{stage(peer, 'detect'):.1f}",
                 f"{stage(peer, 'embed'):.1f}", f"{stage(peer, 'frame'):.1f}", f"{peer['fps']:.2f}",
                 f"{peer['rss_mb']['peak_children_max']:.0f}", f"{peer['frames_with_face']}/{peer['frames']}"]]
        for r in ours:
            rows.append([f"edgeface {r['embedder']}", r["threads"], f"{stage(r, 'decode'):.1f}",
                         f"{stage(r, 'detect') + (stage(r, 'mesh') or 0):.1f}",
                         f"{stage(r, 'align') + stage(r, 'embed') + stage(r, 'match'):.1f}", f"{stage(r, 'frame'):.1f}",
                         f"{r['fps']:.2f}", f"{r['rss_mb']['peak']:.0f}", f"{r['frames_with_face']}/{r['frames']}"])
        lines.append(md_table(["pipeline", "threads", "decode ms", "detect ms (ours: + mesh)",
                               "embed ms (ours: align + embed + match)", "whole photo ms", "photos/s", "peak RSS MiB",
                               "photos with a face"], rows))
        if best:
            ratio = stage(peer, "frame") / stage(best, "frame")
            per_face = stage(peer, "embed") / stage(best, "embed")
            lines += ["", f"In this run the default pipeline ({best['embedder']}, {best['threads']} threads) handled a photo "
                      f"{ratio:.1f}x faster than face_recognition (median whole-photo time); the embedding step alone "
                      f"(dlib 5-point landmarks + ResNet-34 against align + {best['embedder']}) was {per_face:.1f}x faster. "
                      "dlib's HOG detector runs on one thread; face_recognition uses its defaults (HOG, one upsampling, "
                      "no jitter).", ""]
    if ref:
        lines += pi_section(pipe, ref)
    return lines


def pi_section(pipe: dict, ref: dict) -> list[str]:
    f_lo, f_hi = ratio_range(ref, "float32")
    i_lo, i_hi = ratio_range(ref, "int8")
    s = ref["pi5_over_pi4_speedup"]
    rows = [[r["network"], r["precision"], f"{r['here_ms']:.1f} ({r['here_threads']} threads)",
             f"{r['pi4_published_ms']:.0f} ({r['pi4_threads']} threads)", f"{r['ratio_pi4_over_here']:.2f}"] for r in ref["rows"]]
    lines = ["## Raspberry Pi estimate (projected, not measured)", "",
             "No Pi was available. The projection uses published XNNPACK latencies of two reference networks on a "
             f"Raspberry Pi 4 ({ref['source']}) and the same networks (random weights, converted here, run through "
             "the same runtime) timed on this machine:", "",
             md_table(["reference network", "precision", "here ms", "Pi 4 published ms", "Pi 4 / here"], rows), "",
             f"Assumption: each stage of our pipeline slows down by the same factor as the references of its precision "
             f"(float32 {f_lo:.1f}-{f_hi:.1f}x, int8 {i_lo:.1f}-{i_hi:.1f}x; decode, align and match, which are not "
             f"XNNPACK, are scaled with the float32 factor). Pi 5: the Pi 4 estimate divided by {s['low']:.0f}-{s['high']:.0f} "
             f"({s['source']}). These are ranges from ratios, not measurements: measure on the device before relying on them.",
             ""]
    full = max(r["threads"] for r in pipe["results"]) if pipe["results"] else 1
    here_threads = ref["rows"][0]["here_threads"]
    rows = []
    for r in pipe["results"]:
        if r["threads"] != here_threads:
            continue
        fl = sum(stage(r, k) or 0 for k in ("decode", "detect", "mesh", "align", "match"))
        # Each model's embed time by its own precision's factor (float16 weights run as float32 on a Pi 4).
        parts = r.get("embed_parts") or [{"precision": "int8" if r["quantized"] else "float32",
                                          "embed_ms": r["stages_ms"]["embed"]}]
        lo, hi = fl * f_lo, fl * f_hi
        for part in parts:
            em = part["embed_ms"]["median"]
            lo_e, hi_e = (i_lo, i_hi) if part["precision"] == "int8" else (f_lo, f_hi)
            lo, hi = lo + em * lo_e, hi + em * hi_e
        k = r["decision"]["k_frames"]
        empty = stage(r, "empty_720p")  # float32 BlazeFace (+ mesh): the float32 factor
        rows.append([r["embedder"], f"{stage(r, 'frame'):.0f}", f"{lo:.0f}-{hi:.0f}", f"{1000 / hi:.1f}-{1000 / lo:.1f}",
                     f"{k * lo:.0f}-{k * hi:.0f}", f"{lo / s['high']:.0f}-{hi / s['low']:.0f}",
                     f"{k * lo / s['high']:.0f}-{k * hi / s['low']:.0f}",
                     "-" if empty is None else f"{empty * f_lo:.0f}-{empty * f_hi:.0f}"])
    lines += [md_table(["embedder", f"frame ms here ({here_threads} threads)", "Pi 4 est. frame ms (4 threads)",
                        "Pi 4 est. frames/s", "Pi 4 est. decision ms", "Pi 5 est. frame ms", "Pi 5 est. decision ms",
                        "Pi 4 est. empty 1280x720 frame ms"], rows), ""]
    del full
    emb = ref.get("embedders") or []
    if emb:
        k = pipe["results"][0]["decision"]["k_frames"] if pipe["results"] else 3
        rows = [[Path(e["embedder"].split(":")[0]).name.removesuffix(".tflite"), e["precision"], f"{e['here_ms']:.1f} ({e['here_threads']} threads)", e["pi4_factor"],
                 f"{e['pi4_est_ms'][0]:.0f}-{e['pi4_est_ms'][1]:.0f}",
                 f"{k * e['pi4_est_ms'][0]:.0f}-{k * e['pi4_est_ms'][1]:.0f}"] for e in emb]
        lines += ["### The embedding step alone, timed in turns with the reference networks", "",
                  "Each embedder's interpreter was invoked once per round in turn with the four reference networks "
                  f"({ref.get('timing', 'same run')}), so the ratio and the embedder saw the same machine load; the "
                  "Pi 4 estimate is the embedder's time here times its precision's ratio range (float16 weights run "
                  "as float32 on a Pi 4). Score fusion embeds each face with both models: add their rows.", "",
                  md_table(["embedder", "precision", "here ms", "factor", "Pi 4 est. ms per face",
                            f"Pi 4 est. ms for K={k} faces"], rows), ""]
    return lines


def doorway_section(door: dict) -> list[str]:
    """The replayed doorway (bench/bench_doorway.py): empty-doorway CPU and face-to-relay latency, gate off and on."""
    from bench_doorway import render

    return ["## An empty doorway and face-to-relay latency (replayed sequences, presence gate off and on)", "",
            "Replayed with `bench/bench_doorway.py` (edgeface.replay: the fixture faces composited into a synthetic "
            "doorway with lighting flicker and camera noise, 1280x720) through the real daemon, fed as a live camera "
            "would: a frame every 1/fps s, the daemon taking the newest whenever it is free. Face to relay = relay on "
            "minus the first frame with half the face in view. Empty-doorway CPU = process CPU time per second of empty doorway. The Pi 4 "
            "figures convert CPU time here with the reference networks (published Pi 4 ms / their CPU ms here, timed in "
            "turns with the replays, under the same load); an empty doorway's Pi 4 CPU is that busy time x 1 to 4 "
            "busy cores (XNNPACK's 4 threads; the upper end is compared with the target). Wall-time figures here "
            "suffer from other processes on this shared machine (see the load average); the granting frame does not. "
            "Estimates from ratios, not measurements.", ""] + render(door, title=False).splitlines() + [""]


def matching_section(match: dict) -> list[str]:
    rows = []
    for r in match["rows"]:
        f32, f16 = r["float32"], r["float16"]
        rows.append([f"{r['embeddings']:,}", f"{r['persons']:,}", f"{f32['median_ms']:.3f} / {f32['p95_ms']:.3f}",
                     f"{f32['storage_bytes'] / 2**20:.1f}", f"{f16['median_ms']:.3f} / {f16['p95_ms']:.3f}",
                     f"{f16['storage_bytes'] / 2**20:.1f}", f"{max(f32['query_peak_extra_bytes'], 1) / 2**20:.2f}",
                     "yes" if r["same_answer"] else "no"])
    return ["## 1:N matching as the gallery grows", "",
            f"Random {match['dim']}-D unit embeddings, {match['per_person']} per person; one query = distances to every "
            "embedding + per-person minimum + argmin. float32 is the gallery's own index (edgeface.gallery.index); float16 "
            "halves the memory but numpy must convert it back to float32 in chunks to multiply, so it is slower here. "
            f"Measured {match['when']}.", "",
            md_table(["embeddings", "people", "float32 ms (median / p95)", "float32 MiB", "float16 ms (median / p95)",
                      "float16 MiB", "float32 extra memory per query MiB", "same nearest person"], rows), ""]


def accuracy_section(ev: dict) -> list[str]:
    fars = [a["far_target"] for a in ev["models"][0]["verification"]["at_far"]]
    rows = []
    for m in ev["models"]:
        v, o = m["verification"], m["identification"]
        d = o["fixed"].get("default") or {}
        rows.append([m["label"], f"{m['photos_no_face']}/{m['photos']}", num(v["default_threshold"]),
                     pct(v["tar_at_default"]), pct(v["far_at_default"], 2)] + [pct(a["tar"]) for a in v["at_far"]] +
                    [pct(v["eer"], 2), pct(d.get("correct_accept")), pct(d.get("wrong_person_accept"), 2),
                     pct(d.get("stranger_accept"), 2)])
    s = ev["models"][0]["identification"]["settings"]
    return ["## Accuracy on the same photos (data/faces)", "",
            f"{ev['n_persons']} people, {ev['n_photos']} photos; all pairs ({ev['models'][0]['verification']['n_genuine']} "
            f"genuine, {ev['models'][0]['verification']['n_impostor']} impostor). Every model sees exactly the same photos "
            "and pairs; a photo where a model finds no face stays in, as a rejection. Default threshold: the shipped one "
            "(manifest) for ours, the documented tolerance 0.6 for face_recognition. Open-set columns: "
            f"{s['draws']} galleries of K={s['k']} people with E={s['enroll']} photo each, the others as strangers, at the "
            "default threshold. The full report (ROC, identification at matched stranger-FAR) is "
            "[bench/results/eval_faces.md](../bench/results/eval_faces.md).", "",
            md_table(["model", "photos without a face", "default threshold", "TAR @ default", "FAR @ default"] +
                     [f"TAR @ FAR {far_name(f)}" for f in fars] +
                     ["EER", "1:N correct accept @ default", "wrong person", "stranger accept"], rows), "",
            "TAR at a FAR shows the models at matched false-accept rates (n/a: too few impostor pairs to measure it).", "",
            "![ROC](img/eval_faces_roc.png)", "", "![scores](img/eval_faces_scores.png)", ""]


def open_set_section(acc: dict) -> list[str]:
    rows = []
    for r in acc["results"]:
        if r["levers"] not in ("as configured", "its defaults"):
            continue
        rep = r["report"]
        cal = rep["fixed"].get(f"tune-calibrated {far_name(min(acc['far_targets']))}")
        rows.append([r["variant"], r["k"], r["enroll"]] +
                    [f"{pct(a['correct_accept'])} / {pct(a['wrong_person_accept'], 2)}" for a in rep["at_far"]] +
                    [f"{num(cal['threshold'])}: {pct(cal['stranger_accept'], 2)} / {pct(cal['correct_accept'])}" if cal else "n/a"] +
                    [f"{num(d['threshold'])}: {pct(d['stranger_accept'], 2)} / {pct(d['correct_accept'])} / "
                     f"{pct(d['wrong_person_accept'], 2)}" if (d := rep["fixed"].get("default")) else "n/a"])
    rec = acc.get("recommendation")
    out = ["## Open-set identification (open-set protocol, reporting half)", "",
           "Same seeded galleries for every model, photos without a face counted as rejections; levers, tuning half and "
           "plots in [accuracy.md](accuracy.md).", "",
           md_table(["model", "K", "E"] + [f"stranger {pct(f, 1)}: correct accept / wrong person" for f in acc["far_targets"]] +
                    [f"threshold from the tuning half ({pct(min(acc['far_targets']), 1)}): stranger / correct accept",
                     "default threshold: stranger / correct / wrong person"], rows), ""]
    if rec:
        cost = rec.get("cost_vs_baseline")
        out += [f"Best on the tuning half: `{rec['variant']}`, threshold {num(rec['threshold'], 4)}"
                + (f" ({cost:.2f}x the configured pipeline's time per face)." if cost is not None else ".")]
        same = acc.get("recommendation_same_cost")
        if same and same["variant"] != rec["variant"]:
            out += [f"At no more work per face than the configured pipeline: `{same['variant']}`, threshold "
                    f"{num(same['threshold'], 4)} (accuracy.md, \"Recommended default\")."]
        out += [""]
    return out


def summary(pipe: Optional[dict], ev: Optional[dict]) -> list[str]:
    """The headline numbers, each pulled from the tables below."""
    out = []
    if ev:
        for m in ev["models"]:
            v = m["verification"]
            d = m["identification"]["fixed"].get("default") or {}
            out.append(f"- {m['label']} on data/faces: TAR {pct(v['tar_at_default'])} at its default threshold "
                       f"{num(v['default_threshold'])} (impostor pairs accepted: {pct(v['far_at_default'], 2)}); in 1:N "
                       f"galleries a stranger was accepted {pct(d.get('stranger_accept'), 2)} of the time; "
                       f"{m['photos_no_face']} of {m['photos']} photos without a detected face.")
    if pipe and pipe.get("peer"):
        peer = pipe["peer"]
        from edgeface.config import EdgefaceConfig
        default = EdgefaceConfig().embedder.model
        ours_rows = [x for x in pipe["results"] if x["embedder"] == default] or \
            [x for x in pipe["results"] if x["quantized"]]
        for r in ([min(ours_rows, key=lambda x: stage(x, "frame"))] if ours_rows else []):
                ours = stage(r, "frame")
                out.append(f"- Per photo in one run ({pipe['n_images']} photos): edgeface {r['embedder']} "
                           f"{ours:.0f} ms (embed step {stage(r, 'embed'):.1f} ms, {r['threads']} threads) vs face_recognition "
                           f"{stage(peer, 'frame'):.0f} ms (embed step {stage(peer, 'embed'):.0f} ms).")
    return (["## Summary", ""] + out + [""]) if out else []


def plots(pipe: Optional[dict], match: Optional[dict]) -> list[str]:
    plt = pyplot()
    out = []
    if pipe and pipe["results"]:
        fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=100)
        labels, bottoms = [], None
        keys = ("decode", "detect", "mesh", "align", "embed", "match")
        data = np.array([[stage(r, k) or 0.0 for k in keys] for r in pipe["results"]])
        labels = [f"{r['embedder']}\n{r['threads']} thr" for r in pipe["results"]]
        bottoms = np.zeros(len(labels))
        for j, k in enumerate(keys):
            ax.bar(labels, data[:, j], bottom=bottoms, label=k)
            bottoms += data[:, j]
        ax.set_ylabel("median ms per frame")
        ax.set_title(f"Pipeline stages ({pipe['machine'].split(',')[0]})")
        ax.legend(fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        fig.tight_layout()
        IMG.mkdir(parents=True, exist_ok=True)
        fig.savefig(IMG / "bench_stages.png")
        plt.close(fig)
        out.append("![stages](img/bench_stages.png)")
    if match:
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
        n = [r["embeddings"] for r in match["rows"]]
        ax.loglog(n, [r["float32"]["median_ms"] for r in match["rows"]], "o-", label="float32")
        ax.loglog(n, [r["float16"]["median_ms"] for r in match["rows"]], "s-", label="float16 (chunked)")
        ax.set_xlabel("gallery embeddings")
        ax.set_ylabel("median ms per query")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        ax.set_title("1:N matching time")
        fig.tight_layout()
        fig.savefig(IMG / "bench_matching.png")
        plt.close(fig)
        out.append("![matching](img/bench_matching.png)")
    return out


def main() -> int:
    import argparse
    global RESULTS, DOC, IMG
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--doc", type=Path, default=DOC)
    args = ap.parse_args()
    RESULTS, DOC = args.results, args.doc
    IMG = DOC.parent / "img"
    pipe, match, ref, ev = load("pipeline.json"), load("matching.json"), load("reference.json"), load("eval_faces.json")
    machine = (pipe or match or ref or {}).get("machine", "unknown")
    lines = ["# Benchmarks", "",
             "Generated by `bench/make_docs.py` from `bench/results/*.json`; every number below comes from those files "
             "(do not edit by hand). Reproduce with `bench/run_all.sh` (see [bench/README.md](../bench/README.md)).", "",
             f"Machine: {machine}.", ""]
    loads = {name: d.get("load_average_1min_at_end") for name, d in
             (("pipeline", pipe), ("matching", match), ("reference", ref)) if d}
    if any(v is not None for v in loads.values()):
        lines += ["1-minute load average when each run ended (on an idle machine it stays well under the core count; "
                  "higher means other processes competed for the CPU and the timings are pessimistic): " +
                  ", ".join(f"{k} {v:.1f}" for k, v in loads.items() if v is not None) + ".", ""]
    notes = (ev or {}).get("notes")
    lines += summary(pipe, ev)
    if pipe:
        lines += pipeline_section(pipe, ref)
    door = load("doorway.json")
    if door:
        lines += doorway_section(door)
    if ev:
        lines += accuracy_section(ev)
    acc = load("accuracy.json")
    if acc:
        lines += open_set_section(acc)
    if match:
        lines += matching_section(match)
    img = plots(pipe, match)
    if img:
        lines += ["## Plots", ""] + img + [""]
    if notes:
        lines += ["## Notes", "", notes, ""]
    script = REPO / "bench" / "run_all.sh"
    if script.is_file():
        lines += ["## Reproduce", "", "Everything above comes from these commands (`bench/run_all.sh`):", "", "```sh",
                  script.read_text(encoding="utf-8").rstrip(), "```", ""]
    write_text_atomic(DOC, "\n".join(lines) + "\n")
    print(f"wrote {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

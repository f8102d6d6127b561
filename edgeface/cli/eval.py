"""`edgeface eval`: measure accuracy on a labelled photo set (verification, open-set identification, the
open-set study with its levers) and write a markdown + JSON report with plots."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import click

from edgeface.cli import CliContext, pass_ctx
from edgeface.errors import ConfigError

DEFAULT_CACHE = Path.home() / ".cache" / "edgeface" / "eval"


def _parse_thresholds(items: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for item in items:
        label, sep, value = item.rpartition("=")
        try:
            if not sep or not label:
                raise ValueError
            out[label] = float(value)
        except ValueError:
            raise ConfigError(f"--threshold {item!r}: expected MODEL_LABEL=DISTANCE, e.g. facenet_int8=0.55") from None
    return out


@click.command("eval")
@click.argument("dataset", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", "models", multiple=True, metavar="MODEL",
              help="Embedder: manifest name, .tflite path, PATH:TEMPLATE:PREPROCESSING for a model outside the manifest "
                   "(e.g. mobilefacenet.tflite:arcface112:arcface), suffix +flip for flip averaging, +lm / -lm to force "
                   "the face mesh on / off (default: detector.refine_landmarks), +mesh2 for two face-mesh passes, +full for BlazeFace full range, +short for short range alone (no full-range fallback), or 'face_recognition' (the dlib peer). Repeat to compare. Default: the config's embedder.")
@click.option("--pairs", "pairs_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="LFW-style pairs.txt; default: every pair of photos in DATASET.")
@click.option("--open-set", "open_set_mode", is_flag=True,
              help="The open-set study: tuning/reporting halves, K-person galleries, E enrollment photos, seeded draws.")
@click.option("--k", "k", type=click.IntRange(1), default=100, show_default=True, help="People enrolled per gallery.")
@click.option("--enroll", "enrolls", type=click.IntRange(1), multiple=True,
              help="Enrollment photos per person (repeatable). Default: 3 and 1 with --open-set, else 1.")
@click.option("--draws", type=click.IntRange(1), default=20, show_default=True, help="Random galleries averaged.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--template", type=click.Choice(["mean", "best", "blend"]), default=None,
              help="Per-person score: distance to the mean of the E embeddings, the best of the E, or the blend of "
                   "both. Default: as the gallery matches (gallery.match_mode centroid -> mean, blend -> blend, "
                   "best/topk_mean -> best).")
@click.option("--split", type=click.Choice(["tune", "report", "all"]), default=None,
              help="Identities to use (fixed by a hash of the name). Without --open-set: default all. With --open-set: "
                   "default report (tables of the reporting half, thresholds also calibrated on the tuning half); "
                   "'tune' shows the tuning half only; 'all' every identity, thresholds chosen on the same people "
                   "(no cohort normalisation, so not with --ablation).")
@click.option("--ablation", is_flag=True, help="With --open-set: also measure each lever (template, flip, face mesh, "
                                                "fusion of the first two models, cohort normalisation, per-K thresholds).")
@click.option("--threshold", "thresholds", multiple=True, metavar="LABEL=DIST",
              help="Default threshold of a model (default: config gallery.max_distance, else the manifest's; "
                   "face_recognition: 0.6).")
@click.option("--target-far", type=float, default=1e-3, show_default=True,
              help="False-accept rate for the recommended threshold.")
@click.option("--accuracy-at", "accuracy_thresholds", type=float, multiple=True, metavar="DIST",
              help="With --pairs: also the accuracy at this distance threshold (repeatable).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=Path("eval-report.md"),
              show_default=True, help="Markdown report, written to eval-report.md in the current folder unless given; "
                                      "the JSON goes next to it (.json) unless --json is given.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="Where the JSON report (every figure, curves; with --pairs every pair's distance) is written "
                   "(default: the --report path with .json).")
@click.option("--plots-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the PNG plots go (default: img/ next to the report).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_CACHE, show_default=True,
              help="Embeddings cache (one npz per model, settings, photo set and face-path code version).")
@click.option("--no-cache", is_flag=True, help="Embed everything again.")
@click.option("--peer-python", type=click.Path(dir_okay=False), default=None,
              help="Python of the peer venv (bench/setup_peer_env.sh) for --model face_recognition; "
                   "default $EDGEFACE_PEER_PYTHON.")
@click.option("--exclude", "exclude_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File of persons or person/photo entries to leave out (label errors), one per line, # comments.")
@click.option("--threads", type=click.IntRange(1, 16), default=None, help="Interpreter threads.")
@click.option("--quiet", is_flag=True, help="No progress (default: a bar on a terminal, a line per 10% of the photos "
                                            "or per 10 s in a log).")
@pass_ctx
def eval_cmd(obj: CliContext, dataset: Path, models: tuple[str, ...], pairs_file: Optional[Path], open_set_mode: bool,
             k: int, enrolls: tuple[int, ...], draws: int, seed: int, template: Optional[str], split: Optional[str], ablation: bool,
             thresholds: tuple[str, ...], target_far: float, accuracy_thresholds: tuple[float, ...],
             report_path: Path, json_path: Optional[Path],
             plots_dir: Optional[Path], cache_dir: Path, no_cache: bool, peer_python: Optional[str],
             exclude_file: Optional[Path], threads: Optional[int], quiet: bool) -> None:
    """Measure accuracy on DATASET (one folder of photos per person) and write a report.

    Without --open-set: 1:1 verification (ROC, EER, TAR at FAR 1e-2/1e-3/1e-4 where enough impostor pairs exist)
    and open-set identification, per model, on the same photos. Photos without a detected face are counted,
    never dropped.
    """
    from edgeface.evaluation.dataset import identity_split, load_folder_dataset, read_exclusions
    from edgeface.evaluation.embedding import EmbeddedSet, ModelChoice, default_threshold, embed_dataset
    from edgeface.evaluation.metrics import folder_pairs, lfw_pairs
    from edgeface.evaluation.openset import OpenSetSettings, SAME_COST, Variant, open_set_study, recommend
    from edgeface.evaluation.plots import eval_plots, open_set_plots
    from edgeface.evaluation.report import evaluate_models, public, render_eval_markdown, render_open_set_markdown, write_text_atomic

    if ablation and not open_set_mode:
        raise ConfigError("--ablation needs --open-set")
    if ablation and split == "all":
        raise ConfigError("--split all --ablation: cohort normalisation needs identities outside the scored ones "
                          "(use --split report)")
    if accuracy_thresholds and not pairs_file:
        raise ConfigError("--accuracy-at needs --pairs (the pairs file's accuracy)")
    if not 0 < target_far < 1:
        raise ConfigError(f"--target-far {target_far}: expected a rate between 0 and 1")
    cfg = obj.config
    template = template or {"centroid": "mean", "blend": "blend"}.get(cfg.gallery.match_mode, "best")
    choices = [ModelChoice.parse(m) for m in (models or (cfg.embedder.model,))]
    labels = [c.label for c in choices]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--model given twice: {labels}")
    overrides = _parse_thresholds(thresholds)
    unknown = set(overrides) - set(labels)
    if unknown:
        raise ConfigError(f"--threshold names {sorted(unknown)}, which is not among the models {labels}")
    exclusions = read_exclusions(exclude_file) if exclude_file else set()
    full = load_folder_dataset(dataset)
    dropped = set(exclusions)
    if split and split != "all" and not open_set_mode:
        dropped |= {p for p in full.persons if identity_split(p) != split}
    ds, keep = full.without(dropped)
    if len(ds.persons) < 2:
        raise ConfigError(f"{dataset}: {len(ds.persons)} person(s) left after --split/--exclude; need at least 2")
    cache = None if no_cache else cache_dir
    json_path = json_path or report_path.with_suffix(".json")
    plots_dir = plots_dir or report_path.parent / "img"
    prefix = report_path.stem
    command = "edgeface " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] and "eval" in sys.argv[1:] \
        else "edgeface eval " + shlex.quote(str(dataset))

    def embed(choice: "ModelChoice") -> "EmbeddedSet":
        # Embeddings are made (and cached) for the whole folder, then cut to the photos kept.
        es = embed_dataset(full, choice, cache_dir=cache, detector_config=cfg.detector, num_threads=threads,
                              peer_python=peer_python, progress=not quiet)
        return es.take(keep)

    thr = {c.label: overrides.get(c.label, default_threshold(c, cfg.gallery.max_distance, cfg.gallery.match_mode)) for c in choices}
    if not open_set_mode:
        sets = [(c, embed(c)) for c in choices]
        pairs = lfw_pairs(ds, pairs_file) if pairs_file else folder_pairs(ds)
        settings = OpenSetSettings(k=k, enroll=(enrolls or (1,))[0], draws=draws, seed=seed, template=template)
        report = evaluate_models(ds, sets, pairs=pairs, thresholds=thr, id_settings=settings, target_far=target_far,
                                 accuracy_thresholds=accuracy_thresholds)
        report["excluded"] = sorted(exclusions)
        plots = eval_plots(report, plots_dir, prefix, report_path.parent)
        md = render_eval_markdown(report, plots, command)
        _summary_eval(report)
    else:
        if pairs_file:
            raise ConfigError("--pairs does not apply to --open-set (galleries are drawn from the folders)")
        enrolls = enrolls or (3, 1)
        sets: dict[str, EmbeddedSet] = {}
        variants: list[Variant] = []
        for c in choices:
            sets[c.label] = embed(c)
            variants.append(Variant(c.label, "as configured" if not c.is_peer else "its defaults", (c.label,),
                                       template=template, deployable=c.shipped))
        baseline = variants[0].name
        calibrate: list[str] = []
        if ablation:
            base = [c for c in choices if not c.is_peer and not c.flip and c.landmarks is None and c.detector is None
                    and c.mesh2 is None]
            mesh_on = cfg.detector.refine_landmarks
            toggled = not mesh_on
            others = [t for t in ("mean", "best", "blend") if t != template]
            # Cohort s-norm is measured on single templates: with the blend it runs on the mean template.
            cohort_template = "mean" if template == "blend" else template
            cohort_note = ", mean template" if template == "blend" else ""
            what = {"mean": "mean template", "best": "best of E photos",
                    "blend": "blend: 0.75 x mean template + 0.25 x best photo"}
            for c in base:
                ship = c.shipped  # only models in the manifest can be recommended as the default
                flip = ModelChoice(c.model, c.template, c.preprocessing, flip=True)
                lm = ModelChoice(c.model, c.template, c.preprocessing, landmarks=toggled)
                extra = [flip, lm]
                mesh2 = None
                if mesh_on and cfg.detector.landmark_passes == 1:
                    mesh2 = ModelChoice(c.model, c.template, c.preprocessing, mesh2=True)
                    extra.append(mesh2)
                full_range = short_only = None
                if cfg.detector.variant != "full":
                    full_range = ModelChoice(c.model, c.template, c.preprocessing, detector="full")
                    extra.append(full_range)
                if cfg.detector.variant == "short" and cfg.detector.fallback_full_range:
                    short_only = ModelChoice(c.model, c.template, c.preprocessing, detector="short")
                    extra.append(short_only)
                for x in extra:
                    if x.label not in sets:
                        sets[x.label] = embed(x)
                variants += [
                    # All are gallery match modes (gallery.match_mode centroid / best / blend), so all can ship.
                    *[Variant(f"{c.label} {other}" if other == "blend" else f"{c.label} {other}-of-E", what[other],
                                 (c.label,), template=other, deployable=ship) for other in others],
                    Variant(f"{c.label} enrolled without mirror", "enrollment without the mirror image (as "
                               "probes)", (c.label,), template=template, deployable=ship, enroll_mirror=False),
                    Variant(flip.label, "flip TTA", (flip.label,), template=template, deployable=ship),
                    Variant(lm.label, "face mesh on" if toggled else "face mesh off (BlazeFace points)", (lm.label,),
                               template=template, deployable=ship),
                    *([Variant(mesh2.label, "face mesh twice (second crop from the first pass's points)",
                                  (mesh2.label,), template=template, deployable=ship)] if mesh2 else []),
                    *([Variant(full_range.label, "BlazeFace full range (finds more, smaller faces)", (full_range.label,),
                                  template=template, deployable=ship)] if full_range else []),
                    *([Variant(short_only.label, "short range alone (no full-range fallback)", (short_only.label,),
                                  template=template, deployable=ship)] if short_only else []),
                    Variant(f"{c.label} face >= {cfg.policy.min_face_size}px", "the product's face-size rule: enrollment "
                               f"and the door refuse faces under {cfg.policy.min_face_size} px", (c.label,), template=template,
                               min_face_px=float(cfg.policy.min_face_size), deployable=ship),
                    Variant(f"{c.label} +cohort", f"cohort s-norm (top 100){cohort_note}", (c.label,),
                               template=cohort_template, cohort_top=100, deployable=False),
                    Variant(f"{flip.label} +cohort", f"flip TTA + cohort s-norm{cohort_note}", (flip.label,),
                               template=cohort_template, cohort_top=100, deployable=False)]
            if len(base) >= 2:
                a, b = base[0], base[1]
                variants.append(Variant(f"{a.label} ⊕ {b.label}", "score fusion", (a.label, b.label), template=template,
                                           deployable=False))
                fa, fb = f"{a.label}+flip", f"{b.label}+flip"
                variants.append(Variant(f"{fa} ⊕ {fb} +cohort", f"fusion + flip TTA + cohort s-norm{cohort_note}",
                                           (fa, fb), template=cohort_template, cohort_top=100, deployable=False))
            calibrate = [variants[0].name] if not choices[0].is_peer else []
        study = open_set_study(ds, sets, variants, ks=(k,), enrolls=enrolls, draws=draws, seed=seed, thresholds=thr,
                                  calibration_ks=sorted({10, 25, 50, k}) if ablation else (), calibrate=calibrate,
                                  only_tune=(split == "tune"), all_identities=(split == "all"))
        study["excluded"] = sorted(exclusions)
        rec = recommend(study, k=k, enroll=enrolls[0], far_target=target_far, baseline=baseline)
        rec_same_cost = recommend(study, k=k, enroll=enrolls[0], far_target=target_far, baseline=baseline,
                                     max_cost=SAME_COST)
        study["recommendation"], study["recommendation_same_cost"] = rec, rec_same_cost
        plots = {}
        for e in enrolls:
            plots.update(open_set_plots(study, plots_dir, prefix, report_path.parent, k, e))
        md = render_open_set_markdown(study, plots, command, rec, baseline if ablation else None, rec_same_cost)
        report = study
        _summary_open_set(study, rec)
    write_text_atomic(report_path, md)
    write_text_atomic(json_path, json.dumps(public(report), indent=1) + "\n")
    click.echo(f"report: {report_path}  json: {json_path}  plots: {plots_dir}")


def _summary_eval(report: dict) -> None:
    from edgeface.evaluation.report import num, pct
    for m in report["models"]:
        v = m["verification"]
        click.echo(f"{m['label']}: no face {m['photos_no_face']}/{m['photos']}, EER {pct(v['eer'], 2)}, "
                   f"TAR@default({num(v['default_threshold'])}) {pct(v['tar_at_default'])} "
                   f"FAR {pct(v['far_at_default'], 2)}; " +
                   ", ".join(f"TAR@FAR{a['far_target']:g} {pct(a['tar'])}" for a in v["at_far"]))
        if "k_fold" in v:
            kf = v["k_fold"]
            click.echo(f"{m['label']}: {kf['folds']}-fold accuracy {pct(kf['accuracy_mean'], 2)} ± "
                       f"{pct(kf['accuracy_std'], 2)} (std over folds); accuracy at default "
                       f"{pct(v['accuracy_at_default'], 2)}" +
                       "".join(f", at {a['threshold']:g} {pct(a['accuracy'], 2)}" for a in v["accuracy_at"]))


def _summary_open_set(study: dict, rec: Optional[dict]) -> None:
    from edgeface.evaluation.metrics import far_name
    from edgeface.evaluation.report import pct
    for r in study["results"]:
        parts = [f"CA@{far_name(a['far_target'])} {pct(a['correct_accept'])} WP {pct(a['wrong_person_accept'], 2)}"
                 for a in r["report"]["at_far"]]
        click.echo(f"K={r['k']} E={r['enroll']} {r['variant']}: " + "; ".join(parts))
    if rec:
        click.echo(f"recommended (tuning half): {rec['variant']} threshold {rec['threshold']:.4f}")
    same = study.get("recommendation_same_cost")
    if same and rec and same["variant"] != rec["variant"]:
        click.echo(f"recommended at no more work per face: {same['variant']} threshold {same['threshold']:.4f}")


def register(group: click.Group) -> None:
    group.add_command(eval_cmd)

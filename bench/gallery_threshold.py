"""Open-set identification through the real gallery at several max_distance values (docs/gallery.md).

Enroll every person of ../shared/data/faces with their first N photos that pass the enrollment quality
gate, probe with their other photos (known) and with faces of never-enrolled CelebA identities
(../shared/data/openset/celeba_wild, strangers). Single photo, no K-of-N: the daemon's policy adds that.

Run by hand: python bench/gallery_threshold.py [--model mobilefacenet] [--mode topk_mean]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
MOBILEFACENET = SHARED / "weights" / "mobilefacenet" / "mobilefacenet.tflite"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="'default' (config embedder) or 'mobilefacenet'")
    ap.add_argument("--mode", default=None, choices=["best", "topk_mean", "centroid", "blend"],
                    help="gallery match mode (default: the config's gallery.match_mode)")
    ap.add_argument("--enroll", type=int, default=3, help="photos enrolled per person")
    ap.add_argument("--stranger-every", type=int, default=3, help="use every k-th CelebA identity")
    ap.add_argument("--per-stranger", type=int, default=4, help="photos per CelebA identity")
    ap.add_argument("--thresholds", default="0.40,0.45,0.47,0.49,0.52,0.55")
    args = ap.parse_args()

    from edgeface.vision.analyzer import FaceAnalyzer
    from edgeface.config import EdgefaceConfig
    from edgeface.enroll import enroll_images
    from edgeface.gallery import Gallery, default_max_distance
    from edgeface.vision.images import list_images, load_image

    cfg = EdgefaceConfig()
    args.mode = args.mode or cfg.gallery.match_mode
    if args.model == "mobilefacenet":
        cfg.embedder = cfg.embedder.model_copy(update={"model": str(MOBILEFACENET), "preprocessing": "arcface",
                                                       "template": "arcface112"})
    analyzer = FaceAnalyzer.from_config(cfg.detector, cfg.embedder, cfg.models_dir)
    faces = SHARED / "data" / "faces"
    celeba = SHARED / "data" / "openset" / "celeba_wild"
    strangers = []
    for ident in sorted(p for p in celeba.iterdir() if p.is_dir())[::args.stranger_every]:
        for f in list_images(ident)[:args.per_stranger]:
            res, _ = analyzer.analyze_main(load_image(f))
            if res is not None:
                strangers.append(res.embedding)
    with tempfile.TemporaryDirectory() as tmp:
        g = Gallery.open(Path(tmp) / "g.db", model_id=analyzer.embedder.model_id, max_distance=2.0,
                         match_mode=args.mode)
        known = []
        for person in sorted(p for p in faces.iterdir() if p.is_dir()):
            photos = list_images(person)
            good = [i for i in enroll_images(analyzer, photos) if i.accepted][:args.enroll]
            g.enroll(person.name, good)
            used = {i.source for i in good}
            for f in photos:
                if str(f) in used:
                    continue
                res, _ = analyzer.analyze_main(load_image(f))
                if res is not None:
                    m = g.match(res.embedding)
                    known.append(m.distance if m.candidate_name == person.name else np.inf)
        sd = np.array([g.match(e).distance for e in strangers])
        g.close()
    kd = np.array(known)
    print(f"model {analyzer.embedder.model_id} (manifest default for {args.mode}: "
          f"{default_max_distance(cfg.embedder.model, match_mode=args.mode)}), "
          f"mode {args.mode}: {len(kd)} known probes, {len(sd)} stranger faces")
    print("| max_distance | known accepted | strangers rejected |\n|---|---|---|")
    for t in (float(v) for v in args.thresholds.split(",")):
        print(f"| {t:.2f} | {np.mean(kd <= t):.1%} | {np.mean(sd > t):.2%} ({int(np.sum(sd <= t))} FA) |")


if __name__ == "__main__":
    main()

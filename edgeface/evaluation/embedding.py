"""Every photo of a data set embedded once per model (through FaceAnalyzer, the daemon's face path) and cached.

- The cache (npz) is keyed by the model file, its settings and the image list, so protocols, levers and
  thresholds can be explored in seconds.
- A photo in which no face is found is never dropped: its row is NaN and `n_faces` 0; the protocols count it as a
  rejection (a miss for a genuine user, a correct rejection for a stranger).
- The face_recognition peer runs in its own venv (bench/setup_peer_env.sh) and is cached the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from edgeface.errors import ConfigError, ModelError
from edgeface.evaluation.dataset import Dataset
from edgeface.evaluation.progress import progress_steps
from edgeface.vision.images import load_image

PEER_NAME = "face_recognition"


#: face_recognition's documented default: "0.6 is typical best performance".
PEER_DEFAULT_TOLERANCE = 0.6

CACHE_VERSION = 3  # 2: enrollment (crop + mirror) embeddings stored beside the probe ones; 3: keyed by code + models

#: The code an embedding depends on (decode, detect, face mesh, main face, align, embed, and this module's loop): the
#: cache key holds a hash of these files, so a change to the face path re-embeds instead of reusing stale vectors.
_VISION = Path(__file__).resolve().parents[1] / "vision"
FACE_PATH_SOURCES: tuple[Path, ...] = tuple(_VISION / f"{name}.py" for name in (
    "images", "runtime", "detect", "landmarks", "align", "embed", "analyzer")) + (Path(__file__).resolve(),)


def face_path_fingerprint() -> str:
    """sha256 over the face path's source files (FACE_PATH_SOURCES), in order."""
    h = hashlib.sha256()
    for path in FACE_PATH_SOURCES:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def face_models_key(det_cfg: Any) -> dict[str, str]:
    """sha256 of the detector and face-mesh model files the analyzer loads (manifest entries, or the config's file)."""
    from edgeface.models import default_models_dir, load_manifest, sha256_file

    out = {name: info.sha256 for name, info in load_manifest(default_models_dir()).items()
           if info.kind in ("detector", "landmarks")}
    if getattr(det_cfg, "model", None) and Path(det_cfg.model).is_file():
        out["detector.model"] = sha256_file(det_cfg.model)
    return out


@dataclass(frozen=True)
class ModelChoice:
    """One --model argument: `NAME|PATH[:TEMPLATE:PREPROCESSING][+flip][+lm|-lm][+mesh2][+full|+short][+head=HEAD]`,
    or `face_recognition`. `+head=HEAD` (last): the embeddings go through a head from `edgeface train-head`.

    `landmarks` None follows the config (detector.refine_landmarks); +lm / -lm force the face mesh on / off;
    +mesh2 runs it twice per face (detector.landmark_passes 2)."""

    model: str
    template: Optional[str] = None
    preprocessing: Optional[str] = None
    flip: bool = False
    landmarks: Optional[bool] = None
    #: None follows the config (detector.variant); "+full" forces BlazeFace full range, "+short" short range alone
    #: (no full-range fallback).
    detector: Optional[str] = None
    #: True: two face-mesh passes per face (None follows the config's detector.landmark_passes).
    mesh2: Optional[bool] = None
    #: An embedding head (manifest name or .tflite path) applied after the embedder.
    head: Optional[str] = None

    def mesh_passes(self, detector: Any) -> int:
        """Face-mesh runs per face for this choice under a DetectorConfig: 0 (mesh off), 1 or 2."""
        if self.mesh2:
            return 2
        on = detector.refine_landmarks if self.landmarks is None else self.landmarks
        return detector.landmark_passes if on else 0

    @property
    def is_peer(self) -> bool:
        return self.model == PEER_NAME

    @property
    def base_label(self) -> str:
        name = Path(self.model).name
        return name[: -len(".tflite")] if name.endswith(".tflite") else name

    @property
    def label(self) -> str:
        lm = {None: "", True: "+lm", False: "-lm"}[self.landmarks]
        return (self.base_label + lm + ("+mesh2" if self.mesh2 else "") + (f"+{self.detector}" if self.detector else "")
                + ("+flip" if self.flip else "") + (f"+head={Path(self.head).stem}" if self.head else ""))

    @property
    def shipped(self) -> bool:
        """An embedder listed in models/manifest.json (what the daemon can be configured to run as it is); a choice
        with a head is not (no head ships: the heads measured are trained on non-commercial data, docs/training.md)."""
        if self.is_peer or self.head:
            return False
        from edgeface.models import resolve_model
        try:
            _, info = resolve_model(self.model, verify=False)
        except ModelError:
            return False
        return info is not None and info.kind == "embedder" and not self.template

    @property
    def metric(self) -> str:
        return "euclidean" if self.is_peer else "cosine"

    @staticmethod
    def parse(text: str) -> "ModelChoice":
        raw = text.strip()
        head = None
        if "+head=" in raw:
            raw, head = raw.split("+head=", 1)
            if not head:
                raise ConfigError(f"--model {text}: +head= names no head")
        flags = set()
        while True:
            for flag in ("+flip", "+lm", "-lm", "+mesh2", "+full", "+short"):
                if raw.endswith(flag):
                    flags.add(flag)
                    raw = raw[: -len(flag)]
                    break
            else:
                break
        template = preprocessing = None
        parts = raw.split(":")
        if len(parts) == 3:
            raw, template, preprocessing = parts
            from edgeface.vision.align import TEMPLATES
            from edgeface.vision.embed import PREPROCESSING
            if template not in TEMPLATES:
                raise ConfigError(f"--model {text}: template {template!r} is not one of {sorted(TEMPLATES)}")
            if preprocessing not in PREPROCESSING:
                raise ConfigError(f"--model {text}: preprocessing {preprocessing!r} is not one of {sorted(PREPROCESSING)}")
        elif len(parts) != 1:
            raise ConfigError(f"--model {text}: expected NAME, PATH or PATH:TEMPLATE:PREPROCESSING "
                              "(e.g. mobilefacenet.tflite:arcface112:arcface)")
        if not raw:
            raise ConfigError(f"--model {text!r} names no model")
        if raw == PEER_NAME and flags:
            raise ConfigError(f"--model {text}: +flip/+lm/-lm/+mesh2/+full/+short apply to edgeface's embedders only")
        if {"+lm", "-lm"} <= flags or {"+full", "+short"} <= flags or {"+mesh2", "-lm"} <= flags:
            raise ConfigError(f"--model {text}: {' and '.join(sorted(flags & {'+lm', '-lm', '+mesh2', '+full', '+short'}))} "
                              "contradict each other")
        lm = True if "+lm" in flags else (False if "-lm" in flags else None)
        detector = "full" if "+full" in flags else ("short" if "+short" in flags else None)
        if raw == PEER_NAME and head:
            raise ConfigError(f"--model {text}: +head= applies to edgeface's embedders only")
        return ModelChoice(raw, template, preprocessing, "+flip" in flags, lm, detector, True if "+mesh2" in flags else None,
                           head)


@dataclass
class EmbeddedSet:
    """Embeddings of every photo of a data set by one model; rows of photos without a face are NaN."""

    label: str
    metric: str
    emb: np.ndarray
    n_faces: np.ndarray
    timings: dict[str, np.ndarray] = field(default_factory=dict)
    from_cache: bool = False
    #: Box side (px) of the face used per photo (NaN without a face; None when an old cache lacks it).
    face_px: Optional[np.ndarray] = None
    #: The gallery-side embedding of each photo (crop and mirror averaged, as enrollment stores it); None: use `emb`
    #: (the peer, or a variant measuring enrollment without the mirror).
    enroll_emb: Optional[np.ndarray] = None

    def for_enrollment(self) -> np.ndarray:
        return self.emb if self.enroll_emb is None else self.enroll_emb

    @property
    def found(self) -> np.ndarray:
        return self.n_faces > 0

    def take(self, idx: np.ndarray) -> "EmbeddedSet":
        return EmbeddedSet(self.label, self.metric, self.emb[idx], self.n_faces[idx],
                           {k: v[idx] for k, v in self.timings.items()}, self.from_cache,
                           None if self.face_px is None else self.face_px[idx],
                           None if self.enroll_emb is None else self.enroll_emb[idx])

    def ms_per_face(self) -> dict[str, Optional[float]]:
        """Median milliseconds per stage over photos with a face (decode over all photos)."""
        out: dict[str, Optional[float]] = {}
        found = self.found
        for key, values in self.timings.items():
            vals = values if key == "ms_decode" else values[found]
            out[key] = float(np.median(vals)) if len(vals) else None
        stages = [k for k in ("ms_detect", "ms_mesh", "ms_align", "ms_embed") if out.get(k) is not None]
        per_face = sum(np.nan_to_num(self.timings[k]) for k in stages) if stages else 0
        out["ms_face_total"] = float(np.median(np.asarray(per_face)[found])) if stages and found.any() else None
        return out


def _images_key(paths: Sequence[Path]) -> str:
    h = hashlib.sha1()
    for p in paths:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
    return h.hexdigest()


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_cached(path: Path, label: str, metric: str, n: int) -> Optional[EmbeddedSet]:
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError):
        return None
    if len(arrays.get("n_faces", ())) != n:
        return None
    timings = {k: v for k, v in arrays.items() if k.startswith("ms_")}
    enroll = arrays.get("enroll_emb")
    return EmbeddedSet(label, metric, arrays["emb"].astype(np.float32), arrays["n_faces"], timings, from_cache=True,
                       face_px=arrays.get("face_px"), enroll_emb=None if enroll is None else enroll.astype(np.float32))


def embed_dataset(ds: Dataset, choice: ModelChoice, *, cache_dir: Optional[Path] = None,
                  detector_config: Any = None, num_threads: Optional[int] = None,
                  peer_python: Optional[str] = None, progress: bool = False) -> EmbeddedSet:
    """Detect, align and embed every photo (the main face of each); cached in `cache_dir` when given."""
    if choice.is_peer:
        return _embed_peer(ds, cache_dir=cache_dir, peer_python=peer_python)
    if choice.head:
        return _through_head(embed_dataset(ds, replace(choice, head=None), cache_dir=cache_dir,
                                           detector_config=detector_config, num_threads=num_threads, progress=progress),
                             choice)
    from edgeface.config import DetectorConfig
    from edgeface.vision.detect import build_detector
    from edgeface.vision.embed import EmbedderSpec, TFLiteEmbedder, enrollment_embeddings
    from edgeface.models import resolve_model, sha256_file

    det_cfg = detector_config or DetectorConfig()
    if choice.detector == "short":
        det_cfg = det_cfg.model_copy(update={"variant": "short", "model": None, "fallback_full_range": False})
    elif choice.detector and choice.detector != det_cfg.variant:
        det_cfg = det_cfg.model_copy(update={"variant": choice.detector, "model": None})
    mesh_passes = choice.mesh_passes(det_cfg)
    use_mesh = mesh_passes > 0
    if choice.mesh2:  # in the cache key below
        det_cfg = det_cfg.model_copy(update={"landmark_passes": mesh_passes})
    path, info = resolve_model(choice.model)
    spec = None
    if choice.template:
        from edgeface.vision.align import TEMPLATES
        spec = EmbedderSpec(choice.base_label, TEMPLATES[choice.template].size, choice.template, choice.preprocessing)
    elif info is None:
        raise ConfigError(f"--model {choice.model}: not in models/manifest.json; give PATH:TEMPLATE:PREPROCESSING "
                          "(e.g. :arcface112:arcface)")
    key_src = json.dumps({"v": CACHE_VERSION, "model": info.sha256 if info is not None else sha256_file(path),
                          "spec": [choice.template, choice.preprocessing], "flip": choice.flip, "lm": use_mesh,
                          "det": det_cfg.model_dump(exclude={"num_threads", "refine_landmarks"}),
                          "face_models": face_models_key(det_cfg), "code": face_path_fingerprint(),
                          "images": _images_key(ds.paths)}, sort_keys=True)
    cache = cache_dir / f"{choice.label}-{hashlib.sha1(key_src.encode()).hexdigest()[:16]}.npz" if cache_dir else None
    if cache is not None:
        cached = _load_cached(cache, choice.label, choice.metric, len(ds))
        if cached is not None:
            return cached

    from edgeface.vision.analyzer import FaceAnalyzer
    detector = build_detector(det_cfg, num_threads=num_threads)
    embedder = TFLiteEmbedder(path, spec=spec, num_threads=num_threads, flip_augment=choice.flip)
    refiner = None
    if use_mesh:
        from edgeface.vision.landmarks import LandmarkRefiner
        refiner = LandmarkRefiner(num_threads=num_threads, passes=mesh_passes)
    stage_ms: dict[str, float] = {}

    def timer(stage: str, seconds: float) -> None:
        stage_ms[f"ms_{stage}"] = stage_ms.get(f"ms_{stage}", 0.0) + seconds * 1e3

    analyzer = FaceAnalyzer(detector, embedder, refiner=refiner, min_presence=det_cfg.min_presence, timer=timer)
    n = len(ds)
    emb = np.full((n, embedder.spec.embedding_dim), np.nan, np.float32)
    enroll_emb = np.full_like(emb, np.nan)
    n_faces = np.zeros(n, np.int32)
    face_px = np.full(n, np.nan, np.float32)
    timings = {k: np.full(n, np.nan) for k in ("ms_decode", "ms_detect", "ms_mesh", "ms_align", "ms_embed")}
    iterator: Iterable[int] = progress_steps(n, f"embed {choice.label}") if progress else range(n)
    with analyzer:
        for i in iterator:
            stage_ms.clear()
            t0 = time.perf_counter()
            image = load_image(ds.paths[i])
            timings["ms_decode"][i] = (time.perf_counter() - t0) * 1e3
            face, crop, n_faces[i] = analyzer.main_crop(image)
            if face is not None:
                face_px[i] = face.size
                emb[i] = analyzer.embed(crop)[0]
                # What `edgeface enroll` would store (not timed): only the mirror is run, the crop's embedding is emb[i].
                enroll_emb[i] = enrollment_embeddings(embedder, crop, plain=emb[i])[0]
            stage_ms.setdefault("ms_mesh", 0.0)  # no face mesh configured: it cost nothing
            for key, ms in stage_ms.items():
                timings[key][i] = ms
    result = EmbeddedSet(choice.label, choice.metric, emb, n_faces, timings, face_px=face_px, enroll_emb=enroll_emb)
    if cache is not None:
        _save_npz(cache, emb=emb, enroll_emb=enroll_emb, n_faces=n_faces, face_px=face_px, **timings)
    return result


def _through_head(es: EmbeddedSet, choice: ModelChoice) -> EmbeddedSet:
    """The backbone's embeddings of a data set through the choice's head, as HeadedEmbedder does at the door
    (enrollment: crop and mirror averaged in the backbone's space, then projected)."""
    from edgeface.vision.head import EmbeddingHead, resolve_head

    path, info = resolve_head(str(choice.head))
    if info.backbone != es.label.split("+", 1)[0] and info.backbone != Path(choice.model).stem:
        raise ConfigError(f"--model {choice.label}: head {info.name} was trained on {info.backbone} embeddings")
    head = EmbeddingHead(path, info)

    def project(x: Optional[np.ndarray]) -> Optional[np.ndarray]:
        if x is None:
            return None
        out = np.full((len(x), info.output_dim), np.nan, np.float32)
        ok = np.isfinite(x).all(axis=1)
        out[ok] = head.project(x[ok])
        return out

    result = EmbeddedSet(choice.label, es.metric, project(es.emb), es.n_faces, es.timings, es.from_cache, es.face_px,
                         project(es.enroll_emb))
    head.close()
    return result


def peer_script() -> Path:
    script = Path(__file__).resolve().parents[2] / "bench" / "peer_face_recognition.py"
    if not script.is_file():
        raise ConfigError(f"the face_recognition peer needs a source checkout (missing {script})")
    return script


def _embed_peer(ds: Dataset, *, cache_dir: Optional[Path], peer_python: Optional[str]) -> EmbeddedSet:
    listing = "".join(f"{p}\n" for p in ds.paths)
    key = hashlib.sha1(listing.encode()).hexdigest()[:16]
    cache = cache_dir / f"{PEER_NAME}-{key}.npz" if cache_dir else None
    if cache is not None:
        cached = _load_cached(cache, PEER_NAME, "euclidean", len(ds))
        if cached is not None:
            return cached
    python = peer_python or os.environ.get("EDGEFACE_PEER_PYTHON")
    if not python or not Path(python).is_file():
        raise ConfigError(f"--model {PEER_NAME} needs --peer-python (or $EDGEFACE_PEER_PYTHON) pointing at the python of "
                          f"a venv made by bench/setup_peer_env.sh; got {python!r}")
    with tempfile.TemporaryDirectory(prefix="edgeface-peer-") as tmp:
        list_path, out_path = Path(tmp) / "list.txt", Path(tmp) / "out.npz"
        list_path.write_text(listing, encoding="utf-8")
        proc = subprocess.run([python, str(peer_script()), str(list_path), str(out_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not out_path.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ModelError(f"face_recognition peer failed (exit {proc.returncode}): {tail[0]}")
        got = _load_cached(out_path, PEER_NAME, "euclidean", len(ds))
        if got is None:
            raise ModelError(f"face_recognition peer wrote an unreadable result for {len(ds)} photos")
        if cache is not None:
            _save_npz(cache, emb=got.emb, n_faces=got.n_faces, **got.timings)
    got.from_cache = False
    return got


def fuse(a: EmbeddedSet, b: EmbeddedSet) -> EmbeddedSet:
    """Score-level fusion of two cosine models: [a, b] / sqrt(2), whose cosine is the mean of the two cosines."""
    if a.metric != "cosine" or b.metric != "cosine":
        raise ConfigError("score fusion needs two cosine-distance embedders")
    emb = np.concatenate([a.emb, b.emb], axis=1) / np.sqrt(2.0)
    enroll = np.concatenate([a.for_enrollment(), b.for_enrollment()], axis=1) / np.sqrt(2.0)
    found = a.found & b.found
    emb[~found] = np.nan
    enroll[~found] = np.nan
    timings = {k: a.timings[k] + b.timings[k] for k in a.timings if k in b.timings and k != "ms_decode"}
    if "ms_decode" in a.timings:
        timings["ms_decode"] = a.timings["ms_decode"]
        timings["ms_detect"] = a.timings["ms_detect"]  # one detector (and mesh) pass feeds both embedders
        if "ms_mesh" in a.timings:
            timings["ms_mesh"] = a.timings["ms_mesh"]
    return EmbeddedSet(f"{a.label}⊕{b.label}", "cosine", emb.astype(np.float32), np.where(found, a.n_faces, 0), timings,
                       face_px=a.face_px, enroll_emb=enroll.astype(np.float32))


def default_threshold(choice: ModelChoice, gallery_max_distance: Optional[float] = None,
                      match_mode: Optional[str] = None) -> float:
    """The threshold the product would use (config gallery.max_distance, else the manifest's calibrated
    default_max_distance, else the gallery's fallback); for the peer its documented tolerance 0.6."""
    if choice.is_peer:
        return PEER_DEFAULT_TOLERANCE
    if gallery_max_distance is not None:
        return float(gallery_max_distance)
    if choice.head:
        from edgeface.vision.head import head_threshold
        value = head_threshold(choice.head)
        if value is not None:
            return float(value)
    from edgeface.gallery import default_max_distance
    return default_max_distance(choice.model, match_mode=match_mode)


def machine_description() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import platform
    return f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.machine()}, Python {platform.python_version()}"

"""Detect -> face mesh -> main face -> align -> embed, wired once: the daemon, enrollment, identification, the
evaluation, conversion's representative set, quantisation's calibration set and the pipeline benchmark all run
this code, so what they measure is what the door runs."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np

from edgeface.vision.align import align_face
from edgeface.config import DetectorConfig, EmbedderConfig
from edgeface.vision.detect import Detector, build_detector
from edgeface.vision.embed import Embedder, EmbedderSpec, TFLiteEmbedder, enrollment_embeddings
from edgeface.vision.head import with_head
from edgeface.vision.landmarks import LandmarkRefiner
from edgeface.types import Face


@dataclass(frozen=True)
class FaceResult:
    """One face of an image: where it is, its aligned crop, and its unit embedding."""

    face: Face
    crop: np.ndarray
    embedding: np.ndarray


#: Receives (stage, seconds) after each stage the analyzer runs: "detect", "mesh", "align", "embed". The benchmark
#: and the evaluation take their per-stage times from it instead of timing a copy of the path.
StageTimer = Callable[[str, float], None]


def main_face_index(faces: list[Face], image_shape: tuple[int, ...]) -> Optional[int]:
    """The face a door should care about: large, confident and near the centre of the frame."""
    if not faces:
        return None
    h, w = image_shape[:2]
    diag = float(np.hypot(w, h))

    def weight(face: Face) -> float:
        cx, cy = face.center
        off_centre = float(np.hypot(cx - w / 2, cy - h / 2)) / diag
        return face.size * face.score * (1.0 - 0.5 * off_centre)

    return int(max(range(len(faces)), key=lambda i: weight(faces[i])))


def scale_face(face: Face, sx: float, sy: float) -> Face:
    """A detection made on a scaled copy, in the full image's pixels (box and keypoints)."""
    x, y, w, h = face.box
    return replace(face, box=(x * sx, y * sy, w * sx, h * sy),
                   keypoints=np.asarray(face.keypoints, np.float32) * np.array([sx, sy], np.float32))


class FaceAnalyzer:
    """Turns an RGB image into aligned, embedded faces. Owns its detector, face mesh and embedder.

    `embedder` may be None for a caller that needs aligned crops only (conversion's representative set): give
    `template` then. `timer`, when set, is told how long each stage took."""

    def __init__(self, detector: Detector, embedder: Optional[Embedder], *, refiner: Optional[LandmarkRefiner] = None,
                 min_presence: float = 0.5, template: Optional[str] = None,
                 timer: Optional[StageTimer] = None) -> None:
        if embedder is None and template is None:
            raise ValueError("FaceAnalyzer without an embedder needs an alignment template")
        self.detector = detector
        self.embedder = embedder
        self.refiner = refiner
        self.min_presence = min_presence
        self.template: str = template if template is not None else embedder.template  # type: ignore[union-attr]
        self.timer = timer

    @classmethod
    def from_config(cls, detector: DetectorConfig, embedder: EmbedderConfig,
                    models_dir: Optional[str] = None) -> "FaceAnalyzer":
        det = build_detector(detector, models_dir=models_dir)
        spec = None
        if embedder.preprocessing and embedder.template:
            from edgeface.vision.align import TEMPLATES
            spec = EmbedderSpec(model_id=str(embedder.model).rsplit("/", 1)[-1].removesuffix(".tflite"),
                                input_size=TEMPLATES[embedder.template].size, template=embedder.template,
                                preprocessing=embedder.preprocessing)
        emb = TFLiteEmbedder(embedder.model, spec=spec, num_threads=embedder.num_threads,
                             flip_augment=embedder.flip_augment, models_dir=models_dir)
        emb = with_head(emb, embedder.head, models_dir=models_dir)
        refiner = LandmarkRefiner(num_threads=detector.num_threads, models_dir=models_dir,
                                  passes=detector.landmark_passes) if detector.refine_landmarks else None
        return cls(det, emb, refiner=refiner, min_presence=detector.min_presence)

    def _timed(self, stage: str, started: float) -> float:
        now = time.perf_counter()
        if self.timer is not None:
            self.timer(stage, now - started)
        return now

    def detect(self, image: np.ndarray, *, detect_on: Optional[np.ndarray] = None) -> list[Face]:
        """Detected faces; with a refiner, each gets five-point landmarks and non-faces are dropped. `detect_on`: a
        smaller copy of `image` for the detector (boxes scaled back to `image`; the mesh runs on `image`)."""
        started = time.perf_counter()
        if detect_on is None:
            faces = self.detector.detect(image)
        else:
            sx, sy = image.shape[1] / detect_on.shape[1], image.shape[0] / detect_on.shape[0]
            faces = [scale_face(f, sx, sy) for f in self.detector.detect(detect_on)]
        if self.refiner is None:
            self._timed("detect", started)
            return faces
        meshed = self._timed("detect", started)
        faces = self.refiner.refine_all(image, faces, self.min_presence)
        self._timed("mesh", meshed)
        return faces

    def main_face(self, image: np.ndarray, *, detect_on: Optional[np.ndarray] = None) -> tuple[Optional[Face], int]:
        """The face a door should care about (or None) and how many faces were seen."""
        faces = self.detect(image, detect_on=detect_on)
        idx = main_face_index(faces, image.shape)
        return (None if idx is None else faces[idx]), len(faces)

    def align(self, image: np.ndarray, face: Face, template: Optional[str] = None) -> np.ndarray:
        """The aligned uint8 crop of `face` (this analyzer's template unless another is named)."""
        started = time.perf_counter()
        crop = align_face(image, face, template or self.template)
        self._timed("align", started)
        return crop

    def main_crop(self, image: np.ndarray) -> tuple[Optional[Face], Optional[np.ndarray], int]:
        """(main face, its aligned crop, faces seen); (None, None, n) when no face is usable."""
        face, n = self.main_face(image)
        if face is None:
            return None, None, n
        return face, self.align(image, face), n

    def embed(self, crops: np.ndarray, embedder: Optional[Embedder] = None) -> np.ndarray:
        """Unit embeddings of aligned crops ((N,S,S,3) or (S,S,3)) by this analyzer's embedder (or `embedder`)."""
        model = embedder or self.embedder
        if model is None:
            raise ValueError("this FaceAnalyzer has no embedder")
        started = time.perf_counter()
        out = model.embed(crops)
        self._timed("embed", started)
        return out

    def embed_faces(self, image: np.ndarray, faces: list[Face], *, for_enrollment: bool = False) -> list[FaceResult]:
        """Align and embed faces; `for_enrollment` gives the gallery-side embedding (crop and mirror averaged)."""
        if not faces:
            return []
        crops = np.stack([self.align(image, f) for f in faces])
        if for_enrollment:
            embeddings = enrollment_embeddings(self.embedder, crops)  # type: ignore[arg-type]
        else:
            embeddings = self.embed(crops)
        return [FaceResult(f, c, e) for f, c, e in zip(faces, crops, embeddings)]

    def analyze(self, image: np.ndarray) -> list[FaceResult]:
        """Every face in the image, embedded (detector order: most confident first)."""
        return self.embed_faces(image, self.detect(image))

    def analyze_main(self, image: np.ndarray, *, detect_on: Optional[np.ndarray] = None
                     ) -> tuple[Optional[FaceResult], int]:
        """The main face embedded (or None) and how many faces were seen. `detect_on`: a smaller copy of the same
        image (a camera's low-resolution stream) to run the detector on; mesh, alignment and embedding still use
        `image`, so the crop keeps the full resolution."""
        face, n = self.main_face(image, detect_on=detect_on)
        if face is None:
            return None, 0
        return self.embed_faces(image, [face])[0], n

    def close(self) -> None:
        for part in (self.detector, self.embedder, self.refiner):
            close = getattr(part, "close", None) if part is not None else None
            if close:
                close()

    def __enter__(self) -> "FaceAnalyzer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

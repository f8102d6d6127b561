"""Detect -> align -> embed, wired once, shared by enrollment, identification, evaluation and the daemon."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from edgeface.vision.align import align_face
from edgeface.config import DetectorConfig, EmbedderConfig
from edgeface.vision.detect import Detector, build_detector
from edgeface.vision.embed import Embedder, EmbedderSpec, TFLiteEmbedder, enrollment_embeddings
from edgeface.vision.landmarks import LandmarkRefiner
from edgeface.types import Face


@dataclass(frozen=True)
class FaceResult:
    """One face of an image: where it is, its aligned crop, and its unit embedding."""

    face: Face
    crop: np.ndarray
    embedding: np.ndarray


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
    """Turns an RGB image into aligned, embedded faces. Owns its detector and embedder."""

    def __init__(self, detector: Detector, embedder: Embedder, *, refiner: Optional[LandmarkRefiner] = None,
                 min_presence: float = 0.5) -> None:
        self.detector = detector
        self.embedder = embedder
        self.refiner = refiner
        self.min_presence = min_presence

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
        refiner = LandmarkRefiner(num_threads=detector.num_threads, models_dir=models_dir,
                                  passes=detector.landmark_passes) if detector.refine_landmarks else None
        return cls(det, emb, refiner=refiner, min_presence=detector.min_presence)

    def detect(self, image: np.ndarray) -> list[Face]:
        """Detected faces; with a refiner, each gets five-point landmarks and non-faces are dropped."""
        faces = self.detector.detect(image)
        if self.refiner is None:
            return faces
        return self.refiner.refine_all(image, faces, self.min_presence)

    def embed_faces(self, image: np.ndarray, faces: list[Face], *, for_enrollment: bool = False) -> list[FaceResult]:
        """Align and embed faces; `for_enrollment` gives the gallery-side embedding (crop and mirror averaged)."""
        if not faces:
            return []
        crops = np.stack([align_face(image, f, self.embedder.template) for f in faces])
        embeddings = enrollment_embeddings(self.embedder, crops) if for_enrollment else self.embedder.embed(crops)
        return [FaceResult(f, c, e) for f, c, e in zip(faces, crops, embeddings)]

    def analyze(self, image: np.ndarray) -> list[FaceResult]:
        """Every face in the image, embedded (detector order: most confident first)."""
        return self.embed_faces(image, self.detect(image))

    def analyze_main(self, image: np.ndarray, *, detect_on: Optional[np.ndarray] = None
                     ) -> tuple[Optional[FaceResult], int]:
        """The main face embedded (or None) and how many faces were seen. `detect_on`: a smaller copy of the same
        image (a camera's low-resolution stream) to run the detector on; mesh, alignment and embedding still use
        `image`, so the crop keeps the full resolution."""
        if detect_on is None:
            faces = self.detect(image)
        else:
            faces = [scale_face(f, image.shape[1] / detect_on.shape[1], image.shape[0] / detect_on.shape[0])
                     for f in self.detector.detect(detect_on)]
            if self.refiner is not None:
                faces = self.refiner.refine_all(image, faces, self.min_presence)
        idx = main_face_index(faces, image.shape)
        if idx is None:
            return None, 0
        return self.embed_faces(image, [faces[idx]])[0], len(faces)

    def close(self) -> None:
        for part in (self.detector, self.embedder, self.refiner):
            close = getattr(part, "close", None) if part is not None else None
            if close:
                close()

    def __enter__(self) -> "FaceAnalyzer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

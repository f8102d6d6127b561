"""Face detection with MediaPipe BlazeFace (short range <= ~2 m, full range <= ~5 m) on TFLite.

Anchor layout and box decoding follow MediaPipe's SsdAnchorsCalculator and TensorsToDetectionsCalculator:
boxes and keypoints are offsets (in input pixels) from fixed-size anchors, scores are logits, and overlapping
boxes are merged by score-weighted non-maximum suppression.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import cv2
import numpy as np

from edgeface.errors import ModelError
from edgeface.vision.images import to_rgb
from edgeface.models import check_io, resolve_model
from edgeface.vision.runtime import load_interpreter
from edgeface.types import Face

if TYPE_CHECKING:  # pragma: no cover
    from edgeface.config import DetectorConfig


class Detector(Protocol):
    def detect(self, image: np.ndarray) -> list[Face]: ...


@dataclass(frozen=True)
class BlazeFaceVariant:
    model_name: str
    input_size: int
    strides: tuple[int, ...]
    anchors_per_cell: tuple[int, ...]
    default_score_threshold: float


VARIANTS = {
    "short": BlazeFaceVariant("blazeface_short", 128, (8, 16), (2, 6), 0.5),
    "full": BlazeFaceVariant("blazeface_full", 192, (4,), (1,), 0.6),
}


def make_anchors(input_size: int, strides: tuple[int, ...], anchors_per_cell: tuple[int, ...]) -> np.ndarray:
    """Anchor centres (N, 2) in [0, 1], in the order the model emits them (fixed anchor size 1x1)."""
    centres = []
    for stride, per_cell in zip(strides, anchors_per_cell):
        cells = int(np.ceil(input_size / stride))
        ys, xs = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
        grid = np.stack([(xs + 0.5) / cells, (ys + 0.5) / cells], axis=-1).reshape(-1, 1, 2)
        centres.append(np.repeat(grid, per_cell, axis=1).reshape(-1, 2))
    return np.concatenate(centres).astype(np.float32)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (x1, y1, x2, y2) box against many."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def weighted_nms(boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray,
                 iou_threshold: float) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """MediaPipe's weighted NMS: each cluster of overlapping boxes becomes their score-weighted mean."""
    order = np.argsort(-scores)
    boxes, keypoints, scores = boxes[order], keypoints[order], scores[order]
    remaining = np.arange(len(scores))
    out = []
    while remaining.size:
        top = remaining[0]
        overlap = _iou(boxes[top], boxes[remaining])
        members = remaining[overlap > iou_threshold]
        members = members if members.size else np.array([top])
        weights = scores[members][:, None]
        total = float(weights.sum())
        box = (boxes[members] * weights).sum(axis=0) / total
        kps = (keypoints[members] * weights[:, :, None]).sum(axis=0) / total
        out.append((box, kps, float(scores[top])))
        remaining = remaining[overlap <= iou_threshold]
    return out


class BlazeFaceDetector:
    """Find faces in an RGB frame of any size; boxes and keypoints come back in frame pixels."""

    def __init__(self, model: str | os.PathLike[str] | None = None, *, variant: str = "short",
                 score_threshold: float | None = None, nms_iou: float = 0.3, min_face_size: int = 0,
                 max_faces: int = 10, num_threads: int | None = None,
                 models_dir: str | os.PathLike[str] | None = None) -> None:
        if variant not in VARIANTS:
            raise ModelError(f"unknown BlazeFace variant {variant!r}; expected one of {sorted(VARIANTS)}")
        self.variant = VARIANTS[variant]
        path, _ = resolve_model(model or self.variant.model_name, models_dir)
        self._interpreter = load_interpreter(path, num_threads)
        size = self.variant.input_size
        check_io(self._interpreter, path, input_shape=(1, size, size, 3), output_last_dim=None)
        self._input_index = self._interpreter.get_input_details()[0]["index"]
        outputs = self._interpreter.get_output_details()
        self._anchors = make_anchors(size, self.variant.strides, self.variant.anchors_per_cell)
        try:
            self._reg_index = next(o["index"] for o in outputs if int(o["shape"][-1]) == 16)
            self._score_index = next(o["index"] for o in outputs if int(o["shape"][-1]) == 1)
        except StopIteration:
            raise ModelError(f"model {path} does not have BlazeFace outputs ([1,N,16] and [1,N,1])") from None
        if any(int(o["shape"][1]) != len(self._anchors) for o in outputs):
            raise ModelError(f"model {path} emits {[list(o['shape']) for o in outputs]}, expected {len(self._anchors)} anchors")
        self.score_threshold = self.variant.default_score_threshold if score_threshold is None else score_threshold
        self.nms_iou = nms_iou
        self.min_face_size = min_face_size
        self.max_faces = max_faces

    def _letterbox(self, rgb: np.ndarray) -> tuple[np.ndarray, float, float, float]:
        """Fit the frame into the square input, keeping its aspect ratio; return (input, scale, pad_x, pad_y)."""
        size = self.variant.input_size
        h, w = rgb.shape[:2]
        scale = size / max(h, w)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        resized = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        canvas = np.zeros((size, size, 3), np.uint8)
        pad_x, pad_y = (size - nw) // 2, (size - nh) // 2
        canvas[pad_y:pad_y + nh, pad_x:pad_x + nw] = resized
        return canvas, scale, pad_x, pad_y

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in an RGB uint8 frame, best first (largest score), at most `max_faces`."""
        rgb = image if (image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3) else to_rgb(image)
        size = self.variant.input_size
        canvas, scale, pad_x, pad_y = self._letterbox(rgb)
        tensor = (canvas.astype(np.float32) / 127.5 - 1.0)[None]
        self._interpreter.set_tensor(self._input_index, tensor)
        self._interpreter.invoke()
        raw = self._interpreter.get_tensor(self._reg_index)[0]
        logits = self._interpreter.get_tensor(self._score_index)[0, :, 0]
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float64), -80.0, 80.0)))
        keep = scores >= self.score_threshold
        if not keep.any():
            return []
        raw, scores, anchors = raw[keep], scores[keep], self._anchors[keep]
        centre = raw[:, 0:2] / size + anchors
        half = raw[:, 2:4] / size / 2.0
        boxes = np.concatenate([centre - half, centre + half], axis=1)
        keypoints = raw[:, 4:16].reshape(-1, 6, 2) / size + anchors[:, None, :]
        faces = []
        h, w = rgb.shape[:2]
        for box, kps, score in weighted_nms(boxes, keypoints, scores, self.nms_iou):
            # From normalised letterbox coordinates back to frame pixels.
            box_px = (box * size - [pad_x, pad_y, pad_x, pad_y]) / scale
            kps_px = (kps * size - [pad_x, pad_y]) / scale
            x1, y1 = max(0.0, box_px[0]), max(0.0, box_px[1])
            x2, y2 = min(float(w), box_px[2]), min(float(h), box_px[3])
            if x2 - x1 < 2 or y2 - y1 < 2:
                continue
            face = Face(box=(float(x1), float(y1), float(x2 - x1), float(y2 - y1)), score=score,
                        keypoints=kps_px.astype(np.float32))
            if face.size >= self.min_face_size:
                faces.append(face)
        return faces[: self.max_faces]

    def close(self) -> None:
        self._interpreter = None

    def __enter__(self) -> "BlazeFaceDetector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CascadeDetector:
    """Run a second detector only when the first finds nothing (e.g. short range, then full range)."""

    def __init__(self, first: Detector, second: Detector) -> None:
        self.first = first
        self.second = second

    def detect(self, image: np.ndarray) -> list[Face]:
        return self.first.detect(image) or self.second.detect(image)

    def close(self) -> None:
        for part in (self.first, self.second):
            close = getattr(part, "close", None)
            if close is not None:
                close()


def build_detector(cfg: "DetectorConfig", *, num_threads: int | None = None,
                   models_dir: str | os.PathLike[str] | None = None) -> Detector:
    """The detector a config asks for (one place, shared by the daemon, enrollment, eval and benchmarks)."""
    threads = cfg.num_threads if num_threads is None else num_threads
    primary = BlazeFaceDetector(cfg.model, variant=cfg.variant, score_threshold=cfg.score_threshold,
                                nms_iou=cfg.nms_iou, min_face_size=cfg.min_face_size, num_threads=threads,
                                models_dir=models_dir)
    if not cfg.fallback_full_range or cfg.variant == "full":
        return primary
    fallback = BlazeFaceDetector(variant="full", nms_iou=cfg.nms_iou, min_face_size=cfg.min_face_size,
                                 num_threads=threads, models_dir=models_dir)
    return CascadeDetector(primary, fallback)

"""Embedding: an aligned face crop -> a 128-D unit vector, on a TFLite model (float32 or full-integer int8).

Quantised models are fed and read through their own tensor scale/zero point, so one class serves
float and int8 files alike.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import numpy as np

from edgeface.errors import ImageError, ModelError
from edgeface.models import ModelInfo, check_io, resolve_model
from edgeface.vision.runtime import load_interpreter


class Embedder(Protocol):
    model_id: str
    input_size: int
    template: str

    def embed(self, crops: np.ndarray) -> np.ndarray: ...


def prewhiten(batch: np.ndarray) -> np.ndarray:
    """FaceNet's per-image standardisation: (x - mean) / max(std, 1/sqrt(N)) over each whole crop."""
    x = batch.astype(np.float32)
    axes = tuple(range(1, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    std = x.std(axis=axes, keepdims=True)
    n = np.prod(x.shape[1:])
    # float32 out: a float64 numpy scalar here would otherwise promote the batch to float64 (NEP 50).
    return ((x - mean) / np.maximum(std, 1.0 / np.sqrt(n))).astype(np.float32)


def arcface_norm(batch: np.ndarray) -> np.ndarray:
    """(x - 127.5) / 128, the normalisation of ArcFace-family models such as MobileFaceNet."""
    return (batch.astype(np.float32) - 127.5) / 128.0


PREPROCESSING: dict[str, Callable[[np.ndarray], np.ndarray]] = {"prewhiten": prewhiten, "arcface": arcface_norm}


@dataclass(frozen=True)
class EmbedderSpec:
    """How to feed a model: which crop template, which pixel normalisation, what comes out."""

    model_id: str
    input_size: int
    template: str
    preprocessing: str
    embedding_dim: int = 128

    @staticmethod
    def from_manifest(info: ModelInfo) -> "EmbedderSpec":
        try:
            return EmbedderSpec(model_id=info.extra.get("model_id", info.name), input_size=info.input_size,
                                template=info.extra["align_template"], preprocessing=info.extra["preprocessing_id"],
                                embedding_dim=int(info.extra.get("embedding_dim", 128)))
        except KeyError as exc:
            raise ModelError(f"manifest entry {info.name} lacks {exc.args[0]!r} (needed for an embedder)") from None


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def enrollment_embeddings(embedder: Embedder, crops: np.ndarray, plain: Optional[np.ndarray] = None) -> np.ndarray:
    """Embeddings for the gallery: each aligned crop and its mirror image, averaged.

    Test-time augmentation on the gallery side only: enrollment runs once, so it costs nothing at the door, where
    probes stay one pass. On the open-set tuning half (K=100) it added +0.2 / +1.2 points correct accept at 1% /
    0.1% stranger false-accept with E=3 photos and +0.4 / +0.9 with E=1 (docs/accuracy.md, "enrolled without
    mirror" row). `plain`: the crops' own embeddings when the caller already has them (only the mirrors are run)."""
    crops = np.asarray(crops)
    if crops.ndim == 3:
        crops = crops[None]
    project = getattr(embedder, "project", None)
    if project is not None:  # an embedder followed by a head: average in the backbone's space, then project
        return project(enrollment_embeddings(embedder.backbone, crops))  # type: ignore[attr-defined]
    if len(crops) == 0:
        return embedder.embed(crops)
    if plain is not None:
        return l2_normalize(np.asarray(plain, np.float32).reshape(len(crops), -1) + embedder.embed(crops[:, :, ::-1]))
    both = embedder.embed(np.concatenate([crops, crops[:, :, ::-1]], axis=0))
    return l2_normalize(both[: len(crops)] + both[len(crops):])


class TFLiteEmbedder:
    """Embed aligned RGB crops; `embed` takes (N, S, S, 3) or (S, S, 3) uint8 and returns (N, D) float32 unit rows."""

    def __init__(self, model: str | os.PathLike[str], *, spec: EmbedderSpec | None = None,
                 num_threads: int | None = None, flip_augment: bool = False,
                 models_dir: str | os.PathLike[str] | None = None) -> None:
        path, info = resolve_model(model, models_dir)
        if spec is None:
            if info is None:
                raise ModelError(f"model {path} is not in the manifest: give its preprocessing and template in config")
            spec = EmbedderSpec.from_manifest(info)
        if spec.preprocessing not in PREPROCESSING:
            raise ModelError(f"unknown preprocessing {spec.preprocessing!r}; expected one of {sorted(PREPROCESSING)}")
        self.spec = spec
        self.path = path
        self.model_id = spec.model_id
        self.input_size = spec.input_size
        self.template = spec.template
        self.flip_augment = flip_augment
        self._preprocess = PREPROCESSING[spec.preprocessing]
        self._interpreter = load_interpreter(path, num_threads)
        check_io(self._interpreter, path, input_shape=(1, spec.input_size, spec.input_size, 3),
                 output_last_dim=spec.embedding_dim)
        self._batch = 1
        inp = self._interpreter.get_input_details()[0]
        out = self._interpreter.get_output_details()[0]
        self._input_dtype = inp["dtype"]
        self._in_q = inp["quantization"]
        self._out_q = out["quantization"]
        self.quantized = self._input_dtype in (np.int8, np.uint8)
        # A batch dimension of -1 in the signature means the file accepts batches (our converter writes that).
        self._batchable = int(inp.get("shape_signature", inp["shape"])[0]) == -1

    def _resize(self, n: int) -> None:
        if n != self._batch:
            idx = self._interpreter.get_input_details()[0]["index"]
            self._interpreter.resize_tensor_input(idx, [n, self.input_size, self.input_size, 3])
            self._interpreter.allocate_tensors()
            self._batch = n

    def _run(self, x: np.ndarray) -> np.ndarray:
        inp = self._interpreter.get_input_details()[0]
        if self.quantized:
            scale, zero = self._in_q
            info = np.iinfo(self._input_dtype)
            x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(self._input_dtype)
        self._interpreter.set_tensor(inp["index"], x)
        self._interpreter.invoke()
        out_detail = self._interpreter.get_output_details()[0]
        y = self._interpreter.get_tensor(out_detail["index"])
        if out_detail["dtype"] in (np.int8, np.uint8):
            scale, zero = self._out_q
            y = (y.astype(np.float32) - zero) * scale
        return y.reshape(len(x), -1).astype(np.float32)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        crops = np.asarray(crops)
        if crops.ndim == 3:
            crops = crops[None]
        s = self.input_size
        if crops.ndim != 4 or crops.shape[1:] != (s, s, 3):
            raise ImageError(f"embedder {self.model_id} expects aligned crops of shape (N, {s}, {s}, 3), got {crops.shape}")
        if len(crops) == 0:
            return np.zeros((0, self.spec.embedding_dim), np.float32)
        if self.flip_augment:
            crops = np.concatenate([crops, crops[:, :, ::-1]], axis=0)
        x = self._preprocess(crops)
        if self._batchable:
            self._resize(len(x))
            raw = self._run(x)
        else:
            self._resize(1)
            raw = np.concatenate([self._run(x[i:i + 1]) for i in range(len(x))], axis=0)
        if self.flip_augment:
            half = len(raw) // 2
            raw = l2_normalize(raw[:half]) + l2_normalize(raw[half:])
        return l2_normalize(raw)

    def close(self) -> None:
        self._interpreter = None

    def __enter__(self) -> "TFLiteEmbedder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

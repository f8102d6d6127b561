"""An embedding head: a small learned map applied after the embedder (trained with `edgeface train-head`).

The head runs on the same TFLite runtime as the embedder (no TensorFlow on the Pi). Its identity is part of the
embedding's model id (``sface_int8+head-name-1a2b3c4d``), so a gallery enrolled through one head is refused by a
daemon with another head, or none, exactly as a gallery of another embedder is; `edgeface gallery reembed`
moves a gallery that kept its face chips to or from a head.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from edgeface.errors import ModelError
from edgeface.models import resolve_model, sha256_file
from edgeface.vision.embed import Embedder, EmbedderSpec, l2_normalize
from edgeface.vision.runtime import load_interpreter

HEAD_KIND = "head"


@dataclass(frozen=True)
class HeadInfo:
    """What a head file is: its name, the embedder it was trained on, its dimensions and calibrated threshold."""

    name: str
    sha256: str
    backbone: str
    input_dim: int
    output_dim: int
    default_max_distance: Optional[float] = None

    @property
    def head_id(self) -> str:
        """Name plus the file's digest: a retrained head under the same name is a different embedding space."""
        return f"{self.name}-{self.sha256[:8]}"

    @staticmethod
    def from_entry(entry: dict[str, Any], where: str) -> "HeadInfo":
        try:
            return HeadInfo(name=str(entry["name"]), sha256=str(entry["sha256"]).lower(), backbone=str(entry["backbone"]),
                            input_dim=int(entry["input_dim"]), output_dim=int(entry["output_dim"]),
                            default_max_distance=(float(entry["default_max_distance"])
                                                  if entry.get("default_max_distance") is not None else None))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: head entry lacks or has a bad {exc} (expected name, sha256, backbone, "
                             "input_dim, output_dim)") from None


def sidecar_path(model_path: Path) -> Path:
    """`head.tflite` -> `head.json`: the manifest entry that `edgeface train-head` writes beside the file."""
    return model_path.with_suffix(".json")


def resolve_head(name_or_path: str | os.PathLike[str],
                 models_dir: Optional[str | os.PathLike[str]] = None) -> tuple[Path, HeadInfo]:
    """Find a head by manifest name or path; its entry comes from the manifest or the sidecar JSON beside it."""
    path, info = resolve_model(name_or_path, models_dir)
    if info is not None:
        if info.kind != HEAD_KIND:
            raise ModelError(f"embedder.head {name_or_path!r} is a {info.kind} model, not an embedding head")
        entry = {"name": info.name, "sha256": info.sha256, **info.extra}
        return path, HeadInfo.from_entry(entry, f"manifest entry {info.name}")
    side = sidecar_path(path)
    try:
        entry = json.loads(side.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"head {path} has no manifest entry and no {side.name} beside it "
                         "(edgeface train-head writes one)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"head description {side} is unreadable: {exc}") from None
    head = HeadInfo.from_entry(entry, str(side))
    digest = sha256_file(path)
    if digest != head.sha256:
        raise ModelError(f"head file {path} has sha256 {digest[:12]}..., {side.name} says {head.sha256[:12]}... "
                         "(replaced or damaged)")
    return path, head


class EmbeddingHead:
    """Maps (N, input_dim) unit embeddings to (N, output_dim) unit embeddings with a small TFLite model."""

    def __init__(self, path: str | os.PathLike[str], info: HeadInfo, *, num_threads: Optional[int] = 1) -> None:
        self.path = Path(path)
        self.info = info
        self._interpreter = load_interpreter(self.path, num_threads)
        inp = self._interpreter.get_input_details()[0]
        out = self._interpreter.get_output_details()[0]
        if int(inp["shape"][-1]) != info.input_dim or int(out["shape"][-1]) != info.output_dim:
            raise ModelError(f"head {self.path} maps {list(inp['shape'])} -> {list(out['shape'])}, its entry says "
                             f"{info.input_dim} -> {info.output_dim}")
        self._batch = int(inp["shape"][0])

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        x = np.asarray(embeddings, np.float32).reshape(-1, self.info.input_dim)
        if len(x) == 0:
            return np.zeros((0, self.info.output_dim), np.float32)
        idx = self._interpreter.get_input_details()[0]["index"]
        if len(x) != self._batch:
            self._interpreter.resize_tensor_input(idx, [len(x), self.info.input_dim])
            self._interpreter.allocate_tensors()
            self._batch = len(x)
        self._interpreter.set_tensor(idx, x)
        self._interpreter.invoke()
        y = self._interpreter.get_tensor(self._interpreter.get_output_details()[0]["index"])
        return l2_normalize(np.asarray(y, np.float32).reshape(len(x), -1))

    def close(self) -> None:
        self._interpreter = None


class HeadedEmbedder:
    """An embedder followed by a head: what the daemon, enrollment and the eval call when `embedder.head` is set."""

    def __init__(self, backbone: Embedder, head: EmbeddingHead) -> None:
        spec: Optional[EmbedderSpec] = getattr(backbone, "spec", None)
        if head.info.backbone != backbone.model_id:
            raise ModelError(f"head {head.info.name} was trained on {head.info.backbone} embeddings; the embedder is "
                             f"{backbone.model_id} (train a head for it, or set embedder.model: {head.info.backbone})")
        if spec is not None and spec.embedding_dim != head.info.input_dim:
            raise ModelError(f"head {head.info.name} takes {head.info.input_dim}-D embeddings; {backbone.model_id} "
                             f"gives {spec.embedding_dim}-D")
        self.backbone = backbone
        self.head = head
        self.model_id = f"{backbone.model_id}+{head.info.head_id}"
        self.input_size = backbone.input_size
        self.template = backbone.template
        if spec is not None:
            self.spec = replace(spec, model_id=self.model_id, embedding_dim=head.info.output_dim)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        return self.head.project(self.backbone.embed(crops))

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """Backbone embeddings through the head (enrollment averages crop and mirror before this step)."""
        return self.head.project(embeddings)

    def close(self) -> None:
        for part in (self.backbone, self.head):
            close = getattr(part, "close", None)
            if close:
                close()


def with_head(embedder: Embedder, head: Optional[str], *, models_dir: Optional[str | os.PathLike[str]] = None,
              num_threads: Optional[int] = 1) -> Embedder:
    """The embedder itself when no head is configured, else the embedder followed by that head."""
    if not head:
        return embedder
    path, info = resolve_head(head, models_dir)
    return HeadedEmbedder(embedder, EmbeddingHead(path, info, num_threads=num_threads))


def head_threshold(head: str, models_dir: Optional[str | os.PathLike[str]] = None) -> Optional[float]:
    """The head's calibrated cosine-distance threshold (its training report's validation operating point)."""
    return resolve_head(head, models_dir)[1].default_max_distance


__all__ = ["HEAD_KIND", "HeadInfo", "EmbeddingHead", "HeadedEmbedder", "resolve_head", "with_head", "head_threshold",
           "sidecar_path"]

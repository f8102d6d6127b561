"""Train an embedding head with triplet loss on a frozen embedder's cached embeddings (FaceNet's idea, on a PC).

The backbone (the shipped SFace or FaceNet TFLite file) stays frozen: every photo is embedded once through the
same face path the daemon uses (and cached), and only a small head is trained on those vectors, so training takes
minutes on a CPU. Identities are split into train and validation sets that share nobody; early stopping watches an
open-set figure on the validation identities (correct accept at 1% stranger false-accept), the figure a door cares
about, not the loss.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from edgeface.errors import ConfigError

ARCHITECTURES = ("mlp", "residual", "linear")
MINING = ("batch-hard", "semi-hard")


@dataclass(frozen=True)
class TrainSettings:
    """How to train; defaults are the ones measured in docs/training.md."""

    arch: str = "residual"
    margin: float = 0.2
    mining: str = "semi-hard"
    epochs: int = 60
    patience: int = 8
    persons_per_batch: int = 32
    photos_per_person: int = 4
    learning_rate: float = 1e-3
    dropout: float = 0.2
    val_fraction: float = 0.25
    seed: int = 0

    def check(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"--arch {self.arch!r}: expected one of {', '.join(ARCHITECTURES)}")
        if self.mining not in MINING:
            raise ConfigError(f"--mining {self.mining!r}: expected one of {', '.join(MINING)}")
        if not 0 < self.margin <= 2:
            raise ConfigError(f"--margin {self.margin}: expected 0 < margin <= 2 (squared distance of unit vectors)")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction {self.val_fraction}: expected between 0 and 1")


@dataclass
class Samples:
    """Unit embeddings with identity labels; `views` holds a second view per photo (the crop+mirror average)."""

    x: np.ndarray
    y: np.ndarray
    persons: list[str]
    photo: np.ndarray  # index of the source photo per row (a photo's views stay together in evaluation)

    def identities(self) -> np.ndarray:
        return np.unique(self.y)


def identity_disjoint_split(persons: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Train and validation identities: the `val_fraction` of names with the smallest seeded hash (a person's side
    rarely changes as folders grow)."""
    def bucket(name: str) -> float:
        digest = hashlib.sha256(f"{seed}:{name}".encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") / 2 ** 64

    ranked = sorted(persons, key=bucket)
    n_val = int(round(len(ranked) * val_fraction))
    val, train = sorted(ranked[:n_val]), sorted(ranked[n_val:])
    if len(val) < 4 or len(train) < 2:
        raise ConfigError(f"{len(persons)} identities give {len(train)} to train and {len(val)} to validate; need at "
                          "least 2 and 4 (add people, or change --val-fraction)")
    return train, val


# ------------------------------------------------------------------------------------------ the open-set figure
def open_set_accept(x: np.ndarray, y: np.ndarray, photo: np.ndarray, *, far: float = 0.01, enroll: int = 2,
                    seed: int = 0, draws: int = 10) -> float:
    """The mean of `draws` seeded draws of `_open_set_once` (one draw of a small validation set is too coarse to
    stop training on)."""
    vals = [_open_set_once(x, y, photo, far=far, enroll=enroll, seed=seed * 1000 + k) for k in range(draws)]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _open_set_once(x: np.ndarray, y: np.ndarray, photo: np.ndarray, *, far: float, enroll: int, seed: int) -> float:
    """Correct accept at `far` stranger false-accept on a labeled set: half its identities enrolled (their first
    `enroll` photos averaged into a centroid; only people with two photos or more), the others strangers; a probe counts when its nearest centroid is
    its own and closer than the threshold that lets `far` of the strangers in."""
    rng = np.random.default_rng(seed)
    ids = np.unique(y)
    rng.shuffle(ids)
    eligible = np.array([i for i in ids if len(np.unique(photo[y == i])) >= 2])  # can be enrolled and probed
    enrolled = eligible[: (len(ids) + 1) // 2]
    strangers = np.array([i for i in ids if i not in set(enrolled.tolist())])
    cents, probes, probe_y = [], [], []
    for k, pid in enumerate(enrolled):
        rows = np.flatnonzero(y == pid)
        photos = np.unique(photo[rows])
        if len(photos) < 2:
            continue
        take = photos[: min(enroll, len(photos) - 1)]
        c = x[np.isin(photo, take) & (y == pid)].mean(axis=0)
        cents.append(c / max(np.linalg.norm(c), 1e-12))
        rest = rows[~np.isin(photo[rows], take)]
        probes.append(x[rest])
        probe_y.extend([len(cents) - 1] * len(rest))
    if len(cents) < 2 or not probes:
        return float("nan")
    cmat = np.stack(cents)
    gp = np.concatenate(probes)
    gy = np.asarray(probe_y)
    sp = x[np.isin(y, strangers)]
    dg = 1.0 - gp @ cmat.T
    ds = (1.0 - sp @ cmat.T).min(axis=1)
    thr = float(np.quantile(ds, far)) if len(ds) else 0.0
    right = dg.argmin(axis=1) == gy
    return float(np.mean(right & (dg.min(axis=1) <= thr)))


def impostor_threshold(x: np.ndarray, y: np.ndarray, far: float = 1e-3) -> float:
    """Cosine distance that `far` of the different-person pairs fall under: the head's provisional threshold."""
    d = 1.0 - x @ x.T
    iu = np.triu_indices(len(x), 1)
    impostor = d[iu][(y[:, None] != y[None, :])[iu]]
    return float(np.quantile(impostor, far))


# ----------------------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    """The trained head, its history and the figures a report needs."""

    model: Any
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    baseline_val: float = float("nan")
    best_val: float = float("nan")
    initial_loss: float = float("nan")
    final_loss: float = float("nan")

    def project(self, x: np.ndarray) -> np.ndarray:
        y = np.asarray(self.model(np.asarray(x, np.float32), training=False))
        return (y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def build_head(tf: Any, dim: int, settings: TrainSettings) -> Any:
    """The head: `mlp` is 512 -> 256 -> dim with batch norm and dropout, linear output (the FaceNet-style head);
    `residual` adds that MLP's output to its input with the last layer starting at zero, so training starts from
    the backbone's own space; `linear` is one dim x dim matrix starting at the identity."""
    keras = tf.keras
    inp = keras.Input(shape=(dim,), name="embedding")
    if settings.arch == "linear":
        out = keras.layers.Dense(dim, kernel_initializer="identity", bias_initializer="zeros", name="linear")(inp)
        return keras.Model(inp, out, name="head_linear")
    h = inp
    for width in (512, 256):
        h = keras.layers.Dense(width, use_bias=False)(h)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.ReLU()(h)
        h = keras.layers.Dropout(settings.dropout)(h)
    if settings.arch == "mlp":
        out = keras.layers.Dense(dim, name="out")(h)
        return keras.Model(inp, out, name="head_mlp")
    delta = keras.layers.Dense(dim, kernel_initializer="zeros", bias_initializer="zeros", name="delta")(h)
    out = keras.layers.Add(name="out")([inp, delta])
    return keras.Model(inp, out, name="head_residual")


def triplet_loss(tf: Any, emb: Any, labels: Any, margin: float, mining: str) -> Any:
    """Triplet loss on a batch of L2-normalised embeddings, squared euclidean distances (FaceNet, section 3.1).

    batch-hard: per anchor, its farthest positive and nearest negative. semi-hard: per anchor-positive pair, the
    nearest negative still farther than the positive (FaceNet's choice), else the farthest negative."""
    emb = tf.math.l2_normalize(emb, axis=1)
    dot = tf.matmul(emb, emb, transpose_b=True)
    d = tf.maximum(2.0 - 2.0 * dot, 0.0)
    same = tf.equal(labels[:, None], labels[None, :])
    eye = tf.eye(tf.shape(labels)[0], dtype=tf.bool)
    pos = tf.logical_and(same, tf.logical_not(eye))
    neg = tf.logical_not(same)
    big = tf.constant(1e9, d.dtype)
    if mining == "batch-hard":
        hardest_pos = tf.reduce_max(tf.where(pos, d, tf.zeros_like(d)), axis=1)
        hardest_neg = tf.reduce_min(tf.where(neg, d, big * tf.ones_like(d)), axis=1)
        has = tf.logical_and(tf.reduce_any(pos, axis=1), tf.reduce_any(neg, axis=1))
        loss = tf.nn.relu(hardest_pos - hardest_neg + margin)
        return tf.reduce_sum(tf.where(has, loss, 0.0)) / tf.maximum(tf.reduce_sum(tf.cast(has, d.dtype)), 1.0)
    # semi-hard: for each (a, p): negatives n with d(a,n) > d(a,p); take the smallest such d(a,n)
    d_ap = d[:, :, None]                      # (a, p, 1)
    d_an = d[:, None, :]                      # (a, 1, n)
    neg3 = neg[:, None, :]
    semi = tf.logical_and(neg3, d_an > d_ap)
    nearest_semi = tf.reduce_min(tf.where(semi, d_an + 0.0 * d_ap, big), axis=2)
    farthest_neg = tf.reduce_max(tf.where(neg, d, tf.zeros_like(d)), axis=1)[:, None] + 0.0 * d
    chosen = tf.where(nearest_semi < big / 2, nearest_semi, farthest_neg)
    loss = tf.nn.relu(d - chosen + margin)
    return tf.reduce_sum(tf.where(pos, loss, 0.0)) / tf.maximum(tf.reduce_sum(tf.cast(pos, d.dtype)), 1.0)


def _batches(y: np.ndarray, p: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of P-identities x K-rows batches (identities with fewer rows are sampled with replacement)."""
    by_id = {int(i): np.flatnonzero(y == i) for i in np.unique(y)}
    ids = np.array([i for i, rows in by_id.items() if len(rows) >= 2])
    rng.shuffle(ids)
    out = []
    for start in range(0, len(ids) - 1, p):
        group = ids[start:start + p]
        if len(group) < 2:
            continue
        rows = [rng.choice(by_id[int(i)], size=k, replace=len(by_id[int(i)]) < k) for i in group]
        out.append(np.concatenate(rows))
    return out


def train_head(train: Samples, val: Samples, settings: TrainSettings, *,
               on_epoch: Optional[Callable[[dict[str, float]], None]] = None) -> TrainResult:
    """Train with early stopping on the validation open-set figure; returns the best epoch's head."""
    from edgeface.convert.tflite import require_tensorflow

    settings.check()
    tf = require_tensorflow()
    tf.keras.utils.set_random_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    dim = train.x.shape[1]
    model = build_head(tf, dim, settings)
    opt = tf.keras.optimizers.Adam(settings.learning_rate)
    xs = tf.constant(train.x, tf.float32)
    ys = tf.constant(train.y, tf.int64)

    @tf.function
    def step(idx: Any) -> Any:
        with tf.GradientTape() as tape:
            out = model(tf.gather(xs, idx), training=True)
            loss = triplet_loss(tf, out, tf.gather(ys, idx), settings.margin, settings.mining)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    eval_rng = np.random.default_rng(settings.seed + 1)
    fixed = _batches(train.y, settings.persons_per_batch, settings.photos_per_person, eval_rng)

    def train_loss() -> float:
        """The loss over fixed batches with the head in inference mode (comparable across epochs)."""
        vals = [float(triplet_loss(tf, model(tf.gather(xs, b), training=False), tf.gather(ys, b), settings.margin,
                                   settings.mining)) for b in fixed]
        return float(np.mean(vals)) if vals else float("nan")

    def val_figure(m: Any) -> float:
        proj = TrainResult(m).project(val.x)
        return open_set_accept(proj, val.y, val.photo, seed=settings.seed)

    result = TrainResult(model)
    result.baseline_val = open_set_accept(val.x, val.y, val.photo, seed=settings.seed)
    result.initial_loss = train_loss()
    best_weights = model.get_weights()
    best = -1.0  # the best trained epoch wins, even when the untrained head scored as well (a random MLP can)
    since_best = 0
    for epoch in range(1, settings.epochs + 1):
        losses = [float(step(tf.constant(b))) for b in _batches(train.y, settings.persons_per_batch,
                                                                 settings.photos_per_person, rng)]
        figure = val_figure(model)
        row = {"epoch": epoch, "batch_loss": float(np.mean(losses)) if losses else float("nan"),
               "train_loss": train_loss(), "val_correct_accept_at_1pct": figure}
        result.history.append(row)
        if on_epoch:
            on_epoch(row)
        if not math.isnan(figure) and figure > best + 1e-9:
            best, result.best_val, result.best_epoch, since_best = figure, figure, epoch, 0
            best_weights = model.get_weights()
        else:
            since_best += 1
            if since_best >= settings.patience:
                break
    model.set_weights(best_weights)
    result.final_loss = train_loss()
    return result

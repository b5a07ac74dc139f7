"""Running examples for scoring: one model or a stack of them, reading the answer logits, clean and corrupted
runs, batching with running sums, and metric checks.

Every per-batch program is written for one model and mapped over a model axis (`for_every_model`). A
single model is not copied into a stack: the batch gains a model axis of size one, which the program drops
(a vmap of size one would batch every product and cost ~20% on a CPU). So the batch, the resampling
partners and fitted ablation means always carry a leading model axis `[M, B, ...]`.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Float

from mdm_circuits import sharding
from mdm_circuits.circuits.ablations import Ablation
from mdm_circuits.circuits.interventions import run
from mdm_circuits.errors import AttributionError, BatchError
from mdm_circuits.model.config import ModelConfig
from mdm_circuits.model.transformer import ModelStack, Transformer
from mdm_circuits.outputs import write_atomically
from mdm_circuits.tasks.batch import Batch, stack_batches

Progress = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class Models:
    """What the per-batch programs take: one model (`axis` None) or a stack on a leading model axis (0), and
    the mesh its parameters and every slice of examples are placed on (None: the default device)."""

    tree: Transformer
    configs: tuple[ModelConfig, ...]
    stacked: bool
    mesh: Mesh | None = None

    def place(self, tree):
        """`[M, B, ...]` arrays with their examples split over the mesh's data axis (unchanged without one)."""
        if self.mesh is None:
            return tree
        return jax.tree.map(lambda a: sharding.place(a, sharding.examples_sharding(self.mesh, a.ndim)), tree)

    @property
    def axis(self) -> int | None:
        return 0 if self.stacked else None

    @property
    def size(self) -> int:
        return len(self.configs)

    def name(self, index: int) -> str:
        """How an error names model `index`."""
        return f"model {index} of the stack: " if self.stacked else ""

    def results(self, per_model: list):
        """One result per model of a stack; the result itself for a single model."""
        return per_model if self.stacked else per_model[0]


def for_every_model(function: Callable, model_axis: int | None, in_axes: Sequence[int | None]) -> Callable:
    """`function(model, *args)` for every model: vmapped over the leading model axis of the models and of the
    `args` whose `in_axes` entry is 0 (the others are shared). With `model_axis` None (a single model) it runs
    once, on the size-one model axis of those args, and its outputs gain that axis back."""
    if model_axis is not None:
        return jax.vmap(function, in_axes=(model_axis, *in_axes))

    def single(model, *args):
        args = [arg if axis is None else jax.tree.map(lambda leaf: leaf[0], arg) for arg, axis in zip(args, in_axes)]
        return jax.tree.map(lambda leaf: leaf[None], function(model, *args))

    return single


def as_models(models: Transformer | ModelStack, mesh: Mesh | None = None) -> Models:
    """The models as the per-batch programs take them; with a mesh, their parameters placed on it
    (`sharding.shard_model`: tensor parallel over `model`)."""
    if mesh is not None:
        models = sharding.shard_model(models, mesh)
    if isinstance(models, ModelStack):
        return Models(models.models, models.configs, True, mesh)
    return Models(models, (models.config,), False, mesh)


def model_batches(models: Models, batch: Batch | Sequence[Batch]) -> Batch:
    """The examples of every model, `[M, B, ...]`, checked against each model's configuration: one batch for
    all models, or one per model of a stack (each posed in its model's view)."""
    if isinstance(batch, Batch):
        batches = [batch] * models.size
    else:
        batches = list(batch)
        if not models.stacked or len(batches) != models.size:
            raise BatchError(f"give one batch for every model, or one per model of a stack ({models.size} "
                             f"model(s), {len(batches)} batches)")
    for index, (config, part) in enumerate(zip(models.configs, batches)):
        try:
            part.check(config)
        except BatchError as error:
            raise BatchError(models.name(index) + str(error)) from error
    return stack_batches(batches)


def read_logits(model: Transformer, final: Float[Array, "T D"], example: Batch) -> Float[Array, "A V"]:
    """Logits at the positions that predict the example's answer tokens (only those are unembedded)."""
    return model.unembed(final[example.read_positions(model)])


def answer_logits(model: Transformer, embeddings: Float[Array, "T D"], example: Batch) -> Float[Array, "A V"]:
    """The answer logits of a plain run from `embeddings` (no node outputs kept)."""
    return read_logits(model, run(model, embeddings, valid=example.valid, keep_sources=False).final, example)


def clean_sources(model: Transformer, batch: Batch) -> Float[Array, "B N T D"]:
    """Every node's output on every clean example."""
    return jax.vmap(lambda example: run(model, model.embed(example.clean), valid=example.valid).sources)(batch)


def plain_runs(model, metric, batch, ablation: Ablation, partners: Batch | None = None):
    """Clean and corrupted runs of every example: the clean node outputs, their ablation values, the clean
    answer logits and both metric values. `partners` holds each example's resampling partner."""
    def one(example):
        clean = run(model, model.embed(example.clean), valid=example.valid)
        corrupted = run(model, model.embed(example.corrupted), valid=example.valid)
        clean_logits = read_logits(model, clean.final, example)
        corrupted_logits = read_logits(model, corrupted.final, example)
        return (clean.sources, corrupted.sources, clean_logits, metric(clean_logits, example, clean_logits),
                metric(corrupted_logits, example, clean_logits))

    clean, corrupted, clean_logits, clean_metric, corrupted_metric = jax.vmap(one)(batch)
    partner = None if partners is None else clean_sources(model, partners)
    return clean, ablation.sources(clean, corrupted, partner), clean_logits, clean_metric, corrupted_metric


def _slices(batch: Batch, batch_size: int):
    """(start, slice) of `batch_size` examples of every model (`batch` is `[M, B, ...]`), the last padded
    with copies of its first example, so every slice has one shape and a program compiles once."""
    size = batch.clean.shape[1]
    for start in range(0, size, batch_size):
        part = jax.tree.map(lambda a: a[:, start: start + batch_size], batch)
        missing = batch_size - part.clean.shape[1]
        if missing and size > batch_size:
            part = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[:, :1], missing, 1)], axis=1), part)
        yield start, part


def check_metric(models: Models, values: np.ndarray, what: str) -> None:
    """Refuse non-finite metric values `[M, B]`, naming the model and the examples."""
    for index, row in enumerate(values):
        bad = np.nonzero(~np.isfinite(row))[0]
        if len(bad):
            raise AttributionError(
                f"{models.name(index)}the metric is not finite on the {what} run of example(s) "
                f"{bad.tolist()[:10]}; check the answer tokens and positions (a token outside the "
                f"vocabulary, or a probability of zero)")


@dataclasses.dataclass(frozen=True)
class Totals:
    """A per-batch program's results over the dataset, for every model: the mean of its summed output, its
    per-example rows when it returns them, and the mean clean and corrupted metrics."""

    mean: np.ndarray
    rows: np.ndarray | None
    clean_metric: np.ndarray
    corrupted_metric: np.ndarray


class _Resumable:
    """The running sums of `over_batches`, saved after every slice to `path` (atomically) under `key`, so that
    a killed run continues where it stopped and ends with the same sums."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = Path(path), key

    def load(self) -> tuple[int, float | np.ndarray, list, list, list]:
        if not self.path.exists():
            return 0, 0.0, [], [], []
        with np.load(self.path) as saved:
            if str(saved["key"]) != self.key:
                raise AttributionError(f"{self.path} holds the progress of another run (other models, examples or "
                                       f"settings); remove it to start again")
            rows = [saved["rows"]] if "rows" in saved.files else []
            return (int(saved["done"]), saved["total"], rows, [saved["clean"]], [saved["corrupted"]])

    def save(self, done: int, total, rows: list, clean: list, corrupted: list) -> None:
        arrays = {"key": np.array(self.key), "done": np.array(done), "total": np.asarray(total),
                  "clean": np.concatenate(clean, axis=1), "corrupted": np.concatenate(corrupted, axis=1)}
        if rows:
            arrays["rows"] = np.concatenate(rows, axis=1)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_atomically(self.path, buffer.getvalue())


def over_batches(models: Models, batch: Batch, batch_size: int, ablation: Ablation, program: Callable,
                 progress: Progress | None = None, resume: tuple[Path, str] | None = None) -> Totals:
    """Run `program(part, weights, partners)` over the dataset (`[M, B, ...]`) in slices of `batch_size`.

    The program returns, for every model: a sum over the slice's examples weighted by `weights` (0 for
    padding copies), per-example rows or None, and the clean and the corrupted metric per example. The sums
    are added up on the devices (each slice split over the mesh's data axis when the models carry a mesh)
    and read back once, at the end, then divided by the number of examples; non-finite metrics are refused,
    naming the model and the examples. With `resume` = (file, key), the sums are read back and saved after
    every slice, and a rerun under the same key continues from them; the file is removed when the run is
    complete.
    """
    if batch_size < 1:
        raise AttributionError(f"batch_size must be positive, got {batch_size}")
    if models.mesh is not None:
        sharding.check_batch_size(models.mesh, batch_size)
    size = batch.clean.shape[1]
    partner_index = ablation.partners(size)
    saved = None if resume is None else _Resumable(*resume)
    done, total, rows, clean, corrupted = (0, 0.0, [], [], []) if saved is None else saved.load()
    for start, part in _slices(batch, batch_size):
        if start < done:
            continue
        n = min(batch_size, size - start)
        partners = None
        if partner_index is not None:
            index = partner_index[start: start + batch_size]
            index = np.concatenate([index, np.repeat(index[:1], part.clean.shape[1] - len(index))])
            partners = models.place(jax.tree.map(lambda a: a[:, index], batch))
        weights = jnp.arange(part.clean.shape[1]) < n
        summed, per_example, clean_metric, corrupted_metric = program(models.place(part), weights, partners)
        total = total + summed
        if per_example is not None:
            rows.append(per_example[:, :n])
        clean.append(clean_metric[:, :n])
        corrupted.append(corrupted_metric[:, :n])
        if saved is not None:
            total, rows, clean, corrupted = jax.device_get((total, rows, clean, corrupted))
            saved.save(start + n, total, rows, clean, corrupted)
        if progress is not None:
            jax.block_until_ready(total)  # a wait, not a read: progress counts finished slices
            progress(start + n, size)
    # One read back for the whole run: every slice's rows and metrics joined on the devices first.
    total, rows, clean, corrupted = sharding.read_back((
        total, jnp.concatenate(rows, axis=1) if rows else None, jnp.concatenate(clean, axis=1),
        jnp.concatenate(corrupted, axis=1)))
    clean, corrupted = np.asarray(clean, np.float64), np.asarray(corrupted, np.float64)
    check_metric(models, clean, "clean")
    check_metric(models, corrupted, "corrupted")
    if saved is not None:
        saved.path.unlink(missing_ok=True)
    return Totals(np.asarray(total, np.float64) / size, rows, clean.mean(axis=1), corrupted.mean(axis=1))


def _source_sums(model, batch, weights):
    """Σ over real positions of weighted examples of every node's clean output, and the position counts."""
    real = (batch.valid & weights[:, None]).astype(jnp.float32)
    sources = clean_sources(model, batch)
    return jnp.einsum("bntd,bt->ntd", sources.astype(jnp.float32), real), real.sum(0)


@functools.partial(jax.jit, static_argnames=("model_axis",))
def _source_sums_batch(models, batch, weights, *, model_axis):
    return for_every_model(_source_sums, model_axis, (0, None))(models, batch, weights)


def fit_ablation(models: Models, batch: Batch, ablation: Ablation, batch_size: int) -> Ablation:
    """Fix every model's means of a mean ablation from its clean runs of `batch` (`[M, B, ...]`)."""
    if not ablation.needs_fit():
        return ablation
    if batch_size < 1:
        raise AttributionError(f"batch_size must be positive, got {batch_size}")
    size = batch.clean.shape[1]
    sums, counts = 0.0, 0.0
    for start, part in _slices(batch, batch_size):
        part_sums, part_counts = _source_sums_batch(models.tree, models.place(part),
                                                    jnp.arange(part.clean.shape[1]) < size - start,
                                                    model_axis=models.axis)
        sums, counts = sums + part_sums, counts + part_counts
    return jax.vmap(Ablation.fit, in_axes=(None, 0, 0))(ablation, sums, counts)


def chunked(rows: np.ndarray, chunk: int, axis: int = 0) -> jnp.ndarray:
    """Rows (along `axis`) padded to a multiple of `chunk` with copies of the first, and split into
    [n_chunks, chunk, ...] there, for `lax.map` over chunks of vmapped work."""
    if chunk < 1:
        raise AttributionError(f"chunk sizes must be positive, got {chunk}")
    rows = np.moveaxis(np.asarray(rows), axis, 0)
    padded = np.concatenate([rows, np.repeat(rows[:1], -len(rows) % chunk, axis=0)])
    return jnp.asarray(np.moveaxis(padded.reshape(-1, chunk, *rows.shape[1:]), (0, 1), (axis, axis + 1)))

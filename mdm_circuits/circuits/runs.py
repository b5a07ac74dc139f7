"""Running examples for scoring: reading the answer logits, clean and corrupted runs, batching with
running sums, and metric checks."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from mdm_circuits.circuits.ablations import Ablation
from mdm_circuits.circuits.interventions import run
from mdm_circuits.circuits.scores import AttributionError
from mdm_circuits.model.transformer import Transformer
from mdm_circuits.tasks.batch import Batch

Progress = Callable[[int, int], None]


def read_logits(model: Transformer, final: Float[Array, "T D"], example: Batch) -> Float[Array, "A V"]:
    """Logits at the positions that predict the example's answer tokens (only those are unembedded)."""
    return model.unembed(final[example.read_positions(model.config)])


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
    partner = None if partners is None else jax.vmap(
        lambda e: run(model, model.embed(e.clean), valid=e.valid).sources)(partners)
    return clean, ablation.sources(clean, corrupted, partner), clean_logits, clean_metric, corrupted_metric


def _slices(batch: Batch, batch_size: int):
    """(start, slice) of `batch_size` examples, the last padded with copies of its first example, so every
    slice has one shape and a program compiles once."""
    for start in range(0, batch.size, batch_size):
        part = batch[start: start + batch_size]
        if part.size < batch_size and batch.size > batch_size:
            part = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[:1], batch_size - a.shape[0], 0)]),
                                part)
        yield start, part


def check_metric(values: np.ndarray, what: str, offset: int = 0) -> None:
    bad = np.nonzero(~np.isfinite(values))[0]
    if len(bad):
        raise AttributionError(
            f"the metric is not finite on the {what} run of example(s) {(bad + offset).tolist()[:10]}; check "
            f"the answer tokens and positions (a token outside the vocabulary, or a probability of zero)")


@dataclasses.dataclass(frozen=True)
class Totals:
    """A per-batch program's results averaged over the dataset, with the mean clean and corrupted metrics."""

    mean: np.ndarray
    clean_metric: float
    corrupted_metric: float


def over_batches(batch: Batch, batch_size: int, ablation: Ablation, program: Callable,
                 progress: Progress | None = None) -> Totals:
    """Run `program(part, weights, partners)` over the dataset in slices of `batch_size`.

    The program returns (a sum over the slice's examples weighted by `weights`, which are 0 for padding
    copies; the clean metric per example; the corrupted metric per example). Sums are added up over the
    slices and divided by the number of examples; non-finite metrics are refused, naming the examples.
    """
    if batch_size < 1:
        raise AttributionError(f"batch_size must be positive, got {batch_size}")
    partner_index = ablation.partners(batch.size)
    total, clean, corrupted = 0.0, [], []
    for start, part in _slices(batch, batch_size):
        n = min(batch_size, batch.size - start)
        partners = None
        if partner_index is not None:
            rows = partner_index[start: start + batch_size]
            partners = batch[np.concatenate([rows, np.repeat(rows[:1], part.size - len(rows))])]
        summed, clean_metric, corrupted_metric = program(part, jnp.arange(part.size) < n, partners)
        check_metric(np.asarray(clean_metric[:n]), "clean", start)
        check_metric(np.asarray(corrupted_metric[:n]), "corrupted", start)
        total = total + np.asarray(summed, np.float64)
        clean.append(np.asarray(clean_metric[:n], np.float64))
        corrupted.append(np.asarray(corrupted_metric[:n], np.float64))
        if progress is not None:
            progress(start + n, batch.size)
    return Totals(total / batch.size, float(np.concatenate(clean).mean()), float(np.concatenate(corrupted).mean()))


def fit_ablation(model: Transformer, batch: Batch, ablation: Ablation, batch_size: int) -> Ablation:
    """Fix the means of a mean ablation from the clean runs of `batch`."""
    if not ablation.needs_fit():
        return ablation
    if batch_size < 1:
        raise AttributionError(f"batch_size must be positive, got {batch_size}")
    sums, counts = 0.0, 0.0
    for start, part in _slices(batch, batch_size):
        weights = jnp.arange(part.size) < min(batch_size, batch.size - start)
        sources = jax.vmap(lambda e: run(model, model.embed(e.clean), valid=e.valid).sources)(part)
        real = (part.valid & weights[:, None]).astype(jnp.float32)
        sums = sums + jnp.einsum("bntd,bt->ntd", sources.astype(jnp.float32), real)
        counts = counts + real.sum(0)
    return ablation.fit(sums, counts)


def chunked(rows: np.ndarray, chunk: int) -> jnp.ndarray:
    """Rows padded to a multiple of `chunk` (with copies of the first) and reshaped to [n_chunks, chunk, ...],
    for `lax.map` over chunks of vmapped work."""
    if chunk < 1:
        raise AttributionError(f"chunk sizes must be positive, got {chunk}")
    padded = np.concatenate([rows, np.repeat(rows[:1], -len(rows) % chunk, axis=0)])
    return jnp.asarray(padded.reshape(-1, chunk, *rows.shape[1:]))

"""Running examples for scoring: reading the answer logits, clean and corrupted runs, batching with
running sums, metric checks, and the `Scores` every attribution method returns."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from mdm_circuits.ablations import Ablation
from mdm_circuits.batch import Batch
from mdm_circuits.graph import Graph
from mdm_circuits.interventions import run
from mdm_circuits.model import Transformer

Progress = Callable[[int, int], None]


class AttributionError(ValueError):
    """Attribution that cannot give meaningful scores for the inputs given."""


@dataclasses.dataclass(frozen=True)
class Scores:
    """Edge scores `[n_sources, n_destinations]` (zero off the edges) and how they were obtained."""

    graph: Graph
    matrix: np.ndarray
    method: str
    steps: int | None
    n_examples: int
    clean_metric: float
    corrupted_metric: float

    @property
    def edges(self) -> np.ndarray:
        """One score per edge, in the graph's edge order."""
        return self.graph.edge_vector(self.matrix)

    def to_json(self, path, d_model: int | None = None) -> None:
        self.graph.to_json(path, scores=self.matrix, d_model=d_model)

    def node_importance(self, k: int | None = None, absolute: bool = True) -> np.ndarray:
        """s(v) for every source node: the sum of the scores (absolute by default) of the edges entering or
        leaving v, over the top-k edges if `k` is given (DESIGN's component importance), else all edges."""
        values = np.abs(self.edges) if absolute else self.edges
        if k is not None:
            keep = np.zeros_like(values, dtype=bool)
            keep[np.argsort(-values, kind="stable")[:k]] = True
            values = np.where(keep, values, 0)
        matrix = self.graph.edge_matrix(values.astype(np.float64))
        leaving = matrix.sum(axis=1)
        entering = (self.graph.own_destinations * matrix.sum(axis=0)[None, :]).sum(axis=1)
        return leaving + entering


def read_logits(model: Transformer, final: Float[Array, "T D"], example: Batch) -> Float[Array, "A V"]:
    """Logits at the positions that predict the example's answer tokens (only those are unembedded)."""
    return model.unembed(final[example.read_positions(model.config)])


def plain_runs(model, metric, batch):
    """Clean and corrupted runs of every example: node outputs, clean answer logits, both metric values."""
    def one(example):
        clean = run(model, model.embed(example.clean), valid=example.valid)
        corrupted = run(model, model.embed(example.corrupted), valid=example.valid)
        clean_logits = read_logits(model, clean.final, example)
        corrupted_logits = read_logits(model, corrupted.final, example)
        return (clean.sources, corrupted.sources, clean_logits, metric(clean_logits, example, clean_logits),
                metric(corrupted_logits, example, clean_logits))

    return jax.vmap(one)(batch)


def batches_of(batch: Batch, batch_size: int):
    """Split into slices of `batch_size`, padding the last with copies of its first example at weight 0,
    so every slice has one shape and the program compiles once."""
    for start in range(0, batch.size, batch_size):
        part = batch[start: start + batch_size]
        n = part.size
        if n < batch_size and batch.size > batch_size:
            part = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[:1], batch_size - n, 0)]), part)
        yield part, jnp.arange(part.size) < n


def check_metric(values: np.ndarray, what: str, offset: int = 0) -> None:
    bad = np.nonzero(~np.isfinite(values))[0]
    if len(bad):
        raise AttributionError(
            f"the metric is not finite on the {what} run of example(s) {(bad + offset).tolist()[:10]}; check "
            f"the answer tokens and positions (a token outside the vocabulary, or a probability of zero)")


def fit_ablation(model: Transformer, batch: Batch, ablation: Ablation, batch_size: int) -> Ablation:
    """Fix the means of a mean ablation from the clean runs of `batch`."""
    if not ablation.needs_fit():
        return ablation
    sums, counts = 0.0, 0.0
    for part, weights in batches_of(batch, batch_size):
        sources = jax.vmap(lambda e: run(model, model.embed(e.clean), valid=e.valid).sources)(part)
        real = (part.valid & weights[:, None]).astype(jnp.float32)
        sums = sums + jnp.einsum("bntd,bt->ntd", sources.astype(jnp.float32), real)
        counts = counts + real.sum(0)
    return ablation.fit(sums, counts)

"""What a circuit recovers of the task.

A circuit is a boolean matrix `[n_sources, n_destinations]` over the graph's edges. Evaluating it runs the
model with every edge outside it fed its source's ablation value (the corrupted run's by default):
destination v reads Σ_u c_uv · out_u(this run) + (1 − c_uv) · ablation_u. Then

    faithfulness = (M(circuit) − M(ablated)) / (M(clean) − M(ablated)),

with M the task metric averaged over examples, M(clean) the full graph and M(ablated) the empty one. Many
circuits (a whole curve over K) are evaluated by one vmapped program. Curves and searches take the circuits
from `selection` (top-K, optionally pruned of dangling edges).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from mdm_circuits.circuits.ablations import Ablation
from mdm_circuits.circuits.graph import Graph
from mdm_circuits.circuits.interventions import EdgeWeights, Interventions, run
from mdm_circuits.circuits.runs import Progress, chunked, fit_ablation, over_batches, plain_runs, read_logits
from mdm_circuits.circuits.scores import Scores
from mdm_circuits.circuits.selection import CircuitError, prune, top_k
from mdm_circuits.model.transformer import Transformer
from mdm_circuits.tasks.batch import Batch
from mdm_circuits.tasks.metrics import Metric


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Mean metric of each evaluated circuit, of the full model (clean) and of the empty circuit (ablated)."""

    circuit_metric: np.ndarray
    clean_metric: float
    ablated_metric: float

    @property
    def faithfulness(self) -> np.ndarray:
        gap = self.clean_metric - self.ablated_metric
        if abs(gap) < 1e-8 * max(1.0, abs(self.clean_metric)):
            raise CircuitError(f"the clean ({self.clean_metric:.4g}) and fully ablated "
                               f"({self.ablated_metric:.4g}) metrics coincide; faithfulness is undefined")
        return (self.circuit_metric - self.ablated_metric) / gap


@functools.partial(jax.jit, static_argnames=("metric",))
def _circuit_metrics(model, batch, weights, partners, ablation, circuit_chunks, *, metric):
    """Σ_examples weight · metric for every circuit in `circuit_chunks[n, c, N, M]`, and both baselines' values."""
    _, ablated, clean_logits, clean_metric, corrupted_metric = plain_runs(model, metric, batch, ablation, partners)

    def one_circuit(circuit):
        def one_example(example, ablation_sources, logits):
            edges = EdgeWeights(circuit.astype(ablation_sources.dtype), ablation_sources)
            result = run(model, model.embed(example.clean), Interventions(edges=edges), valid=example.valid)
            return metric(read_logits(model, result.final, example), example, logits)

        return jax.vmap(one_example)(batch, ablated, clean_logits)

    values = jax.lax.map(jax.vmap(one_circuit), circuit_chunks).reshape(-1, batch.size)
    return values @ weights.astype(values.dtype), clean_metric, corrupted_metric


def evaluate(model: Transformer, batch: Batch, circuits: np.ndarray, metric: Metric, *,
             ablation: Ablation = Ablation(), batch_size: int = 32, chunk: int = 4,
             progress: Progress | None = None) -> Evaluation:
    """Mean metric of each circuit (`[N, M]` or a stack `[C, N, M]`), with the clean and ablated baselines."""
    graph = Graph.for_model(model.config)
    circuits = np.asarray(circuits, dtype=bool)
    circuits = circuits[None] if circuits.ndim == 2 else circuits
    if circuits.shape[1:] != graph.edge_mask.shape:
        raise CircuitError(f"circuits of shape {circuits.shape[1:]} do not fit this model's graph "
                           f"{graph.edge_mask.shape}")
    batch.check(model.config)
    ablation = fit_ablation(model, batch, ablation, batch_size)
    with_empty = np.concatenate([circuits & graph.edge_mask, np.zeros_like(circuits[:1])])
    chunks = chunked(with_empty, chunk)
    totals = over_batches(batch, batch_size, ablation, lambda part, weights, partners: _circuit_metrics(
        model, part, weights, partners, ablation, chunks, metric=metric), progress)
    means = totals.mean[: len(with_empty)]
    return Evaluation(means[:-1], totals.clean_metric, float(means[-1]))


@dataclasses.dataclass(frozen=True)
class Curve:
    ks: np.ndarray
    evaluation: Evaluation

    @property
    def faithfulness(self) -> np.ndarray:
        return self.evaluation.faithfulness


def faithfulness_curve(model: Transformer, batch: Batch, scores: Scores, metric: Metric, ks, *,
                       absolute: bool = True, prune_dangling: bool = False, **evaluate_options) -> Curve:
    """Faithfulness of the top-K circuit for every K in `ks`, all in one vmapped evaluation."""
    ks = np.asarray(ks, dtype=int)
    circuits = [top_k(scores.graph, scores.matrix, int(k), absolute=absolute) for k in ks]
    if prune_dangling:
        circuits = [prune(scores.graph, circuit) for circuit in circuits]
    return Curve(ks, evaluate(model, batch, np.stack(circuits), metric, **evaluate_options))


def smallest_faithful(model: Transformer, batch: Batch, scores: Scores, metric: Metric, tau: float, *,
                      absolute: bool = True, prune_dangling: bool = False, grid: int = 12,
                      **evaluate_options) -> tuple[int, np.ndarray, float]:
    """The smallest K whose top-K circuit reaches faithfulness `tau`: (K, circuit, its faithfulness).

    A geometric grid of K (one vmapped evaluation) brackets the first K that reaches tau; bisection then
    narrows the bracket. Faithfulness need not grow monotonically with K, so the answer is the smallest K
    found that reaches tau, not a guarantee that no smaller K does.
    """
    graph = scores.graph
    ks = np.unique(np.geomspace(1, graph.n_edges, grid).astype(int))
    curve = faithfulness_curve(model, batch, scores, metric, ks, absolute=absolute,
                               prune_dangling=prune_dangling, **evaluate_options)
    reached = np.nonzero(curve.faithfulness >= tau)[0]
    if not len(reached):
        raise CircuitError(f"no top-K circuit reaches faithfulness {tau} (best {curve.faithfulness.max():.3f} "
                           f"at K = {ks[curve.faithfulness.argmax()]})")
    high, value = int(ks[reached[0]]), float(curve.faithfulness[reached[0]])
    low = int(ks[reached[0] - 1]) if reached[0] > 0 else 0
    while high - low > 1:
        middle = (low + high) // 2
        point = faithfulness_curve(model, batch, scores, metric, [middle], absolute=absolute,
                                   prune_dangling=prune_dangling, **evaluate_options).faithfulness[0]
        if point >= tau:
            high, value = middle, float(point)
        else:
            low = middle
    circuit = top_k(graph, scores.matrix, high, absolute=absolute)
    return high, prune(graph, circuit) if prune_dangling else circuit, value

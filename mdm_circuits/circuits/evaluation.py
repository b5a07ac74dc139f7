"""What a circuit recovers of the task.

A circuit is a boolean matrix `[n_sources, n_destinations]` over the graph's edges. Evaluating it runs the
model with every edge outside it fed its source's ablation value (the corrupted run's by default):
destination v reads Σ_u c_uv · out_u(this run) + (1 − c_uv) · ablation_u. Then

    faithfulness = (M(circuit) − M(ablated)) / (M(clean) − M(ablated)),

with M the task metric averaged over examples, M(clean) the full graph and M(ablated) the empty one. Many
circuits (a whole curve over K) are evaluated by one vmapped program. Curves and searches take the circuits
from `selection` (top-K, optionally pruned of dangling edges). The same program can also return every
question's metric (`per_example`), for intervals over questions (`mdm_circuits.analysis.faithfulness`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mdm_circuits.circuits import normalised
from mdm_circuits.circuits.ablations import Ablation
from mdm_circuits.circuits.graph import Graph
from mdm_circuits.circuits.interventions import EdgeWeights, Interventions, run
from mdm_circuits.circuits.runs import (
    Progress,
    as_models,
    chunked,
    fit_ablation,
    for_every_model,
    model_batches,
    over_batches,
    plain_runs,
    read_logits,
)
from mdm_circuits.circuits.scores import Scores
from mdm_circuits.circuits.selection import prune, top_k
from mdm_circuits.errors import CircuitError
from mdm_circuits.model.transformer import ModelStack, Transformer
from mdm_circuits.tasks.batch import Batch
from mdm_circuits.tasks.metrics import Metric


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Mean metric of each evaluated circuit, of the full model (clean) and of the empty circuit (ablated), and
    the metric's direction. With `evaluate(..., per_example=True)`, also every question's values: `circuit_rows`
    `[S, N]`, `clean_rows` and `ablated_rows` `[N]`, whose means over N are the three means."""

    circuit_metric: np.ndarray
    clean_metric: float
    ablated_metric: float
    higher_is_better: bool = True
    circuit_rows: np.ndarray | None = None
    clean_rows: np.ndarray | None = None
    ablated_rows: np.ndarray | None = None

    @property
    def faithfulness(self) -> np.ndarray:
        """The plain ratio, for searches and the CLI. It is refused only where clean and ablated agree to 1e-8
        relative, which rounding can miss (a corrupted input equal to the clean one leaves a gap of ~1e-7);
        `faithfulness_where_defined` applies the comparison's floor and the metric's direction instead."""
        gap = self.clean_metric - self.ablated_metric
        if abs(gap) < 1e-8 * max(1.0, abs(self.clean_metric)):
            raise CircuitError(f"the clean ({self.clean_metric:.4g}) and fully ablated "
                               f"({self.ablated_metric:.4g}) metrics coincide; faithfulness is undefined")
        return (self.circuit_metric - self.ablated_metric) / gap

    @property
    def defined(self) -> bool:
        """Whether the clean − ablated gap carries a ratio: above the floor of `normalised`, in the metric's
        good direction."""
        return bool(normalised.defined(self.clean_metric, self.ablated_metric, self.higher_is_better))

    @property
    def faithfulness_where_defined(self) -> np.ndarray:
        """Faithfulness of each circuit, NaN (undefined) for all of them where the gap is not `defined`: the
        form a comparison reports (DESIGN section 6)."""
        return normalised.normalised(self.circuit_metric, self.clean_metric, self.ablated_metric,
                                     self.higher_is_better)


def _circuit_metrics(model, batch, weights, partners, ablation, circuit_chunks, *, metric, per_example):
    """Σ_examples weight · metric for every circuit in `circuit_chunks[n, c, N, M]`, both baselines' values, and
    with `per_example` every example's metric of every circuit followed by its clean metric, `[B, n·c + 1]`."""
    _, ablated, clean_logits, clean_metric, corrupted_metric = plain_runs(model, metric, batch, ablation, partners)

    def one_circuit(circuit):
        def one_example(example, ablation_sources, logits):
            edges = EdgeWeights(circuit.astype(ablation_sources.dtype), ablation_sources)
            result = run(model, model.embed(example.clean), Interventions(edges=edges), valid=example.valid)
            return metric(read_logits(model, result.final, example), example, logits)

        return jax.vmap(one_example)(batch, ablated, clean_logits)

    values = jax.lax.map(jax.vmap(one_circuit), circuit_chunks).reshape(-1, batch.size)
    rows = jnp.concatenate([values, clean_metric[None].astype(values.dtype)]).T if per_example else None
    return values @ weights.astype(values.dtype), rows, clean_metric, corrupted_metric


@functools.partial(jax.jit, static_argnames=("model_axis", "metric", "per_example"))
def _circuit_metrics_batch(models, batch, weights, partners, ablation, circuit_chunks, *, model_axis, metric,
                           per_example):
    """`_circuit_metrics` of every model, each with its own circuits (vmapped over a stack's model axis)."""
    program = functools.partial(_circuit_metrics, metric=metric, per_example=per_example)
    return for_every_model(program, model_axis, (0, None, 0, 0, 0))(
        models, batch, weights, partners, ablation, circuit_chunks)


def evaluate(models: Transformer | ModelStack, batch: Batch | Sequence[Batch], circuits, metric: Metric, *,
             ablation: Ablation = Ablation(), batch_size: int = 32, chunk: int = 4,
             progress: Progress | None = None, mesh: Mesh | None = None,
             per_example: bool = False) -> Evaluation | list[Evaluation]:
    """Mean metric of each circuit (`[N, M]` or several, `[C, N, M]`), with the clean and ablated baselines.

    For a `ModelStack`, `circuits` is one array for every model or a sequence with one per model (equally
    many circuits each), `batch` one batch or one per model; one `Evaluation` per model is returned. With a
    `mesh` (`mdm_circuits.sharding`), weights are split over its model axis and examples over its data axis.
    With `per_example`, every question's metric of every circuit and of both baselines comes back too
    (`Evaluation.circuit_rows`, `clean_rows`, `ablated_rows`), from the same program."""
    chosen = as_models(models, mesh)
    graph = Graph.for_model(chosen.configs[0])
    per_model = list(circuits) if chosen.stacked and not isinstance(circuits, np.ndarray) else [circuits] * chosen.size
    if len(per_model) != chosen.size:
        raise CircuitError(f"give one set of circuits for every model, or one per model ({chosen.size} models, "
                           f"{len(per_model)} sets)")
    per_model = [np.asarray(c, dtype=bool) for c in per_model]
    per_model = [c[None] if c.ndim == 2 else c for c in per_model]
    for c in per_model:
        if c.shape[1:] != graph.edge_mask.shape or c.shape[0] != per_model[0].shape[0]:
            raise CircuitError(f"circuits of shape {c.shape} do not fit this model's graph {graph.edge_mask.shape} "
                               f"(or the models have different numbers of circuits)")
    batch = model_batches(chosen, batch)
    ablation = fit_ablation(chosen, batch, ablation, batch_size)
    with_empty = np.stack([np.concatenate([c & graph.edge_mask, np.zeros_like(c[:1])]) for c in per_model])
    chunks = chunked(with_empty, chunk, axis=1)
    totals = over_batches(chosen, batch, batch_size, ablation, lambda part, weights, partners: _circuit_metrics_batch(
        chosen.tree, part, weights, partners, ablation, chunks, model_axis=chosen.axis, metric=metric,
        per_example=per_example), progress)
    n = with_empty.shape[1]
    return chosen.results([
        Evaluation(totals.mean[index, : n - 1], float(totals.clean_metric[index]), float(totals.mean[index, n - 1]),
                   metric.higher_is_better, **(_row_fields(totals.rows[index], n) if per_example else {}))
        for index in range(chosen.size)])


def _row_fields(rows: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """One model's per-example rows `[N, padded + 1]` as `Evaluation` fields: its circuits in the first n − 1
    columns, the empty circuit in column n − 1, then the chunks' padding copies, the clean metric last."""
    rows = np.asarray(rows, np.float64)
    return {"circuit_rows": rows[:, : n - 1].T, "ablated_rows": rows[:, n - 1], "clean_rows": rows[:, -1]}


@dataclasses.dataclass(frozen=True)
class Curve:
    ks: np.ndarray
    evaluation: Evaluation

    @property
    def faithfulness(self) -> np.ndarray:
        return self.evaluation.faithfulness


def faithfulness_curve(models: Transformer | ModelStack, batch: Batch | Sequence[Batch],
                       scores: Scores | Sequence[Scores], metric: Metric, ks, *, absolute: bool = True,
                       prune_dangling: bool = False, **evaluate_options) -> Curve | list[Curve]:
    """Faithfulness of the top-K circuit for every K in `ks`, all in one vmapped evaluation (for a
    `ModelStack`, `scores` holds one `Scores` per model, and every model's curve is one program)."""
    ks = np.asarray(ks, dtype=int)
    stacked = isinstance(models, ModelStack)
    per_model = list(scores) if stacked else [scores]

    def circuits_of(model_scores: Scores) -> np.ndarray:
        circuits = [top_k(model_scores.graph, model_scores.matrix, int(k), absolute=absolute) for k in ks]
        if prune_dangling:
            circuits = [prune(model_scores.graph, circuit) for circuit in circuits]
        return np.stack(circuits)

    circuits = [circuits_of(model_scores) for model_scores in per_model]
    evaluations = evaluate(models, batch, circuits if stacked else circuits[0], metric, **evaluate_options)
    return [Curve(ks, evaluation) for evaluation in evaluations] if stacked else Curve(ks, evaluations)


def smallest_faithful(model: Transformer, batch: Batch, scores: Scores, metric: Metric, tau: float, *,
                      absolute: bool = True, prune_dangling: bool = False, grid: int = 12,
                      **evaluate_options) -> tuple[int, np.ndarray, float]:
    """The smallest K whose top-K circuit reaches faithfulness `tau`: (K, circuit, its faithfulness), for
    one model (run it on each model of a stack in turn: they share one compiled program).

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

"""Exact patching: the model run with one edge, or one node (at one position or all), ablated at a time.

Each patch is an intervention array, so a whole sweep is `vmap` over patches (in chunks, via `lax.map`) inside
one jitted program per batch of examples: the ground truth for attribution on small graphs, and the
vmapped ablation study (every head at every position) on real ones. An effect is the change of the metric as
a loss, L(patched) − L(clean), averaged over examples: positive when ablating hurts the task.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mdm_circuits.circuits.ablations import Ablation
from mdm_circuits.circuits.graph import Graph, Node
from mdm_circuits.circuits.interventions import EdgeWeights, Interventions, NodePatch, run
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
from mdm_circuits.errors import CircuitError
from mdm_circuits.model.transformer import ModelStack, Transformer
from mdm_circuits.tasks.batch import Batch
from mdm_circuits.tasks.metrics import Metric


def _loss(model, metric, result, example, clean_logits):
    return metric.loss(read_logits(model, result.final, example), example, clean_logits)


def _effects(model, metric, batch, weights, clean_logits, clean_metric, one_patch, patch_chunks):
    """Σ_examples weight · (L patched − L clean), for every patch in `patch_chunks[n, c, ...]`."""
    losses = jax.lax.map(jax.vmap(one_patch), patch_chunks).reshape(-1, batch.size)
    clean_loss = jax.vmap(metric.loss)(clean_logits, batch, clean_logits)
    return (losses - clean_loss[None]) @ weights.astype(losses.dtype)


@functools.partial(jax.jit, static_argnames=("effects", "model_axis", "patches_axis", "metric"))
def _effects_batch(models, batch, weights, partners, ablation, patch_chunks, *, effects, model_axis, metric,
                   patches_axis=None):
    """One of the per-model effect programs below, for every model (vmapped over a stack's model axis); every
    model takes the same patches, or (`patches_axis` 0) its own."""
    return for_every_model(functools.partial(effects, metric=metric), model_axis, (0, None, 0, 0, patches_axis))(
        models, batch, weights, partners, ablation, patch_chunks)


def _edge_effects(model, batch, weights, partners, ablation, edge_chunks, *, metric):
    """Effects of ablating each edge of `edge_chunks[n, c, 2]` (source, destination) alone."""
    _, ablated, clean_logits, clean_metric, corrupted_metric = plain_runs(model, metric, batch, ablation, partners)
    graph = Graph.for_model(model.architecture)
    full = jnp.ones((graph.n_sources, graph.n_destinations))

    def one_edge(edge):
        weight = full.at[edge[0], edge[1]].set(0.0)

        def one_example(example, ablation_sources, logits):
            result = run(model, model.embed(example.clean),
                         Interventions(edges=EdgeWeights(weight, ablation_sources)), valid=example.valid)
            return _loss(model, metric, result, example, logits)

        return jax.vmap(one_example)(batch, ablated, clean_logits)

    effects = _effects(model, metric, batch, weights, clean_logits, clean_metric, one_edge, edge_chunks)
    return effects, None, clean_metric, corrupted_metric


def _edge_rows(graph: Graph, edges: Sequence[int] | np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The chosen edges' indices (`edges`: indices into the graph's edge order, every edge if None), sorted
    and without repeats, and their (source, destination) rows `[n, 2]`; indices outside the graph are refused."""
    rows = np.stack(graph.edge_indices, axis=1)
    if edges is None:
        return np.arange(graph.n_edges), rows
    chosen = np.asarray(edges)
    if chosen.ndim != 1 or not len(chosen) or not np.issubdtype(chosen.dtype, np.integer):
        raise CircuitError(f"edges must be a non-empty vector of integer edge indices, got shape {chosen.shape} "
                           f"of {chosen.dtype}")
    if chosen.min() < 0 or chosen.max() >= graph.n_edges:
        raise CircuitError(f"edge indices must lie in [0, {graph.n_edges}), the edges of this graph; got "
                           f"{chosen.min()} to {chosen.max()}")
    chosen = np.unique(chosen)
    return chosen, rows[chosen]


def exact_edges(models: Transformer | ModelStack, batch: Batch | Sequence[Batch], metric: Metric, *,
                edges: Sequence[int] | np.ndarray | None = None, ablation: Ablation = Ablation(),
                batch_size: int = 32, edge_chunk: int = 64, progress: Progress | None = None,
                mesh: Mesh | None = None) -> Scores | list[Scores]:
    """Exact edge scores: each edge ablated alone (its destination reads the ablation value from it).

    Cost: one forward per (patched edge, example), plus the clean and corrupted runs of each example; that is
    n_edges × n_examples forwards for the whole graph (1,997 × 32 = 64k for the default pair; ~10^6 edges at
    7B rule the whole graph out). `edges` (indices into the graph's edge order, e.g.
    `analysis.agreement.exact_sample`) patches only those: the returned `Scores` then holds NaN at every
    unmeasured edge, so `np.isfinite(scores.edges)` says which were measured, and a ranking or circuit taken
    from them without choosing the measured edges first is refused (`analysis.structure.ranking`,
    `circuits.selection`) rather than read as zeros. Each compiled step runs `edge_chunk` × `batch_size`
    patched forwards at once: on a CPU about 32 of them (e.g. 4 × 8) run ~2.5× faster than the defaults,
    whose arrays outgrow the caches. With a `mesh` (`mdm_circuits.sharding`), weights are split over its
    model axis and examples over its data axis."""
    chosen = as_models(models, mesh)
    batch = model_batches(chosen, batch)
    ablation = fit_ablation(chosen, batch, ablation, batch_size)
    graph = Graph.for_model(chosen.configs[0])
    measured, rows = _edge_rows(graph, edges)
    chunks = chunked(rows, edge_chunk)
    totals = over_batches(chosen, batch, batch_size, ablation, lambda part, weights, partners: _effects_batch(
        chosen.tree, part, weights, partners, ablation, chunks, effects=_edge_effects, model_axis=chosen.axis,
        metric=metric), progress)
    results = []
    for index in range(chosen.size):
        values = np.full(graph.n_edges, np.nan, np.float32)
        values[measured] = totals.mean[index, : len(rows)]
        results.append(Scores(graph, graph.edge_matrix(values), "exact", None, batch.clean.shape[1],
                              float(totals.clean_metric[index]), float(totals.corrupted_metric[index])))
    return chosen.results(results)


@dataclasses.dataclass(frozen=True)
class NodeEffects:
    """Effect of ablating each node: `values[i]` for `nodes[i]`, per position if `per_position`."""

    nodes: tuple[Node, ...]
    values: np.ndarray
    per_position: bool
    clean_metric: float

    def top(self, k: int) -> list[tuple[Node, float]]:
        """The k nodes whose ablation hurts most (summed over positions if per position)."""
        totals = self.values.sum(axis=1) if self.per_position else self.values
        order = np.argsort(-totals)[:k]
        return [(self.nodes[i], float(totals[i])) for i in order]


def _node_effects(model, batch, weights, partners, ablation, patch_chunks, *, metric):
    """Effects of each patch of `patch_chunks[n, c, 2]` = (source, position), position −1 meaning every
    position."""
    clean, ablated, clean_logits, clean_metric, corrupted_metric = plain_runs(model, metric, batch, ablation,
                                                                              partners)
    n_sources, length = clean.shape[1], clean.shape[2]

    def one_patch(patch):
        source, position = patch[0], patch[1]
        at = (jnp.arange(n_sources)[:, None] == source) & (
            (jnp.arange(length)[None, :] == position) | (position < 0))
        keep = jnp.where(at, 0.0, 1.0)

        def one_example(example, value, logits):
            result = run(model, model.embed(example.clean), Interventions(nodes=NodePatch(keep, value)),
                         valid=example.valid)
            return _loss(model, metric, result, example, logits)

        return jax.vmap(one_example)(batch, ablated, clean_logits)

    effects = _effects(model, metric, batch, weights, clean_logits, clean_metric, one_patch, patch_chunks)
    return effects, None, clean_metric, corrupted_metric


def patch_nodes(models: Transformer | ModelStack, batch: Batch | Sequence[Batch], metric: Metric, *,
                nodes: Sequence[Node] | None = None, per_position: bool = False, ablation: Ablation = Ablation(),
                batch_size: int = 32, chunk: int = 16, progress: Progress | None = None, mesh: Mesh | None = None
                ) -> NodeEffects | list[NodeEffects]:
    """Ablate each node (every source node by default) alone, at all positions or at each position in turn.

    A node's output is replaced by its ablation value (the corrupted run's by default) and everything
    downstream recomputes. With `per_position`, one patch per (node, position): every head at every
    position is one vmapped program. A `ModelStack` gives one `NodeEffects` per model, from one program.
    With a `mesh`, weights are split over its model axis and examples over its data axis.
    """
    chosen = as_models(models, mesh)
    batch = model_batches(chosen, batch)
    ablation = fit_ablation(chosen, batch, ablation, batch_size)
    graph = Graph.for_model(chosen.configs[0])
    nodes = tuple(graph.sources if nodes is None else nodes)
    positions = range(batch.clean.shape[2]) if per_position else (-1,)
    patches = np.array([(graph.source_index(node), t) for node in nodes for t in positions], np.int32)
    chunks = chunked(patches, chunk)
    totals = over_batches(chosen, batch, batch_size, ablation, lambda part, weights, partners: _effects_batch(
        chosen.tree, part, weights, partners, ablation, chunks, effects=_node_effects, model_axis=chosen.axis,
        metric=metric), progress)
    results = []
    for index in range(chosen.size):
        values = totals.mean[index, : len(patches)].reshape(len(nodes), -1)
        results.append(NodeEffects(nodes, values if per_position else values[:, 0], per_position,
                                   float(totals.clean_metric[index])))
    return chosen.results(results)


@dataclasses.dataclass(frozen=True)
class SetEffects:
    """The mean metric with each set of nodes ablated together (`metric[i]` for `sets[i]`), and the clean and
    corrupted runs' mean metrics, which normalise it: `retained` is (M(set) − M(corrupted)) / (M(clean) −
    M(corrupted)), 1 where ablating the set costs nothing, 0 where it costs as much as the corruption."""

    sets: np.ndarray
    metric: np.ndarray
    clean_metric: float
    corrupted_metric: float

    @property
    def retained(self) -> np.ndarray:
        return (self.metric - self.corrupted_metric) / (self.clean_metric - self.corrupted_metric)


def _set_effects(model, batch, weights, partners, ablation, set_chunks, *, metric):
    """Σ_examples weight · metric with every node of each set of `set_chunks[n, c, N]` ablated at every position."""
    _, ablated, clean_logits, clean_metric, corrupted_metric = plain_runs(model, metric, batch, ablation, partners)

    def one_set(chosen):
        keep = jnp.broadcast_to(jnp.where(chosen, 0.0, 1.0)[:, None], ablated.shape[1:3])

        def one_example(example, value, logits):
            result = run(model, model.embed(example.clean), Interventions(nodes=NodePatch(keep, value)),
                         valid=example.valid)
            return metric(read_logits(model, result.final, example), example, logits)

        return jax.vmap(one_example)(batch, ablated, clean_logits)

    values = jax.lax.map(jax.vmap(one_set), set_chunks).reshape(-1, batch.size)
    return values @ weights.astype(values.dtype), None, clean_metric, corrupted_metric


def ablate_node_sets(models: Transformer | ModelStack, batch: Batch | Sequence[Batch], metric: Metric, sets, *,
                     ablation: Ablation = Ablation("zero"), batch_size: int = 32, chunk: int = 8,
                     progress: Progress | None = None, mesh: Mesh | None = None) -> SetEffects | list[SetEffects]:
    """Ablate each set of nodes together (zeroed by default) at every position, and measure the task metric.

    `sets` is bool `[S, n_sources]` (one row per set, in source order), the same for every model of a stack
    or a sequence with one such array per model (equally many sets). All sets run as one vmapped program.
    With a `mesh`, weights are split over its model axis and examples over its data axis."""
    chosen = as_models(models, mesh)
    graph = Graph.for_model(chosen.configs[0])
    per_model = list(sets) if chosen.stacked and not isinstance(sets, np.ndarray) else [sets] * chosen.size
    per_model = [np.atleast_2d(np.asarray(s, dtype=bool)) for s in per_model]
    if len(per_model) != chosen.size or any(s.shape != (per_model[0].shape[0], graph.n_sources) for s in per_model):
        raise CircuitError(f"node sets must be bool [S, {graph.n_sources}] (one row per set, in source order), the "
                           f"same number for every model; got shapes {[s.shape for s in per_model]}")
    batch = model_batches(chosen, batch)
    ablation = fit_ablation(chosen, batch, ablation, batch_size)
    chunks = chunked(np.stack(per_model), chunk, axis=1)
    totals = over_batches(chosen, batch, batch_size, ablation, lambda part, weights, partners: _effects_batch(
        chosen.tree, part, weights, partners, ablation, chunks, effects=_set_effects, model_axis=chosen.axis,
        patches_axis=0, metric=metric), progress)
    n = per_model[0].shape[0]
    return chosen.results([SetEffects(per_model[index], totals.mean[index, :n], float(totals.clean_metric[index]),
                                      float(totals.corrupted_metric[index])) for index in range(chosen.size)])

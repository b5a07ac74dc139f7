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

from mdm_circuits.ablations import Ablation
from mdm_circuits.batch import Batch
from mdm_circuits.graph import Graph, Node
from mdm_circuits.interventions import EdgeWeights, Interventions, NodePatch, run
from mdm_circuits.metrics import Metric
from mdm_circuits.model import Transformer
from mdm_circuits.scoring import Progress, Scores, batches_of, check_metric, fit_ablation, plain_runs, read_logits


def _chunked(indices: np.ndarray, chunk: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Indices padded to a multiple of `chunk` (with copies of the first) and reshaped to [n_chunks, chunk]."""
    padded = np.concatenate([indices, np.repeat(indices[:1], -len(indices) % chunk, axis=0)])
    return jnp.asarray(padded.reshape(-1, chunk, *indices.shape[1:]))


def _loss(model, metric, result, example, clean_logits):
    return metric.loss(read_logits(model, result.final, example), example, clean_logits)


@functools.partial(jax.jit, static_argnames=("metric",))
def _edge_effects(model, batch, weights, ablation, edge_chunks, *, metric):
    """Σ_examples weight · (L with edge e ablated − L clean), for every edge in `edge_chunks[n, c, 2]`."""
    clean, corrupted, clean_logits, clean_metric, corrupted_metric = plain_runs(model, metric, batch)
    ablated = ablation.sources(clean, corrupted, batch)
    graph = Graph.for_model(model.config)
    full = jnp.ones((graph.n_sources, graph.n_destinations))

    def one_edge(edge):
        weight = full.at[edge[0], edge[1]].set(0.0)

        def one_example(example, ablation_sources, logits):
            edges = EdgeWeights(weight, ablation_sources)
            result = run(model, model.embed(example.clean), Interventions(edges=edges), valid=example.valid)
            return _loss(model, metric, result, example, logits)

        return jax.vmap(one_example)(batch, ablated, clean_logits)

    losses = jax.lax.map(jax.vmap(one_edge), edge_chunks).reshape(-1, batch.size)
    clean_loss = -clean_metric if metric.higher_is_better else clean_metric
    return (losses - clean_loss[None]) @ weights.astype(losses.dtype), clean_metric, corrupted_metric


def exact_edges(model: Transformer, batch: Batch, metric: Metric, *, ablation: Ablation = Ablation(),
                batch_size: int = 32, edge_chunk: int = 64, progress: Progress | None = None) -> Scores:
    """Exact edge scores: each edge ablated alone (its destination reads the ablation value from it)."""
    ablation = fit_ablation(model, batch, ablation, batch_size)
    graph = Graph.for_model(model.config)
    edges = np.stack(graph.edge_indices, axis=1)
    chunks = _chunked(edges, edge_chunk)
    total = np.zeros(len(edges), np.float64)
    clean_values, corrupted_values, done = [], [], 0
    for part, weights in batches_of(batch, batch_size):
        effects, clean_metric, corrupted_metric = _edge_effects(model, part, weights, ablation, chunks,
                                                               metric=metric)
        n = int(weights.sum())
        check_metric(np.asarray(clean_metric[:n]), "clean", done)
        total += np.asarray(effects[: len(edges)], np.float64)
        clean_values.append(np.asarray(clean_metric[:n]))
        corrupted_values.append(np.asarray(corrupted_metric[:n]))
        done += n
        if progress is not None:
            progress(done, batch.size)
    matrix = graph.edge_matrix((total / batch.size).astype(np.float32))
    return Scores(graph, matrix, "exact", None, batch.size, float(np.concatenate(clean_values).mean()),
                  float(np.concatenate(corrupted_values).mean()))


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


@functools.partial(jax.jit, static_argnames=("metric",))
def _node_effects(model, batch, weights, ablation, patch_chunks, *, metric):
    """Σ_examples weight · (L with the patch applied − L clean), for patches `[n, c, 2]` = (source, position),
    position −1 meaning every position."""
    clean, corrupted, clean_logits, clean_metric, _ = plain_runs(model, metric, batch)
    ablated = ablation.sources(clean, corrupted, batch)
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

    losses = jax.lax.map(jax.vmap(one_patch), patch_chunks).reshape(-1, batch.size)
    clean_loss = -clean_metric if metric.higher_is_better else clean_metric
    return (losses - clean_loss[None]) @ weights.astype(losses.dtype), clean_metric


def patch_nodes(model: Transformer, batch: Batch, metric: Metric, *, nodes: Sequence[Node] | None = None,
                per_position: bool = False, ablation: Ablation = Ablation(), batch_size: int = 32,
                chunk: int = 16, progress: Progress | None = None) -> NodeEffects:
    """Ablate each node (every source node by default) alone, at all positions or at each position in turn.

    A node's output is replaced by its ablation value (the corrupted run's by default) and everything
    downstream recomputes. With `per_position`, one patch per (node, position): every head at every
    position is one vmapped program.
    """
    batch.check(model.config)
    ablation = fit_ablation(model, batch, ablation, batch_size)
    graph = Graph.for_model(model.config)
    nodes = tuple(graph.sources if nodes is None else nodes)
    length = batch.clean.shape[1]
    positions = range(length) if per_position else (-1,)
    patches = np.array([(graph.source_index(node), t) for node in nodes for t in positions], np.int32)
    chunks = _chunked(patches, chunk)
    total, clean_values, done = np.zeros(len(patches)), [], 0
    for part, weights in batches_of(batch, batch_size):
        effects, clean_metric = _node_effects(model, part, weights, ablation, chunks, metric=metric)
        n = int(weights.sum())
        check_metric(np.asarray(clean_metric[:n]), "clean", done)
        total += np.asarray(effects[: len(patches)], np.float64)
        clean_values.append(np.asarray(clean_metric[:n]))
        done += n
        if progress is not None:
            progress(done, batch.size)
    values = (total / batch.size).reshape(len(nodes), -1)
    return NodeEffects(nodes, values if per_position else values[:, 0], per_position,
                       float(np.concatenate(clean_values).mean()))

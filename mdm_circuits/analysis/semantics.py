"""What important components write, and what their neurons respond to.

- Logit lens of a component (direct logit attribution): what its output, at the position where the answer
  is read, adds to the logits, with the final norm's statistic fixed at that position's residual stream (the
  contributions of all components then sum to the logits). Reported: the tokens it promotes most on average,
  the median rank of the answer among them, and its mean push towards the correct rather than the incorrect
  answer (in logits).
- Neuron attribution inside an MLP: EAP at the neuron level, Σ_positions (h(corrupted) − h(clean)) · ∂L/∂h
  at the clean run, averaged over examples (L the metric as a loss: positive where corrupting the neuron hurts),
  from a zero probe on the hidden activations. For the top neurons: the pool inputs (example, position) that
  activate them most, and the tokens their output direction (the neuron's row of W_down, through the final
  norm's scale and the unembedding) promotes.

The functions run one model over batches of examples (`[B, ...]`, a `tasks.batch.Batch`) as jitted programs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mdm_circuits.circuits.graph import Graph
from mdm_circuits.circuits.interventions import run
from mdm_circuits.model.sites import Capture, Edit, LayerEdit
from mdm_circuits.model.transformer import Transformer
from mdm_circuits.tasks.batch import Batch
from mdm_circuits.tasks.metrics import Metric


@dataclasses.dataclass(frozen=True)
class LogitLens:
    """For each component (source rows `rows`): the `top` tokens its output promotes most on average (and by
    how much, in logits), the median rank of the answer in its contribution (0 = promoted most), and its mean
    contribution to the correct-minus-incorrect logit."""

    rows: np.ndarray
    top_tokens: np.ndarray
    top_logits: np.ndarray
    answer_rank: np.ndarray
    answer_push: np.ndarray


@jax.jit
def _lens_batch(model, batch, rows):
    def one(example):
        result = run(model, model.embed(example.clean), valid=example.valid)
        read = example.read_positions(model)[0]
        contributions = model.direct_logits(result.sources[rows, read], result.final[read])       # [C, V]
        correct, incorrect = example.correct[0, 0], example.incorrect[0, 0]
        ranks = jnp.sum(contributions > contributions[:, correct][:, None], axis=1)
        return contributions, ranks, contributions[:, correct] - contributions[:, incorrect]

    contributions, ranks, push = jax.vmap(one)(batch)
    return contributions.sum(0), ranks, push


def logit_lens(model: Transformer, batch: Batch, rows: np.ndarray, *, top: int = 5, batch_size: int = 32) -> LogitLens:
    """The logit lens of the components `rows` (source rows) at each example's first answer position."""
    rows = np.asarray(rows, np.int32)
    total, ranks, push = 0.0, [], []
    for start in range(0, batch.size, batch_size):
        part = batch[start: start + batch_size]
        summed, part_ranks, part_push = _lens_batch(model, part, jnp.asarray(rows))
        total = total + np.asarray(summed, np.float64)
        ranks.append(np.asarray(part_ranks))
        push.append(np.asarray(part_push))
    mean = total / batch.size
    order = np.argsort(-mean, axis=1)[:, :top]
    return LogitLens(rows, order, np.take_along_axis(mean, order, axis=1),
                     np.median(np.concatenate(ranks), axis=0), np.concatenate(push).mean(axis=0))


def _hidden_and_gradient(model, metric, example, clean_logits, layer):
    """The clean run's hidden activations of MLP `layer` and ∂L/∂(them), and the corrupted run's."""
    arch = model.architecture
    length = example.clean.shape[0]

    def loss(probe):
        probes = jnp.zeros((arch.n_layers, length, arch.d_mlp), probe.dtype).at[layer].set(probe)
        trace = model.trace(model.embed(example.clean), valid=example.valid,
                            edit=Edit(layers=LayerEdit(hidden_probe=probes)), capture=Capture(mlp_hidden=True))
        logits = model.unembed(trace.final[example.read_positions(model)])
        return metric.loss(logits, example, clean_logits), trace.layers.mlp_hidden[layer]

    gradient, clean_hidden = jax.grad(loss, has_aux=True)(jnp.zeros((length, arch.d_mlp), jnp.float32))
    corrupted = model.trace(model.embed(example.corrupted), valid=example.valid, capture=Capture(mlp_hidden=True))
    return clean_hidden, corrupted.layers.mlp_hidden[layer], gradient


@functools.partial(jax.jit, static_argnames=("metric",))
def _neuron_batch(model, batch, layer, *, metric):
    def one(example):
        clean_logits = model.unembed(run(model, model.embed(example.clean), valid=example.valid,
                                         keep_sources=False).final[example.read_positions(model)])
        clean, corrupted, gradient = _hidden_and_gradient(model, metric, example, clean_logits, layer)
        real = example.valid[:, None].astype(gradient.dtype)
        score = jnp.sum((corrupted.astype(gradient.dtype) - clean.astype(gradient.dtype)) * gradient * real, axis=0)
        return score, jnp.where(example.valid[:, None], clean.astype(jnp.float32), -jnp.inf)

    return jax.vmap(one)(batch)


@dataclasses.dataclass(frozen=True)
class Neurons:
    """Neuron attribution in one MLP: `scores[F]` (mean over examples), and for the `top` neurons by |score|:
    their indices, the (example, position) pairs of the pool that activate each most, with the activations,
    and the tokens each one's output direction promotes most."""

    layer: int
    scores: np.ndarray
    top: np.ndarray
    top_inputs: np.ndarray
    top_activations: np.ndarray
    promoted_tokens: np.ndarray


def neurons(model: Transformer, batch: Batch, metric: Metric, layer: int, *, top: int = 5, inputs: int = 3,
            tokens: int = 5, batch_size: int = 16) -> Neurons:
    """Attribute MLP `layer`'s neurons, and describe its `top` neurons (see the module doc)."""
    scores, activations = [], []
    for start in range(0, batch.size, batch_size):
        part_scores, part_activations = _neuron_batch(model, batch[start: start + batch_size], jnp.asarray(layer),
                                                      metric=metric)
        scores.append(np.asarray(part_scores))
        activations.append(np.asarray(part_activations))
    scores = np.concatenate(scores).mean(axis=0)
    activations = np.concatenate(activations)                                            # [B, T, F]
    chosen = np.argsort(-np.abs(scores), kind="stable")[:top]
    flat = activations[:, :, chosen].reshape(-1, len(chosen))
    strongest = np.argsort(-flat, axis=0, kind="stable")[:inputs].T                       # [top, inputs]
    places = np.stack(np.unravel_index(strongest, activations.shape[:2]), axis=-1)        # [top, inputs, 2]
    directions = model.layer(layer).mlp.w_down[...][chosen]                               # [top, D]
    # The norm's statistic is a positive constant here: it scales each direction's logits, not their order.
    promoted = model.direct_logits(directions, jnp.ones(directions.shape[-1], directions.dtype))
    return Neurons(layer, scores, chosen, places, np.take_along_axis(flat, strongest.T, axis=0).T,
                   np.argsort(-np.asarray(promoted), axis=1)[:, :tokens])


def important_rows(graph: Graph, importance: np.ndarray, count: int) -> np.ndarray:
    """The `count` components (heads and MLPs; the input apart) of largest importance, in order."""
    rows = np.arange(1, graph.n_sources)
    return rows[np.argsort(-np.asarray(importance)[rows], kind="stable")][:count]

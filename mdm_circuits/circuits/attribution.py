"""Edge attribution on the EAP-IG graph: EAP, EAP-IG (on inputs or on activations) and exact patching.

    score(u → v) = Σ_positions Σ_d Δ_u · ∂L/∂(input of v),    Δ_u = out_u(ablation) − out_u(clean),

averaged over examples, where L is the metric as a loss (negated when higher is better). A positive score
means that corrupting the edge lowers the task performance. Node and edge order, names, sign and activation
definitions follow the PyTorch reference (hannamw/EAP-IG).

Scale: the reference's metric is a batch mean and it divides by the number of examples again, so its scores
are ours divided by its batch size: reference = ours / batch_size.

Each method is one jitted program per batch of examples (vmapped over examples); the dataset is processed
in batches of `batch_size` with running sums, so its size is not bounded by memory. Integrated-gradient
steps run inside the program (a `lax.scan` over chunks of `step_chunk` vmapped steps).
"""

from __future__ import annotations

import functools
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from mdm_circuits.circuits import gradients
from mdm_circuits.circuits.ablations import Ablation
from mdm_circuits.circuits.gradients import PerStep, Summed, step_parts
from mdm_circuits.circuits.graph import Graph, NodeKind
from mdm_circuits.circuits.interventions import Interventions, NodePatch, Probes, run
from mdm_circuits.circuits.patching import exact_edges
from mdm_circuits.circuits.runs import Progress, fit_ablation, over_batches, plain_runs, read_logits
from mdm_circuits.circuits.scores import AttributionError, Scores
from mdm_circuits.model.layers import accumulation_dtype
from mdm_circuits.model.transformer import Transformer
from mdm_circuits.tasks.batch import Batch
from mdm_circuits.tasks.metrics import Metric

Method = Literal["eap", "eap_ig_inputs", "eap_ig_activations", "exact"]
Aggregation = Literal["sum", "mean"]


# ---- per-example pieces (vmapped over the batch below) ----


def _gradient_parts(model, metric, embeddings, example, clean_logits, nodes=None):
    """One example's probe gradients at a run from `embeddings` (with `nodes` patched), split for `assemble`."""
    def loss(probes):
        result = run(model, embeddings, Interventions(nodes=nodes, probes=probes), valid=example.valid,
                     keep_sources=False)
        return metric.loss(read_logits(model, result.final, example), example, clean_logits), result

    zeros = Probes.zeros(model.config, embeddings.shape[0], accumulation_dtype(model.embedding.dtype))
    probe_gradients, result = jax.grad(loss, has_aux=True)(zeros)
    return step_parts(model, result, probe_gradients)


def _weighted_differences(ablated, clean, batch, weights, aggregation):
    """Δ = ablated − clean at real positions, weighted per example (and by 1/length for 'mean')."""
    wide = accumulation_dtype(clean.dtype)
    scale = (weights[:, None] & batch.valid).astype(wide)
    if aggregation == "mean":
        scale = scale / batch.valid.sum(axis=1, keepdims=True).astype(wide)
    return (ablated.astype(wide) - clean.astype(wide)) * scale[:, None, :, None]


def _integrate(parts_at: Callable[[Array], tuple[Summed, PerStep]], steps: int,
               step_chunk: int) -> tuple[Summed, PerStep]:
    """The gradient parts of a batch over α_k = k/steps, k = 0..steps−1 (a left Riemann sum): summed parts
    added up, per-step parts kept `[B, steps, ...]`. `parts_at(α[C])` gives the parts at C values of α,
    shaped [C, B, ...]; a `lax.scan` runs over chunks of `step_chunk` steps."""
    alphas = (jnp.arange(steps, dtype=jnp.float32) / steps).reshape(-1, step_chunk)

    def accumulate(total, chunk):
        summed, per_step = parts_at(chunk)
        return jax.tree.map(lambda t, s: t + s.sum(0), total, summed), per_step

    first = jax.eval_shape(parts_at, alphas[0])[0]
    zeros = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape[1:], leaf.dtype), first)
    total, per_step = jax.lax.scan(accumulate, zeros, alphas)
    # [chunks, chunk, B, ...] -> [B, steps, ...]
    return total, jax.tree.map(lambda leaf: jnp.moveaxis(leaf.reshape(steps, *leaf.shape[2:]), 0, 1), per_step)


def _batched_points(parts, arguments_at: Callable, alphas: Float[Array, " C"]):
    """`parts` at every α of `alphas`, where `arguments_at(α)` gives its per-example arguments (leading batch
    axis B): the C points go through `parts` as one batch of C·B runs, outputs shaped [C, B, ...]."""
    arguments = jax.vmap(arguments_at)(alphas)
    flat = jax.tree.map(lambda leaf: leaf.reshape(-1, *leaf.shape[2:]), arguments)
    return jax.tree.map(lambda leaf: leaf.reshape(alphas.shape[0], -1, *leaf.shape[1:]), parts(*flat))


def _scores(model, delta: Float[Array, "B R T D"], summed: Summed, per_step: PerStep,
            steps: int) -> Float[Array, "R M"]:
    """The score matrix rows of the sources in `delta` (Δ laid out [B, R, T, D]), in destination order."""
    heads, mlps, logits = gradients.scores(model, jnp.moveaxis(delta, 1, 0), summed, per_step, steps)
    per_layer = jnp.concatenate([heads.reshape(*heads.shape[:2], -1), mlps[..., None]], axis=-1)
    return jnp.concatenate([per_layer.reshape(delta.shape[1], -1), logits[:, None]], axis=1)


@functools.partial(jax.jit, static_argnames=("metric", "method", "steps", "step_chunk", "aggregation"))
def _attribute_batch(model, batch, weights, partners, ablation, *, metric, method, steps, step_chunk,
                     aggregation):
    """Summed (weighted) edge scores of one batch, and the clean and corrupted metric values."""
    clean, ablated, clean_logits, clean_metric, corrupted_metric = plain_runs(model, metric, batch, ablation,
                                                                              partners)
    delta = _weighted_differences(ablated, clean, batch, weights, aggregation)
    clean_embeddings = jax.vmap(model.embed)(batch.clean)
    parts = jax.vmap(functools.partial(_gradient_parts, model, metric))
    if method == "eap":
        summed, per_step = parts(clean_embeddings, batch, clean_logits)
        scores = _scores(model, delta, summed, jax.tree.map(lambda leaf: leaf[:, None], per_step), 1)
    elif method == "eap_ig_inputs":
        corrupted_embeddings = jax.vmap(model.embed)(batch.corrupted)

        def arguments_at(alpha):
            alpha = alpha.astype(clean_embeddings.dtype)
            embeddings = corrupted_embeddings + alpha * (clean_embeddings - corrupted_embeddings)
            return embeddings, batch, clean_logits

        summed, per_step = _integrate(functools.partial(_batched_points, parts, arguments_at), steps, step_chunk)
        scores = _scores(model, delta, summed, per_step, steps)
    else:
        scores = _activation_integrals(model, metric, batch, clean, ablated, clean_logits, clean_embeddings,
                                       delta, steps, step_chunk)
    return scores, clean_metric, corrupted_metric


def _activation_integrals(model, metric, batch, clean, ablated, clean_logits, clean_embeddings, delta,
                          steps, step_chunk):
    """EAP-IG on activations: for each node group (the input, one layer's heads, one MLP), its outputs move
    from their ablation values to clean, α = k/m for k = 0..m−1, while everything else runs clean; the
    gradients of those runs, averaged over the steps, score the edges leaving that group. The reference
    instead takes α = k/m for k = 1..m and pools the gradients of every group's runs for every edge."""
    graph = Graph.for_model(model.config)
    h = model.config.n_heads
    groups, members = [], []
    for node in graph.sources:
        if node.kind == NodeKind.HEAD and node.head > 0:
            continue
        first = graph.source_index(node)
        size = h if node.kind == NodeKind.HEAD else 1
        groups.append([first + i if i < size else first for i in range(h)])
        members.append([i < size for i in range(h)])
    groups, members = jnp.asarray(groups), jnp.asarray(members)
    parts = jax.vmap(functools.partial(_gradient_parts, model, metric))

    def group_scores(group):
        rows, member = group
        keep = jnp.ones(graph.n_sources).at[rows].min(jnp.where(member, 0.0, 1.0))
        keep = jnp.broadcast_to(keep[None, :, None], clean.shape[:3])

        def arguments_at(alpha):
            patch = NodePatch(keep, ablated + alpha.astype(clean.dtype) * (clean - ablated))
            return clean_embeddings, batch, clean_logits, patch

        summed, per_step = _integrate(functools.partial(_batched_points, parts, arguments_at), steps, step_chunk)
        in_group = member.astype(delta.dtype)[None, :, None, None]
        return _scores(model, delta[:, rows] * in_group, summed, per_step, steps)

    per_group = jax.lax.map(group_scores, (groups, members))
    return jnp.zeros((graph.n_sources, graph.n_destinations)).at[groups].add(
        per_group * members[..., None].astype(per_group.dtype))


def attribute(
    model: Transformer,
    batch: Batch,
    metric: Metric,
    *,
    method: Method = "eap_ig_inputs",
    steps: int = 5,
    aggregation: Aggregation = "sum",
    ablation: Ablation = Ablation(),
    batch_size: int = 32,
    step_chunk: int = 1,
    progress: Progress | None = None,
) -> Scores:
    """Score every edge of the model's EAP-IG graph for a task.

    Args:
      model: the model; its config says where answers are read (logit shift) and its attention.
      batch: clean/corrupted pairs (`batch.collate`); both runs share positions, padding and answers.
      metric: the task metric (see `metrics`); differentiated as a loss.
      method: "eap"; "eap_ig_inputs" (the default: input embeddings interpolated from corrupted to clean);
        "eap_ig_activations" (each node group's outputs interpolated from their ablation values); "exact"
        (patch one edge at a time; see `patching.exact_edges`, for small graphs).
      steps: integration steps m (α = k/m, k = 0..m−1), as the reference's examples use 5.
      aggregation: "sum" over positions (the reference's default) or "mean" over each example's positions.
      ablation: what Δ is measured against: the corrupted run (patching) by default; "zero", "mean",
        "mean_positional" or "resample". EAP-IG on inputs interpolates towards the corrupted input, so it
        takes the corrupted run only.
      batch_size: examples per compiled program; scores are running sums over batches.
      step_chunk: integration steps batched together (must divide `steps`); more is faster and uses more memory.
      progress: called with (examples done, examples in all).
    """
    batch.check(model.config)
    if method == "exact":
        return exact_edges(model, batch, metric, ablation=ablation, batch_size=batch_size, progress=progress)
    if method not in ("eap", "eap_ig_inputs", "eap_ig_activations"):
        raise AttributionError(f"unknown method {method!r}; use eap, eap_ig_inputs, eap_ig_activations or exact")
    if method == "eap_ig_inputs" and ablation.kind != "corrupted":
        raise AttributionError("eap_ig_inputs interpolates to the corrupted input; use method='eap' for "
                               f"{ablation.kind} ablation")
    if steps < 1 or step_chunk < 1 or steps % step_chunk:
        raise AttributionError(f"steps ({steps}) and step_chunk ({step_chunk}) must be positive, steps a multiple "
                               f"of step_chunk")
    if aggregation not in ("sum", "mean"):
        raise AttributionError(f"aggregation must be 'sum' or 'mean', got {aggregation!r}")
    ablation = fit_ablation(model, batch, ablation, batch_size)
    program = functools.partial(_attribute_batch, model, metric=metric, method=method, steps=steps,
                                step_chunk=step_chunk, aggregation=aggregation)
    totals = over_batches(batch, batch_size, ablation,
                          lambda part, weights, partners: program(part, weights, partners, ablation), progress)
    graph = Graph.for_model(model.config)
    matrix = np.where(graph.edge_mask, totals.mean, 0).astype(np.float32)
    if not np.isfinite(matrix).all():
        raise AttributionError("edge scores are not finite; the metric's gradient overflowed or is undefined")
    return Scores(graph, matrix, method, None if method == "eap" else steps, batch.size, totals.clean_metric,
                  totals.corrupted_metric)

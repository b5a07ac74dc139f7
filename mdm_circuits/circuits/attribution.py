"""Edge attribution on the EAP-IG graph: EAP, EAP-IG (on inputs or on activations) and exact patching.

    score(u → v) = Σ_positions Σ_d Δ_u · ∂L/∂(input of v),    Δ_u = out_u(ablation) − out_u(clean),

averaged over examples, where L is the metric as a loss (negated when higher is better). A positive score
means that corrupting the edge lowers the task performance. Node and edge order, names, sign and activation
definitions follow the PyTorch reference (hannamw/EAP-IG).

Scale: the reference's metric is a batch mean and it divides by the number of examples again, so its scores
are ours divided by its batch size: reference = ours / batch_size.

Each method is one jitted program per batch of examples (vmapped over examples, and over the models of a
`ModelStack`); the dataset is processed in batches of `batch_size` with running sums, so its size is not
bounded by memory. Integrated-gradient steps run inside the program (a `lax.scan` over chunks of
`step_chunk` vmapped steps).

Within a batch, the largest array is Δ itself, one `[B, T, D]` per source (the reference holds it too),
stored in the activations' dtype; `gradients.scores` contracts it with a few layers' gradients at a time. For
EAP and EAP-IG on inputs it is formed after the gradient runs, so the two are never held together, and,
against the corrupted run, straight from the heads' z (`_patching_differences`), so neither run's node
outputs exist. EAP-IG on activations patches node outputs, so it holds both runs' and Δ throughout.

Per-example scores (`per_example=True`) come from the same program: the score product is then taken per
example rather than summed over the batch, and each example's edge scores are kept, `[N, n_edges]` per
model (N examples). That is N · n_edges numbers: 500 examples of a 7B graph (~10^6 edges) take 2 GB in
float32, so `per_example_dtype` can store them in bfloat16 (sums are still taken in float32).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Float

from mdm_circuits.circuits import gradients, plans
from mdm_circuits.circuits.ablations import Ablation
from mdm_circuits.circuits.gradients import PerStep, Summed, step_parts
from mdm_circuits.circuits.graph import Graph
from mdm_circuits.circuits.interventions import Interventions, NodePatch, Probes, run
from mdm_circuits.circuits.patching import exact_edges
from mdm_circuits.circuits.runs import (
    Progress,
    answer_logits,
    as_models,
    fit_ablation,
    for_every_model,
    model_batches,
    over_batches,
    plain_runs,
    read_logits,
)
from mdm_circuits.circuits.scores import Scores
from mdm_circuits.errors import AttributionError
from mdm_circuits.model.layers import accumulation_dtype
from mdm_circuits.model.sites import Capture
from mdm_circuits.model.transformer import ModelStack, Transformer
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

    zeros = Probes.zeros(model.architecture, embeddings.shape[0], accumulation_dtype(model.embedding.dtype))
    probe_gradients, result = jax.grad(loss, has_aux=True)(zeros)
    return step_parts(model, result, probe_gradients)


def _weights(batch, weights, aggregation, dtype) -> Float[Array, "B T"]:
    """How much each position of each example counts, in `dtype`: 1 at real positions of real examples
    (1/length for 'mean'), 0 elsewhere."""
    scale = (weights[:, None] & batch.valid).astype(dtype)
    if aggregation == "mean":
        scale = scale / batch.valid.sum(axis=1, keepdims=True).astype(dtype)
    return scale


def _weighted_differences(ablated, clean, batch, weights, aggregation) -> Float[Array, "N B T D"]:
    """Δ = ablated − clean, weighted (`_weights`), taken in the accumulation dtype and stored in the
    activations' dtype, sources first (the score products contract whole rows)."""
    scale = _weights(batch, weights, aggregation, accumulation_dtype(clean.dtype))
    difference = (ablated.astype(scale.dtype) - clean.astype(scale.dtype)) * scale[:, None, :, None]
    return jnp.moveaxis(difference, 1, 0).astype(clean.dtype)


class _Differences(NamedTuple):
    """Weighted Δ of every source, by kind, in the activations' dtype: what `gradients.scores` contracts."""

    input: Float[Array, "B T D"]
    heads: Float[Array, "L H B T D"]
    mlps: Float[Array, "L B T D"]

    @classmethod
    def of_rows(cls, graph: Graph, rows: Float[Array, "N B T D"]) -> _Differences:
        """Δ laid out by source (`_weighted_differences`), split by kind."""
        first, per_layer = graph.layer_rows(rows)
        return cls(first, per_layer[:, :-1], per_layer[:, -1])


def _source_rows(graph: Graph, input, heads, mlps):
    """Results for each kind of source (`gradients.scores` of `_Differences`, `[..., M]` each) as rows in
    source order."""
    return graph.join_rows(input, jnp.concatenate([heads, mlps[:, None]], axis=1))


def _patching_differences(model, metric, batch, weights, aggregation, dtype=None):
    """Δ against the corrupted run, from the heads' z rather than their outputs: Δ_head = (z_corrupted −
    z_clean) W_O, formed once in its final layout, so that neither run's [N, T, D] node outputs exist; stored
    in `dtype` (default: the activations'). Also the clean and corrupted metric values."""
    capture = Capture(head_z=True, mlp_out=True)

    def one(embeddings, example):
        result = run(model, embeddings, valid=example.valid, keep_sources=False, capture=capture)
        return result.layers.head_z, result.layers.mlp_out, read_logits(model, result.final, example)

    embeddings = [jax.vmap(model.embed)(tokens) for tokens in (batch.clean, batch.corrupted)]
    (clean_z, clean_mlps, clean_logits), (corrupted_z, corrupted_mlps, logits) = (
        jax.vmap(one)(e, batch) for e in embeddings)
    narrow = embeddings[0].dtype if dtype is None else dtype
    wide = accumulation_dtype(narrow)
    scale = _weights(batch, weights, aggregation, wide)

    z_delta = (corrupted_z.astype(wide) - clean_z.astype(wide)) * scale[:, None, :, None, None]  # [B, L, T, H, E]
    heads = jnp.einsum("blthe,lhed->lhbtd", z_delta.astype(narrow), model.blocks.attn.w_o[...],
                       preferred_element_type=wide).astype(narrow)
    mlps = (corrupted_mlps.astype(wide) - clean_mlps.astype(wide)) * scale[:, None, :, None]       # [B, L, T, D]
    first = (embeddings[1].astype(wide) - embeddings[0].astype(wide)) * scale[..., None]
    differences = _Differences(first.astype(narrow), heads, jnp.moveaxis(mlps, 1, 0).astype(narrow))
    measure = jax.vmap(metric)
    return differences, measure(clean_logits, batch, clean_logits), measure(logits, batch, clean_logits)


def _integrate(parts_at: Callable[[Array], tuple[Summed, PerStep]], steps: int,
               step_chunk: int) -> tuple[Summed, PerStep]:
    """The gradient parts of a batch over α_k = k/steps, k = 0..steps−1 (a left Riemann sum): summed parts
    added up, per-step parts kept `[steps, B, ...]`. `parts_at(α[C])` gives the parts at C values of α,
    shaped [C, B, ...]; a `lax.scan` runs over chunks of `step_chunk` steps."""
    alphas = (jnp.arange(steps, dtype=jnp.float32) / steps).reshape(-1, step_chunk)

    def accumulate(total, chunk):
        summed, per_step = parts_at(chunk)
        return jax.tree.map(lambda t, s: t + s.sum(0), total, summed), per_step

    first = jax.eval_shape(parts_at, alphas[0])[0]
    zeros = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape[1:], leaf.dtype), first)
    total, per_step = jax.lax.scan(accumulate, zeros, alphas)
    return total, jax.tree.map(lambda leaf: leaf.reshape(steps, *leaf.shape[2:]), per_step)


def _batched_points(parts, arguments_at: Callable, alphas: Float[Array, " C"]):
    """`parts` at every α of `alphas`, where `arguments_at(α)` gives its per-example arguments (leading batch
    axis B): the C points go through `parts` as one batch of C·B runs, outputs shaped [C, B, ...]."""
    arguments = jax.vmap(arguments_at)(alphas)
    flat = jax.tree.map(lambda leaf: leaf.reshape(-1, *leaf.shape[2:]), arguments)
    return jax.tree.map(lambda leaf: leaf.reshape(alphas.shape[0], -1, *leaf.shape[1:]), parts(*flat))


def _attribute_one(model, batch, weights, partners, ablation, *, metric, method, steps, step_chunk, aggregation,
                   per_example, rows_dtype, mesh):
    """One model's edge scores of one batch: their weighted sum, each example's scores per edge (with
    `per_example`, else None), and the clean and corrupted metric values."""
    graph = Graph.for_model(model.architecture)
    clean_embeddings = jax.vmap(model.embed)(batch.clean)
    if method == "eap_ig_activations":
        clean, ablated, clean_logits, clean_metric, corrupted_metric = plain_runs(model, metric, batch, ablation,
                                                                                  partners)
        delta = _weighted_differences(ablated, clean, batch, weights, aggregation)
        scores = _activation_integrals(model, metric, batch, clean, ablated, clean_logits, clean_embeddings,
                                       delta, steps, step_chunk, per_example)
    else:
        clean_logits = jax.vmap(functools.partial(answer_logits, model))(clean_embeddings, batch)
        parts = jax.vmap(functools.partial(_gradient_parts, model, metric))
        if method == "eap":
            summed, per_step = parts(clean_embeddings, batch, clean_logits)
            per_step = jax.tree.map(lambda leaf: leaf[None], per_step)
        else:
            corrupted_embeddings = jax.vmap(model.embed)(batch.corrupted)

            def arguments_at(alpha):
                alpha = alpha.astype(clean_embeddings.dtype)
                embeddings = corrupted_embeddings + alpha * (clean_embeddings - corrupted_embeddings)
                return embeddings, batch, clean_logits

            summed, per_step = _integrate(functools.partial(_batched_points, parts, arguments_at), steps,
                                          step_chunk)
        # Δ is formed only now, so that it is not held through the gradient runs (the price is a second clean
        # forward).
        summed, per_step, batch, partners = jax.lax.optimization_barrier((summed, per_step, batch, partners))
        if ablation.kind == "corrupted":
            differences, clean_metric, corrupted_metric = _patching_differences(model, metric, batch, weights,
                                                                                aggregation)
        else:
            clean, ablated, _, clean_metric, corrupted_metric = plain_runs(model, metric, batch, ablation, partners)
            differences = _Differences.of_rows(graph, _weighted_differences(ablated, clean, batch, weights,
                                                                            aggregation))
        per_kind = gradients.scores(model, differences, summed, per_step, 1 if method == "eap" else steps,
                                    per_example, mesh)
        join = functools.partial(_source_rows, graph)
        scores = jax.vmap(join)(*per_kind) if per_example else join(*per_kind)
    if not per_example:
        return scores, None, clean_metric, corrupted_metric
    rows = scores[:, graph.edge_indices[0], graph.edge_indices[1]].astype(rows_dtype)
    return scores.sum(0), rows, clean_metric, corrupted_metric


@functools.partial(jax.jit, static_argnames=("model_axis", "metric", "method", "steps", "step_chunk",
                                             "aggregation", "per_example", "rows_dtype", "mesh"))
def _attribute_batch(models, batch, weights, partners, ablation, *, model_axis, **options):
    """`_attribute_one` for every model (vmapped over the model axis of a stack, `model_axis` 0); `mesh` (or
    None) is the mesh the inputs are placed on, where the score product lays out its operands."""
    return for_every_model(functools.partial(_attribute_one, **options), model_axis, (0, None, 0, 0))(
        models, batch, weights, partners, ablation)


def _activation_integrals(model, metric, batch, clean, ablated, clean_logits, clean_embeddings, delta,
                          steps, step_chunk, per_example):
    """EAP-IG on activations: for each node group (the input, one layer's heads, one MLP), its outputs move
    from their ablation values to clean, α = k/m for k = 0..m−1, while everything else runs clean; the
    gradients of those runs, averaged over the steps, score the edges leaving that group. The reference
    instead takes α = k/m for k = 1..m and pools the gradients of every group's runs for every edge."""
    graph = Graph.for_model(model.architecture)
    h = graph.n_heads
    # Groups padded to H rows: the input and each MLP fill row 0 (repeated), each layer's heads all H.
    rows = [[0] * h]
    for layer in range(graph.n_layers):
        rows += [graph.head_rows(layer).tolist(), [graph.mlp_row(layer)] * h]
    groups = jnp.asarray(rows)
    members = jnp.asarray([[i == 0 or len(set(group)) > 1 for i in range(h)] for group in rows])
    parts = jax.vmap(functools.partial(_gradient_parts, model, metric))

    def group_scores(group):
        rows, member = group
        keep = jnp.ones(graph.n_sources).at[rows].min(jnp.where(member, 0.0, 1.0))
        keep = jnp.broadcast_to(keep[None, :, None], clean.shape[:3])

        def arguments_at(alpha):
            patch = NodePatch(keep, ablated + alpha.astype(clean.dtype) * (clean - ablated))
            return clean_embeddings, batch, clean_logits, patch

        summed, per_step = _integrate(functools.partial(_batched_points, parts, arguments_at), steps, step_chunk)
        in_group = member.astype(delta.dtype)[:, None, None, None]
        return gradients.scores(model, [delta[rows] * in_group], summed, per_step, steps, per_example)[0]

    per_group = jax.lax.map(group_scores, (groups, members))                 # [G, (B,) H, M]
    per_group = per_group * members.astype(per_group.dtype).reshape(
        members.shape[0], *([1] if per_example else []), h, 1)
    if not per_example:
        return jnp.zeros((graph.n_sources, graph.n_destinations)).at[groups].add(per_group)
    return jnp.zeros((delta.shape[1], graph.n_sources, graph.n_destinations)).at[:, groups].add(
        jnp.moveaxis(per_group, 1, 0))


def _run_key(models, batch, settings: tuple) -> str:
    """What a saved partial run must match: the settings, the examples, and a sample of every parameter."""
    digest = hashlib.sha256(repr((settings, models.configs)).encode())
    for leaf in jax.tree.leaves(batch) + jax.tree.leaves(models.tree):
        digest.update(np.asarray(jnp.ravel(leaf)[:4096]).tobytes())
    return digest.hexdigest()


def attribute(
    models: Transformer | ModelStack,
    batch: Batch | Sequence[Batch],
    metric: Metric,
    *,
    method: Method = "eap_ig_inputs",
    steps: int = 5,
    aggregation: Aggregation = "sum",
    ablation: Ablation = Ablation(),
    batch_size: int | None = None,
    step_chunk: int | None = None,
    per_example: bool = False,
    per_example_dtype: jnp.dtype = jnp.float32,
    progress: Progress | None = None,
    resume: str | Path | None = None,
    mesh: Mesh | None = None,
) -> Scores | list[Scores]:
    """Score every edge of the model's EAP-IG graph for a task.

    Args:
      models: the model (its config says where answers are read and its attention), or a `ModelStack`:
        every model of the stack is scored by one traced program, and a list of `Scores` is returned.
      batch: clean/corrupted pairs (`tasks.batch.collate`); both runs share positions, padding and answers.
        For a stack, one batch for every model or one per model (the same questions, each in its model's
        view).
      metric: the task metric (see `tasks.metrics`); differentiated as a loss.
      method: "eap"; "eap_ig_inputs" (the default: input embeddings interpolated from corrupted to clean);
        "eap_ig_activations" (each node group's outputs interpolated from their ablation values); "exact"
        (patch one edge at a time; see `patching.exact_edges`, for small graphs).
      steps: integration steps m (α = k/m, k = 0..m−1), as the reference's examples use 5.
      aggregation: "sum" over positions (the reference's default) or "mean" over each example's positions.
      ablation: what Δ is measured against: the corrupted run (patching) by default; "zero", "mean",
        "mean_positional" or "resample". EAP-IG on inputs interpolates towards the corrupted input, so it
        takes the corrupted run only.
      batch_size: examples per compiled program; scores are running sums over batches. By default the
        largest that fits the device (`circuits.plans.attribution_batch`: candidate programs are compiled with
        abstract weights, seconds each at 7B), or 32 where the device does not report its memory (a CPU).
      step_chunk: integration steps batched together (must divide `steps`); more is faster and uses more memory.
        By default the largest that fits with the chosen batch (1 with a batch you name).
      per_example: also keep every example's scores (`Scores.per_example`, `[N, n_edges]`), from the same
        program; their mean over examples is `Scores.matrix` (see the module doc for their memory).
      per_example_dtype: the dtype the per-example scores are stored in (bfloat16 halves their memory).
      progress: called with (examples done, examples in all).
      resume: a file where the running sums are saved after every batch: a run killed part way continues
        from it (if the models, examples and settings are the same) and ends with the same scores.
      mesh: a device mesh (`mdm_circuits.sharding.make_mesh`): the weights are split over its model axis
        (tensor parallel), every slice of examples over its data axis (`batch_size` a multiple of it), and
        the running sums stay on the devices until the end.
    """
    if method == "exact":
        batch_size = plans.DEFAULT_BATCH if batch_size is None else batch_size
        if per_example:
            raise AttributionError("per-example scores come from the gradient methods (eap, eap_ig_inputs, "
                                   "eap_ig_activations); exact patching gives the mean over examples only")
        return exact_edges(models, batch, metric, ablation=ablation, batch_size=batch_size, progress=progress,
                           mesh=mesh)
    if resume is not None and jax.process_count() > 1:
        raise AttributionError("resume= is not supported across processes (jax.distributed): every process would "
                               "write the file; run without it")
    chosen = as_models(models, mesh)
    batch = model_batches(chosen, batch)
    if method not in ("eap", "eap_ig_inputs", "eap_ig_activations"):
        raise AttributionError(f"unknown method {method!r}; use eap, eap_ig_inputs, eap_ig_activations or exact")
    if method == "eap_ig_inputs" and ablation.kind != "corrupted":
        raise AttributionError("eap_ig_inputs interpolates to the corrupted input; use method='eap' for "
                               f"{ablation.kind} ablation")
    if aggregation not in ("sum", "mean"):
        raise AttributionError(f"aggregation must be 'sum' or 'mean', got {aggregation!r}")
    if steps < 1 or (step_chunk is not None and (step_chunk < 1 or steps % step_chunk)):
        raise AttributionError(f"steps ({steps}) and step_chunk ({step_chunk}) must be positive, steps a multiple "
                               f"of step_chunk")
    if batch_size is None:
        batch_size, fitted_chunk = plans.attribution_batch(
            chosen.configs[0], n_examples=batch.clean.shape[1], seq_len=batch.clean.shape[2],
            dtype=chosen.tree.embedding.dtype, n_models=chosen.size, mesh=mesh, method=method, steps=steps,
            ablation=ablation.kind, per_example=per_example)
        step_chunk = fitted_chunk if step_chunk is None else step_chunk
    step_chunk = 1 if step_chunk is None else step_chunk
    ablation = fit_ablation(chosen, batch, ablation, batch_size)
    program = functools.partial(
        _attribute_batch, chosen.tree, model_axis=chosen.axis, metric=metric, method=method, steps=steps,
        step_chunk=step_chunk, aggregation=aggregation, per_example=per_example,
        rows_dtype=jnp.dtype(per_example_dtype), mesh=chosen.mesh)
    key = None if resume is None else _run_key(chosen, batch, (method, steps, aggregation, ablation.kind, ablation.seed,
                                                              batch_size, step_chunk, per_example,
                                                              jnp.dtype(per_example_dtype).name, metric.name))
    totals = over_batches(chosen, batch, batch_size, ablation,
                          lambda part, weights, partners: program(part, weights, partners, ablation), progress,
                          None if resume is None else (Path(resume), key))
    graph = Graph.for_model(chosen.configs[0])
    results = []
    for index in range(chosen.size):
        matrix = np.where(graph.edge_mask, totals.mean[index], 0).astype(np.float32)
        if not np.isfinite(matrix).all():
            raise AttributionError(f"{chosen.name(index)}edge scores are not finite; the metric's gradient "
                                   f"overflowed or is undefined")
        results.append(Scores(graph, matrix, method, None if method == "eap" else steps, batch.clean.shape[1],
                              float(totals.clean_metric[index]), float(totals.corrupted_metric[index]),
                              None if totals.rows is None else totals.rows[index]))
    return chosen.results(results)

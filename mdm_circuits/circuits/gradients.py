"""∂metric/∂(input of every destination), averaged over integration steps, from the probes' gradients,
and the edge scores it gives against activation differences.

A head's q (k, v) input is its own copy x of the residual stream, read through the block's RMSNorm
(y = s ⊙ x / r, r = √(mean(x²) + ε)) and the head's slice W of W_Q (W_K, W_V). With g the gradient w.r.t.
the head's projected query (key, value), the gradient w.r.t. the copy is the norm's VJP of W g:

    ∂/∂x = (1/r) · [W_s g − x̂ · (x̂ · W_s g) / D],      W_s = diag(s) W,  x̂ = x / r,

and x̂ · W_s g = (y W) · g is the head's own projection (without bias) dotted with g. So over m steps

    mean_k ∂/∂x_k = (1/m) · [W_s Σ_k g_k / r_k − Σ_k x̂_k β_k],      β_k = ((y W)_k · g_k) / (D r_k),

which needs, per step, only the head-space sums Σ g/r and the small per-step factors x̂_k and β_k: the
per-destination gradients are formed once, after all steps, a block of layers at a time, and contracted with
Δ in `scores`.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, Float

from mdm_circuits import sharding
from mdm_circuits.circuits.graph import Graph
from mdm_circuits.circuits.interventions import Probes, Run
from mdm_circuits.model.layers import accumulation_dtype
from mdm_circuits.model.transformer import Transformer


class Summed(NamedTuple):
    """The parts of one step's gradients that add up over steps."""

    heads: Float[Array, "L 3 T H E"]    # g / r, for q, k, v
    mlp: Float[Array, "L T D"]
    logits: Float[Array, "T D"]


class PerStep(NamedTuple):
    """The parts kept for every step (stacked over steps, in front, by the integrator)."""

    normalized: Float[Array, "L T D"]   # x̂, in the activations' dtype
    factor: Float[Array, "L 3 H T"]     # β


def _per_query_head(model: Transformer, key_value: Array, axis: int) -> Array:
    """Key/value heads repeated so that query head h finds its own at index h (on a layer-stacked axis)."""
    return jnp.repeat(key_value, model.architecture.heads_per_kv, axis=axis)


def _biases(model: Transformer) -> Float[Array, "L 3 H E"] | None:
    attn = model.blocks.attn
    if attn.b_q is None:
        return None
    keys, values = _per_query_head(model, attn.b_k[...], 1), _per_query_head(model, attn.b_v[...], 1)
    return jnp.stack([attn.b_q[...], keys, values], axis=1)


def step_parts(model: Transformer, result: Run, gradients: Probes) -> tuple[Summed, PerStep]:
    """Split one run's probe gradients into what is summed over steps and what is kept per step."""
    wide = accumulation_dtype(result.layers.residual.dtype)
    x = result.layers.residual.astype(wide)                                     # [L, T, D]
    r = model.blocks.attn_norm.rms(x)                                           # [L, T]
    g = jnp.stack([gradients.q, gradients.k, gradients.v], axis=1).astype(wide)  # [L, 3, T, H, E]
    projected = result.layers.qkv.astype(wide)
    biases = _biases(model)
    if biases is not None:
        projected = projected - biases[:, :, None].astype(wide)
    d = x.shape[-1]
    factor = jnp.einsum("lpthe,lpthe->lpht", projected, g) / (d * r[:, None, None, :])
    summed = Summed(g / r[:, None, :, None, None], gradients.mlp.astype(wide), gradients.logits.astype(wide))
    return summed, PerStep((x / r[..., None]).astype(result.layers.residual.dtype), factor)


def scores(model: Transformer, differences: Sequence[Float[Array, "... B T D"]], summed: Summed,
           per_step: PerStep, steps: int, per_example: bool = False, mesh: Mesh | None = None
           ) -> list[Float[Array, "... M"]]:
    """Σ_{b,t,d} Δ[..., b, t, d] · (mean gradient w.r.t. destination m's input)[b, t, d] for every row of Δ in
    each array of `differences` (any leading row axes, then examples, positions, width) and every destination
    m, in the graph's column order: one `[..., M]` per array. With `per_example`, the sum over b is not taken:
    each result gains a leading batch axis.

    `summed` carries a leading batch axis, `per_step` a leading step axis and then the batch axis. Memory is
    bounded by a few layers: the mean gradients w.r.t. the inputs of a block of layers' destinations (every
    head's q, k and v copy, and its MLP's) are formed at a time, `[3H + 1, B, T, D]` per layer from that
    layer's weights, and contracted with all of Δ at once. Products with Δ take their other operand in Δ's
    dtype and accumulate in float32: for a bfloat16 model the mean gradients are rounded to bfloat16 there,
    as its activations already are. On a `mesh`, Δ and each block's gradients split their width over `model`
    (and examples over `data`), so neither is whole on any device; the products then add up partial sums of a
    small result.
    """
    graph = Graph.for_model(model.architecture)
    attn, norm_scales = model.blocks.attn, model.blocks.attn_norm.scale[...]
    narrow, wide = differences[0].dtype, summed.heads.dtype
    batch, length, width = differences[0].shape[-3:]
    out = "b...k" if per_example else "...k"
    differences = [sharding.constrain(delta, mesh, *[None] * (delta.ndim - 3), sharding.DATA, None, sharding.MODEL)
                   for delta in differences]

    def contract(destinations: Float[Array, "K B T D"]) -> list[Float[Array, "... K"]]:
        return [jnp.einsum(f"...btd,kbtd->{out}", delta, destinations, preferred_element_type=wide)
                for delta in differences]

    def layer_columns(layer):
        weights = jnp.stack([attn.w_q[layer], _per_query_head(model, attn.w_k[layer], 1),
                             _per_query_head(model, attn.w_v[layer], 1)])                 # [3, D, H, E]
        scaled = weights.astype(wide) * norm_scales[layer].astype(wide)[None, :, None, None]
        heads = (jnp.einsum("bpthe,pdhe->phbtd", summed.heads[:, layer], scaled)
                 - jnp.einsum("sbtd,sbpht->phbtd", per_step.normalized[:, :, layer], per_step.factor[:, :, layer],
                              preferred_element_type=wide))
        destinations = jnp.concatenate([heads.reshape(-1, batch, length, width), summed.mlp[None, :, layer]])
        return contract(sharding.constrain(destinations.astype(narrow), mesh, None, sharding.DATA, None,
                                           sharding.MODEL))

    # Layers in blocks whose destinations number at most a third of Δ's rows: each product then reads Δ once
    # per block rather than once per layer, and a block's gradients stay well below Δ's size.
    n_rows = sum(math.prod(delta.shape[:-3]) for delta in differences)
    layers_per_block = max(1, n_rows // (3 * (3 * graph.n_heads + 1)))
    per_layer = jax.lax.map(layer_columns, jnp.arange(graph.n_layers), batch_size=layers_per_block)
    logits = contract(summed.logits.astype(narrow)[None])                              # each [..., 1]
    return [graph.join_layer_columns(jnp.moveaxis(layers, 0, -2), last[..., 0]) / steps
            for layers, last in zip(per_layer, logits)]

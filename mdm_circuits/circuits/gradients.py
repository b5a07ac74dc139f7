"""∂metric/∂(input of every destination), averaged over integration steps, from the probes' gradients,
and the edge scores it gives against activation differences.

A head's q (k, v) input is its own copy x of the residual stream, read through the block's RMSNorm
(y = s ⊙ x / r, r = √(mean(x²) + ε)) and the head's slice W of W_Q (W_K, W_V). With g the gradient w.r.t.
the head's projected query (key, value), the gradient w.r.t. the copy is the norm's VJP of W g:

    ∂/∂x = (1/r) · [W_s g − x̂ · (x̂ · W_s g) / D],      W_s = diag(s) W,  x̂ = x / r,

and x̂ · W_s g = (y W) · g is the head's own projection (without bias) dotted with g. So over m steps

    mean_k ∂/∂x_k = (1/m) · [W_s Σ_k g_k / r_k − Σ_k x̂_k β_k],      β_k = ((y W)_k · g_k) / (D r_k),

which needs, per step, only the head-space sums Σ g/r and the small per-step factors x̂_k and β_k: the
per-destination gradients are formed once, after all steps, and contracted with Δ in `scores`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float

from mdm_circuits.circuits.interventions import Probes, Run
from mdm_circuits.model.layers import accumulation_dtype
from mdm_circuits.model.transformer import Transformer


class Summed(NamedTuple):
    """The parts of one step's gradients that add up over steps."""

    heads: Float[Array, "L 3 T H E"]    # g / r, for q, k, v
    mlp: Float[Array, "L T D"]
    logits: Float[Array, "T D"]


class PerStep(NamedTuple):
    """The parts kept for every step (stacked over steps by the integrator)."""

    normalized: Float[Array, "L T D"]   # x̂
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
    return summed, PerStep(x / r[..., None], factor)


def scores(model: Transformer, delta: Float[Array, "R B T D"], summed: Summed, per_step: PerStep,
           steps: int, per_example: bool = False) -> tuple[Float[Array, "R L 3 H"], Float[Array, "R L"],
                                                            Float[Array, " R"]]:
    """Σ_{b,t,d} Δ[r,b,t,d] · (mean gradient w.r.t. each destination's input)[b,t,d], for R rows of Δ: into
    every head's q, k and v input, every MLP's input, and the logits' input. With `per_example`, the sum
    over b is not taken: every output gains a leading batch axis.

    `summed` and `per_step` carry a leading batch axis (`per_step` then one entry per step). For the heads,
    the term W_s Σ g/r is formed for every head once and contracted as one large product; the correction
    term is contracted through its factors (Σ_d Δ·x̂ first), so its [L, 3, H, B, T, D] tensor never exists.
    """
    attn = model.blocks.attn
    weights = jnp.stack([attn.w_q[...], _per_query_head(model, attn.w_k[...], 2),
                         _per_query_head(model, attn.w_v[...], 2)], axis=1)                 # [L, 3, D, H, E]
    wide = summed.heads.dtype
    norm_scales = model.blocks.attn_norm.scale[...].astype(wide)                            # [L, D]
    scaled_weights = weights.astype(wide) * norm_scales[:, None, :, None, None]
    projected_back = jnp.einsum("blpthe,lpdhe->lphbtd", summed.heads, scaled_weights)
    n_layers, _, n_heads = projected_back.shape[:3]
    along_x = jnp.einsum("rbtd,bkltd->rbklt", delta, per_step.normalized)
    if per_example:
        heads = jnp.einsum("rbx,kbx->brk", delta.reshape(*delta.shape[:2], -1),
                           projected_back.reshape(n_layers * 3 * n_heads, delta.shape[1], -1))
        correction = jnp.einsum("rbklt,bklpht->brlph", along_x, per_step.factor)
        heads = heads.reshape(*heads.shape[:2], n_layers, 3, n_heads) - correction
        mlps = jnp.einsum("rbtd,lbtd->brl", delta, jnp.moveaxis(summed.mlp, 1, 0))
        logits = jnp.einsum("rbtd,btd->br", delta, summed.logits)
        return heads / steps, mlps / steps, logits / steps
    rows = delta.reshape(delta.shape[0], -1)                                                # [R, B·T·D]
    heads = rows @ projected_back.reshape(n_layers * 3 * n_heads, -1).T
    correction = jnp.einsum("rbklt,bklpht->rlph", along_x, per_step.factor)
    heads = heads.reshape(-1, n_layers, 3, n_heads) - correction
    mlps = rows @ jnp.moveaxis(summed.mlp, 1, 0).reshape(n_layers, -1).T
    logits = rows @ summed.logits.reshape(-1)
    return heads / steps, mlps / steps, logits / steps

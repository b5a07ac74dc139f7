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


def _biases(model: Transformer) -> Float[Array, "L 3 H E"] | None:
    attn = [block.attn for block in model.blocks]
    if attn[0].b_q is None:
        return None
    return jnp.stack([jnp.stack([a.b_q[...], a.expand_kv(a.b_k[...], 0), a.expand_kv(a.b_v[...], 0)])
                      for a in attn])


def step_parts(model: Transformer, result: Run, gradients: Probes) -> tuple[Summed, PerStep]:
    """Split one run's probe gradients into what is summed over steps and what is kept per step."""
    wide = accumulation_dtype(result.attention_inputs.dtype)
    x = result.attention_inputs.astype(wide)                                     # [L, T, D]
    eps = jnp.array([block.attn_norm.eps for block in model.blocks], wide)
    r = jnp.sqrt(jnp.mean(jnp.square(x), axis=-1) + eps[:, None])               # [L, T]
    g = jnp.stack([gradients.q, gradients.k, gradients.v], axis=1).astype(wide)  # [L, 3, T, H, E]
    projected = result.qkv.astype(wide)
    biases = _biases(model)
    if biases is not None:
        projected = projected - biases[:, :, None].astype(wide)
    d = x.shape[-1]
    factor = jnp.einsum("lpthe,lpthe->lpht", projected, g) / (d * r[:, None, None, :])
    summed = Summed(g / r[:, None, :, None, None], gradients.mlp.astype(wide), gradients.logits.astype(wide))
    return summed, PerStep(x / r[..., None], factor)


def scores(model: Transformer, delta: Float[Array, "R B T D"], summed: Summed, per_step: PerStep,
           steps: int) -> tuple[Float[Array, "R L 3 H"], Float[Array, "R L"], Float[Array, " R"]]:
    """Σ_{b,t,d} Δ[r,b,t,d] · (mean gradient w.r.t. each destination's input)[b,t,d], for R rows of Δ: into
    every head's q, k and v input, every MLP's input, and the logits' input.

    `summed` and `per_step` carry a leading batch axis (`per_step` then one entry per step). For the heads,
    the term W_s Σ g/r is formed for every head once and contracted as one large product; the correction
    term is contracted through its factors (Σ_d Δ·x̂ first), so its [L, 3, H, B, T, D] tensor never exists.
    """
    attn = [block.attn for block in model.blocks]
    weights = jnp.stack([jnp.stack([a.w_q[...], a.expand_kv(a.w_k[...]), a.expand_kv(a.w_v[...])]) for a in attn])
    wide = summed.heads.dtype
    norm_scales = jnp.stack([block.attn_norm.scale[...] for block in model.blocks]).astype(wide)
    scaled_weights = weights.astype(wide) * norm_scales[:, None, :, None, None]             # [L, 3, D, H, E]
    rows = delta.reshape(delta.shape[0], -1)                                                # [R, B·T·D]
    projected_back = jnp.einsum("blpthe,lpdhe->lphbtd", summed.heads, scaled_weights)
    n_layers, _, n_heads = projected_back.shape[:3]
    heads = rows @ projected_back.reshape(n_layers * 3 * n_heads, -1).T
    along_x = jnp.einsum("rbtd,bkltd->rbklt", delta, per_step.normalized)
    correction = jnp.einsum("rbklt,bklpht->rlph", along_x, per_step.factor)
    heads = heads.reshape(-1, n_layers, 3, n_heads) - correction
    mlps = rows @ jnp.moveaxis(summed.mlp, 1, 0).reshape(n_layers, -1).T
    logits = rows @ summed.logits.reshape(-1)
    return heads / steps, mlps / steps, logits / steps

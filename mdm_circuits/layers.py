"""Building blocks of the decoder, each written for one sequence (batch with `jax.vmap`).

Axis letters, used in names, shape annotations and einsums throughout the library:
  T query positions, S key positions, D d_model, H query heads, K key/value heads,
  G query heads per key/value head (H = K * G), E head dim, F MLP width, V vocabulary, L layers.

Query head h reads key/value head h // G, as Hugging Face's `repeat_kv` does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from mdm_circuits.config import ModelConfig

weight_init = nnx.initializers.normal(stddev=0.02)


class RMSNorm(nnx.Module):
    """Root-mean-square norm; statistics in float32, then scaled in the parameter dtype (as Llama/Qwen2)."""

    def __init__(self, dim: int, eps: float, *, dtype: jnp.dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: Float[Array, "T D"]) -> Float[Array, "T D"]:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.scale[...][None, :] * normed.astype(x.dtype)


def rotary_tables(
    positions: Int[Array, " T"], head_dim: int, theta: float
) -> tuple[Float[Array, "T E/2"], Float[Array, "T E/2"]]:
    """Cosine and sine tables of the rotary embedding, in float32."""
    inverse_frequency = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[:, None] * inverse_frequency[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(
    x: Float[Array, "T N E"],
    rope: tuple[Float[Array, "T E/2"], Float[Array, "T E/2"]],
    in_float32: bool = False,
) -> Float[Array, "T N E"]:
    """Rotate the two halves of each head (Hugging Face's non-interleaved layout).

    By default in x's dtype with the tables cast to it (as transformers does); with `in_float32`, x is
    rotated in float32 and cast back (as LLaDA does).
    """
    dtype = jnp.float32 if in_float32 else x.dtype
    cos, sin = (table.astype(dtype)[:, None, :] for table in rope)
    first, second = jnp.split(x.astype(dtype), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query attention with per-head weights.

    Weights keep heads on their own axis (`w_q[D, H, E]`, `w_o[H, E, D]`), so a head is addressed by index,
    and keys/values stay grouped (K heads, never repeated to H) in the computation.
    """

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, h, k, e = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
        self.w_q = nnx.Param(weight_init(rngs.params(), (d, h, e), dtype))
        self.w_k = nnx.Param(weight_init(rngs.params(), (d, k, e), dtype))
        self.w_v = nnx.Param(weight_init(rngs.params(), (d, k, e), dtype))
        self.w_o = nnx.Param(weight_init(rngs.params(), (h, e, d), dtype))
        if config.qkv_bias:
            self.b_q = nnx.Param(jnp.zeros((h, e), dtype))
            self.b_k = nnx.Param(jnp.zeros((k, e), dtype))
            self.b_v = nnx.Param(jnp.zeros((k, e), dtype))
        else:
            self.b_q = self.b_k = self.b_v = None
        self.n_kv_heads = k
        self.heads_per_kv = config.heads_per_kv
        self.rope_in_float32 = config.rope_in_float32

    def _project(self, x: Float[Array, "T D"], weight: nnx.Param, bias: nnx.Param | None):
        out = jnp.einsum("td,dne->tne", x, weight[...])
        return out if bias is None else out + bias[...][None]

    def heads(
        self,
        x: Float[Array, "T D"],
        *,
        mask: Bool[Array, "T S"],
        rope: tuple[Float[Array, "T E/2"], Float[Array, "T E/2"]],
    ) -> Float[Array, "T H E"]:
        """Each query head's attention-weighted values z (before the output projection)."""
        q = apply_rotary(self._project(x, self.w_q, self.b_q), rope, self.rope_in_float32)
        k = apply_rotary(self._project(x, self.w_k, self.b_k), rope, self.rope_in_float32)
        v = self._project(x, self.w_v, self.b_v)
        t, _, e = q.shape
        q = q.reshape(t, self.n_kv_heads, self.heads_per_kv, e)
        scores = jnp.einsum("tkge,ske->kgts", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(mask[None, None], scores * e**-0.5, jnp.finfo(jnp.float32).min)
        pattern = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        z = jnp.einsum("kgts,ske->tkge", pattern, v)
        return z.reshape(t, self.n_kv_heads * self.heads_per_kv, e)

    def output(self, z: Float[Array, "T H E"]) -> Float[Array, "T D"]:
        return jnp.einsum("the,hed->td", z, self.w_o[...])

    def head_outputs(self, z: Float[Array, "T H E"]) -> Float[Array, "T H D"]:
        """What each head writes to the residual stream (z W_O per head; they sum to `output`)."""
        return jnp.einsum("the,hed->thd", z, self.w_o[...])

    def __call__(self, x, *, mask, rope) -> Float[Array, "T D"]:
        return self.output(self.heads(x, mask=mask, rope=rope))


class MLP(nnx.Module):
    """SwiGLU: w_down(silu(x w_gate) * x w_up)."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, f = config.d_model, config.d_mlp
        self.w_gate = nnx.Param(weight_init(rngs.params(), (d, f), dtype))
        self.w_up = nnx.Param(weight_init(rngs.params(), (d, f), dtype))
        self.w_down = nnx.Param(weight_init(rngs.params(), (f, d), dtype))

    def __call__(self, x: Float[Array, "T D"]) -> Float[Array, "T D"]:
        hidden = jax.nn.silu(x @ self.w_gate[...]) * (x @ self.w_up[...])
        return hidden @ self.w_down[...]


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps, dtype=dtype)
        self.attn = Attention(config, dtype=dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps, dtype=dtype)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)

    def trace(
        self, x: Float[Array, "T D"], *, mask, rope
    ) -> tuple[Float[Array, "T D"], Float[Array, "T H E"], Float[Array, "T D"]]:
        """The block's output, with its heads' z and its MLP's output along the way."""
        z = self.attn.heads(self.attn_norm(x), mask=mask, rope=rope)
        x = x + self.attn.output(z)
        mlp_out = self.mlp(self.mlp_norm(x))
        return x + mlp_out, z, mlp_out

    def __call__(self, x: Float[Array, "T D"], *, mask, rope) -> Float[Array, "T D"]:
        return self.trace(x, mask=mask, rope=rope)[0]

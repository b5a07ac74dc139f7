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

from mdm_circuits.model.config import ModelConfig

weight_init = nnx.initializers.normal(stddev=0.02)


def accumulation_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32 for bfloat16/float16/float32 computations, float64 for float64 ones (used by exact tests)."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


class RMSNorm(nnx.Module):
    """Root-mean-square norm; statistics in (at least) float32, then scaled in the parameter dtype (as
    Llama/Qwen2)."""

    def __init__(self, dim: int, eps: float, *, dtype: jnp.dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: Float[Array, "T D"]) -> Float[Array, "T D"]:
        wide = x.astype(accumulation_dtype(x.dtype))
        normed = wide * jax.lax.rsqrt(jnp.mean(jnp.square(wide), axis=-1, keepdims=True) + self.eps)
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

    def project(
        self, x: Float[Array, "T D"]
    ) -> tuple[Float[Array, "T H E"], Float[Array, "T K E"], Float[Array, "T K E"]]:
        """Queries, keys and values (with biases, before RoPE) from one input shared by every head."""
        def project(weight, bias):
            out = jnp.einsum("td,dne->tne", x, weight[...])
            return out if bias is None else out + bias[...][None]

        return project(self.w_q, self.b_q), project(self.w_k, self.b_k), project(self.w_v, self.b_v)

    def project_per_head(
        self, x_q: Float[Array, "H T D"], x_k: Float[Array, "H T D"], x_v: Float[Array, "H T D"]
    ) -> tuple[Float[Array, "T H E"], Float[Array, "T H E"], Float[Array, "T H E"]]:
        """Queries, keys and values when every query head reads its own copy of each input (the EAP-IG
        graph's q/k/v edges); keys and values then exist once per query head."""
        def project(x, weight, bias):
            weight, bias = weight[...], None if bias is None else bias[...]
            if weight.shape[1] != x.shape[0]:  # a key/value weight, shared by a group of query heads
                weight, bias = self.expand_kv(weight, 1), None if bias is None else self.expand_kv(bias, 0)
            out = jnp.einsum("htd,dhe->the", x, weight)
            return out if bias is None else out + bias[None]

        return project(x_q, self.w_q, self.b_q), project(x_k, self.w_k, self.b_k), project(x_v, self.w_v, self.b_v)

    def expand_kv(self, x: Array, axis: int = 1) -> Array:
        """Repeat key/value heads along `axis` so that query head h finds its key/value head h // G."""
        return jnp.repeat(x, self.heads_per_kv, axis=axis)

    def attend(
        self,
        q: Float[Array, "T H E"],
        k: Float[Array, "S N E"],
        v: Float[Array, "S N E"],
        *,
        mask: Bool[Array, "T S"],
        rope: tuple[Float[Array, "T E/2"], Float[Array, "T E/2"]],
    ) -> Float[Array, "T H E"]:
        """Each query head's attention-weighted values z. Keys and values come grouped (N = K heads) or
        one per query head (N = H); either way the computation keeps query heads grouped by key head."""
        q = apply_rotary(q, rope, self.rope_in_float32)
        k = apply_rotary(k, rope, self.rope_in_float32)
        t, h, e = q.shape
        q = q.reshape(t, self.n_kv_heads, self.heads_per_kv, e)
        if k.shape[1] == h and self.heads_per_kv > 1:
            k = k.reshape(k.shape[0], self.n_kv_heads, self.heads_per_kv, e)
            v = v.reshape(v.shape[0], self.n_kv_heads, self.heads_per_kv, e)
            scores = jnp.einsum("tkge,skge->kgts", q, k, preferred_element_type=accumulation_dtype(q.dtype))
        else:
            scores = jnp.einsum("tkge,ske->kgts", q, k, preferred_element_type=accumulation_dtype(q.dtype))
        scores = jnp.where(mask[None, None], scores * e**-0.5, jnp.finfo(scores.dtype).min)
        pattern = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        if v.ndim == 4:
            z = jnp.einsum("kgts,skge->tkge", pattern, v)
        else:
            z = jnp.einsum("kgts,ske->tkge", pattern, v)
        return z.reshape(t, h, e)

    def heads(
        self,
        x: Float[Array, "T D"],
        *,
        mask: Bool[Array, "T S"],
        rope: tuple[Float[Array, "T E/2"], Float[Array, "T E/2"]],
    ) -> Float[Array, "T H E"]:
        """Each query head's attention-weighted values z (before the output projection)."""
        return self.attend(*self.project(x), mask=mask, rope=rope)

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

"""Building blocks of the decoder, each written for one sequence (batch with `jax.vmap`).

Axis letters, used in names, shape annotations and einsums throughout the library:
  T query positions, S key positions, D d_model, H query heads, K key/value heads,
  G query heads per key/value head (H = K * G), E head dim, F MLP width, V vocabulary, L layers.

Query head h reads key/value head h // G, as Hugging Face's `repeat_kv` does.

`Block.step` is the one block step every forward runs, plain or intervened (see `sites`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from mdm_circuits.model.config import Architecture
from mdm_circuits.model.sites import Capture, LayerEdit, LayerTrace, blend

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

    def rms(self, x: Float[Array, "... D"]) -> Float[Array, "..."]:
        """r = √(mean(x²) + ε), in (at least) float32: the norm's output is scale · x / r."""
        wide = x.astype(accumulation_dtype(x.dtype))
        return jnp.sqrt(jnp.mean(jnp.square(wide), axis=-1) + self.eps)

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

    def __init__(self, config: Architecture, *, dtype: jnp.dtype, rngs: nnx.Rngs):
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

    def __init__(self, config: Architecture, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, f = config.d_model, config.d_mlp
        self.w_gate = nnx.Param(weight_init(rngs.params(), (d, f), dtype))
        self.w_up = nnx.Param(weight_init(rngs.params(), (d, f), dtype))
        self.w_down = nnx.Param(weight_init(rngs.params(), (f, d), dtype))

    def hidden(self, x: Float[Array, "T D"]) -> Float[Array, "T F"]:
        """The neurons' activations, silu(x W_gate) · x W_up."""
        return jax.nn.silu(x @ self.w_gate[...]) * (x @ self.w_up[...])

    def __call__(self, x: Float[Array, "T D"]) -> Float[Array, "T D"]:
        return self.hidden(x) @ self.w_down[...]


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(x)).

    In a `Transformer` the blocks are stored once, stacked: every parameter has a leading layer axis, and
    the forward scans `step` over it."""

    def __init__(self, config: Architecture, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps, dtype=dtype)
        self.attn = Attention(config, dtype=dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps, dtype=dtype)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)

    def step(
        self,
        residual: Float[Array, "T D"],
        differences: Float[Array, "T D N"] | None,
        edit: LayerEdit,
        *,
        mask: Bool[Array, "T S"],
        rope: tuple[Float[Array, "T E/2"], Float[Array, "T E/2"]],
        capture: Capture,
    ) -> tuple[Float[Array, "T D"], Float[Array, "T D N"] | None, LayerTrace]:
        """One block, with `edit` applied at its sites (see `sites`): the residual stream after the block,
        with edge reading every node's output so far minus its ablation value (else None), and what
        `capture` keeps."""
        h = self.attn.w_q.shape[1]
        if edit.resid_keep is not None:
            residual = blend(residual, edit.resid_keep, edit.resid_value)
        attention_input, qkv = residual, None
        if edit.reads_edges:
            inputs = read_edges(edit.read_weight[:, : 3 * h], edit.read_base[0], differences)
            normed = jax.vmap(jax.vmap(self.attn_norm))(inputs.reshape(3, h, *inputs.shape[1:]))
            q, k, v = self.attn.project_per_head(*normed)
        else:
            q, k, v = self.attn.project(self.attn_norm(residual))
            if edit.qkv_probe is not None or capture.qkv:  # per query head, where probes sit
                k, v = self.attn.expand_kv(k), self.attn.expand_kv(v)
                qkv = jnp.stack([q, k, v])
                if edit.qkv_probe is not None:
                    q, k, v = (x + probe.astype(x.dtype) for x, probe in zip((q, k, v), edit.qkv_probe))
        z = self.attn.attend(q, k, v, mask=mask, rope=rope)
        per_head = capture.head_out or edit.node_keep is not None or edit.reads_edges
        head_out = None
        if per_head:
            head_out = self.attn.head_outputs(z).swapaxes(0, 1)                                   # [H, T, D]
            if edit.node_keep is not None:
                head_out = blend(head_out, edit.node_keep[:h], edit.node_value[:h])
            residual = residual + head_out.sum(0)
        else:  # nobody reads the heads one by one: project them all at once
            residual = residual + self.attn.output(z)
        if edit.reads_edges:
            differences = _write_nodes(differences, head_out - edit.read_ablation[:h].astype(head_out.dtype),
                                       edit.first_source)
            mlp_in = read_edges(edit.read_weight[:, 3 * h:], edit.read_base[1], differences)[0]
        elif edit.mlp_probe is not None:
            mlp_in = residual + edit.mlp_probe.astype(residual.dtype)
        else:
            mlp_in = residual
        hidden = self.mlp.hidden(self.mlp_norm(mlp_in))
        if edit.hidden_probe is not None:
            hidden = hidden + edit.hidden_probe.astype(hidden.dtype)
        mlp_out = hidden @ self.mlp.w_down[...]
        if edit.node_keep is not None:
            mlp_out = blend(mlp_out, edit.node_keep[h], edit.node_value[h])
        if edit.reads_edges:
            differences = _write_nodes(differences, (mlp_out - edit.read_ablation[h].astype(mlp_out.dtype))[None],
                                       edit.first_source + h)
        kept = LayerTrace(
            residual=attention_input if capture.residual else None,
            head_z=z if capture.head_z else None,
            head_out=head_out if capture.head_out else None,
            mlp_out=mlp_out if capture.mlp_out else None,
            qkv=qkv if capture.qkv else None,
            mlp_hidden=hidden if capture.mlp_hidden else None,
        )
        return residual + mlp_out, differences, kept


def read_edges(weight: Float[Array, "N C"], base: Float[Array, "T D"], differences: Float[Array, "T D N"]
               ) -> Float[Array, "C T D"]:
    """The inputs of C destinations under edge weights, Σ_u w_u·out_u + (1 − w_u)·ablation_u over their upstream
    nodes u: `base` (Σ_u ablation_u) plus Σ_u w_u·(out_u − ablation_u). Nodes not yet computed have zero
    differences, and no edge weighs anything off the graph's edges. The differences keep the node axis last,
    where the product contracts it without transposing them (they are the largest array of the step)."""
    read = jnp.einsum("tdu,uc->tdc", differences, weight.astype(differences.dtype))
    return base.astype(differences.dtype)[None] + jnp.moveaxis(read, -1, 0)


def _write_nodes(differences: Float[Array, "T D N"], rows: Float[Array, "R T D"], first: Int[Array, ""]
                 ) -> Float[Array, "T D N"]:
    return jax.lax.dynamic_update_slice_in_dim(differences, jnp.moveaxis(rows, 0, -1), first, axis=2)

"""Interventions as data, and the one forward pass that applies them.

An intervention is a pytree of arrays handed to `run`: no hooks, no global state. So an intervened forward
is an ordinary function, and a sweep over many interventions is `vmap` over their arrays inside one `jit`.
Everything here is for one sequence; batch with `vmap`.

Axis letters as in `layers`; N = graph.n_sources, M = graph.n_destinations (see `graph` for the order).

- `NodePatch`: replace node outputs (input embedding, each query head's z·W_O, each MLP output), per
  position: out' = keep · out + (1 − keep) · value. The value comes from a corrupted run, zeros, a mean, a
  resampled example (`ablations`).
- `ResidualPatch`: replace the residual stream entering a block (or the logits' input) the same way.
- `EdgeWeights`: destination v reads Σ_u w[u, v] · out_u(this run) + (1 − w[u, v]) · ablation_u, so each
  head's q, k and v inputs become their own copies of the residual stream, each through its own norm.
- `Probes`: zeros added to every destination input. Their gradient is ∂metric/∂(input of v): the MLP and
  logits probes sit on those inputs directly; q/k/v probes sit after each head's projection (before RoPE)
  and `destination_gradients` pulls them back through the head's weight slice and the norm's VJP at the
  shared residual, which equals the gradient w.r.t. the head's own input copy without copying the
  residual stream once per head.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from mdm_circuits.graph import Graph, Port, head, mlp
from mdm_circuits.layers import rotary_tables
from mdm_circuits.model import Transformer


@struct.dataclass
class NodePatch:
    keep: Float[Array, "N T"]
    value: Float[Array, "N T D"]


@struct.dataclass
class ResidualPatch:
    """Row l < L patches the residual stream entering block l; row L the logits' input."""

    keep: Float[Array, "L+1 T"]
    value: Float[Array, "L+1 T D"]


@struct.dataclass
class EdgeWeights:
    weight: Float[Array, "N M"]
    ablation: Float[Array, "N T D"]


@struct.dataclass
class Probes:
    q: Float[Array, "L T H E"]
    k: Float[Array, "L T H E"]
    v: Float[Array, "L T H E"]
    mlp: Float[Array, "L T D"]
    logits: Float[Array, "T D"]

    @classmethod
    def zeros(cls, config, length: int, dtype=jnp.float32) -> Probes:
        heads = (config.n_layers, length, config.n_heads, config.head_dim)
        return cls(jnp.zeros(heads, dtype), jnp.zeros(heads, dtype), jnp.zeros(heads, dtype),
                   jnp.zeros((config.n_layers, length, config.d_model), dtype),
                   jnp.zeros((length, config.d_model), dtype))


@struct.dataclass
class Interventions:
    nodes: NodePatch | None = None
    residual: ResidualPatch | None = None
    edges: EdgeWeights | None = None
    probes: Probes | None = None


class Run(NamedTuple):
    """What an intervened forward computed.

    sources: every node's output in this run (after node patches), in source order.
    attention_inputs: the residual stream each block's attention read (where q/k/v probes pull back to).
    final: the logits' input (before the final norm).
    """

    sources: Float[Array, "N T D"]
    attention_inputs: Float[Array, "L T D"]
    final: Float[Array, "T D"]


def _patch(out: Array, patch: NodePatch | None, start: int) -> Array:
    """Apply the node patch rows [start, start + n) to `out[n, T, D]`."""
    if patch is None:
        return out
    rows = slice(start, start + out.shape[0])
    keep = patch.keep[rows][..., None].astype(out.dtype)
    return keep * out + (1 - keep) * patch.value[rows].astype(out.dtype)


def _patch_residual(x: Array, patch: ResidualPatch | None, row: int) -> Array:
    if patch is None:
        return x
    keep = patch.keep[row][:, None].astype(x.dtype)
    return keep * x + (1 - keep) * patch.value[row].astype(x.dtype)


def _edge_inputs(edges: EdgeWeights, sources: list[Array], columns: slice) -> Array:
    """Inputs of destinations `columns` from the sources so far: Σ_u w·out_u + (1 − w)·ablation_u."""
    current = jnp.concatenate(sources)
    ablation = edges.ablation[: current.shape[0]].astype(current.dtype)
    weight = edges.weight[: current.shape[0], columns].astype(current.dtype)
    return ablation.sum(0)[None] + jnp.einsum("uc,utd->ctd", weight, current - ablation)


def run(
    model: Transformer,
    embeddings: Float[Array, "T D"],
    interventions: Interventions = Interventions(),
    *,
    valid: Bool[Array, " T"] | None = None,
    positions: Int[Array, " T"] | None = None,
) -> Run:
    """The forward pass with interventions applied, keeping every node's output."""
    config = model.config
    if interventions.edges is not None and (interventions.probes is not None or interventions.residual is not None):
        raise ValueError("edge weights combine with node patches only, not with probes or residual patches")
    graph = Graph.for_model(config)
    n, h = embeddings.shape[0], config.n_heads
    valid = jnp.ones((n,), dtype=bool) if valid is None else valid
    positions = jnp.arange(n) if positions is None else positions
    mask = model.attention_mask(valid)
    rope = rotary_tables(positions, config.head_dim, config.rope_theta)
    nodes, edges, probes = interventions.nodes, interventions.edges, interventions.probes

    x = _patch(embeddings.astype(model.embedding.dtype)[None], nodes, 0)
    sources, attention_inputs, residual = [x], [], x[0]
    for layer, block in enumerate(model.blocks):
        first_head = graph.source_index(head(layer, 0))
        residual = _patch_residual(residual, interventions.residual, layer)
        attention_inputs.append(residual)
        if edges is None:
            q, k, v = block.attn.project(block.attn_norm(residual))
            if probes is not None:
                q = q + probes.q[layer].astype(q.dtype)
                k = block.attn.expand_kv(k) + probes.k[layer].astype(k.dtype)
                v = block.attn.expand_kv(v) + probes.v[layer].astype(v.dtype)
        else:
            first_query = graph.destination_index(head(layer, 0), Port.Q)
            columns = slice(first_query, first_query + 3 * h)
            inputs = _edge_inputs(edges, sources, columns).reshape(3, h, n, -1)
            q, k, v = block.attn.project_per_head(*jax.vmap(jax.vmap(block.attn_norm))(inputs))
        z = block.attn.attend(q, k, v, mask=mask, rope=rope)
        head_out = _patch(block.attn.head_outputs(z).swapaxes(0, 1), nodes, first_head)
        sources.append(head_out)
        residual = residual + head_out.sum(0)

        if edges is None:
            mlp_in = residual
            if probes is not None:
                mlp_in = mlp_in + probes.mlp[layer].astype(mlp_in.dtype)
        else:
            mlp_column = graph.destination_index(mlp(layer))
            mlp_in = _edge_inputs(edges, sources, slice(mlp_column, mlp_column + 1))[0]
        mlp_out = _patch(block.mlp(block.mlp_norm(mlp_in))[None], nodes, first_head + h)
        sources.append(mlp_out)
        residual = residual + mlp_out[0]

    if edges is None:
        final = _patch_residual(residual, interventions.residual, config.n_layers)
        if probes is not None:
            final = final + probes.logits.astype(final.dtype)
    else:
        final = _edge_inputs(edges, sources, slice(graph.n_destinations - 1, graph.n_destinations))[0]
    return Run(jnp.concatenate(sources), jnp.stack(attention_inputs), final)


def destination_gradients(model: Transformer, attention_inputs: Float[Array, "L T D"],
                          probe_gradients: Probes) -> Float[Array, "M T D"]:
    """∂metric/∂(input of every destination), in destination order, from the probes' gradients.

    A head's q (k, v) input is its own copy of the residual stream r, read through the block's norm and the
    head's slice of W_Q (W_K, W_V). At the unintervened point the gradient w.r.t. that copy is
    VJP_norm(r)(W^h · g^h), where g^h is the gradient w.r.t. the head's projected query (key, value).
    """
    columns = []
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        weights = (attn.w_q[...], attn.expand_kv(attn.w_k[...]), attn.expand_kv(attn.w_v[...]))
        grads = (probe_gradients.q[layer], probe_gradients.k[layer], probe_gradients.v[layer])
        at_norm_output = jnp.stack([jnp.einsum("the,dhe->htd", g, w.astype(g.dtype))
                                    for g, w in zip(grads, weights)])  # [3, H, T, D]
        _, norm_vjp = jax.vjp(block.attn_norm, attention_inputs[layer])
        at_input = jax.vmap(lambda cotangent: norm_vjp(cotangent.astype(attention_inputs.dtype))[0])(
            at_norm_output.reshape(-1, *at_norm_output.shape[2:]))
        columns += [at_input.astype(jnp.float32), probe_gradients.mlp[layer][None].astype(jnp.float32)]
    columns.append(probe_gradients.logits[None].astype(jnp.float32))
    return jnp.concatenate(columns)

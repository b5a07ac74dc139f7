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
  and `gradients` pulls them back through the head's weight slice and the norm's VJP at the shared
  residual, which equals the gradient w.r.t. the head's own input copy without copying the residual
  stream once per head.
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

    sources: every node's output in this run (after node patches), in source order; None when not kept.
    attention_inputs: the residual stream each block's attention read (where q/k/v probes pull back to).
    final: the logits' input (before the final norm).
    qkv: with probes, each head's query, key and value where its probe was added (after the projection
      and bias, before RoPE; keys and values once per query head); otherwise None.
    """

    sources: Float[Array, "N T D"] | None
    attention_inputs: Float[Array, "L T D"]
    final: Float[Array, "T D"]
    qkv: Float[Array, "L 3 T H E"] | None = None


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


class _EdgeInputs:
    """Destination inputs under edge weights: Σ_u w·out_u(this run) + (1 − w)·ablation_u over the edges.

    Non-edges weigh nothing, so each call is two products over the sources: the run's outputs so far, and
    the ablation values."""

    def __init__(self, edges: EdgeWeights, edge_mask, dtype):
        mask = jnp.asarray(edge_mask, dtype)
        weight = edges.weight.astype(dtype)
        self.kept, self.dropped = weight * mask, (1 - weight) * mask
        self.ablation = edges.ablation.astype(dtype)

    def __call__(self, sources: list[Array], columns: slice) -> Array:
        """Inputs of destinations `columns`, given this run's outputs of the first U sources (which are all
        a destination of these columns can read)."""
        current = jnp.concatenate(sources)
        return (jnp.einsum("uc,utd->ctd", self.dropped[:, columns], self.ablation)
                + jnp.einsum("uc,utd->ctd", self.kept[: current.shape[0], columns], current))


def run(
    model: Transformer,
    embeddings: Float[Array, "T D"],
    interventions: Interventions = Interventions(),
    *,
    valid: Bool[Array, " T"] | None = None,
    positions: Int[Array, " T"] | None = None,
    keep_sources: bool = True,
) -> Run:
    """The forward pass with interventions applied, keeping every node's output unless `keep_sources` is
    False (then heads are projected together, as in the plain model, and `Run.sources` is None)."""
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

    per_head = keep_sources or nodes is not None or edges is not None
    x = _patch(embeddings.astype(model.embedding.dtype)[None], nodes, 0)
    sources, attention_inputs, probed, residual = [x], [], [], x[0]
    edge_inputs = None if edges is None else _EdgeInputs(edges, graph.edge_mask, x.dtype)
    for layer, block in enumerate(model.blocks):
        first_head = graph.source_index(head(layer, 0))
        residual = _patch_residual(residual, interventions.residual, layer)
        attention_inputs.append(residual)
        if edges is None:
            q, k, v = block.attn.project(block.attn_norm(residual))
            if probes is not None:
                k, v = block.attn.expand_kv(k), block.attn.expand_kv(v)
                probed.append(jnp.stack([q, k, v]))
                q = q + probes.q[layer].astype(q.dtype)
                k = k + probes.k[layer].astype(k.dtype)
                v = v + probes.v[layer].astype(v.dtype)
        else:
            first_query = graph.destination_index(head(layer, 0), Port.Q)
            columns = slice(first_query, first_query + 3 * h)
            inputs = edge_inputs(sources, columns).reshape(3, h, n, -1)
            q, k, v = block.attn.project_per_head(*jax.vmap(jax.vmap(block.attn_norm))(inputs))
        z = block.attn.attend(q, k, v, mask=mask, rope=rope)
        if per_head:
            head_out = _patch(block.attn.head_outputs(z).swapaxes(0, 1), nodes, first_head)
            sources.append(head_out)
            residual = residual + head_out.sum(0)
        else:  # nobody reads the heads one by one: project them all at once
            residual = residual + block.attn.output(z)

        if edges is None:
            mlp_in = residual
            if probes is not None:
                mlp_in = mlp_in + probes.mlp[layer].astype(mlp_in.dtype)
        else:
            mlp_column = graph.destination_index(mlp(layer))
            mlp_in = edge_inputs(sources, slice(mlp_column, mlp_column + 1))[0]
        mlp_out = _patch(block.mlp(block.mlp_norm(mlp_in))[None], nodes, first_head + h)
        sources.append(mlp_out)
        residual = residual + mlp_out[0]

    if edges is None:
        final = _patch_residual(residual, interventions.residual, config.n_layers)
        if probes is not None:
            final = final + probes.logits.astype(final.dtype)
    else:
        final = edge_inputs(sources, slice(graph.n_destinations - 1, graph.n_destinations))[0]
    return Run(jnp.concatenate(sources) if keep_sources else None, jnp.stack(attention_inputs), final,
               jnp.stack(probed) if probed else None)

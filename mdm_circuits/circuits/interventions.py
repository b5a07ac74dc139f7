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

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jaxtyping import Array, Bool, Float, Int

from mdm_circuits.circuits.graph import Graph, Port, head, mlp
from mdm_circuits.model.layers import rotary_tables
from mdm_circuits.model.transformer import Transformer


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


def _blend(out: Array, keep: Array, value: Array) -> Array:
    """keep · out + (1 − keep) · value, with `keep` lacking out's last (feature) axis."""
    keep = keep[..., None].astype(out.dtype)
    return keep * out + (1 - keep) * value.astype(out.dtype)


def _patch(out: Array, patch: NodePatch | None, start: int) -> Array:
    """Apply the node patch rows [start, start + n) to `out[n, T, D]`."""
    if patch is None:
        return out
    rows = slice(start, start + out.shape[0])
    return _blend(out, patch.keep[rows], patch.value[rows])


class _EdgeInputs:
    """Destination inputs under edge weights: Σ_u w·out_u(this run) + (1 − w)·ablation_u over the edges.

    Non-edges weigh nothing, so each read is two products over the sources: the run's outputs so far (the
    sources not yet computed are zeros and their edges weigh nothing), and the ablation values."""

    def __init__(self, edges: EdgeWeights, edge_mask, dtype):
        mask = jnp.asarray(edge_mask, dtype)
        weight = edges.weight.astype(dtype)
        self.kept, self.dropped = weight * mask, (1 - weight) * mask
        self.ablation = edges.ablation.astype(dtype)

    def read(self, sources: Array, kept: Array, dropped: Array) -> Array:
        """Inputs of the destinations whose weight columns are `kept` and `dropped` ([N, C])."""
        return (jnp.einsum("uc,utd->ctd", dropped, self.ablation)
                + jnp.einsum("uc,utd->ctd", kept, sources))


def _stacked_blocks(model: Transformer):
    """The blocks' graph definition and their states stacked on a leading layer axis (for `lax.scan`)."""
    definition = nnx.split(model.blocks[0])[0]
    states = [nnx.split(block)[1] for block in model.blocks]
    return definition, jax.tree.map(lambda *layers: jnp.stack(layers), *states)


def _per_layer(rows: Array, n_layers: int) -> Array:
    """Rows of every layer's sources (h heads, then the MLP) after the input row, as [L, h + 1, ...]."""
    return rows[1:].reshape(n_layers, -1, *rows.shape[1:])


@functools.partial(jax.jit, static_argnames=("keep_sources",))
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
    False (then heads are projected together, as in the plain model, and `Run.sources` is None).

    The blocks run as one `lax.scan` over their stacked parameters, so a deep model compiles one layer; the
    function is jitted, so calls outside a `jit` reuse one compiled program per shape and intervention kind."""
    config = model.config
    if interventions.edges is not None and (interventions.probes is not None or interventions.residual is not None):
        raise ValueError("edge weights combine with node patches only, not with probes or residual patches")
    graph = Graph.for_model(config)
    n, h, n_layers = embeddings.shape[0], config.n_heads, config.n_layers
    valid = jnp.ones((n,), dtype=bool) if valid is None else valid
    positions = jnp.arange(n) if positions is None else positions
    mask = model.attention_mask(valid)
    rope = rotary_tables(positions, config.head_dim, config.rope_theta)
    nodes, residual_patch, edges, probes = (interventions.nodes, interventions.residual, interventions.edges,
                                            interventions.probes)
    per_head = keep_sources or nodes is not None or edges is not None
    x = _patch(embeddings.astype(model.embedding.dtype)[None], nodes, 0)
    dtype = x.dtype

    # What each layer reads, stacked on a leading layer axis.
    definition, blocks = _stacked_blocks(model)
    layers = {"block": blocks}
    if nodes is not None:
        layers["node_keep"], layers["node_value"] = _per_layer(nodes.keep, n_layers), _per_layer(nodes.value, n_layers)
    if residual_patch is not None:
        layers["residual_keep"], layers["residual_value"] = residual_patch.keep[:-1], residual_patch.value[:-1]
    if probes is not None:
        layers["probes"] = (probes.q, probes.k, probes.v, probes.mlp)
    if edges is not None:
        edge_inputs = _EdgeInputs(edges, graph.edge_mask, dtype)
        columns = np.array([[graph.destination_index(head(layer, 0), Port.Q) + c for c in range(3 * h)]
                            + [graph.destination_index(mlp(layer))] for layer in range(n_layers)])
        layers["kept"] = jnp.moveaxis(edge_inputs.kept[:, columns], 1, 0)        # [L, N, 3h + 1]
        layers["dropped"] = jnp.moveaxis(edge_inputs.dropped[:, columns], 1, 0)
        layers["first_source"] = jnp.array([graph.source_index(head(layer, 0)) for layer in range(n_layers)])

    def layer_step(carry, layer):
        residual, sources = carry
        block = nnx.merge(definition, layer["block"])
        node_patch = NodePatch(layer["node_keep"], layer["node_value"]) if nodes is not None else None
        if residual_patch is not None:
            residual = _blend(residual, layer["residual_keep"], layer["residual_value"])
        attention_input, probed = residual, None
        if edges is None:
            q, k, v = block.attn.project(block.attn_norm(residual))
            if probes is not None:
                k, v = block.attn.expand_kv(k), block.attn.expand_kv(v)
                probed = jnp.stack([q, k, v])
                probe_q, probe_k, probe_v, _ = layer["probes"]
                q, k, v = q + probe_q.astype(q.dtype), k + probe_k.astype(k.dtype), v + probe_v.astype(v.dtype)
        else:
            inputs = edge_inputs.read(sources, layer["kept"][:, : 3 * h], layer["dropped"][:, : 3 * h])
            q, k, v = block.attn.project_per_head(*jax.vmap(jax.vmap(block.attn_norm))(inputs.reshape(3, h, n, -1)))
        z = block.attn.attend(q, k, v, mask=mask, rope=rope)
        if per_head:
            head_out = _patch(block.attn.head_outputs(z).swapaxes(0, 1), node_patch, 0)
            residual = residual + head_out.sum(0)
        else:  # nobody reads the heads one by one: project them all at once
            head_out = None
            residual = residual + block.attn.output(z)
        if edges is not None:
            sources = jax.lax.dynamic_update_slice_in_dim(sources, head_out, layer["first_source"], axis=0)
            mlp_in = edge_inputs.read(sources, layer["kept"][:, 3 * h:], layer["dropped"][:, 3 * h:])[0]
        elif probes is not None:
            mlp_in = residual + layer["probes"][3].astype(residual.dtype)
        else:
            mlp_in = residual
        mlp_out = _patch(block.mlp(block.mlp_norm(mlp_in))[None], node_patch, h)
        if edges is not None:
            sources = jax.lax.dynamic_update_slice_in_dim(sources, mlp_out, layer["first_source"] + h, axis=0)
        residual = residual + mlp_out[0]
        outputs = (attention_input, probed, jnp.concatenate([head_out, mlp_out]) if keep_sources else None)
        return (residual, sources), outputs

    sources = None
    if edges is not None:  # every node's output so far, the rest zeros (their edges weigh nothing)
        sources = jnp.zeros((graph.n_sources, n, x.shape[-1]), dtype).at[0].set(x[0])
    (residual, sources), (attention_inputs, probed, layer_sources) = jax.lax.scan(
        layer_step, (x[0], sources), layers)

    if edges is None:
        final = residual if residual_patch is None else _blend(residual, residual_patch.keep[-1],
                                                                residual_patch.value[-1])
        if probes is not None:
            final = final + probes.logits.astype(final.dtype)
    else:
        final = edge_inputs.read(sources, edge_inputs.kept[:, -1:], edge_inputs.dropped[:, -1:])[0]
    kept_sources = None
    if keep_sources:
        kept_sources = jnp.concatenate([x, layer_sources.reshape(-1, *layer_sources.shape[2:])])
    return Run(kept_sources, attention_inputs, final, probed)

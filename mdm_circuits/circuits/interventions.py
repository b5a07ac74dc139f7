"""Interventions as data on the EAP-IG graph, and the forward pass that applies them.

An intervention is a pytree of arrays handed to `run`: no hooks, no global state. So an intervened forward
is an ordinary function, and a sweep over many interventions is `vmap` over their arrays inside one `jit`.
Everything here is for one sequence; batch with `vmap`.

Axis letters as in `model.layers`; N = graph.n_sources, M = graph.n_destinations (see `graph` for the order).

- `NodePatch`: replace node outputs (input embedding, each query head's z·W_O, each MLP output), per
  position: out' = keep · out + (1 − keep) · value. The value comes from a corrupted run, zeros, a mean, a
  resampled example (`ablations`).
- `ResidualPatch`: replace the residual stream entering a block (or the logits' input) the same way.
- `EdgeWeights`: destination v reads Σ_u w[u, v] · out_u(this run) + (1 − w[u, v]) · ablation_u over its
  upstream nodes u, so each head's q, k and v inputs become their own copies of the residual stream, each
  through its own norm.
- `Probes`: zeros added to every destination input. Their gradient is ∂metric/∂(input of v): the MLP and
  logits probes sit on those inputs directly; q/k/v probes sit after each head's projection (before RoPE)
  and `gradients` pulls them back through the head's weight slice and the norm's VJP at the shared
  residual, which equals the gradient w.r.t. the head's own input copy without copying the residual
  stream once per head.

`run` translates these graph-indexed arrays into the model's per-layer `Edit` (the graph owns the layout)
and runs the model's one forward: the plain forward is the same step with nothing edited.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from mdm_circuits.circuits.graph import Graph
from mdm_circuits.errors import InterventionError
from mdm_circuits.model.config import Architecture
from mdm_circuits.model.sites import Capture, Edit, LayerEdit, LayerTrace
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
    def zeros(cls, architecture: Architecture, length: int, dtype=jnp.float32) -> Probes:
        heads = (architecture.n_layers, length, architecture.n_heads, architecture.head_dim)
        return cls(jnp.zeros(heads, dtype), jnp.zeros(heads, dtype), jnp.zeros(heads, dtype),
                   jnp.zeros((architecture.n_layers, length, architecture.d_model), dtype),
                   jnp.zeros((length, architecture.d_model), dtype))


@struct.dataclass
class Interventions:
    nodes: NodePatch | None = None
    residual: ResidualPatch | None = None
    edges: EdgeWeights | None = None
    probes: Probes | None = None


class Run(NamedTuple):
    """What an intervened forward computed.

    sources: every node's output in this run (after node patches), in source order; None when not kept.
    final: the logits' input (before the final norm).
    layers: what the run captured in each block (see `model.sites.Capture`); with probes, `residual` (the
      stream each block's attention read, where q/k/v probes pull back to) and `qkv` (each head's query, key
      and value where its probe was added) are always kept.
    """

    sources: Float[Array, "N T D"] | None
    final: Float[Array, "T D"]
    layers: LayerTrace


def edit(graph: Graph, interventions: Interventions) -> Edit:
    """The model's per-layer `Edit` for interventions indexed by the graph's rows and columns."""
    nodes, residual, edges, probes = (interventions.nodes, interventions.residual, interventions.edges,
                                      interventions.probes)
    if edges is not None and (probes is not None or residual is not None):
        raise InterventionError("edge weights combine with node patches only, not with probes or residual "
                                "patches; run them separately")
    changes, layer_changes = {}, {}
    if nodes is not None:
        changes["input_keep"], layer_changes["node_keep"] = graph.layer_rows(nodes.keep)
        changes["input_value"], layer_changes["node_value"] = graph.layer_rows(nodes.value)
    if residual is not None:
        layer_changes["resid_keep"], changes["final_keep"] = residual.keep[:-1], residual.keep[-1]
        layer_changes["resid_value"], changes["final_value"] = residual.value[:-1], residual.value[-1]
    if probes is not None:
        layer_changes["qkv_probe"] = jnp.stack([probes.q, probes.k, probes.v], axis=1)
        layer_changes["mlp_probe"] = probes.mlp
        changes["final_probe"] = probes.logits
    if edges is not None:
        weight = edges.weight * jnp.asarray(graph.edge_mask, edges.weight.dtype)
        layer_changes["read_weight"], changes["final_weight"] = _per_layer_columns(graph, weight)
        # What each destination reads with every edge ablated: the sum of its upstream nodes' ablation values.
        # Those are the input and the earlier layers (and, for an MLP, its own layer's heads).
        first, per_layer = graph.layer_rows(edges.ablation)
        layer_totals = per_layer.sum(1)                                                    # [L, T, D]
        before = first[None] + jnp.cumsum(layer_totals, axis=0) - layer_totals           # input, earlier layers
        layer_changes["read_base"] = jnp.stack([before, before + per_layer[:, :-1].sum(1)], axis=1)
        changes["final_base"] = first + per_layer.sum((0, 1))
        changes["input_ablation"], layer_changes["read_ablation"] = first, per_layer
        layer_changes["first_source"] = jnp.asarray([graph.head_rows(layer)[0] for layer in range(graph.n_layers)])
    return Edit(layers=LayerEdit(**layer_changes), **changes)


def _per_layer_columns(graph: Graph, weights: Float[Array, "N M"]) -> tuple[Float[Array, "L N 3H+1"],
                                                                            Float[Array, " N"]]:
    per_layer, logits = graph.layer_columns(weights)
    return jnp.moveaxis(per_layer, 1, 0), logits


@functools.partial(jax.jit, static_argnames=("keep_sources", "capture"))
def run(
    model: Transformer,
    embeddings: Float[Array, "T D"],
    interventions: Interventions = Interventions(),
    *,
    valid: Bool[Array, " T"] | None = None,
    positions: Int[Array, " T"] | None = None,
    keep_sources: bool = True,
    capture: Capture = Capture(),
) -> Run:
    """The forward pass with interventions applied, keeping every node's output unless `keep_sources` is
    False (then heads are projected together, as in the plain model, and `Run.sources` is None), and what
    `capture` asks for.

    The function is jitted, so calls outside a `jit` reuse one compiled program per shape and kind of
    intervention; models of one architecture share it."""
    graph = Graph.for_model(model.architecture)
    if interventions.probes is not None:
        capture = dataclasses.replace(capture, residual=True, qkv=True)
    if keep_sources:
        capture = dataclasses.replace(capture, head_out=True, mlp_out=True)
    trace = model.trace(embeddings, valid=valid, positions=positions, edit=edit(graph, interventions),
                        capture=capture)
    sources = None
    if keep_sources:
        per_layer = jnp.concatenate([trace.layers.head_out, trace.layers.mlp_out[:, None]], axis=1)
        sources = graph.join_rows(trace.embeddings, per_layer)
    return Run(sources, trace.final, trace.layers)


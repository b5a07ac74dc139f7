"""What one forward pass may change and keep, as data: the sites of the block step.

The plain forward and every intervened forward run the same step (`layers.Block.step`) in one `lax.scan`
over the stacked layers. What differs is data handed to the step:
- `Edit`: arrays applied at fixed sites, each field None when unused (then it compiles away):
  - the input node's output (the embeddings) and the residual stream entering each block, replaced per
    position: out' = keep · out + (1 − keep) · value;
  - each head's write (z·W_O) and the MLP's output, replaced the same way;
  - zero probes added after the q/k/v projections (keys and values per query head), to the MLP's input, to
    its hidden activations (neurons) and to the logits' input, whose gradients are the attribution signal;
  - per-edge reading: a destination v reads Σ_u [w_uv · out_u(this run) + (1 − w_uv) · ablation_u] over
    the nodes u upstream of it, so each head's q, k and v inputs are their own mixes, each through its own
    norm. The upstream nodes are a prefix of the node order, so this is the prefix sum of the ablation
    values plus Σ_u w_uv · (out_u − ablation_u): one product with the differences, which the step carries.
- `Capture`: which intermediate values the run returns (static).

Rows of node arrays follow the EAP-IG graph: the input, then each layer's H heads and its MLP. The per-layer
arrays of an `Edit` carry a leading layer axis; `circuits.interventions` builds them from the graph's layout.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from flax import struct
from jaxtyping import Array, Float, Int


def blend(out: Array, keep: Array, value: Array) -> Array:
    """keep · out + (1 − keep) · value, with `keep` lacking out's last (feature) axis."""
    keep = keep[..., None].astype(out.dtype)
    return keep * out + (1 - keep) * value.astype(out.dtype)


@struct.dataclass
class LayerEdit:
    """What the step changes in one block (in `Edit.layers`, every field has a leading layer axis).

    resid_keep, resid_value: patch of the residual stream entering the block.
    node_keep, node_value: patch of the block's node outputs, rows = its H heads, then its MLP.
    qkv_probe: added to each head's query, key and value after the projection and bias, before RoPE.
    mlp_probe: added to the MLP's input.
    hidden_probe: added to the MLP's hidden activations (its neurons), before the down projection.
    read_weight: edge weights into the block's destinations (columns: the heads' q, k and v inputs, then the
      MLP's) from every node (rows, graph order), zero off the edges.
    read_base: what the heads' inputs and the MLP's input read when every edge is ablated: the sums of the
      ablation values of their upstream nodes.
    read_ablation: the ablation values of the block's own nodes (its heads, then its MLP).
    first_source: the row of the block's first head among the nodes.
    """

    resid_keep: Float[Array, " T"] | None = None
    resid_value: Float[Array, "T D"] | None = None
    node_keep: Float[Array, "H+1 T"] | None = None
    node_value: Float[Array, "H+1 T D"] | None = None
    qkv_probe: Float[Array, "3 T H E"] | None = None
    mlp_probe: Float[Array, "T D"] | None = None
    hidden_probe: Float[Array, "T F"] | None = None
    read_weight: Float[Array, "N 3H+1"] | None = None
    read_base: Float[Array, "2 T D"] | None = None
    read_ablation: Float[Array, "H+1 T D"] | None = None
    first_source: Int[Array, ""] | None = None

    @property
    def reads_edges(self) -> bool:
        return self.read_weight is not None


@struct.dataclass
class Edit:
    """Everything one forward pass changes (see the module doc); the default changes nothing.

    input_keep, input_value: patch of the input node's output (the embeddings).
    layers: the per-block edits, stacked on a leading layer axis.
    final_keep, final_value: patch of the logits' input (the residual stream after the last block).
    final_probe: added to the logits' input.
    input_ablation: with edge reading, the input node's ablation value (the other nodes' are in `layers`).
    final_weight, final_base: with edge reading, the weights of the edges into the logits, and the sum of
      every node's ablation value.
    """

    input_keep: Float[Array, " T"] | None = None
    input_value: Float[Array, "T D"] | None = None
    layers: LayerEdit = LayerEdit()
    final_keep: Float[Array, " T"] | None = None
    final_value: Float[Array, "T D"] | None = None
    final_probe: Float[Array, "T D"] | None = None
    input_ablation: Float[Array, "T D"] | None = None
    final_weight: Float[Array, " N"] | None = None
    final_base: Float[Array, "T D"] | None = None


@dataclasses.dataclass(frozen=True)
class Capture:
    """Which intermediate values a run keeps (a static choice: what is not kept is never materialised).

    residual: the residual stream entering each block (what its attention reads).
    head_z: each head's attention-weighted values, before the output projection.
    head_out: each head's write to the residual stream (forces the heads to be projected one by one).
    mlp_out: each MLP's output.
    qkv: each head's query, key and value after projection and bias, before RoPE (keys and values once
      per query head): where `Edit` probes sit.
    mlp_hidden: each MLP's hidden activations (silu(x W_gate) · x W_up), for neuron-level work.
    """

    residual: bool = False
    head_z: bool = False
    head_out: bool = False
    mlp_out: bool = False
    qkv: bool = False
    mlp_hidden: bool = False


class LayerTrace(NamedTuple):
    """What one block kept (each None unless captured); `Trace` stacks them on a leading layer axis."""

    residual: Float[Array, "T D"] | None
    head_z: Float[Array, "T H E"] | None
    head_out: Float[Array, "H T D"] | None
    mlp_out: Float[Array, "T D"] | None
    qkv: Float[Array, "3 T H E"] | None
    mlp_hidden: Float[Array, "T F"] | None


class Trace(NamedTuple):
    """What a forward pass computed, for one sequence.

    embeddings: the input node's output (the embeddings in the parameter dtype, after any patch).
    final: the logits' input (the residual stream after the last block and any patch, before the final norm).
    layers: the captured per-block values, stacked on a leading layer axis.
    """

    embeddings: Float[Array, "T D"]
    final: Float[Array, "T D"]
    layers: LayerTrace


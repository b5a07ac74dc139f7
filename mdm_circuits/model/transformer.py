"""The decoder as a Flax NNX module, and its pure functional boundary.

The module is written for one sequence: tokens[T] -> logits[T, V]. Batch with `jax.vmap`, e.g.

    graphdef, state = nnx.split(model)
    batched = jax.jit(jax.vmap(forward, in_axes=(None, None, 0)), static_argnums=0)
    logits = batched(graphdef, state, tokens)          # tokens: int[B, T]

Padding: `valid[S]` marks real tokens; padded positions are never attended to, and their own outputs are
unspecified (finite). Positions default to 0..T-1 for every sequence, as in Hugging Face; RoPE depends only
on position differences, so left padding leaves the real tokens' logits unchanged up to rounding.
Token ids outside the vocabulary give NaN embeddings (`jnp.take`'s fill), which poison every output.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from mdm_circuits.model.config import ConfigError, ModelConfig
from mdm_circuits.model.layers import Block, RMSNorm, accumulation_dtype, rotary_tables, weight_init


class Activations(NamedTuple):
    """What a forward pass computed along the way, for one sequence.

    residual: the residual stream entering each block, then leaving the last one (before the final norm).
    head_z: each head's attention-weighted values, before the output projection.
    mlp_out: each MLP's output.
    """

    residual: Float[Array, "L+1 T D"]
    head_z: Float[Array, "L T H E"]
    mlp_out: Float[Array, "L T D"]


class Transformer(nnx.Module):
    """Embedding, `n_layers` pre-norm blocks, final RMSNorm and unembedding."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        self.config = config
        self.embedding = nnx.Param(
            weight_init(rngs.params(), (config.vocab_size, config.d_model), dtype))
        self.blocks = nnx.List(
            [Block(config, dtype=dtype, rngs=rngs) for _ in range(config.n_layers)])
        self.final_norm = RMSNorm(config.d_model, config.norm_eps, dtype=dtype)
        self.unembedding = None if config.tie_embeddings else nnx.Param(
            weight_init(rngs.params(), (config.d_model, config.vocab_size), dtype))

    def embed(self, tokens: Int[Array, " T"]) -> Float[Array, "T D"]:
        return jnp.take(self.embedding[...], tokens, axis=0)

    def attention_mask(self, valid: Bool[Array, " S"], pattern: Bool[Array, "T S"] | None = None
                       ) -> Bool[Array, "T S"]:
        """Which key positions each query may read: real tokens, and among them those the configured
        attention allows (only earlier ones for a causal model), or those of `pattern` when it is given."""
        n = valid.shape[0]
        mask = jnp.broadcast_to(valid[None, :], (n, n))
        if pattern is not None:
            return mask & pattern
        if self.config.attention == "causal":
            mask = mask & jnp.tril(jnp.ones((n, n), dtype=bool))
        return mask

    def trace(
        self,
        embeddings: Float[Array, "T D"],
        *,
        valid: Bool[Array, " T"] | None = None,
        positions: Int[Array, " T"] | None = None,
        pattern: Bool[Array, "T T"] | None = None,
    ) -> Activations:
        """Run the blocks from input embeddings (cast to the parameter dtype), keeping what each one did.

        `pattern` replaces the configured attention pattern (e.g. the partly opened causal masks of
        attention-mask annealing during ARM → MDM adaptation)."""
        n = embeddings.shape[0]
        valid = jnp.ones((n,), dtype=bool) if valid is None else valid
        positions = jnp.arange(n) if positions is None else positions
        mask = self.attention_mask(valid, pattern)
        rope = rotary_tables(positions, self.config.head_dim, self.config.rope_theta)
        residual, head_z, mlp_out = [embeddings.astype(self.embedding.dtype)], [], []
        for block in self.blocks:
            x, z, mlp = block.trace(residual[-1], mask=mask, rope=rope)
            residual.append(x)
            head_z.append(z)
            mlp_out.append(mlp)
        return Activations(jnp.stack(residual), jnp.stack(head_z), jnp.stack(mlp_out))

    def unembed(self, residual: Float[Array, "T D"]) -> Float[Array, "T V"]:
        """Final norm and unembedding; logits are float32 for bfloat16 or float32 parameters."""
        normed = self.final_norm(residual)
        wide = accumulation_dtype(normed.dtype)
        if self.unembedding is None:
            return jnp.einsum("td,vd->tv", normed, self.embedding[...], preferred_element_type=wide)
        return jnp.einsum("td,dv->tv", normed, self.unembedding[...], preferred_element_type=wide)

    def from_embeddings(self, embeddings: Float[Array, "T D"], *, valid=None, positions=None, pattern=None
                        ) -> Float[Array, "T V"]:
        return self.unembed(self.trace(embeddings, valid=valid, positions=positions, pattern=pattern).residual[-1])

    def __call__(self, tokens: Int[Array, " T"], *, valid=None, positions=None, pattern=None) -> Float[Array, "T V"]:
        return self.from_embeddings(self.embed(tokens), valid=valid, positions=positions, pattern=pattern)

    def logits_at(self, tokens: Int[Array, " T"], at: Int[Array, " A"], *, valid=None, positions=None
                  ) -> Float[Array, "A V"]:
        """The logits of output positions `at` only (unembedding every position costs V·D per token)."""
        residual = self.trace(self.embed(tokens), valid=valid, positions=positions).residual[-1]
        return self.unembed(residual[at])


def forward(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: Int[Array, " T"],
    valid: Bool[Array, " T"] | None = None,
    positions: Int[Array, " T"] | None = None,
) -> Float[Array, "T V"]:
    """Logits of one sequence, as a pure function of the model's graph definition and state."""
    return nnx.merge(graphdef, state)(tokens, valid=valid, positions=positions)


def forward_from_embeddings(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    embeddings: Float[Array, "T D"],
    valid: Bool[Array, " T"] | None = None,
    positions: Int[Array, " T"] | None = None,
) -> Float[Array, "T V"]:
    """Logits from input embeddings (the point where integrated gradients interpolate)."""
    return nnx.merge(graphdef, state).from_embeddings(embeddings, valid=valid, positions=positions)


def activations(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: Int[Array, " T"],
    valid: Bool[Array, " T"] | None = None,
    positions: Int[Array, " T"] | None = None,
) -> Activations:
    """The residual stream, every head's z and every MLP's output for one sequence."""
    model = nnx.merge(graphdef, state)
    return model.trace(model.embed(tokens), valid=valid, positions=positions)


def head_outputs(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: Int[Array, " T"],
    valid: Bool[Array, " T"] | None = None,
    positions: Int[Array, " T"] | None = None,
) -> Float[Array, "L T H D"]:
    """What each head of each layer writes to the residual stream (z W_O, no output bias)."""
    head_z = activations(graphdef, state, tokens, valid, positions).head_z
    blocks = nnx.merge(graphdef, state).blocks
    return jnp.stack([block.attn.head_outputs(z) for block, z in zip(blocks, head_z)])


def abstract_model(config: ModelConfig, dtype: jnp.dtype = jnp.float32) -> Transformer:
    """The model with `jax.ShapeDtypeStruct` leaves: shapes and dtypes, no memory allocated."""
    return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0), dtype=dtype))


def count_parameters(config: ModelConfig) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(abstract_model(config))))


def with_config(model: Transformer, config: ModelConfig) -> Transformer:
    """The same weights under another configuration of the same shapes (e.g. bidirectional attention)."""
    graphdef, state = nnx.split(model)
    new_graphdef, new_state = nnx.split(abstract_model(config, model.embedding.dtype))
    old_shapes = jax.tree.map(jnp.shape, state)
    new_shapes = jax.tree.map(jnp.shape, new_state)
    if old_shapes != new_shapes:
        raise ConfigError(
            "with_config can change conventions (attention, logit_shift, mask_token_id, rope_theta, norm_eps) "
            "but not parameter shapes; build a new model for a different architecture")
    return nnx.merge(new_graphdef, state)

"""The decoder as a Flax NNX module, and its pure functional boundary.

The module is written for one sequence: tokens[T] -> logits[T, V]. Batch with `jax.vmap`, e.g.

    graphdef, state = nnx.split(model)
    batched = jax.jit(jax.vmap(forward, in_axes=(None, None, 0)), static_argnums=0)
    logits = batched(graphdef, state, tokens)          # tokens: int[B, T]

Layers are stored once, stacked: every block parameter has a leading layer axis (`blocks.attn.w_q[L, D, H,
E]`), and the forward is one `lax.scan` of `Block.step` over them, so XLA compiles one layer, not L.

What is static (in the graph definition) is the `Architecture`: shapes and constants. The conventions
(causal or bidirectional attention, the readout offset, the mask token) are small arrays in the module's
state (`Convention` variables, not parameters), so an ARM and its MDM share one compiled program, and
`stack` puts models of one architecture on a leading model axis to run them as one program.

Padding: `valid[S]` marks real tokens; padded positions are never attended to, and their own outputs are
unspecified (finite). Positions default to 0..T-1 for every sequence, as in Hugging Face; RoPE depends only
on position differences, so left padding leaves the real tokens' logits unchanged up to rounding.
Token ids outside the vocabulary give NaN embeddings (`jnp.take`'s fill), which poison every output.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from mdm_circuits.errors import ConfigError
from mdm_circuits.model.config import Architecture, ModelConfig
from mdm_circuits.model.layers import Block, RMSNorm, accumulation_dtype, read_edges, rotary_tables, weight_init
from mdm_circuits.model.sites import Capture, Edit, Trace, blend


class Convention(nnx.Variable):
    """A convention held as data, not a parameter: optimizers, checkpoints and parameter counts skip it."""


class Conventions(nnx.Module):
    """causal: bool[], attention reads only earlier positions; read_offset: int32[], how many positions
    before an answer token its logits are read (1 with the logit shift); mask_token: int32[], the mask
    token id, −1 for a model without one."""

    def __init__(self, config: ModelConfig):
        self.causal = Convention(jnp.asarray(config.attention == "causal"))
        self.read_offset = Convention(jnp.asarray(config.read_offset, jnp.int32))
        self.mask_token = Convention(jnp.asarray(-1 if config.mask_token_id is None else config.mask_token_id,
                                                 jnp.int32))


class Activations(NamedTuple):
    """What a forward pass computed along the way, for one sequence.

    residual: the residual stream entering each block, then leaving the last one (before the final norm).
    head_z: each head's attention-weighted values, before the output projection.
    mlp_out: each MLP's output.
    """

    residual: Float[Array, "L+1 T D"]
    head_z: Float[Array, "L T H E"]
    mlp_out: Float[Array, "L T D"]


def _stack_layers(blocks: Sequence[Block]) -> Block:
    """One `Block` whose parameters carry a leading layer axis."""
    definition = nnx.graphdef(blocks[0])
    return nnx.merge(definition, jax.tree.map(lambda *layers: jnp.stack(layers), *map(nnx.state, blocks)))


class Transformer(nnx.Module):
    """Embedding, `n_layers` pre-norm blocks (stacked), final RMSNorm and unembedding."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        self.architecture = config.architecture
        self.conventions = Conventions(config)
        self.embedding = nnx.Param(
            weight_init(rngs.params(), (config.vocab_size, config.d_model), dtype))
        # Drawn layer by layer (the same weights as unstacked blocks), then stored stacked.
        self.blocks = _stack_layers([Block(config, dtype=dtype, rngs=rngs) for _ in range(config.n_layers)])
        self.final_norm = RMSNorm(config.d_model, config.norm_eps, dtype=dtype)
        self.unembedding = None if config.tie_embeddings else nnx.Param(
            weight_init(rngs.params(), (config.d_model, config.vocab_size), dtype))

    @property
    def config(self) -> ModelConfig:
        """The architecture with the conventions read from their arrays. Needs concrete conventions: inside
        a traced program, read `architecture` and `conventions` instead."""
        conventions = self.conventions
        try:
            causal, offset, mask = (conventions.causal[...].item(), conventions.read_offset[...].item(),
                                    conventions.mask_token[...].item())
        except (jax.errors.ConcretizationTypeError, AttributeError, ValueError) as error:
            raise ConfigError(
                "this model's conventions are not concrete (a traced, abstract or stacked model); read "
                "model.architecture for shapes and model.conventions for the conventions as arrays") from error
        return ModelConfig(**dataclasses.asdict(self.architecture), attention="causal" if causal else "bidirectional",
                           logit_shift=bool(offset), mask_token_id=None if mask < 0 else int(mask))

    def known_config(self) -> ModelConfig | None:
        """`config` where the conventions are concrete, None inside a traced program (where a check of the
        conventions can only be skipped)."""
        try:
            return self.config
        except ConfigError:
            return None

    def layer(self, index: int) -> Block:
        """Block `index` on its own (its slice of the stacked parameters)."""
        definition, state = nnx.split(self.blocks)
        return nnx.merge(definition, jax.tree.map(lambda stacked: stacked[index], state))

    def embed(self, tokens: Int[Array, " T"]) -> Float[Array, "T D"]:
        return jnp.take(self.embedding[...], tokens, axis=0)

    def read_position(self, position: Int[Array, "..."]) -> Int[Array, "..."]:
        """The output position whose logits predict the token at `position` (the readout offset is data)."""
        return position - self.conventions.read_offset[...].astype(jnp.asarray(position).dtype)

    def attention_mask(self, valid: Bool[Array, " S"], pattern: Bool[Array, "T S"] | None = None
                       ) -> Bool[Array, "T S"]:
        """Which key positions each query may read: real tokens, and among them those the model's attention
        allows (only earlier ones for a causal model), or those of `pattern` when it is given."""
        n = valid.shape[0]
        mask = jnp.broadcast_to(valid[None, :], (n, n))
        if pattern is not None:
            return mask & pattern
        causal = self.conventions.causal[...].astype(bool)
        return mask & (jnp.tril(jnp.ones((n, n), dtype=bool)) | ~causal)

    def trace(
        self,
        embeddings: Float[Array, "T D"],
        *,
        valid: Bool[Array, " T"] | None = None,
        positions: Int[Array, " T"] | None = None,
        pattern: Bool[Array, "T T"] | None = None,
        edit: Edit = Edit(),
        capture: Capture = Capture(),
        unroll: int | bool = 1,
    ) -> Trace:
        """Run the blocks from input embeddings (cast to the parameter dtype): one `lax.scan` of
        `Block.step`, with `edit` applied and what `capture` asks for kept (see `sites`).

        `pattern` replaces the attention pattern (e.g. the partly opened causal masks of attention-mask
        annealing during ARM → MDM adaptation). `unroll` is the scan's: True compiles every layer, which
        trains small models faster on a CPU; the default compiles one."""
        n = embeddings.shape[0]
        valid = jnp.ones((n,), dtype=bool) if valid is None else valid
        positions = jnp.arange(n) if positions is None else positions
        mask = self.attention_mask(valid, pattern)
        rope = rotary_tables(positions, self.architecture.head_dim, self.architecture.rope_theta)
        x = embeddings.astype(self.embedding.dtype)
        if edit.input_keep is not None:
            x = blend(x, edit.input_keep, edit.input_value)
        differences = None
        if edit.layers.reads_edges:  # every node's output so far minus its ablation value; the rest zeros
            differences = jnp.zeros((*x.shape, edit.layers.read_weight.shape[1]), x.dtype).at[..., 0].set(
                x - edit.input_ablation.astype(x.dtype))
        definition, stacked = nnx.split(self.blocks)

        def layer_step(carry, layer):
            residual, differences = carry
            state, layer_edit = layer
            residual, differences, kept = nnx.merge(definition, state).step(
                residual, differences, layer_edit, mask=mask, rope=rope, capture=capture)
            return (residual, differences), kept

        (residual, differences), layers = jax.lax.scan(layer_step, (x, differences), (stacked, edit.layers),
                                                       unroll=unroll)
        if edit.final_weight is not None:
            final = read_edges(edit.final_weight[:, None], edit.final_base, differences)[0]
        else:
            final = residual
            if edit.final_keep is not None:
                final = blend(final, edit.final_keep, edit.final_value)
            if edit.final_probe is not None:
                final = final + edit.final_probe.astype(final.dtype)
        return Trace(x, final, layers)

    def unembed(self, residual: Float[Array, "T D"]) -> Float[Array, "T V"]:
        """Final norm and unembedding; logits are float32 for bfloat16 or float32 parameters."""
        normed = self.final_norm(residual)
        wide = accumulation_dtype(normed.dtype)
        if self.unembedding is None:
            return jnp.einsum("td,vd->tv", normed, self.embedding[...], preferred_element_type=wide)
        return jnp.einsum("td,dv->tv", normed, self.unembedding[...], preferred_element_type=wide)

    def direct_logits(self, writes: Float[Array, "C D"], residual: Float[Array, " D"]) -> Float[Array, "C V"]:
        """What each of C writes to the residual stream contributes to the logits read at a position whose final
        residual is `residual`: the final norm is linear once its statistic is fixed at that residual, so
        the contributions of every write sum to the logits (the direct logit attribution, or logit lens of a
        component)."""
        wide = accumulation_dtype(writes.dtype)
        scale = self.final_norm.scale[...].astype(wide) / self.final_norm.rms(residual)
        normed = (writes.astype(wide) * scale[None, :]).astype(self.embedding.dtype)
        if self.unembedding is None:
            return jnp.einsum("cd,vd->cv", normed, self.embedding[...], preferred_element_type=wide)
        return jnp.einsum("cd,dv->cv", normed, self.unembedding[...], preferred_element_type=wide)

    def from_embeddings(self, embeddings: Float[Array, "T D"], *, valid=None, positions=None, pattern=None,
                        unroll: int | bool = 1) -> Float[Array, "T V"]:
        return self.unembed(self.trace(embeddings, valid=valid, positions=positions, pattern=pattern,
                                       unroll=unroll).final)

    def __call__(self, tokens: Int[Array, " T"], *, valid=None, positions=None, pattern=None,
                 unroll: int | bool = 1) -> Float[Array, "T V"]:
        return self.from_embeddings(self.embed(tokens), valid=valid, positions=positions, pattern=pattern,
                                    unroll=unroll)

    def logits_at(self, tokens: Int[Array, " T"], at: Int[Array, " A"], *, valid=None, positions=None
                  ) -> Float[Array, "A V"]:
        """The logits of output positions `at` only (unembedding every position costs V·D per token)."""
        return self.unembed(self.trace(self.embed(tokens), valid=valid, positions=positions).final[at])


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
    trace = model.trace(model.embed(tokens), valid=valid, positions=positions,
                        capture=Capture(residual=True, head_z=True, mlp_out=True))
    layers = trace.layers
    return Activations(jnp.concatenate([layers.residual, trace.final[None]]), layers.head_z, layers.mlp_out)


def head_outputs(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: Int[Array, " T"],
    valid: Bool[Array, " T"] | None = None,
    positions: Int[Array, " T"] | None = None,
) -> Float[Array, "L T H D"]:
    """What each head of each layer writes to the residual stream (z W_O, no output bias)."""
    model = nnx.merge(graphdef, state)
    trace = model.trace(model.embed(tokens), valid=valid, positions=positions, capture=Capture(head_out=True))
    return trace.layers.head_out.swapaxes(1, 2)


def abstract_model(config: ModelConfig, dtype: jnp.dtype = jnp.float32) -> Transformer:
    """The model with `jax.ShapeDtypeStruct` leaves: shapes and dtypes, no memory allocated."""
    return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0), dtype=dtype))


def parameters(model: Transformer) -> nnx.State:
    """The model's parameters (without its conventions)."""
    return nnx.state(model, nnx.Param)


def count_parameters(config: Architecture) -> int:
    shapes = jax.eval_shape(lambda: parameters(Transformer(_as_config(config), rngs=nnx.Rngs(0))))
    return sum(leaf.size for leaf in jax.tree.leaves(shapes))


def _as_config(config: Architecture) -> ModelConfig:
    return config if isinstance(config, ModelConfig) else ModelConfig(**dataclasses.asdict(config))


def assemble(config: ModelConfig, params: nnx.State) -> Transformer:
    """The model of `config` with the given parameters (a state or pure dict shaped like `parameters`)."""
    dtype = jax.tree.leaves(params)[0].dtype
    graphdef, template, _ = nnx.split(abstract_model(config, dtype), nnx.Param, Convention)
    expected = jax.tree.map(jnp.shape, nnx.to_pure_dict(template))
    given = jax.tree.map(jnp.shape, params if isinstance(params, dict) else nnx.to_pure_dict(params))
    if expected != given:
        raise ConfigError(f"parameters of other shapes than the {config.n_layers}-layer, d_model "
                          f"{config.d_model} architecture's; build a new model for a different architecture")
    if isinstance(params, dict):
        nnx.replace_by_pure_dict(template, params)
        params = template
    return nnx.merge(graphdef, params, conventions_state(config))


def conventions_state(config: ModelConfig) -> nnx.State:
    """`config`'s conventions, at the path a `Transformer` keeps them."""
    return nnx.State({"conventions": nnx.state(Conventions(config))})


def with_config(model: Transformer, config: ModelConfig) -> Transformer:
    """The same weights under another configuration of the same shapes (e.g. bidirectional attention)."""
    try:
        return assemble(config, parameters(model))
    except ConfigError as error:
        raise ConfigError(
            "with_config can change conventions (attention, logit_shift, mask_token_id, rope_theta, norm_eps) "
            "but not parameter shapes; build a new model for a different architecture") from error


@dataclasses.dataclass(frozen=True)
class ModelStack:
    """Models of one architecture on a leading model axis: every parameter and convention of `models` is
    `[M, ...]`. Attribution, circuit evaluation and node patching run a stack as one traced program (vmap
    over the model axis) and return one result per model. `configs[i]` is model i's configuration."""

    models: Transformer
    configs: tuple[ModelConfig, ...]

    @property
    def size(self) -> int:
        return len(self.configs)

    def __getitem__(self, index: int) -> Transformer:
        return jax.tree.map(lambda leaf: leaf[index], self.models)


def stack(models: Sequence[Transformer]) -> ModelStack:
    """Put models of one architecture and parameter dtype on a leading model axis (this copies their
    parameters: M models take M times the memory of one)."""
    models = list(models)
    if not models:
        raise ConfigError("stack needs at least one model")
    first = models[0]
    for index, model in enumerate(models[1:], start=1):
        if model.architecture != first.architecture:
            differences = [f"{field.name} {getattr(first.architecture, field.name)!r} vs "
                           f"{getattr(model.architecture, field.name)!r}"
                           for field in dataclasses.fields(Architecture)
                           if getattr(first.architecture, field.name) != getattr(model.architecture, field.name)]
            raise ConfigError(f"model {index} has another architecture than model 0 ({'; '.join(differences)}); "
                              "only models of one architecture run as one program")
        if model.embedding.dtype != first.embedding.dtype:
            raise ConfigError(f"model {index} has {jnp.dtype(model.embedding.dtype).name} parameters, model 0 "
                              f"{jnp.dtype(first.embedding.dtype).name}; cast them to one dtype first")
    configs = tuple(model.config for model in models)
    return ModelStack(jax.tree.map(lambda *leaves: jnp.stack(leaves), *models), configs)

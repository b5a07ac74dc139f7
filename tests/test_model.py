"""Properties of the model that parity alone cannot show: batching, gradients, causality, heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import run
from mdm_circuits.errors import ConfigError
from mdm_circuits.model.config import ModelConfig
from mdm_circuits.model.layers import rotary_tables
from mdm_circuits.model.sites import Capture
from mdm_circuits.model.transformer import (
    Transformer,
    activations,
    count_parameters,
    forward,
    forward_from_embeddings,
    head_outputs,
    with_config,
)

CONFIG = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_mlp=48,
                     qkv_bias=True)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return Transformer(CONFIG, rngs=nnx.Rngs(0))


def test_jit_vmap_equals_per_example(model):
    tokens = jax.random.randint(jax.random.key(1), (5, 9), 0, CONFIG.vocab_size)
    graphdef, state = nnx.split(model)
    batched = jax.jit(jax.vmap(forward, in_axes=(None, None, 0)), static_argnums=0)(graphdef, state, tokens)
    for row in range(tokens.shape[0]):
        np.testing.assert_allclose(batched[row], forward(graphdef, state, tokens[row]), rtol=1e-5, atol=1e-5)


def test_embedding_gradient_is_finite_and_matches_finite_difference(model):
    graphdef, state = nnx.split(model)
    tokens = jnp.array([3, 14, 15, 9, 2, 6])
    embeddings = model.embed(tokens)

    def log_probability(x):
        return jax.nn.log_softmax(forward_from_embeddings(graphdef, state, x)[-1])[7]

    gradient = jax.jit(jax.grad(log_probability))(embeddings)
    assert jnp.isfinite(gradient).all() and jnp.abs(gradient).max() > 0
    for seed in range(3):
        direction = jax.random.normal(jax.random.key(seed), embeddings.shape)
        direction = direction / jnp.linalg.norm(direction) * jnp.linalg.norm(embeddings)
        step = 1e-2  # float32: truncation error ~ step^2, rounding ~ 1e-7 / step
        finite_difference = (log_probability(embeddings + step * direction)
                             - log_probability(embeddings - step * direction)) / (2 * step)
        np.testing.assert_allclose(jnp.vdot(gradient, direction), finite_difference, rtol=2e-3)


def test_causal_model_ignores_future_tokens(model):
    tokens = jnp.array([1, 2, 3, 4, 5, 6])
    changed = tokens.at[4].set(40)
    np.testing.assert_array_equal(run(model, tokens)[:4], run(model, changed)[:4])


def test_bidirectional_model_reads_future_tokens(model):
    bidirectional = with_config(model, CONFIG.replace(attention="bidirectional"))
    tokens = jnp.array([1, 2, 3, 4, 5, 6])
    changed = tokens.at[4].set(40)
    assert jnp.abs(run(bidirectional, tokens)[0] - run(bidirectional, changed)[0]).max() > 1e-4


def test_head_outputs_sum_to_attention_output(model):
    attention = model.layer(1).attn
    x = jax.random.normal(jax.random.key(3), (7, CONFIG.d_model))
    mask = model.attention_mask(jnp.ones(7, dtype=bool))
    rope = rotary_tables(jnp.arange(7), CONFIG.head_dim, CONFIG.rope_theta)
    z = attention.heads(x, mask=mask, rope=rope)
    per_head = attention.head_outputs(z)
    assert per_head.shape == (7, CONFIG.n_heads, CONFIG.d_model)
    np.testing.assert_allclose(per_head.sum(axis=1), attention(x, mask=mask, rope=rope), atol=1e-6)
    # Head 3 alone: its slice of W_O times its own z.
    np.testing.assert_allclose(per_head[:, 3], z[:, 3] @ attention.w_o[3], atol=1e-6)


def test_residual_stream_is_the_sum_of_head_and_mlp_writes(model):
    graphdef, state = nnx.split(model)
    tokens = jnp.array([7, 1, 30, 22, 5])
    trace = activations(graphdef, state, tokens)
    per_head = head_outputs(graphdef, state, tokens)
    assert per_head.shape == (CONFIG.n_layers, 5, CONFIG.n_heads, CONFIG.d_model)
    writes = per_head.sum(axis=2) + trace.mlp_out
    np.testing.assert_allclose(trace.residual[1:] - trace.residual[:-1], writes, atol=1e-5)
    np.testing.assert_array_equal(trace.residual[0], model.embed(tokens))


def test_float32_embeddings_run_in_the_parameter_dtype(model):
    graphdef, state = nnx.split(model)
    bf16_state = jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16), state)
    bf16_model = nnx.merge(graphdef, bf16_state)
    tokens = jnp.array([5, 4, 3, 2])
    embeddings = bf16_model.embed(tokens).astype(jnp.float32)
    np.testing.assert_array_equal(forward_from_embeddings(graphdef, bf16_state, embeddings),
                                  forward(graphdef, bf16_state, tokens))


def test_bfloat16_model_tracks_float32(model):
    graphdef, state = nnx.split(model)
    bf16_state = jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16), state)
    tokens = jnp.array([5, 4, 3, 2, 1, 0, 11])
    full = forward(graphdef, state, tokens)
    half = forward(graphdef, bf16_state, tokens)
    assert half.dtype == jnp.float32  # logits are float32 whatever the parameters
    assert jnp.abs(half - full).max() < 0.05 * jnp.abs(full).max()


def test_with_config_refuses_a_different_shape(model):
    with pytest.raises(ConfigError, match="not parameter shapes"):
        with_config(model, CONFIG.replace(n_layers=3))


def test_parameter_count_matches_allocated_model(model):
    assert count_parameters(CONFIG) == sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_captured_mlp_neurons_project_to_the_mlp_output(model):
    """Neuron-level work reads the MLP's hidden activations; captured in the same step, they are what the
    down projection turns into the MLP's output. What is not asked for is not kept."""
    tokens = jnp.array([7, 1, 30, 22, 5])
    trace = model.trace(model.embed(tokens), capture=Capture(mlp_hidden=True, mlp_out=True))
    assert trace.layers.mlp_hidden.shape == (CONFIG.n_layers, 5, CONFIG.d_mlp)
    projected = jnp.einsum("ltf,lfd->ltd", trace.layers.mlp_hidden, model.blocks.mlp.w_down[...])
    np.testing.assert_allclose(projected, trace.layers.mlp_out, atol=1e-6)
    assert trace.layers.head_z is None and trace.layers.residual is None and trace.layers.qkv is None


def test_layers_are_stored_stacked_and_addressable_one_by_one(model):
    assert model.blocks.attn.w_q.shape == (CONFIG.n_layers, CONFIG.d_model, CONFIG.n_heads, CONFIG.head_dim)
    np.testing.assert_array_equal(model.layer(1).attn.w_o[...], model.blocks.attn.w_o[...][1])


def test_conventions_are_data_and_config_reads_them(model):
    mdm = with_config(model, CONFIG.replace(attention="bidirectional", mask_token_id=49, logit_shift=False))
    assert mdm.config == CONFIG.replace(attention="bidirectional", mask_token_id=49, logit_shift=False)
    assert nnx.graphdef(mdm) == nnx.graphdef(model)  # one static structure: one compiled program for both
    assert int(mdm.conventions.mask_token[...]) == 49 and int(model.conventions.mask_token[...]) == -1
    with pytest.raises(ConfigError, match="not concrete"):
        jax.jit(lambda m: m.config)(mdm)

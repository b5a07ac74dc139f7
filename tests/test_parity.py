"""Logit and per-layer hidden-state parity with transformers on the same weights (float32)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import run, save_hf, tiny_torch_model, torch_logits
from conversion import convert
from mdm_circuits.model import forward, hidden_states, with_config

TOLERANCE = 1e-4
BATCH, LENGTH, PAD = 3, 12, 4


@functools.cache
def _converted_pair(family: str, n_kv_heads: int, directory):
    torch_model = tiny_torch_model(family, n_kv_heads)
    model = convert(save_hf(torch_model, directory)).model
    return torch_model, model


@pytest.fixture(params=[("qwen2", 2), ("qwen2", 4), ("llama", 2), ("llama", 4)],
                ids=["qwen2-gqa", "qwen2-mha", "llama-gqa", "llama-mha"])
def pair(request, tmp_path_factory):
    family, n_kv_heads = request.param
    return _converted_pair(family, n_kv_heads, tmp_path_factory.mktemp(f"{family}{n_kv_heads}"))


def _batch(padding: str) -> tuple[np.ndarray, np.ndarray | None]:
    tokens = np.random.default_rng(1).integers(0, 96, size=(BATCH, LENGTH))
    if padding == "none":
        return tokens, None
    valid = np.ones((BATCH, LENGTH), dtype=bool)
    # Ragged: each example loses a different number of positions to padding.
    for row, n_pad in enumerate([0, PAD, PAD // 2]):
        if n_pad:
            if padding == "left":
                valid[row, :n_pad] = False
            else:
                valid[row, -n_pad:] = False
    return tokens, valid


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_logits_and_hidden_states_match_transformers(pair, attention, padding):
    torch_model, model = pair
    model = with_config(model, model.config.replace(attention=attention))
    tokens, valid = _batch(padding)
    expected_logits, expected_hidden = torch_logits(torch_model, tokens, valid, attention == "bidirectional")

    graphdef, state = nnx.split(model)
    in_axes = (None, None, 0, None if valid is None else 0)
    logits = jax.jit(jax.vmap(forward, in_axes=in_axes), static_argnums=0)(graphdef, state, tokens, valid)
    stream = jax.jit(jax.vmap(hidden_states, in_axes=in_axes), static_argnums=0)(graphdef, state, tokens, valid)

    real = np.ones((BATCH, LENGTH), dtype=bool) if valid is None else valid  # padded outputs are unspecified
    # transformers reports the residual entering each layer, and the normed final residual last.
    final = jax.vmap(model.final_norm)(stream[:, -1])
    ours = [stream[:, layer] for layer in range(model.config.n_layers)] + [final]
    assert len(ours) == len(expected_hidden)
    for layer, (got, want) in enumerate(zip(ours, expected_hidden)):
        error = np.abs(np.asarray(got) - want)[real].max()
        assert error <= TOLERANCE, f"hidden state {layer} differs by {error:.2e}"
    error = np.abs(np.asarray(logits) - expected_logits)[real].max()
    assert error <= TOLERANCE, f"logits differ by {error:.2e}"
    assert np.isfinite(np.asarray(logits)).all()


def test_padding_leaves_real_tokens_unchanged(pair):
    _, model = pair
    tokens = np.random.default_rng(2).integers(0, 96, size=(LENGTH,))
    padded = np.concatenate([np.zeros(PAD, dtype=tokens.dtype), tokens])
    valid = np.arange(LENGTH + PAD) >= PAD
    for attention in ("causal", "bidirectional"):
        variant = with_config(model, model.config.replace(attention=attention))
        plain = run(variant, tokens)
        left_padded = run(variant, padded, valid)[PAD:]
        np.testing.assert_allclose(left_padded, plain, atol=1e-5)

"""Logit and per-layer hidden-state parity with transformers on the same weights."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import run
from conversion import convert
from mdm_circuits.model.transformer import activations, forward, with_config
from mdm_circuits.testing import save_hf, tiny_torch_model, torch_logits

TOLERANCE = 1e-4
BATCH, LENGTH, PAD = 3, 12, 4


@pytest.fixture(scope="module", params=[("qwen2", 2), ("qwen2", 4), ("llama", 2), ("llama", 4)],
                ids=["qwen2-gqa", "qwen2-mha", "llama-gqa", "llama-mha"])
def pair(request, tmp_path_factory):
    """A tiny random torch model and its conversion, built once per module."""
    family, n_kv_heads = request.param
    torch_model = tiny_torch_model(family, n_kv_heads)
    return torch_model, convert(save_hf(torch_model, tmp_path_factory.mktemp(family))).model


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


def _compare(model, torch_model, tokens, valid, attention, tolerance, positions=None, relative=False):
    """Logits and every hidden state at real positions, against transformers: max |difference| within
    `tolerance`, or within `tolerance` times the largest reference magnitude if `relative`."""
    expected_logits, expected_hidden = torch_logits(torch_model, tokens, valid, attention == "bidirectional",
                                                    positions)
    graphdef, state = nnx.split(model)
    in_axes = (None, None, 0, None if valid is None else 0, None if positions is None else 0)
    logits = jax.jit(jax.vmap(forward, in_axes=in_axes), static_argnums=0)(
        graphdef, state, tokens, valid, positions)
    stream = jax.jit(jax.vmap(activations, in_axes=in_axes), static_argnums=0)(
        graphdef, state, tokens, valid, positions).residual

    real = np.ones(tokens.shape, dtype=bool) if valid is None else valid  # padded outputs are unspecified
    # transformers reports the residual entering each layer, and the normed final residual last.
    final = jax.vmap(model.final_norm)(stream[:, -1])
    ours = [stream[:, layer] for layer in range(model.config.n_layers)] + [final]
    assert len(ours) == len(expected_hidden)
    for layer, (got, want) in enumerate(zip(ours, expected_hidden)):
        error = np.abs(np.asarray(got, np.float32) - want)[real].max()
        bound = tolerance * (np.abs(want).max() if relative else 1.0)
        assert error <= bound, f"hidden state {layer} differs by {error:.2e}"
    error = np.abs(np.asarray(logits) - expected_logits)[real].max()
    bound = tolerance * (np.abs(expected_logits).max() if relative else 1.0)
    assert error <= bound, f"logits differ by {error:.2e}"
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_logits_and_hidden_states_match_transformers(pair, attention, padding):
    torch_model, model = pair
    tokens, valid = _batch(padding)
    _compare(with_config(model, model.config.replace(attention=attention)), torch_model, tokens, valid,
             attention, TOLERANCE)


def test_explicit_positions_match_transformers(pair):
    torch_model, model = pair
    tokens, _ = _batch("none")
    positions = np.cumsum(np.random.default_rng(3).integers(1, 4, size=tokens.shape), axis=1)
    _compare(model, torch_model, tokens, None, "causal", TOLERANCE, positions)


def test_bfloat16_tracks_transformers_bfloat16(pair, tmp_path):
    """Same bf16 weights on both sides; bf16 rounding differs between the two implementations, so the bound
    is loose, but a wrong cast order (norm, RoPE, softmax) would break it."""
    torch_model, model = pair
    bf16_torch = tiny_torch_model(
        "qwen2" if model.config.qkv_bias else "llama", model.config.n_kv_heads).to(torch.bfloat16)
    bf16_model = convert(save_hf(bf16_torch, tmp_path)).model
    assert bf16_model.embedding.dtype == jax.numpy.bfloat16
    tokens, valid = _batch("right")
    _compare(bf16_model, bf16_torch, tokens, valid, "causal", 3e-2, relative=True)


def test_padding_leaves_real_tokens_unchanged(pair):
    _, model = pair
    tokens = np.random.default_rng(2).integers(0, 96, size=(LENGTH,))
    padded = np.concatenate([np.zeros(PAD, dtype=tokens.dtype), tokens])
    valid = np.arange(LENGTH + PAD) >= PAD
    for attention in ("causal", "bidirectional"):
        variant = with_config(model, model.config.replace(attention=attention))
        np.testing.assert_allclose(run(variant, padded, valid)[PAD:], run(variant, tokens), atol=1e-5)

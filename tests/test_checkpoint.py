"""Orbax save/load: bit-identical round trips, and clear refusals of directories that are not saved models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import run
from mdm_circuits.errors import CheckpointError, ConfigError
from mdm_circuits.model import checkpoint
from mdm_circuits.model.config import ModelConfig
from mdm_circuits.model.transformer import Transformer

CONFIG = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=4, d_mlp=24,
                     qkv_bias=True, attention="bidirectional", mask_token_id=39, tie_embeddings=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_is_bit_identical(tmp_path, dtype):
    model = Transformer(CONFIG, rngs=nnx.Rngs(3), dtype=dtype)
    checkpoint.save(tmp_path / "model", model)
    checkpoint.save(tmp_path / "model", model)  # overwriting an earlier save works
    loaded = checkpoint.load(tmp_path / "model")
    assert loaded.config == CONFIG
    before, after = jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(loaded))
    assert len(before) == len(after)
    for original, restored in zip(before, after):
        assert original.dtype == restored.dtype
        np.testing.assert_array_equal(np.asarray(original), np.asarray(restored))
    tokens = jnp.array([1, 2, 39, 4])
    np.testing.assert_array_equal(run(model, tokens), run(loaded, tokens))


def test_tokenizer_travels_with_the_model(tmp_path):
    import tokenizers
    from tokenizers import models

    tokenizer = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    checkpoint.save(tmp_path, Transformer(CONFIG, rngs=nnx.Rngs(0)), tokenizer)
    assert checkpoint.load_tokenizer(tmp_path).get_vocab() == tokenizer.get_vocab()


def test_saving_without_a_tokenizer_removes_an_earlier_one(tmp_path):
    import tokenizers
    from tokenizers import models

    model = Transformer(CONFIG, rngs=nnx.Rngs(0))
    checkpoint.save(tmp_path, model, tokenizers.Tokenizer(models.WordLevel({"a": 0}, unk_token="a")))
    checkpoint.save(tmp_path, model)
    assert checkpoint.load_tokenizer(tmp_path) is None


def test_directory_without_a_model(tmp_path):
    with pytest.raises(CheckpointError, match="does not hold a saved mdm_circuits model"):
        checkpoint.load(tmp_path)


def test_manifest_with_unknown_field(tmp_path):
    checkpoint.save(tmp_path, Transformer(CONFIG, rngs=nnx.Rngs(0)))
    manifest = tmp_path / checkpoint.MANIFEST
    manifest.write_text(manifest.read_text().replace('"d_model"', '"sliding_window": 4, "d_model"'))
    with pytest.raises(ConfigError, match=r"unknown ModelConfig field\(s\) \['sliding_window'\]"):
        checkpoint.load(tmp_path)

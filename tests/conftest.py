"""Test configuration: strict promotion, a jitted one-sequence forward, and the converted SmolLM2."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

# Strict promotion, as equinox tests run: an accidental broadcast or dtype upcast is an error.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@jax.jit
def run(model, tokens, valid=None):
    """Logits of one sequence, jitted (eager dispatch of every op is slow even for tiny models)."""
    return model(jnp.asarray(tokens), valid=None if valid is None else jnp.asarray(valid))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct, converted once per test session."""
    from conversion import convert

    return convert("smollm2-135m-instruct")

"""Test configuration: strict promotion, a jitted one-sequence forward, and the converted SmolLM2."""

from __future__ import annotations

import gc
import os

import jax
import jax.numpy as jnp
import pytest

# Command-line runs inside the test process keep no compiled programs on disk (one test checks the cache
# in processes of its own).
os.environ["MDM_CIRCUITS_COMPILATION_CACHE"] = "off"
# Strict promotion, as equinox tests run: an accidental broadcast or dtype upcast is an error.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Each test module compiles programs of its own; dropping them after the module keeps the suite's
    memory near what one module needs (CI runs it in a few GB)."""
    yield
    jax.clear_caches()
    gc.collect()


@jax.jit
def run(model, tokens, valid=None):
    """Logits of one sequence, jitted (eager dispatch of every op is slow even for tiny models)."""
    return model(jnp.asarray(tokens), valid=None if valid is None else jnp.asarray(valid))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct, converted once per test session."""
    from conversion import convert

    return convert("smollm2-135m-instruct")

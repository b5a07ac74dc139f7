"""Plan a run before renting a machine: parameter counts, and the memory XLA compiles a program to,
with no weights allocated (every array is a `jax.ShapeDtypeStruct`)."""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from mdm_circuits.errors import PlanningError
from mdm_circuits.model.config import ModelConfig
from mdm_circuits.model.transformer import abstract_model, forward, forward_from_embeddings, parameters

Mode = Literal["forward", "gradient"]


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Compiled memory of one batched program. Sizes in bytes, for the backend that compiled it."""

    n_parameters: int
    parameter_bytes: int
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    backend: str
    compile_seconds: float

    @classmethod
    def of(cls, compiled, model, seconds: float) -> MemoryPlan:
        """The plan of a compiled program whose parameters are `model`'s (abstract or real)."""
        memory = compiled.memory_analysis()
        leaves = jax.tree.leaves(parameters(model))
        return cls(
            n_parameters=sum(leaf.size for leaf in leaves),
            parameter_bytes=sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in leaves),
            argument_bytes=memory.argument_size_in_bytes,
            output_bytes=memory.output_size_in_bytes,
            temp_bytes=memory.temp_size_in_bytes,
            backend=jax.default_backend(),
            compile_seconds=seconds,
        )

    @property
    def peak_bytes(self) -> int:
        """Arguments (parameters and inputs), outputs and XLA's temporary buffers, all live at once."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes


def _logits_gradient(graphdef, state, tokens):
    """Gradient of a last-position log-probability with respect to the input embeddings: the backward pass
    that attribution methods run."""
    embeddings = jax.vmap(nnx.merge(graphdef, state).embed)(tokens)

    def loss(x):
        logits = jax.vmap(forward_from_embeddings, in_axes=(None, None, 0))(graphdef, state, x)
        return jax.nn.log_softmax(logits[:, -1]).max(axis=-1).sum()

    return jax.grad(loss)(embeddings)


def plan(
    config: ModelConfig, *, batch: int, seq_len: int, dtype: jnp.dtype = jnp.bfloat16, mode: Mode = "forward"
) -> MemoryPlan:
    """Lower and compile a batched forward (or forward + backward) for `config` without allocating it."""
    graphdef, state = nnx.split(abstract_model(config, dtype))
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    if mode == "forward":
        program = jax.vmap(forward, in_axes=(None, None, 0))
    elif mode == "gradient":
        program = _logits_gradient
    else:
        raise PlanningError(f"mode must be 'forward' or 'gradient', got {mode!r}")
    start = time.perf_counter()
    compiled = jax.jit(program, static_argnums=0).lower(graphdef, state, tokens).compile()
    return MemoryPlan.of(compiled, abstract_model(config, dtype), time.perf_counter() - start)

"""mdm_circuits: comparative circuit analysis of autoregressive LMs and the masked diffusion LMs
post-trained from them, in JAX/Flax.

The model core: `ModelConfig` (frozen), the `Transformer` NNX module, and pure functions of
(graphdef, state, inputs) that compose with `jax.jit`, `jax.vmap` and `jax.grad`.
"""

from mdm_circuits import checkpoint
from mdm_circuits.config import ConfigError, ModelConfig
from mdm_circuits.model import (
    Activations,
    Transformer,
    abstract_model,
    activations,
    count_parameters,
    forward,
    forward_from_embeddings,
    head_outputs,
    with_config,
)

__all__ = [
    "Activations",
    "ConfigError",
    "ModelConfig",
    "Transformer",
    "abstract_model",
    "activations",
    "checkpoint",
    "count_parameters",
    "forward",
    "forward_from_embeddings",
    "head_outputs",
    "with_config",
]

"""mdm_circuits: comparative circuit analysis of autoregressive LMs and the masked diffusion LMs
post-trained from them, in JAX/Flax.

The model core: `ModelConfig` (frozen), the `Transformer` NNX module, and pure functions of
(graphdef, state, inputs) that compose with `jax.jit`, `jax.vmap` and `jax.grad`.
"""

from mdm_circuits import checkpoint
from mdm_circuits.config import ConfigError, ModelConfig
from mdm_circuits.model import (
    Transformer,
    abstract_model,
    count_parameters,
    forward,
    forward_from_embeddings,
    hidden_states,
    with_config,
)

__all__ = [
    "ConfigError",
    "ModelConfig",
    "Transformer",
    "abstract_model",
    "checkpoint",
    "count_parameters",
    "forward",
    "forward_from_embeddings",
    "hidden_states",
    "with_config",
]

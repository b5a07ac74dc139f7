"""mdm_circuits: comparative circuit analysis of autoregressive LMs and the masked diffusion LMs
post-trained from them, in JAX/Flax.

Subpackages, imports pointing down: `model` (config, layers, transformer, checkpoints, presets, planning),
`tasks` (examples and batches, metrics, ARM/MDM views, the task generators), `circuits` (graph,
interventions, attribution, patching, circuit selection and evaluation), `decoding` (generation, denoising
steps, accuracy), `training`, `organisms` (the shipped ARM/MDM pair) and `cli`.
"""

from mdm_circuits.errors import ConfigError, Error
from mdm_circuits.model import (
    Activations,
    ModelConfig,
    ModelStack,
    Transformer,
    abstract_model,
    activations,
    checkpoint,
    count_parameters,
    forward,
    forward_from_embeddings,
    head_outputs,
    stack,
    with_config,
)

__all__ = [
    "Activations",
    "ConfigError",
    "Error",
    "ModelConfig",
    "ModelStack",
    "Transformer",
    "abstract_model",
    "activations",
    "checkpoint",
    "count_parameters",
    "forward",
    "forward_from_embeddings",
    "head_outputs",
    "stack",
    "with_config",
]

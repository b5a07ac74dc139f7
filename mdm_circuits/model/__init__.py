"""The model core: `ModelConfig` (frozen), the `Transformer` NNX module, checkpoints, presets and memory
planning. Nothing here imports the rest of the library."""

from mdm_circuits.model import checkpoint
from mdm_circuits.model.config import ConfigError, ModelConfig
from mdm_circuits.model.transformer import (
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

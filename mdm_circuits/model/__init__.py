"""The model core: `ModelConfig` (frozen), the `Transformer` NNX module, checkpoints, presets and memory
planning. Nothing here imports the rest of the library."""

from mdm_circuits.errors import ConfigError
from mdm_circuits.model import checkpoint
from mdm_circuits.model.config import Architecture, ModelConfig
from mdm_circuits.model.sites import Capture, Edit, LayerEdit, Trace
from mdm_circuits.model.transformer import (
    Activations,
    Convention,
    ModelStack,
    Transformer,
    abstract_model,
    activations,
    assemble,
    count_parameters,
    forward,
    forward_from_embeddings,
    head_outputs,
    parameters,
    stack,
    with_config,
)

__all__ = [
    "Activations",
    "Architecture",
    "Capture",
    "ConfigError",
    "Convention",
    "Edit",
    "LayerEdit",
    "ModelConfig",
    "ModelStack",
    "Trace",
    "Transformer",
    "abstract_model",
    "activations",
    "assemble",
    "checkpoint",
    "count_parameters",
    "forward",
    "forward_from_embeddings",
    "head_outputs",
    "parameters",
    "stack",
    "with_config",
]

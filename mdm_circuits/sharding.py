"""Device meshes: examples on a `data` axis, weights on a `model` axis.

    from mdm_circuits import sharding
    mesh = sharding.make_mesh(data=2, model=4)        # 8 devices: 2-way data, 4-way tensor parallel
    scores = attribute(model, batch, metric, mesh=mesh)

Each parameter has logical axes (`LOGICAL_AXES`: layers, embed, heads, kv_heads, head_dim, mlp, vocab), and a
strategy maps logical axes to mesh axes:
- `TENSOR_PARALLEL` (the default): attention heads, key/value heads, MLP width and vocabulary split over
  `model`, so each device holds 1/model of every large matrix and XLA inserts the all-reduces;
- `FSDP`: the embedding width split over `data` as well (ZeRO-3 style: weights gathered for each layer's
  compute, so per-device weight memory falls with the data axis too).
A dimension its mesh axis does not divide is replicated instead (a model with 2 key/value heads on a 4-way
`model` axis keeps whole k/v weights on every device). The stacked models of a `ModelStack` keep their
leading model axis whole; examples are split over `data`.

A mesh may span several processes (`join_processes`: `jax.distributed`), each holding the same weights and
examples: every process places only its own devices' shards (`place`), and results are gathered to all of
them at the end (`read_back`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mdm_circuits.errors import UsageError
from mdm_circuits.model.transformer import ModelStack, Transformer

DATA, MODEL = "data", "model"

LOGICAL_AXES: Mapping[str, tuple[str | None, ...]] = {
    "w_q": ("layers", "embed", "heads", "head_dim"),
    "b_q": ("layers", "heads", "head_dim"),
    "w_k": ("layers", "embed", "kv_heads", "head_dim"),
    "b_k": ("layers", "kv_heads", "head_dim"),
    "w_v": ("layers", "embed", "kv_heads", "head_dim"),
    "b_v": ("layers", "kv_heads", "head_dim"),
    "w_o": ("layers", "heads", "head_dim", "embed"),
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
    "embedding": ("vocab", "embed"),
    "unembedding": ("embed", "vocab"),
}
"""The logical axes of each parameter, by its name; any other parameter (norm scales, conventions) is
replicated."""

TENSOR_PARALLEL: Mapping[str, str] = {"heads": MODEL, "kv_heads": MODEL, "mlp": MODEL, "vocab": MODEL}
FSDP: Mapping[str, str] = {**TENSOR_PARALLEL, "embed": DATA}


def make_mesh(data: int | None = None, model: int = 1, devices: list | None = None) -> Mesh:
    """A `data` x `model` mesh over `devices` (default: all of them; `data` defaults to what `model` leaves)."""
    devices = list(jax.devices() if devices is None else devices)
    if data is None:
        data = len(devices) // model if model >= 1 else 0
    if data < 1 or model < 1 or data * model > len(devices):
        raise UsageError(f"a {data}x{model} (data x model) mesh needs {data * model} devices and {len(devices)} are "
                         f"here; on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count={data * model} simulates "
                         f"them")
    grid = np.array(devices[: data * model]).reshape(data, model)
    return Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


def parse_mesh(text: str) -> Mesh:
    """The mesh a command line names as DATAxMODEL ("2x4", "1x8")."""
    try:
        data, model = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"a mesh is written DATAxMODEL, such as 2x4 or 1x8; got {text!r}") from None
    return make_mesh(data, model)


def join_processes(cluster: str = "") -> None:
    """Join the other processes of a multi-process run (`jax.distributed.initialize`; before anything touches a
    device), so that `jax.devices()`, and a mesh over them, span every process. Every process runs the same
    command. `cluster` is COORDINATOR:PORT,PROCESSES,ID (this process's id, from 0); empty, JAX reads them from
    a Cloud TPU pod slice, Slurm or Open MPI."""
    if not cluster:
        jax.distributed.initialize()
        return
    try:
        address, count, index = cluster.split(",")
        count, index = int(count), int(index)
    except ValueError:
        raise UsageError(f"a cluster is written COORDINATOR:PORT,PROCESSES,ID, such as 10.0.0.1:1234,2,0; got "
                         f"{cluster!r}") from None
    jax.distributed.initialize(address, count, index)


def _axis_size(mesh: Mesh, axis: str) -> int:
    return mesh.shape[axis] if axis in mesh.shape else 1


def parameter_spec(name: str, shape: tuple[int, ...], mesh: Mesh, rules: Mapping[str, str] = TENSOR_PARALLEL,
                   leading: int = 0) -> PartitionSpec:
    """The partition of a parameter called `name` of `shape` (`leading` stacked axes first, kept whole)."""
    logical = LOGICAL_AXES.get(name)
    if logical is None or len(logical) != len(shape) - leading:
        return PartitionSpec()
    placed = []
    for axis, size in zip(logical, shape[leading:]):
        mesh_axis = rules.get(axis)
        fits = mesh_axis is not None and _axis_size(mesh, mesh_axis) > 1 and size % _axis_size(mesh, mesh_axis) == 0
        placed.append(mesh_axis if fits else None)
    return PartitionSpec(*([None] * leading), *placed)


def _name(path) -> str:
    names = [str(getattr(key, "key", getattr(key, "name", key))) for key in path]
    names = [n for n in names if n != "value"]
    return names[-1] if names else ""


def _placed(model: Transformer, mesh: Mesh, rules: Mapping[str, str], leading: int, put) -> Transformer:
    graphdef, state = nnx.split(model)

    def put_leaf(path, leaf):
        stacked = leading if leaf.ndim > leading else 0
        return put(leaf, NamedSharding(mesh, parameter_spec(_name(path), leaf.shape, mesh, rules, stacked)))

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(put_leaf, state))


def place(x, placement: NamedSharding) -> jax.Array:
    """`x` placed by `placement`. On a mesh over several processes (`jax.distributed`) every process holds
    the same `x` and places only the shards of its own devices, cut from a host copy (`jax.device_put` would
    first check that the processes agree by gathering the whole of `x` on every one of them, for every weight
    and every slice)."""
    if placement.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, placement)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, placement, lambda index: host[index])


def read_back(tree):
    """`tree` as host arrays: one `jax.device_get`, or, when its arrays are split over several processes'
    devices (a mesh under `jax.distributed`), one gather of every array's whole value to every process (a
    collective: all processes read back together)."""
    if all(leaf.is_fully_addressable for leaf in jax.tree.leaves(tree) if isinstance(leaf, jax.Array)):
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def _abstract(leaf, placement: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=placement)


def shard_model(model: Transformer | ModelStack, mesh: Mesh, rules: Mapping[str, str] = TENSOR_PARALLEL
                ) -> Transformer | ModelStack:
    """The model, or every model of a stack, with each parameter placed on `mesh` by `rules`. An abstract model
    (`transformer.abstract_model`: `jax.ShapeDtypeStruct` leaves) gets the shardings without any data."""
    abstract = isinstance(jax.tree.leaves(nnx.state(model.models if isinstance(model, ModelStack) else model))[0],
                          jax.ShapeDtypeStruct)
    put = _abstract if abstract else place
    if isinstance(model, ModelStack):
        return dataclasses.replace(model, models=_placed(model.models, mesh, rules, 1, put))
    return _placed(model, mesh, rules, 0, put)


def constrain(x: jax.Array, mesh: Mesh | None, *axes: str | None) -> jax.Array:
    """`x` laid out on `mesh` with dimension i split over mesh axis `axes[i]` (None: whole), inside a traced
    program; unchanged without a mesh. A dimension its axis does not divide stays whole."""
    if mesh is None:
        return x
    spec = [axis if axis is not None and x.shape[i] % _axis_size(mesh, axis) == 0 else None
            for i, axis in enumerate(axes)]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def examples_sharding(mesh: Mesh, ndim: int, axis: int = 1) -> NamedSharding:
    """Arrays of `ndim` dimensions split over `data` along `axis` (the examples of an `[M, B, ...]` batch)."""
    spec = [None] * ndim
    spec[axis] = DATA
    return NamedSharding(mesh, PartitionSpec(*spec))


def check_batch_size(mesh: Mesh, batch_size: int) -> None:
    data = _axis_size(mesh, DATA)
    if batch_size % data:
        raise UsageError(f"batch_size {batch_size} does not split over the mesh's {data}-way data axis; use a "
                         f"multiple of {data} (for example {math.lcm(batch_size, data)})")

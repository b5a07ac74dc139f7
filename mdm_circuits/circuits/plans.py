"""Plan a circuit run before renting a machine: the memory XLA compiles the real per-batch programs to (EAP-IG
attribution, node patching) for a model, batch, length, IG steps and mesh, with abstract weights (nothing is
allocated), and the largest batch and step chunk that fit a device.

Sizes are per device: on a mesh the compiled program is the partitioned one each device runs.
"""

from __future__ import annotations

import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mdm_circuits import sharding
from mdm_circuits.circuits import attribution
from mdm_circuits.circuits.ablations import Ablation
from mdm_circuits.circuits.graph import Graph
from mdm_circuits.circuits.patching import _effects_batch, _node_effects
from mdm_circuits.circuits.runs import chunked
from mdm_circuits.errors import PlanningError
from mdm_circuits.model.config import ModelConfig
from mdm_circuits.model.planning import MemoryPlan
from mdm_circuits.model.transformer import abstract_model
from mdm_circuits.tasks import metrics
from mdm_circuits.tasks.batch import Batch

Mode = Literal["eap-ig", "patching"]
MODES = ("eap-ig", "patching")


def abstract_batch(batch: int, length: int, mesh: Mesh | None = None) -> Batch:
    """A one-model `[1, B, ...]` batch of `jax.ShapeDtypeStruct`s with one answer token (examples split over the
    mesh's data axis)."""

    def shaped(*shape, dtype=jnp.int32):
        full = (1, batch, *shape)
        return jax.ShapeDtypeStruct(full, dtype, sharding=None if mesh is None else
                                    sharding.examples_sharding(mesh, len(full)))

    return Batch(clean=shaped(length), corrupted=shaped(length), valid=shaped(length, dtype=bool),
                 answer_positions=shaped(1), answer_mask=shaped(1, dtype=bool), correct=shaped(1, 1),
                 correct_mask=shaped(1, 1, dtype=bool), incorrect=shaped(1, 1), incorrect_mask=shaped(1, 1, dtype=bool))


def program_memory(config: ModelConfig, *, mode: Mode = "eap-ig", batch: int, seq_len: int, steps: int = 5,
                   step_chunk: int = 1, chunk: int = 16, dtype=jnp.bfloat16, mesh: Mesh | None = None,
                   method: str = "eap_ig_inputs", ablation: str = "corrupted", per_example: bool = False
                   ) -> MemoryPlan:
    """Compile one batch of EAP-IG (`steps`, `step_chunk` at once) or of node patching (`chunk` nodes at once)
    for `config` without allocating it, and return its memory per device. `method`, `ablation` (a kind) and
    `per_example` choose the attribution program as `attribute` takes them."""
    if mode not in MODES:
        raise PlanningError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if steps < 1 or step_chunk < 1 or steps % step_chunk:
        raise PlanningError(f"steps ({steps}) must be a positive multiple of step_chunk ({step_chunk})")
    if mesh is not None:
        sharding.check_batch_size(mesh, batch)
    model = abstract_model(config, dtype)
    placed = model if mesh is None else sharding.shard_model(model, mesh)
    examples = abstract_batch(batch, seq_len, mesh)
    weights = jax.ShapeDtypeStruct((batch,), bool)
    start = time.perf_counter()
    if mode == "eap-ig":
        lowered = _attribution_lowered(placed, examples, weights, config, steps, step_chunk, mesh, method,
                                       ablation, per_example)
    else:
        graph = Graph.for_model(config)
        patches = chunked(np.stack([np.arange(graph.n_sources), -np.ones(graph.n_sources, int)], 1), chunk)
        lowered = _effects_batch.lower(placed, examples, weights, None, Ablation(),
                                       jax.ShapeDtypeStruct(patches.shape, patches.dtype), effects=_node_effects,
                                       model_axis=None, metric=metrics.logit_difference)
    compiled = lowered.compile()
    return MemoryPlan.of(compiled, model, time.perf_counter() - start)


def _attribution_lowered(placed, examples, weights, config, steps, step_chunk, mesh, method, kind, per_example):
    """The lowered attribution program for abstract weights and examples, with an abstract ablation of `kind`
    (fitted means `[1, N, T, D]`; the examples themselves as resampling partners)."""
    mean = None
    if kind in ("mean", "mean_positional"):
        length = examples.clean.shape[-1]
        mean = jax.ShapeDtypeStruct((1, Graph.for_model(config).n_sources, length, config.d_model),
                                    placed.embedding.dtype)
    return attribution._attribute_batch.lower(
        placed, examples, weights, examples if kind == "resample" else None, Ablation(kind, mean=mean),
        model_axis=None, metric=metrics.logit_difference, method=method, steps=steps, step_chunk=step_chunk,
        aggregation="sum", per_example=per_example, rows_dtype=jnp.dtype(jnp.float32), mesh=mesh)


def largest_fit(config: ModelConfig, device_memory: int, *, mode: Mode = "eap-ig", seq_len: int, steps: int = 5,
                dtype=jnp.bfloat16, mesh: Mesh | None = None, largest_batch: int = 1024,
                progress=None, **program) -> tuple[int, int, MemoryPlan]:
    """(batch, step chunk, its plan): the largest batch (a power of two times the data axis) whose program
    fits `device_memory` bytes per device with one IG step at a time, then the largest step chunk dividing
    `steps` that still fits with it. Each candidate is compiled (abstract weights); `program` goes to
    `program_memory` (method, ablation, per_example)."""
    data = 1 if mesh is None else mesh.shape[sharding.DATA]

    def plan_of(batch, step_chunk=1):
        plan = program_memory(config, mode=mode, batch=batch, seq_len=seq_len, steps=steps, step_chunk=step_chunk,
                              dtype=dtype, mesh=mesh, **program)
        if progress is not None:
            progress(batch, step_chunk, plan)
        return plan

    best = None
    batch = data
    while batch <= largest_batch:
        plan = plan_of(batch)
        if plan.peak_bytes > device_memory:
            break
        best = (batch, 1, plan)
        batch *= 2
    if best is None:
        raise PlanningError(f"even a batch of {data} needs {plan.peak_bytes / 2**30:.1f} GiB per device, more than "
                            f"{device_memory / 2**30:.1f} GiB: use more devices on the model axis, or shorter inputs")
    if mode == "eap-ig":
        for step_chunk in sorted((c for c in range(2, steps + 1) if steps % c == 0), reverse=True):
            plan = plan_of(best[0], step_chunk)
            if plan.peak_bytes <= device_memory:
                return best[0], step_chunk, plan
    return best


DEFAULT_BATCH = 32
"""The batch `attribute` takes where the device does not report its memory (a CPU)."""


def device_memory(mesh: Mesh | None = None, share: float = 0.9) -> int | None:
    """`share` of the memory of this process's first device (of the mesh, or the default device), which XLA
    reports on GPUs and TPUs (`memory_stats()["bytes_limit"]`); None where it does not (CPUs). The rest is
    left to the runtime."""
    devices = jax.local_devices() if mesh is None else [
        device for device in mesh.devices.flat if device.process_index == jax.process_index()]
    limit = (devices[0].memory_stats() or {}).get("bytes_limit")
    return None if not limit else int(limit * share)


def attribution_batch(config: ModelConfig, *, n_examples: int, seq_len: int, dtype, n_models: int = 1,
                      mesh: Mesh | None = None, method: str = "eap_ig_inputs", steps: int = 5,
                      ablation: str = "corrupted", per_example: bool = False) -> tuple[int, int]:
    """(batch, step chunk) for an attribution run when the caller names neither: `largest_fit` of its program
    (`method`, `steps`, `ablation` kind, `per_example`) for the device's memory (a stack of `n_models` gets
    1/n_models of it each), no larger than the examples need; (32, 1) where the device does not report its
    memory. Each candidate is compiled once, with abstract weights; every process of a multi-process run
    compiles the same candidates for the same devices, so all choose alike."""
    memory = device_memory(mesh)
    data = 1 if mesh is None else mesh.shape[sharding.DATA]
    if memory is None:
        return max(data, DEFAULT_BATCH // data * data), 1
    needed = data * 2 ** max(0, int(np.ceil(np.log2(max(1, n_examples / data)))))
    batch, step_chunk, _ = largest_fit(config, memory // n_models, seq_len=seq_len,
                                       steps=1 if method == "eap" else steps, dtype=dtype, mesh=mesh,
                                       largest_batch=needed, method=method, ablation=ablation,
                                       per_example=per_example)
    return batch, step_chunk

"""Run by tests/test_multihost.py as one of two processes joined by `jax.distributed` (CPU collectives over
gloo), each with simulated CPU devices: every process loads the same saved random model and makes the same
examples, and attributes them on a mesh over all the processes' devices. Process 0 saves the scores, and which
examples of a slice its own devices hold, to an .npz file.

    python tests/multihost_runs.py COORDINATOR:PORT,PROCESSES,ID DATAxMODEL MODEL_DIR SCORES.npz
"""

from __future__ import annotations

import sys

import jax
import numpy as np

from mdm_circuits import sharding
from mdm_circuits.circuits import runs
from mdm_circuits.circuits.attribution import attribute
from mdm_circuits.model import checkpoint
from mdm_circuits.model.config import ModelConfig
from mdm_circuits.tasks import metrics
from mdm_circuits.tasks.batch import collate
from mdm_circuits.testing import random_examples

ARM = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=4, d_mlp=64,
                  qkv_bias=True)
EXAMPLES = 12


def scores(model, mesh=None) -> dict[str, np.ndarray]:
    """Mean and per-example edge scores of 12 random examples in slices of 8 (the second padded)."""
    found = attribute(model, collate(random_examples(ARM, EXAMPLES, 3, min_length=5, max_length=7)),
                      metrics.logit_difference, steps=2, batch_size=8, step_chunk=1, per_example=True, mesh=mesh)
    return {"matrix": found.matrix, "rows": found.per_example}


def held(model, mesh) -> list[int]:
    """The examples of a placed slice that this process's devices hold."""
    placed = runs.as_models(model, mesh).place(collate(random_examples(ARM, 8, 3)).clean[None])
    return sorted({example for shard in placed.addressable_shards for example in range(8)[shard.index[1]]})


def main(cluster: str, mesh: str, model_directory: str, path: str):
    sharding.join_processes(cluster)
    mesh, model = sharding.parse_mesh(mesh), checkpoint.load(model_directory)
    found = scores(model, mesh)
    if jax.process_index() == 0:
        np.savez(path, devices=len(jax.devices()), held=held(model, mesh), **found)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])

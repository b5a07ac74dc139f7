"""Run by tests/test_sharding.py in a fresh process with 8 simulated CPU devices: attribution, circuit evaluation,
node patching and node-set ablation on one device and on data-parallel, model-parallel and 2x4 meshes, for one
model and for a stack of ARM and MDM. Prints one JSON object: the largest relative difference from the
single-device results per mesh, and the shardings seen."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import jax
import numpy as np

from mdm_circuits import circuits, sharding
from mdm_circuits.circuits import runs
from mdm_circuits.circuits.attribution import attribute
from mdm_circuits.circuits.patching import ablate_node_sets, patch_nodes
from mdm_circuits.circuits.plans import program_memory
from mdm_circuits.comparison import Settings, compare
from mdm_circuits.comparison.progress import Reporter
from mdm_circuits.model.config import ModelConfig
from mdm_circuits.model.transformer import stack
from mdm_circuits.tasks import metrics
from mdm_circuits.tasks.batch import collate
from mdm_circuits.testing import random_examples, random_model

MASK = 63
ARM = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=4, d_mlp=64,
                  qkv_bias=True)
MDM = ARM.replace(attention="bidirectional", mask_token_id=MASK)
METRIC = metrics.logit_difference


def results(mesh):
    arm, mdm = random_model(ARM, 0), random_model(MDM, 1)
    examples = random_examples(ARM, 16, 3, min_length=5, max_length=7)
    arm_batch = collate(examples)
    mdm_batch = collate([dataclasses.replace(e, clean=[*e.clean, MASK], corrupted=[*e.corrupted, MASK])
                         for e in examples])
    scores = attribute(arm, arm_batch, METRIC, steps=2, batch_size=8, per_example=True, mesh=mesh)
    stacked = attribute(stack([arm, mdm]), [arm_batch, mdm_batch], METRIC, steps=2, batch_size=8, mesh=mesh)
    circuit = circuits.top_k(scores.graph, scores.matrix, 20)
    evaluation = circuits.evaluate(arm, arm_batch, circuit[None], METRIC, batch_size=8, mesh=mesh)
    patched = patch_nodes(arm, arm_batch, METRIC, batch_size=8, mesh=mesh)
    sets = np.zeros((2, scores.graph.n_sources), bool)
    sets[0, 1:3], sets[1, 4:7] = True, True
    ablated = ablate_node_sets(arm, arm_batch, METRIC, sets, batch_size=8, mesh=mesh)
    return {"scores": scores.matrix, "rows": scores.per_example, "stack_arm": stacked[0].matrix,
            "stack_mdm": stacked[1].matrix, "evaluation": np.asarray(evaluation.circuit_metric),
            "patched": np.asarray(patched.values), "ablated": np.asarray(ablated.retained)}


def reads_back(mesh, n: int) -> int:
    """How many device arrays are read back to the host by one attribution of `n` examples in slices of 4."""
    from jax._src import array

    count = [0]
    value = array.ArrayImpl._value

    def counted(self):
        count[0] += 1
        return value.fget(self)

    model, examples = random_model(ARM, 0), collate(random_examples(ARM, n, 5, min_length=5, max_length=7))
    attribute(model, examples, METRIC, steps=2, batch_size=4, per_example=True, mesh=mesh)  # compile first
    array.ArrayImpl._value = property(counted)
    try:
        attribute(model, examples, METRIC, steps=2, batch_size=4, per_example=True, mesh=mesh)
    finally:
        array.ArrayImpl._value = value
    return count[0]


def compared(mesh, directory: Path) -> dict[str, np.ndarray]:
    """Every model's mean edge scores from a small `compare` of the default pair on IOI (exact patching left out
    and the circuits run on 4 questions: only the scores are compared, and the rest is what costs)."""
    settings = Settings(tasks=("ioi",), pool=8, budget=100, steps=2, bootstrap=10, null_draws=10, splits=2,
                        causal_draws=2, batch_size=8, exact_questions=0, faithfulness_questions=4)
    compare(settings, directory, reporter=Reporter(), mesh=mesh)
    with np.load(directory / "scores" / "ioi.npz") as stored:
        return {str(name): stored[f"edges_{index}"] for index, name in enumerate(stored["names"])}


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main():
    reference = results(None)
    meshes = {"data 8": sharding.make_mesh(8, 1), "model 8": sharding.make_mesh(1, 8),
              "2x4": sharding.make_mesh(2, 4)}
    report = {"devices": len(jax.devices()), "differences": {},
              "reads": {name: [reads_back(mesh, n) for n in (8, 16)]
                        for name, mesh in (("one device", None), ("2x4", sharding.make_mesh(2, 4)))}}
    for name, mesh in meshes.items():
        found = results(mesh)
        report["differences"][name] = {key: relative(found[key], reference[key]) for key in reference}
    report["plan_bytes"] = {name: program_memory(ARM, batch=16, seq_len=8, dtype=np.float32, mesh=mesh).peak_bytes
                            for name, mesh in (("one device", None), ("2x4", sharding.make_mesh(2, 4)))}
    with tempfile.TemporaryDirectory() as directory:
        alone, meshed = (compared(mesh, Path(directory) / name)
                         for name, mesh in (("one", None), ("mesh", sharding.make_mesh(2, 4))))
    report["compare"] = {name: relative(meshed[name], alone[name]) for name in alone}
    mesh = sharding.make_mesh(2, 4)
    placed = runs.as_models(random_model(ARM, 0), mesh).place(collate(random_examples(ARM, 8, 3)).clean[None])
    report["examples"] = str(placed.sharding.spec)
    model = sharding.shard_model(random_model(ARM, 0), mesh)
    placed_weights = {"w_q": model.blocks.attn.w_q, "w_k": model.blocks.attn.w_k, "w_down": model.blocks.mlp.w_down,
                      "embedding": model.embedding, "norm": model.final_norm.scale}
    report["shardings"] = {name: str(weight[...].sharding.spec) for name, weight in placed_weights.items()}
    print(json.dumps(report))


if __name__ == "__main__":
    main()

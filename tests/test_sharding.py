"""Meshes: parameter placement rules here; attribution, evaluation and patching on 8 simulated CPU devices (in
a fresh process, `tests/sharded_runs.py`) against one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from mdm_circuits import sharding
from mdm_circuits.circuits.plans import largest_fit, program_memory
from mdm_circuits.cli import main
from mdm_circuits.errors import PlanningError, UsageError
from mdm_circuits.model.config import ModelConfig


def _mesh(data: int, model: int) -> AbstractMesh:
    return AbstractMesh((data, model), (sharding.DATA, sharding.MODEL), axis_types=(AxisType.Auto,) * 2)


def test_tensor_parallel_rules_split_heads_mlp_and_vocabulary():
    mesh = _mesh(2, 4)
    spec = sharding.parameter_spec
    assert spec("w_q", (3, 32, 8, 4), mesh) == PartitionSpec(None, None, "model", None)
    assert spec("w_o", (3, 8, 4, 32), mesh) == PartitionSpec(None, "model", None, None)
    assert spec("w_down", (3, 64, 32), mesh) == PartitionSpec(None, "model", None)
    assert spec("unembedding", (32, 64), mesh) == PartitionSpec(None, "model")
    assert spec("scale", (3, 32), mesh) == PartitionSpec()  # norms are replicated
    # A dimension the axis does not divide stays whole: 2 key/value heads on a 4-way model axis.
    assert spec("w_k", (3, 32, 2, 4), mesh) == PartitionSpec(None, None, None, None)
    # A stack's leading model axis is kept whole; FSDP also splits the width over the data axis.
    assert spec("w_q", (2, 3, 32, 8, 4), mesh, leading=1) == PartitionSpec(None, None, None, "model", None)
    assert spec("w_up", (3, 32, 64), mesh, sharding.FSDP) == PartitionSpec(None, "data", "model")


def test_meshes_and_batches_that_do_not_fit_are_refused():
    with pytest.raises(UsageError, match=r"a 4x4 \(data x model\) mesh needs 16 devices and 1 are here"):
        sharding.make_mesh(4, 4)
    with pytest.raises(UsageError, match="a mesh is written DATAxMODEL"):
        sharding.parse_mesh("2by4")
    with pytest.raises(UsageError, match="batch_size 6 does not split over the mesh's 4-way data axis; use a "
                                         "multiple of 4 \\(for example 12\\)"):
        sharding.check_batch_size(_mesh(4, 2), 6)


@pytest.fixture(scope="module")
def sharded():
    environment = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    script = Path(__file__).with_name("sharded_runs.py")
    done = subprocess.run([sys.executable, str(script)], env=environment, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_data_model_and_2x4_meshes_give_the_single_device_results(sharded):
    """Scores (mean and per example, one model and a stack), circuit evaluation, node patching and node-set
    ablation agree with one device to 1e-5."""
    assert sharded["devices"] == 8
    assert set(sharded["differences"]) == {"data 8", "model 8", "2x4"}
    for mesh, differences in sharded["differences"].items():
        assert set(differences) == {"scores", "rows", "stack_arm", "stack_mdm", "evaluation", "patched", "ablated"}
        assert max(differences.values()) < 1e-5, (mesh, differences)


def test_the_main_job_on_a_mesh_scores_as_on_one_device(sharded):
    """`compare` of the default pair (IOI, small settings) on a 2x4 mesh: every model's mean edge scores equal
    the one-device run's."""
    assert len(sharded["compare"]) == 7
    assert max(sharded["compare"].values()) < 1e-5, sharded["compare"]


def test_a_run_reads_back_once_however_many_batches_it_has(sharded):
    """Device arrays read back to the host by an attribution of 8 and of 16 examples in slices of 4: the same
    count, so nothing is read inside the batch loop (the running sums stay on the devices)."""
    for mesh, (two_slices, four_slices) in sharded["reads"].items():
        assert two_slices == four_slices, (mesh, two_slices, four_slices)


def test_a_mesh_lowers_the_memory_each_device_compiles_to(sharded):
    """One EAP-IG batch of the small model, planned per device: at most a third on a 2x4 mesh of what one
    device needs (Δ and each layer's gradients split their width over `model`, examples over `data`)."""
    assert sharded["plan_bytes"]["2x4"] <= sharded["plan_bytes"]["one device"] / 3


def test_weights_and_examples_carry_the_expected_shardings(sharded):
    assert sharded["shardings"] == {"w_q": "P(None, None, 'model', None)", "w_k": "P(None, None, 'model', None)",
                                    "w_down": "P(None, 'model', None)", "embedding": "P('model', None)",
                                    "norm": "P()"}
    assert sharded["examples"] == "P(None, 'data', None)"


# ---- planning the circuit programs ----

SMALL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=4, d_mlp=64,
                    qkv_bias=True)


def test_the_plan_compiles_the_real_programs_and_grows_with_the_batch():
    plans_of = {mode: [program_memory(SMALL, mode=mode, batch=b, seq_len=16, dtype=jnp.float32) for b in (4, 16)]
                for mode in ("eap-ig", "patching")}
    for mode, (small, large) in plans_of.items():
        assert small.n_parameters == large.n_parameters > 0
        assert 0 < small.temp_bytes < large.temp_bytes, mode
    chunked = program_memory(SMALL, batch=4, seq_len=16, steps=4, step_chunk=4, dtype=jnp.float32)
    assert chunked.temp_bytes > program_memory(SMALL, batch=4, seq_len=16, steps=4, dtype=jnp.float32).temp_bytes
    with pytest.raises(PlanningError, match=r"steps \(5\) must be a positive multiple of step_chunk \(2\)"):
        program_memory(SMALL, batch=4, seq_len=16, step_chunk=2)


def test_the_largest_fit_is_the_largest_batch_under_the_limit():
    seen = {}
    limit = (program_memory(SMALL, batch=8, seq_len=16, dtype=jnp.float32).peak_bytes
             + program_memory(SMALL, batch=16, seq_len=16, dtype=jnp.float32).peak_bytes) // 2
    batch, step_chunk, plan = largest_fit(SMALL, limit, seq_len=16, dtype=jnp.float32,
                                          progress=lambda b, c, p: seen.setdefault((b, c), p.peak_bytes))
    assert (batch, step_chunk) == (8, 1) and plan.peak_bytes <= limit < seen[(16, 1)]
    assert seen[(8, 5)] > limit  # the step chunk was tried, and did not fit
    with pytest.raises(PlanningError, match="even a batch of 1 needs"):
        largest_fit(SMALL, 1000, seq_len=16, dtype=jnp.float32)


def test_plan_on_the_command_line(capsys):
    main(["plan", "smollm2-135m", "--mode", "patching", "--batch", "2", "--seq-len", "8", "--dtype", "float32"])
    printed = capsys.readouterr().out
    assert "compiling one patching batch of 2 x 8 tokens" in printed and "peak estimate" in printed
    with pytest.raises(SystemExit):
        main(["plan", "smollm2-135m", "--mode", "eap-ig", "--mesh", "4x4"])
    assert "a 4x4 (data x model) mesh needs 16 devices and 1 are here" in capsys.readouterr().err

"""Attribution under `jax.distributed`: two processes on this machine (CPU collectives over gloo), each with two
simulated CPU devices, run `tests/multihost_runs.py` on a 2x2 mesh (examples split over the processes, weights
over each one's devices) and give the scores of one process on one device."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from multihost_runs import ARM, EXAMPLES, scores

from mdm_circuits.circuits.attribution import attribute
from mdm_circuits.cli import main
from mdm_circuits.errors import AttributionError
from mdm_circuits.model import checkpoint
from mdm_circuits.tasks import metrics
from mdm_circuits.tasks.batch import collate
from mdm_circuits.testing import random_examples, random_model


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_on_a_2x2_mesh_score_as_one_device(tmp_path):
    model = random_model(ARM, 0)
    checkpoint.save(tmp_path / "model", model)
    cluster, path = f"127.0.0.1:{_free_port()},2", tmp_path / "scores.npz"
    environment = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    workers = [subprocess.Popen([sys.executable, str(Path(__file__).with_name("multihost_runs.py")),
                                 f"{cluster},{index}", "2x2", str(tmp_path / "model"), str(path)],
                                env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for index in range(2)]
    try:
        reference = scores(model)  # one process, one device, while the workers run
        outputs = [worker.communicate(timeout=240)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
    with np.load(path) as found:
        assert int(found["devices"]) == 4
        assert found["held"].tolist() == [0, 1, 2, 3]  # process 0's devices hold its half of a slice only
        assert found["rows"].shape == (EXAMPLES, reference["rows"].shape[1])
        for key, expected in reference.items():
            assert np.max(np.abs(found[key] - expected)) <= 1e-5 * np.max(np.abs(expected)), key


def test_distributed_needs_a_mesh_and_a_well_formed_cluster(capsys, tmp_path):
    for arguments, message in ((["--distributed"], "--distributed runs on a mesh over every process's devices"),
                               (["--mesh", "1x1", "--distributed", "10.0.0.1:1234"],
                                "a cluster is written COORDINATOR:PORT,PROCESSES,ID")):
        with pytest.raises(SystemExit):
            main(["compare", *arguments, "--out", str(tmp_path)])
        assert message in capsys.readouterr().err


def test_resuming_is_refused_across_processes(monkeypatch, tmp_path):
    """Every process would write the same resume file: under several processes `resume=` is refused."""
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(AttributionError, match="resume= is not supported across processes"):
        attribute(random_model(ARM, 0), collate(random_examples(ARM, 2, 3)), metrics.logit_difference,
                  resume=tmp_path / "partial.npz")

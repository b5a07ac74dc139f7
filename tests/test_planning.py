"""The released 7B configurations build abstractly with the right sizes, and compile without weights."""

from __future__ import annotations

import pytest

from mdm_circuits.model.planning import plan
from mdm_circuits.model.presets import PRESETS
from mdm_circuits.model.transformer import count_parameters


@pytest.mark.parametrize("name, expected", [
    ("qwen2.5-7b", 7_615_616_512), ("dream-v0-base-7b", 7_615_616_512),
    ("llama-2-7b", 6_738_415_616), ("diffullama-7b", 6_738_415_616),
])
def test_seven_billion_parameter_counts(name, expected):
    assert count_parameters(PRESETS[name]) == expected


@pytest.mark.parametrize("name", ["dream-v0-base-7b", "llama-2-7b"])
def test_seven_billion_forward_compiles_without_weights(name):
    result = plan(PRESETS[name], batch=2, seq_len=32)
    assert result.n_parameters == count_parameters(PRESETS[name])
    assert result.parameter_bytes == 2 * result.n_parameters  # bfloat16
    # The compiled program takes every parameter as an argument: nothing was dropped or allocated early.
    assert result.argument_bytes >= result.parameter_bytes
    assert result.temp_bytes > 0 and result.peak_bytes > result.parameter_bytes

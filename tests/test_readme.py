"""The README's "Reuse in your own JAX code" example runs as written, on the real converted SmolLM2."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mdm_circuits.model import checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.smollm2
def test_reuse_example_runs(smollm2, tmp_path, capsys):
    section = README.read_text().split("## Reuse in your own JAX code", 1)[1].split("\n## ", 1)[0]
    example = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    checkpoint.save(tmp_path / "smollm2", smollm2.model, smollm2.tokenizer)
    exec(example.replace("out/smollm2-135m-instruct", str(tmp_path / "smollm2")), {})
    assert capsys.readouterr().out.strip() == "[' Mary', ' Tom']"


@pytest.mark.smollm2
def test_finding_a_circuit_example_runs(smollm2, tmp_path, capsys, monkeypatch):
    section = README.read_text().split("## Finding a circuit", 1)[1].split("\n## ", 1)[0]
    example = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    checkpoint.save(tmp_path / "smollm2", smollm2.model, smollm2.tokenizer)
    monkeypatch.chdir(tmp_path)
    exec(example.replace("out/smollm2-135m-instruct", str(tmp_path / "smollm2")), {})
    printed = capsys.readouterr().out.splitlines()
    clean, corrupted = map(float, re.findall(r"-?\d+\.\d+", printed[0]))
    assert clean > 3 and corrupted < 0.5  # SmolLM2 does IOI; the ABC corruption removes the cue
    faithfulness = eval(printed[1])  # {100: f, 1000: f, 10000: f}
    assert faithfulness[10000] > 0.6
    assert (tmp_path / "ioi_scores.json").exists()

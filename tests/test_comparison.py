"""The main job end to end on the default pair (small settings), resumption after an interruption, settings
that never mix, and a real-model smoke test on SmolLM2 posed as an ARM and read as an MDM."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest

from mdm_circuits.circuits.graph import Graph
from mdm_circuits.cli import main
from mdm_circuits.comparison import Settings, compare
from mdm_circuits.comparison.findings import CANNOT_TELL, CONTRADICTS, SUPPORTS
from mdm_circuits.comparison.progress import Reporter
from mdm_circuits.comparison.run import OUTPUTS
from mdm_circuits.errors import UsageError
from mdm_circuits.model import checkpoint
from mdm_circuits.model.transformer import with_config
from mdm_circuits.outputs import RunDirectory

SMALL = dict(tasks=("ioi", "countdown"), pool=8, budget=100, steps=2, bootstrap=20, null_draws=20, splits=4,
             causal_draws=2)
ARGUMENTS = ["--tasks", "ioi,countdown", "--pool", "8", "--budget", "100", "--steps", "2", "--bootstrap", "20",
             "--null-draws", "20", "--splits", "4", "--causal-draws", "2"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The default comparison with small settings, run through the command line."""
    directory = tmp_path_factory.mktemp("compare") / "run"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        main(["compare", *ARGUMENTS, "--out", str(directory)])
    (directory / "printed.txt").write_text(printed.getvalue())
    return directory


def test_the_comparison_writes_the_whole_report(finished):
    printed = (finished / "printed.txt").read_text()
    assert "ioi: attribution" in printed and "the paper's findings, by this run" in printed
    for name in ("report.md", "report.html", "summary.json", "timings.json"):
        assert (finished / name).stat().st_size > 0
    figures = {path.name for path in (finished / "figures").iterdir()}
    assert {"ioi_overlap.png", "ioi_layers.png", "ioi_logit_lens.png", "ioi_ablation.png", "countdown_overlap.png",
            "specialisation.png", "trajectory.png"} <= figures
    html = (finished / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(figures)  # self-contained
    report = (finished / "report.md").read_text()
    assert all(f"figures/{name}" in report for name in figures)
    summary = json.loads((finished / "summary.json").read_text())
    # A task's contrast is checked first; where it fails (8 questions leave the median gap's interval wide), the
    # task is named and read by no finding.
    for task, measured in summary["tasks"].items():
        assert set(measured["validity"]) == set(summary["models"])
        for name, checked in measured["validity"].items():
            assert 0 <= checked["share_positive"] <= 1 and checked["n"] == 8
            assert checked["fails"] == (checked["share_positive"] < 0.8 or checked["median_low"] is None
                                        or checked["median_low"] <= 0)
        failing = [name for name in ("ARM", "MDM") if measured["validity"][name]["fails"]]
        assert summary["contrast_fails"].get(task, []) == failing == measured["contrast_fails_for"]
    assert "Validity of the contrast" in report
    assert summary["contrast_fails"] == {"ioi": ["ARM", "MDM"]}  # a negative gap among 8 questions
    first = summary["findings"][0]
    assert first["verdict"] == "not measured" and "contrast fails" in first["evidence"]
    assert all(f["verdict"] in (SUPPORTS, CONTRADICTS, CANNOT_TELL, "not measured") for f in summary["findings"])
    ioi = summary["tasks"]["ioi"]
    assert ioi["questions"] == 8 and set(ioi["accuracy"]) == set(summary["models"])
    overlap = ioi["overlap"]["ARM vs MDM"]
    assert 0 <= overlap["low"] <= overlap["high"] <= 1 and overlap["point"] > ioi["chance_overlap"]["mean"]
    assert summary["models"]["ARM as MDM"] == "query format" and summary["models"]["step 500"] == "trajectory"
    # The shipped controls come by default, each set beside its baseline for every measure.
    assert summary["models"]["continued ARM"] == summary["models"]["MDM seed 2"] == "control"
    contrasts = ioi["contrasts"]
    assert list(contrasts) == ["ARM vs MDM", "ARM vs continued ARM", "MDM vs MDM seed 2", "ARM vs ARM as MDM"]
    for measures in contrasts.values():
        assert 0 <= measures["overlap"]["low"] <= measures["overlap"]["high"] <= 1
        assert measures["entropy"]["low"] <= measures["entropy"]["point"] <= measures["entropy"]["high"]
    assert contrasts["ARM vs MDM"]["overlap"] == overlap
    assert "ARM vs MDM beside the controls" in report and "| edge overlap (Jaccard) |" in report
    controls = summary["findings"][3]
    assert set(controls["overlap_minus_control"]) == {"countdown"}  # IOI's contrast fails here
    assert set(controls["overlap_minus_control"]["countdown"]) == {"ARM vs continued ARM", "MDM vs MDM seed 2"}
    # The circuits are EAP-IG JSON for this graph; the scores every model's mean edge scores.
    graph = Graph(8, 4, 128)
    scores, circuit = graph.from_json(finished / "circuits" / "ioi_mdm.json")
    assert circuit.sum() > 0 and np.isfinite(scores).all()
    with np.load(finished / "scores" / "countdown.npz") as stored:
        assert list(stored["names"]) == list(summary["models"])
        assert stored["edges_0"].shape == (graph.n_edges,)


class Interrupted(Exception):
    pass


class InterruptAfter(Reporter):
    def __init__(self, stage: str):
        self.stage = stage

    def end(self, stage: str, seconds: float) -> None:
        if stage == self.stage:
            raise Interrupted


def test_an_interrupted_run_resumes_to_the_same_summary(finished, tmp_path):
    settings = Settings(**SMALL)
    with pytest.raises(Interrupted):
        compare(settings, tmp_path / "run", reporter=InterruptAfter("countdown: attribution"))
    assert (tmp_path / "run" / "stages" / "scores-countdown.json").exists()
    assert not (tmp_path / "run" / "stages" / "structure-countdown.json").exists()
    assert not (tmp_path / "run" / "summary.json").exists()
    resumed = compare(settings, tmp_path / "run")
    assert resumed == json.loads((finished / "summary.json").read_text())
    assert (tmp_path / "run" / "summary.json").read_text() == (finished / "summary.json").read_text()


def test_other_settings_never_mix_with_a_finished_run(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    (copy / "notes.txt").write_text("mine")
    before = sorted(path.relative_to(copy) for path in copy.rglob("*"))
    with pytest.raises(UsageError, match=r"other settings \(pool: 8 -> 10\); pass --fresh"):
        compare(Settings(**SMALL | {"pool": 10}), copy)
    assert sorted(path.relative_to(copy) for path in copy.rglob("*")) == before
    # A fresh start removes what the earlier run wrote, and only that.
    store = RunDirectory(copy, Settings(**SMALL | {"pool": 10}).to_dict(), owned=OUTPUTS, fresh=True)
    assert (copy / "notes.txt").read_text() == "mine"
    assert not (copy / "report.md").exists() and not (copy / "stages").exists()
    assert store.load("pool-ioi") is None
    # A stage file stamped with other settings is never read as this run's.
    assert RunDirectory(finished, Settings(**SMALL).to_dict()).load("pool-ioi") is not None


@pytest.mark.smollm2
def test_smollm2_as_an_arm_and_read_as_an_mdm(smollm2, tmp_path):
    """A real model end to end: SmolLM2 is the ARM, and the same weights read bidirectionally with
    <|endoftext|> as the mask token play the MDM (it was never trained as one: this is a smoke test)."""
    model, tokenizer = smollm2.model, smollm2.tokenizer
    checkpoint.save(tmp_path / "arm", model, tokenizer)
    as_mdm = with_config(model, model.config.replace(attention="bidirectional", mask_token_id=0))
    checkpoint.save(tmp_path / "mdm", as_mdm, tokenizer)
    # One model per program: three stacked copies of SmolLM2 would take more memory than CI allows.
    settings = Settings(arm=str(tmp_path / "arm"), mdm=str(tmp_path / "mdm"), tasks=("ioi",), pool=4, budget=48,
                        steps=1, bootstrap=10, null_draws=10, splits=2, causal_size=2, causal_draws=2, max_length=16,
                        batch_size=4, models_per_program=1)
    summary = compare(settings, tmp_path / "out")
    assert set(summary["models"]) == {"ARM", "MDM", "ARM as MDM"}
    assert summary["tasks"]["ioi"]["headline_k"] == 1000 and summary["tasks"]["ioi"]["n_edges"] == 123_211
    # The MDM and the ARM's weights posed as an MDM are the same model here: their circuits coincide.
    assert summary["tasks"]["ioi"]["overlap"]["MDM vs ARM as MDM"]["point"] == 1.0
    assert (tmp_path / "out" / "report.html").exists()


@pytest.mark.parametrize("arm_mdm, verdict", [(0.3, SUPPORTS), (0.9, CONTRADICTS), (0.75, CANNOT_TELL)])
def test_the_controls_finding_follows_its_rule(arm_mdm, verdict):
    """Finding 4 on hand-made overlaps: ARM-MDM below both controls' overlaps supports it, above one of them
    contradicts it, between the two (within the noise of one) cannot tell."""
    from mdm_circuits.comparison import findings

    pairs = [["ARM", "MDM"], ["ARM", "continued ARM"], ["MDM", "MDM seed 2"]]
    points = np.array([arm_mdm, 0.8, 0.7])
    noise = np.random.default_rng(0).normal(0, 0.01, (200, 3))
    noise[:, 2] *= 1 if verdict != CANNOT_TELL else 8
    found = {"pairs": pairs, "ks": [10], "headline_k": 10, "jaccard": {"point": points[:, None].tolist()}}
    halved = points + np.random.default_rng(1).normal(0, 0.014, (200, 3)) * (noise.std(0) / 0.01)
    replicates = {"jaccard_headline": points + noise, "jaccard_headline_halved": halved}
    controls = [("ARM", "continued ARM"), ("MDM", "MDM seed 2")]
    judged = findings.fourth({"ioi": found}, {"ioi": replicates}, controls)
    assert judged["verdict"] == verdict, judged["evidence"]
    assert findings.fourth({"ioi": found}, {"ioi": replicates}, [])["verdict"] == findings.NOT_MEASURED

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
             causal_draws=2, exact_questions=2)
ARGUMENTS = ["--tasks", "ioi,countdown", "--pool", "8", "--budget", "100", "--steps", "2", "--bootstrap", "20",
             "--null-draws", "20", "--splits", "4", "--causal-draws", "2", "--exact-questions", "2"]


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
            "ioi_faithfulness.png", "ioi_agreement.png", "specialisation.png", "trajectory.png"} <= figures
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
    # Attribution held against exact patching of every edge on 2 of the pooled questions, recomputed here from
    # the saved scores: the method's rows averaged over those questions, and the agreement measures.
    agreed = ioi["agreement"]
    assert agreed["edges_patched"] == 1997 and agreed["forwards"] == 1997 * 2 * 2 and len(agreed["questions"]) == 2
    with np.load(finished / "stages" / "agreement-ioi.npz") as saved, \
            np.load(finished / "stages" / "scores-ioi.npz") as scored:
        rows = {name: scored[f"rows_{list(summary['models']).index(name)}"] for name in ("ARM", "MDM")}
        for name in ("ARM", "MDM"):
            method, exact = saved[f"method_{name}"], saved[f"exact_{name}"]
            np.testing.assert_allclose(method, rows[name][agreed["questions"]].mean(0), rtol=1e-6)
            assert np.isfinite(exact).all() and np.abs(exact).max() > 0
            rho = np.corrcoef(*(np.argsort(np.argsort(v)) for v in (method, exact)))[0, 1]
            assert abs(agreed["models"][name]["spearman"] - rho) < 1e-3  # continuous scores: ties are rare
            top = [set(np.argsort(-np.abs(v), kind="stable")[:200]) for v in (method, exact)]
            assert agreed["models"][name]["jaccard"] == len(top[0] & top[1]) / len(top[0] | top[1])
    assert agreed["method_ceiling"] == min(m["jaccard"] for m in agreed["models"].values())
    assert agreed["arm_vs_mdm_within_method_ceiling"] == (overlap["high"] >= agreed["method_ceiling"])
    assert "Attribution against exact patching" in report and "method ceiling (vs exact)" in report
    # Faithfulness recomputed from every question's saved metrics: the ratio of means at the headline K.
    faithful = json.loads((finished / "stages" / "faithfulness-countdown.json").read_text())["data"]
    column = faithful["ks"].index(faithful["headline_k"])
    with np.load(finished / "stages" / "faithfulness-countdown.npz") as saved:
        for name, measured in summary["tasks"]["countdown"]["faithfulness"].items():
            circuit, clean, ablated = (saved[f"{part}_{name}"].astype(np.float64) for part in
                                       ("circuit", "clean", "ablated"))
            # the circuits in order: the K sweep, a random circuit of each size, every model's headline circuit
            assert circuit.shape == (2 * len(faithful["ks"]) + len(faithful["models"]), 8)
            point = (circuit[column].mean() - ablated.mean()) / (clean.mean() - ablated.mean())
            if measured["headline"]["point"] is not None:
                assert abs(measured["headline"]["point"] - point) < 1e-4
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
    """Interrupted during countdown: the finished run with countdown's stages after attribution removed (what
    an interruption there leaves, and so only those are recomputed), interrupted again after its faithfulness,
    then resumed: the summary is byte for byte the uninterrupted run's."""
    run = tmp_path / "run"
    shutil.copytree(finished, run, ignore=shutil.ignore_patterns(*OUTPUTS, "printed.txt"))
    later = [path for path in (run / "stages").iterdir()
             if path.stem.endswith("-countdown") and not path.stem.startswith(("pool", "scores"))]
    assert {path.stem.split("-")[0] for path in later} >= {"structure", "faithfulness", "agreement", "robustness"}
    for path in later:
        path.unlink()
    settings = Settings(**SMALL)
    with pytest.raises(Interrupted):
        compare(settings, run, reporter=InterruptAfter("countdown: faithfulness"))
    assert (run / "stages" / "faithfulness-countdown.json").exists()
    assert not (run / "stages" / "agreement-countdown.json").exists()
    assert not (run / "summary.json").exists()
    resumed = compare(settings, run)
    assert resumed == json.loads((finished / "summary.json").read_text())
    assert (run / "summary.json").read_text() == (finished / "summary.json").read_text()


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


def test_a_graph_over_the_edge_budget_patches_the_top_k_and_a_sample(finished, tmp_path, monkeypatch):
    """Where the graph has more edges than `EDGE_BUDGET` (every 7B graph), the agreement stage patches the union
    of the ARM's and the MDM's top-K and `SAMPLED_EDGES` others, and measures agreement over those alone."""
    from mdm_circuits.analysis import agreement

    monkeypatch.setattr(agreement, "EDGE_BUDGET", 1000)
    monkeypatch.setattr(agreement, "SAMPLED_EDGES", 100)
    run = tmp_path / "run"
    shutil.copytree(finished, run, ignore=shutil.ignore_patterns(*OUTPUTS, "printed.txt", "agreement-ioi.*"))
    summary = compare(Settings(**SMALL), run)
    agreed = summary["tasks"]["ioi"]["agreement"]
    with np.load(run / "stages" / "agreement-ioi.npz") as saved:
        method = {name: saved[f"method_{name}"] for name in ("ARM", "MDM")}
        measured = [np.isfinite(saved[f"exact_{name}"]) for name in ("ARM", "MDM")]
    np.testing.assert_array_equal(measured[0], measured[1])
    top = set().union(*(np.argsort(-np.abs(v), kind="stable")[:200].tolist() for v in method.values()))
    assert set(np.nonzero(measured[0])[0].tolist()) >= top
    assert agreed["edges_patched"] == measured[0].sum() == len(top) + 100
    assert all(m["n_measured"] == agreed["edges_patched"] for m in agreed["models"].values())
    assert "each model's top 200 and a random sample of the rest" in (run / "report.md").read_text()


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
                        batch_size=4, models_per_program=1, exact_questions=0)
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

"""The comparison end to end: the stages of every task, the findings, and the report.

    from mdm_circuits.comparison import Settings, compare
    summary = compare(Settings(tasks=("ioi", "countdown")), "out/compare")

Every stage's results are saved as soon as they are complete; a rerun with the same settings resumes from
them, a rerun with other settings refuses (or, with `fresh=True`, deletes them first).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from jax.sharding import Mesh

from mdm_circuits.analysis import validity
from mdm_circuits.circuits.graph import Graph
from mdm_circuits.comparison import findings, lineup, stages
from mdm_circuits.comparison.progress import Reporter
from mdm_circuits.comparison.settings import Settings
from mdm_circuits.outputs import RunDirectory
from mdm_circuits.report import compose

# What a comparison writes besides its settings and stages (what --fresh removes).
OUTPUTS = ("report.md", "report.html", "summary.json", "timings.json", "figures", "circuits", "scores")


class _Timed:
    """Times each stage, tells the reporter, and keeps the seconds (for timings.json)."""

    def __init__(self, reporter: Reporter):
        self.reporter, self.seconds = reporter, {}

    def __call__(self, name: str, function, *args):
        start = time.perf_counter()
        result = function(*args)
        self.seconds[name] = round(time.perf_counter() - start, 2)
        self.reporter.end(name, self.seconds[name])
        return result


def compare(settings: Settings, directory: str | Path, *, fresh: bool = False, reporter: Reporter | None = None,
            mesh: Mesh | None = None) -> dict:
    """Run (or resume) the comparison into `directory` and return its summary (also `summary.json`). With a
    `mesh` (`mdm_circuits.sharding`), attribution and the causal checks run on it; the results are the same
    (to float rounding), so a run may resume on another mesh."""
    reporter = reporter or Reporter()
    store = RunDirectory(directory, settings.to_dict(), owned=OUTPUTS, fresh=fresh)
    timed = _Timed(reporter)
    reporter.begin("loading the models")
    models = timed("loading the models", lineup.load, settings, mesh)
    graph = Graph.for_model(models["ARM"].model.architecture)
    reporter.note(f"{len(models.members)} models ({', '.join(models.names)}); {graph.n_edges:,} edges")
    results = {}
    for task in settings.tasks:
        drawn = timed(f"{task}: pool", stages.pool, store, models, task, settings, reporter)
        reporter.note(f"{task}: {len(drawn['arm'])} common-correct questions of {drawn['drawn']} drawn")
        names, rows, scored = timed(f"{task}: attribution", stages.scores, store, models, drawn, task, settings,
                                    reporter)
        found = timed(f"{task}: structure", stages.structure_stage, store, task, graph, names, rows, settings,
                      reporter)
        faithful = timed(f"{task}: faithfulness", stages.faithfulness_stage, store, models, drawn, task, graph, names,
                         rows, found, settings, reporter)
        agreed = timed(f"{task}: agreement with exact patching", stages.agreement_stage, store, models, drawn, task,
                       graph, names, rows, settings, reporter)
        meaning = timed(f"{task}: semantics", stages.semantics_stage, store, models, drawn, task, graph, found,
                        settings, reporter)
        checked = timed(f"{task}: causal check", stages.causal_stage, store, models, drawn, task, graph, found,
                        settings, reporter)
        robust = timed(f"{task}: robustness", stages.robustness_stage, store, models, drawn, task, graph, names,
                       rows, settings, reporter)
        results[task] = {"pool": drawn, "scores": scored, "structure": found, "faithfulness": faithful,
                         "agreement": agreed,
                         "agreement_scores": agreed and store.arrays(f"agreement-{task}"), "semantics": meaning,
                         "causal": checked, "robustness": robust, "means": [r.mean(0) for r in rows]}
        results[task]["contrasts"] = compose.contrasts(results[task], models.contrasts)
    replicates = {task: store.arrays(f"structure-{task}") for task in settings.tasks}
    # A task whose contrast fails for the ARM or the MDM is reported under a warning and read by no finding.
    valid = {t: r["structure"] for t, r in results.items() if not validity.failing(r["pool"]["validity"])}
    verdicts = findings.judge(valid, replicates, models.controls)
    reporter.begin("writing the report")
    mdm = models["MDM"]
    described = compose.Models(roles={m.name: m.role for m in models.members}, contrasts=models.contrasts,
                               trajectory=[(m.name, m.step) for m in models.trajectory[:-1]],
                               final_step=mdm.step or 0, source=models.source,
                               read_offset=mdm.model.config.read_offset, mask_token=mdm.model.config.mask_token_id)
    summary = timed("report", compose.write, store.write, described, graph, results, verdicts, settings.to_dict(),
                    timed.seconds)
    store.write("timings.json", json.dumps(timed.seconds, indent=1) + "\n")
    return summary


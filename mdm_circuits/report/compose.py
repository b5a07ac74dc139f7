"""The comparison's outputs: `report.md` (figures in `figures/`), a self-contained `report.html`, the circuits
as JSON in the EAP-IG naming, the mean scores as `.npz`, and `summary.json` with every headline number.

`write` takes the comparison's results as plain data (see `comparison.run`) and a `save(relative path,
bytes or text)` that writes a file of the run."""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Callable

import numpy as np

from mdm_circuits.analysis import structure, validity
from mdm_circuits.circuits.graph import Graph
from mdm_circuits.report import figures
from mdm_circuits.report.document import Bullets, Figure, Heading, Paragraph, Table, markdown, to_html
from mdm_circuits.tasks import TASKS


def _ci(value: dict, digits: int = 3) -> str:
    return f"{value['point']:.{digits}f} [{value['low']:.{digits}f}, {value['high']:.{digits}f}]"


def _headline(found: dict, pair: tuple[str, str]) -> dict | None:
    pairs = [tuple(p) for p in found["pairs"]]
    if pair not in pairs:
        return None
    index, column = pairs.index(pair), found["ks"].index(found["headline_k"])
    return {key: found["jaccard"][key][index][column] for key in ("point", "low", "high")} | {
        "connected": found["jaccard_connected"][index]}


@dataclasses.dataclass(frozen=True)
class Models:
    """What the report needs to know of the compared models: names and roles in order ("arm", "mdm", "query
    format", "trajectory", "control"), the contrasts (ARM vs MDM, then each control beside its baseline), the
    adaptation checkpoints as (name, step), where they came from, and the MDM's readout offset and mask
    token."""

    roles: dict[str, str]
    contrasts: list[tuple[str, str]]
    trajectory: list[tuple[str, int]]
    final_step: int
    source: str
    read_offset: int
    mask_token: int

    @property
    def names(self) -> list[str]:
        return list(self.roles)

    def main(self) -> list[str]:
        return [name for name, role in self.roles.items() if role in ("arm", "mdm", "query format", "control")]


Save = Callable[[str, "bytes | str"], object]


def _figure(save: Save, name: str, png: bytes, caption: str) -> Figure:
    save(f"figures/{name}.png", png)
    return Figure(f"figures/{name}.png", png, caption)


def _in_distribution(drawn: dict, name: str) -> str:
    """The share of the pooled questions a model solves, flagged where it is below `validity.IN_DISTRIBUTION`."""
    share = drawn["solved_in_pool"][name]
    return f"{share:.3f}" + ("" if share >= validity.IN_DISTRIBUTION else " (out of distribution)")


def _ratio(value: float | None, spec: str = ".3f") -> str:
    """A ratio over a task's clean − corrupted gap, or "undefined" where that gap is below its floor
    (`circuits.normalised`)."""
    return "undefined" if value is None else format(value, spec)


def _signed(value: dict) -> str:
    return f"{value['point']:+.3f} [{value['low']:+.3f}, {value['high']:+.3f}]"


def contrasts(result: dict, contrasts: list[tuple[str, str]]) -> dict:
    """Every measure for each contrast: overlaps, differences (second − first) of layers and specialisation
    with intervals, shared top components, and the semantic and causal differences (points)."""
    found, meaning, checked = result["structure"], result["semantics"], result["causal"]["models"]
    measures = {}
    for pair in contrasts:
        a, b = pair
        top = [{c for c, _ in found["top_components"][name][:5]} for name in pair]
        measures[f"{a} vs {b}"] = {
            "overlap": _headline(found, pair),
            **found["differences"][f"{a} vs {b}"],
            "shared_top_5_components": len(top[0] & top[1]),
            "neuron_top_10_share": meaning[b]["neuron_top_10_share"] - meaning[a]["neuron_top_10_share"],
            "kept_after_zeroing": None if None in (checked[a]["retained"], checked[b]["retained"])
            else checked[b]["retained"] - checked[a]["retained"],
        }
    return measures


CONTRAST_ROWS = (
    ("edge overlap (Jaccard)", lambda m: _ci(m["overlap"])),
    ("connected-circuit overlap", lambda m: f"{m['overlap']['connected']:.3f}"),
    ("layer centre of mass, second − first", lambda m: _signed(m["centre_of_mass"])),
    ("importance entropy, second − first", lambda m: _signed(m["entropy"])),
    ("importance Gini, second − first", lambda m: _signed(m["gini"])),
    ("top-3 share, second − first", lambda m: _signed(m["top_3_share"])),
    ("top-5 components in common", lambda m: f"{m['shared_top_5_components']} of 5"),
    ("neuron top-10 share, second − first", lambda m: f"{m['neuron_top_10_share']:+.3f}"),
    ("kept after zeroing important early components, second − first",
     lambda m: _ratio(m["kept_after_zeroing"], "+.3f")),
)


def _task_summary(task: str, result: dict) -> dict:
    found, drawn, scored = result["structure"], result["pool"], result["scores"]
    column = found["ks"].index(found["headline_k"])
    names = scored["members"]
    faithful_column = result["faithfulness"]["ks"].index(result["faithfulness"]["headline_k"])
    return {
        "questions": len(drawn["arm"]), "drawn": drawn["drawn"], "accuracy": drawn["accuracy"],
        "pool_accuracy": drawn["pool_accuracy"],
        "metric": {"name": TASKS[task].METRIC.name, "clean": dict(zip(names, scored["clean_metric"])),
                   "corrupted": dict(zip(names, scored["corrupted_metric"]))},
        "headline_k": found["headline_k"], "n_edges": found["n_edges"],
        "overlap": {f"{a} vs {b}": _headline(found, (a, b)) for a, b in found["pairs"]},
        "chance_overlap": {key: found["null_random"][key][column] for key in ("mean", "low", "high")},
        "split_half_overlap": {name: {key: band[key][column] for key in ("mean", "low", "high")}
                               for name, band in found["null_split_half"].items()},
        "noise_ceiling": {pair: {"mean": null["mean"][column], "p_value": null["p_value"][column]}
                          for pair, null in found["null_label_swap"].items()},
        "normalised_overlap": found["normalised_overlap"],
        "centre_of_mass": found["centre_of_mass"], "specialisation": found["specialisation"],
        "top_components": {name: found["top_components"][name][:5] for name in ("ARM", "MDM")},
        "causal": {name: {key: value[key] for key in ("important", "retained", "retained_without_shared")}
                   | {"random_mean": value["random"]["mean"], "middle_late_mean": value["middle_late"]["mean"]}
                   for name, value in result["causal"]["models"].items()},
        "robustness": result["robustness"],
        "contrasts": result["contrasts"],
        "contrast_fails_for": validity.failing(drawn["validity"]),
        "validity": drawn["validity"], "solved_in_pool": drawn["solved_in_pool"],
        "faithfulness": {name: {"headline": {key: value["curve"][key][faithful_column]
                                             for key in ("point", "low", "high")},
                                "random_headline": value["random"]["point"][faithful_column],
                                "smallest_faithful_k": value["smallest_faithful_k"],
                                "circuits_of": value["circuits_of"]}
                         for name, value in result["faithfulness"]["models"].items()},
        "matched_faithfulness": result["faithfulness"]["matched"],
        "agreement": result["agreement"] and result["agreement"] | {
            "arm_vs_mdm_within_method_ceiling": within_method_ceiling(found, result["agreement"])},
    }


def within_method_ceiling(found: dict, agreed: dict) -> bool:
    """Whether the ARM and the MDM disagree no more than the attribution method disagrees with exact patching
    inside one model: the ARM–MDM overlap's interval reaches the method ceiling."""
    return _headline(found, ("ARM", "MDM"))["high"] >= agreed["method_ceiling"]


def _protocol(settings: dict, models: Models, graph: Graph, results: dict) -> list:
    found = next(iter(results.values()))["structure"]
    protocol = ("single step: every answer position masked, read once" if settings["protocol"] == "single" else
                f"{settings['denoising_steps'] or 'answer-length'} denoising steps revealed {settings['order']}")
    rows = [
        ("models", models.source),
        ("graph", f"{graph.n_layers} layers x {graph.n_heads} heads, {graph.n_edges:,} edges (EAP-IG graph)"),
        ("attribution", f"{settings['method']}, {settings['steps']} steps, Δ against the {settings['ablation']} "
                        f"run, summed over positions"),
        ("MDM query", f"{protocol}; answers read at p − {models.read_offset} (mask token {models.mask_token}); "
                      f"the ARM reads its teacher-forced answer at p − 1"),
        ("K", f"headline {found['headline_k']} (1000, or 10% of a smaller graph's edges); swept over "
              f"{found['ks']}"),
        ("intervals", f"95% percentile bootstrap over questions, {settings['bootstrap']} resamples"),
        ("nulls", f"chance: {settings['null_draws']} pairs of random edge sets of size K; split-half: "
                  f"{settings['splits']} random splits of a model's pool into two disjoint halves"),
        ("causal check", f"{settings['causal_size']} important early components zeroed at every position; "
                         f"{settings['causal_draws']} draws of each control"),
        ("seed", str(settings["seed"])),
    ]
    for task, result in results.items():
        drawn = result["pool"]
        rows.append((f"pool: {task}", f"{len(drawn['arm'])} questions both solve, of {drawn['drawn']} drawn "
                                      f"(ARM {drawn['pool_accuracy']['ARM']:.3f}, MDM "
                                      f"{drawn['pool_accuracy']['MDM']:.3f} of the drawn)"))
    for task, result in results.items():
        rows.append((f"views: {task}", "; ".join(result["pool"]["views"])))
    return [Heading("Protocol"), Table(("setting", "value"), tuple(rows))]


def _median(value: dict) -> str:
    bound = [("−∞" if value[key] is None else f"{value[key]:+.3f}") for key in ("median_low", "median_high")]
    return f"{value['median_gap']:+.3f} [{bound[0]}, {bound[1]}]"


def _validity_blocks(task: str, drawn: dict) -> list:
    checked = drawn["validity"]
    failed = validity.failing(checked)
    blocks = []
    if failed:
        blocks.append(Paragraph(
            f"**Warning: the contrast fails for {' and '.join(failed)} on {task}** (fewer than "
            f"{validity.MIN_SHARE_POSITIVE:.0%} of the pooled questions score higher clean than corrupted, or the "
            f"median gap's interval reaches 0). The corrupted prompt does not take away what the clean one asks, so "
            f"there is no effect to attribute: this task's measures below are shown for completeness only, and no "
            f"finding reads them."))
    blocks.append(Paragraph(
        f"Validity of the contrast: for each model, the share of the {len(drawn['arm'])} pooled questions whose "
        f"clean − corrupted metric gap is positive, and the median gap with its exact 95% interval. The pool keeps "
        f"every common-correct question; the last column counts those a keep-only-positive-gap rule would remove."))
    blocks.append(Table(("model", "gap > 0", "median gap [95%]", "clean mean", "corrupted mean", "gap ≤ 0",
                         "contrast"), tuple(
        (name, f"{v['share_positive']:.3f}", _median(v), f"{v['clean_mean']:.3f}", f"{v['corrupted_mean']:.3f}",
         str(v["non_positive"]), "fails" if v["fails"] else "works") for name, v in checked.items())))
    return blocks


def _faithfulness_blocks(save: Save, task: str, result: dict, models: Models) -> list:
    faithful = result["faithfulness"]
    compared = list(faithful["models"])
    column = faithful["ks"].index(faithful["headline_k"])
    k = faithful["headline_k"]

    def cell(value: dict, index: int | None = None) -> str:
        point, low, high = (value[key] if index is None else value[key][index] for key in ("point", "low", "high"))
        return "undefined" if point is None else f"{point:.3f} [{low:.3f}, {high:.3f}]"

    blocks = [_figure(save, f"{task}_faithfulness", figures.faithfulness(task, faithful, compared),
                      f"{task}: faithfulness of each model's top-K circuit against K, 95% intervals over questions; "
                      f"dotted: a random circuit of the same size")]
    blocks.append(Table(
        ("model", f"faithfulness at K = {k} [95%]", f"random circuit at K = {k}",
         f"smallest K reaching tau = {faithful['tau']}"),
        tuple((name, cell(v["curve"], column), cell(v["random"], column),
               "never" if v["smallest_faithful_k"] is None else str(v["smallest_faithful_k"]))
              for name, v in faithful["models"].items())))
    blocks.append(Paragraph(
        f"Cross-faithfulness at K = {k}: the circuit of the row's model run inside the column's model, normalised "
        f"by the column model's own clean and corrupted runs (the diagonal is each model's own circuit)."))
    blocks.append(Table(("circuit of \\ run in", *compared), tuple(
        (a, *(cell(faithful["models"][b]["circuits_of"][a]) for b in compared)) for a in compared)))
    matched = [(pair, value) for pair, value in faithful["matched"].items()
               if tuple(pair.split(" vs ")) in {tuple(c) for c in models.contrasts}]
    if matched:
        blocks.append(Paragraph(f"At matched faithfulness: each model's smallest K whose circuit reaches tau = "
                                f"{faithful['tau']} (of the swept K), and the overlap of those two circuits."))
        blocks.append(Table(("pair", "K of each", "overlap"), tuple(
            (pair, "—" if v is None else f"{v['k'][0]} / {v['k'][1]}",
             "a circuit never reaches tau" if v is None else f"{v['overlap']:.3f}") for pair, v in matched)))
    return blocks


def _agreement_blocks(save: Save, task: str, result: dict, settings: dict) -> list:
    agreed, found = result["agreement"], result["structure"]
    if agreed is None:
        return [Paragraph("Attribution against exact patching: not measured in this run (exact_questions 0).")]
    k, arrays = agreed["k"], result["agreement_scores"]
    method = {name: arrays[f"method_{name}"] for name in agreed["models"]}
    exact = {name: arrays[f"exact_{name}"] for name in agreed["models"]}
    overlap, ceiling = _headline(found, ("ARM", "MDM")), agreed["method_ceiling"]
    patched = ("every edge" if agreed["edges_patched"] == found["n_edges"] else
               f"{agreed['edges_patched']:,} edges (each model's top {k} and a random sample of the rest)")
    blocks = [Paragraph(
        f"Attribution against exact patching: {patched} patched one at a time on {len(agreed['questions'])} pooled "
        f"questions ({agreed['forwards']:,} forwards), against {settings['method']} ({settings['steps']} steps) on "
        f"the same questions. Single-edge patching ignores interactions between edges, so it is one reference, "
        f"not the truth; the method ceiling is the lower of the two models' top-{k} overlaps with it.")]
    blocks.append(Table(("model", "Spearman, all edges", f"Spearman, exact top {k}", f"top-{k} Jaccard with exact"),
                        tuple((name, f"{v['spearman']:.3f}", f"{v['spearman_top_k']:.3f}", f"{v['jaccard']:.3f}")
                              for name, v in agreed["models"].items())))
    subsample = agreed["arm_vs_mdm_on_subsample"]
    verdict = ("within it: the ARM and the MDM disagree no more than the method disagrees with exact patching "
               "inside one model, so this task's ARM–MDM difference cannot be told from the method's own error"
               if within_method_ceiling(found, agreed) else
               "below it: the two models differ by more than the method differs from exact patching")
    blocks.append(Paragraph(
        f"ARM vs MDM overlap {_ci(overlap)} against the method ceiling {ceiling:.3f}: {verdict}. On the "
        f"{len(agreed['questions'])} questions alone, ARM vs MDM overlaps {subsample['method']:.3f} by the method and "
        f"{subsample['exact']:.3f} by exact patching."))
    blocks.append(_figure(save, f"{task}_agreement", figures.agreement(task, agreed, method, exact,
                                                                       settings["method"]),
                          f"{task}: each model's edge scores by {settings['method']} against exact patching"))
    return blocks


def _task_blocks(save: Save, task: str, result: dict, models: Models, settings: dict) -> list:
    found, scored, drawn = result["structure"], result["scores"], result["pool"]
    names = scored["members"]
    column = found["ks"].index(found["headline_k"])
    blocks = [Heading(task, 2)]
    blocks += _validity_blocks(task, drawn)
    blocks.append(Table(("model", "accuracy (sample)", "solved of the pool", f"clean {TASKS[task].METRIC.name}",
                         "corrupted"), tuple(
        (name, f"{drawn['accuracy'][name]:.3f}", _in_distribution(drawn, name), f"{clean:.3f}", f"{corrupted:.3f}")
        for name, clean, corrupted in zip(names, scored["clean_metric"], scored["corrupted_metric"]))))
    blocks.append(_figure(save, f"{task}_overlap", figures.overlaps(task, found, models.contrasts),
                          f"{task}: Jaccard overlap of top-K edge sets against K, 95% intervals; grey: chance; "
                          f"dotted/dashed: two halves of one model's pool"))
    rows = []
    method_ceiling = "—" if result["agreement"] is None else f"{result['agreement']['method_ceiling']:.3f}"
    for a, b in found["pairs"]:
        value = _headline(found, (a, b))
        if a in ("ARM", "MDM") or b in ("ARM", "MDM"):
            null = found["null_label_swap"][f"{a} vs {b}"]
            rows.append((f"{a} vs {b}", _ci(value), f"{null['mean'][column]:.3f}", f"{null['p_value'][column]:.3f}",
                         _ci(found["normalised_overlap"][f"{a} vs {b}"]), method_ceiling, f"{value['connected']:.3f}"))
    blocks.append(Table((f"pair (K = {found['headline_k']})", "overlap [95%]", "noise ceiling (label swaps)",
                         "p (overlap this low)", "overlap / ceiling [95%]", "method ceiling (vs exact)",
                         "connected circuits"), tuple(rows)))
    headlines = {f"{a} vs {b}": _headline(found, (a, b)) for a, b in found["pairs"]}
    outside = [pair for pair, value in headlines.items() if not value["low"] <= value["point"] <= value["high"]]
    blocks.append(Paragraph(
        f"Chance overlap at K = {found['headline_k']}: {found['null_random']['mean'][column]:.3f} "
        f"(95% up to {found['null_random']['high'][column]:.3f}). The noise ceiling is the mean of the full-size "
        f"paired label-swap null (each question's two rows swapped at random between the two models, "
        f"{len(found['null_label_swap'])} pairs): the overlap two models with one circuit would show on these "
        f"questions; p is the share of swaps whose overlap is as low as the observed one. The method ceiling is "
        f"the attribution's own top-K overlap with exact patching inside one model (the lower of the ARM's and the "
        f"MDM's; below). Overlap intervals are "
        f"extrapolated to the population (top-K Jaccard is biased under resampling; see `analysis.structure`), so a "
        f"point may lie outside its interval" + (f" (here: {', '.join(outside)})" if outside else "") + ". Two "
        f"disjoint halves of one pool (a description at half the pool's size, below the noise ceiling): ARM "
        f"{found['null_split_half']['ARM']['mean'][column]:.3f}, MDM "
        f"{found['null_split_half']['MDM']['mean'][column]:.3f}. "
        f"Connected circuits: the top-K edges pruned to paths from the input to the logits "
        f"({', '.join(f'{n} {s}' for n, s in found['connected_size'].items() if n in ('ARM', 'MDM'))} edges)."))
    if len(models.contrasts) > 1:
        contrasts = result["contrasts"]
        blocks.append(Paragraph(
            "ARM vs MDM beside the controls: each column compares two models on this task's pool (K = "
            f"{found['headline_k']}; 95% bootstrap intervals). A difference between ARM and MDM means more where "
            "the controls' columns stay near zero (or, for overlaps, near the split-half ceiling)."))
        blocks.append(Table(("measure", *contrasts), tuple(
            (label, *(cell(contrasts[pair]) for pair in contrasts)) for label, cell in CONTRAST_ROWS)))
    blocks.append(_figure(save, f"{task}_layers", figures.layers(task, found, models.main()),
                          f"{task}: share of component importance per layer (centre of mass as a fraction of depth)"))
    blocks.append(Table(("model", "layer centre of mass", "entropy", "Gini", "top-3 share", "top components (s(v))"),
                        tuple((n, _ci(found["centre_of_mass"][n]), _ci(found["specialisation"][n]["entropy"]),
                               _ci(found["specialisation"][n]["gini"]), _ci(found["specialisation"][n]["top_3_share"]),
                               ", ".join(f"{c} {s:.2f}" for c, s in found["top_components"][n][:5]))
                              for n in names)))
    blocks += _faithfulness_blocks(save, task, result, models)
    blocks += _agreement_blocks(save, task, result, settings)
    meaning = result["semantics"]
    blocks.append(_figure(save, f"{task}_logit_lens", figures.logit_lens(task, meaning),
                          f"{task}: direct contribution of the top components to the correct − incorrect logit"))
    blocks.append(Table(("model", "component", "promotes most", "answer's median rank", "push (logits)"), tuple(
        (name, c["component"], " ".join(repr(t.strip()) for t in c["tokens"][:3]), f"{c['answer_rank']:.0f}",
         f"{c['answer_push']:+.2f}") for name, value in meaning.items() for c in value["components"])))
    neuron_rows = []
    for name, value in meaning.items():
        for neuron in value["neurons"][:3]:
            inputs = "; ".join(f"{i['context']!r} ({i['activation']:.2f})" for i in neuron["inputs"][:2])
            neuron_rows.append((name, f"m{value['mlp_layer']} #{neuron['neuron']}", f"{neuron['score']:+.3f}",
                                inputs, " ".join(repr(t.strip()) for t in neuron["promotes"][:3])))
    blocks.append(Paragraph("Neurons of each model's most important early MLP (neuron-level EAP; the share of the "
                            "ten largest: " + ", ".join(f"{n} {v['neuron_top_10_share']:.2f}"
                                                        for n, v in meaning.items()) + "):"))
    blocks.append(Table(("model", "neuron", "score", "strongest pool inputs (activation)", "promotes"),
                        tuple(neuron_rows)))
    checked = result["causal"]
    blocks.append(_figure(save, f"{task}_ablation", figures.ablations(task, checked),
                          f"{task}: share of the task kept after zeroing components (controls: mean, min-max)"))
    blocks.append(Table(("model", "zeroed", "kept", "without shared", "random (mean)", "middle/late (mean)"), tuple(
        (name, ", ".join(v["important"]), _ratio(v["retained"]),
         "—" if v["retained_without_shared"] is None and v["defined"] else _ratio(v["retained_without_shared"]),
         _ratio(v["random"]["mean"]), _ratio(v["middle_late"]["mean"]))
        for name, v in checked["models"].items())))
    if checked["shared"]:
        blocks.append(Paragraph(f"Shared by the ARM's and the MDM's important sets: {', '.join(checked['shared'])}; "
                                "'without shared' zeroes the rest."))
    robust = result["robustness"]
    lines = [f"ARM vs MDM overlap on two disjoint halves of the pool: {robust['halves'][0]:.3f} and "
             f"{robust['halves'][1]:.3f}."]
    if robust["protocols"]:
        for order, value in robust["protocols"].items():
            lines.append(f"MDM queried step by step ({order}): overlap with its single-step circuit "
                         f"{_ci(value['mdm_single_vs_stepwise'])}; with the ARM {_ci(value['arm_vs_mdm_stepwise'])}.")
    matched = robust["arm_prompt"]
    if matched:
        lines.append(f"View-matched: the MDM asked the ARM's prompt (it solves {matched['solved']:.3f} of the pool "
                     f"that way): overlap with the ARM {_ci(matched['arm_vs_mdm'])}; with its own circuit on its "
                     f"native prompt {_ci(matched['mdm_native_vs_arm_prompt'])}.")
    blocks += [Paragraph("Robustness:"), Bullets(tuple(lines))]
    return blocks


def _circuits(save: Save, graph: Graph, task: str, result: dict) -> None:
    """The ARM's and the MDM's mean scores with their connected headline-K circuits (EAP-IG JSON), and every
    model's mean scores (`.npz`)."""
    names, means = result["scores"]["members"], result["means"]
    k = structure.headline_k(graph)
    for name, mean in zip(names, means):
        if name in ("ARM", "MDM"):
            circuit = graph.edge_matrix(structure.connected_top_k(graph, mean, k), fill=False)
            save(f"circuits/{task}_{name.lower()}.json", graph.json(graph.edge_matrix(mean.astype(np.float32)),
                                                                    circuit))
    scores = io.BytesIO()
    np.savez(scores, names=np.array(names), **{f"edges_{i}": m for i, m in enumerate(means)})
    save(f"scores/{task}.npz", scores.getvalue())


def write(save: Save, models: Models, graph: Graph, results: dict, verdicts: list[dict], settings: dict,
          timings: dict) -> dict:
    """Write the report, circuits, scores and summary; return the summary."""
    structures = {task: r["structure"] for task, r in results.items()}
    summary = {"models": models.roles, "settings": settings, "findings": verdicts,
               "tasks": {t: _task_summary(t, r) for t, r in results.items()}}
    blocks = [Heading("ARM vs MDM circuits", 1), Paragraph(
        f"The circuits of an autoregressive model (ARM) and of the masked diffusion model (MDM) post-trained from "
        f"it, found with EAP-IG on {', '.join(results)} and compared by structure (edge overlap, component "
        f"importance, layers), semantics (logit lens, neurons) and causal checks, with controls: "
        f"{', '.join(n for n in models.names if n not in ('ARM', 'MDM')) or 'none'}.")]
    failing = {task: validity.failing(r["pool"]["validity"]) for task, r in results.items()}
    failed = {task: names for task, names in failing.items() if names}
    summary["contrast_fails"] = failed
    if failed:
        blocks.append(Paragraph("**Tasks whose contrast fails** (shown under a warning, read by no finding): "
                                + "; ".join(f"{task} for {' and '.join(names)}" for task, names in failed.items())
                                + "."))
    blocks += [Heading("Findings"), Paragraph(
        "Each of the paper's three findings is judged by a rule fixed before the run (see "
        "`mdm_circuits.comparison.findings`): supported, contradicted, or this run cannot tell.")]
    blocks.append(Table(("finding", "this run", "evidence"), tuple(
        (v["finding"], v["verdict"], v["evidence"]) for v in verdicts)))
    blocks += _protocol(settings, models, graph, results)
    for task, result in results.items():
        blocks += _task_blocks(save, task, result, models, settings)
        _circuits(save, graph, task, result)
    blocks += [Heading("Specialisation"), _figure(save, "specialisation",
                                                  figures.specialisation(structures, models.main()),
                                                  "Importance entropy per task and model, 95% intervals")]
    if models.trajectory:
        accuracy = {task: r["pool"]["accuracy"] for task, r in results.items()}
        blocks += [Heading("Along the adaptation"), Paragraph(
            "Each checkpoint of the ARM → MDM adaptation (step 0: the ARM's weights posed as an MDM) against the "
            "ARM and the final MDM at the headline K, its layer centre of mass and its accuracy (MDM view)."),
            _figure(save, "trajectory", figures.trajectory(structures, accuracy, models.trajectory,
                                                           models.final_step),
                    "Overlap, layer centre of mass and accuracy along the adaptation")]
    blocks += [Heading("Files"), Bullets((
        "`summary.json`: every headline number; `timings.json`: seconds per stage",
        "`figures/*.png`: the figures of this report",
        "`circuits/TASK_arm.json`, `circuits/TASK_mdm.json`: mean scores and the connected headline-K circuit, "
        "in the EAP-IG reference's JSON format",
        "`scores/TASK.npz`: every model's mean edge scores (edge order of the graph)",
        "`stages/`: each stage's saved results (a rerun with the same settings resumes from them)"))]
    blocks += [Heading("Time per stage"), Table(("stage", "seconds"), tuple(
        (stage, f"{seconds:.1f}") for stage, seconds in timings.items()))]
    save("report.md", markdown(blocks))
    save("report.html", to_html(blocks, "ARM vs MDM circuits"))
    save("summary.json", json.dumps(summary, indent=1) + "\n")
    return summary

"""The stages of a comparison, for one task each. A stage reads what earlier stages saved, computes, and saves
its own results in the run's store; a finished stage is never recomputed.

  pool         the common-correct questions of the ARM and the MDM, and every model's accuracy
  scores       every model's per-question edge scores (stacked programs: models of one architecture at once)
  structure    overlaps over K with bootstrap intervals, the two nulls, importance, layers, specialisation
  faithfulness every compared circuit over K, run in its own model and in every other one
  agreement    the attribution against exact single-edge patching on a subsample: the method ceiling
  semantics    logit lens of the top components, neurons of the most important early MLP
  causal       important early components zeroed, against random and middle/late controls
  robustness   disjoint half pools; for multi-token answers, the MDM queried step by step in two orders
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from mdm_circuits.analysis import agreement as agree
from mdm_circuits.analysis import causal, faithfulness, semantics, structure, validity
from mdm_circuits.analysis.validity import contrast_metrics
from mdm_circuits.circuits.ablations import Ablation
from mdm_circuits.circuits.attribution import attribute
from mdm_circuits.circuits.evaluation import evaluate
from mdm_circuits.circuits.graph import Graph
from mdm_circuits.circuits.normalised import normalised
from mdm_circuits.circuits.patching import ablate_node_sets, exact_edges
from mdm_circuits.comparison.lineup import Lineup, Member
from mdm_circuits.comparison.progress import Reporter
from mdm_circuits.comparison.settings import Settings
from mdm_circuits.decoding.accuracy import common_correct_pool, solved
from mdm_circuits.decoding.denoising import denoising_steps
from mdm_circuits.errors import UsageError
from mdm_circuits.model.transformer import stack
from mdm_circuits.outputs import RunDirectory
from mdm_circuits.tasks import TASKS
from mdm_circuits.tasks.batch import Example, collate
from mdm_circuits.tasks.views import View

MAIN_PAIR = ("ARM", "MDM")
SPECIALISATION = ("entropy", "gini", "top_3_share")


@dataclasses.dataclass(frozen=True)
class Posed:
    """One model's examples of a task: every question, or every denoising step of every question (then
    `questions[i]` is the question example i belongs to)."""

    examples: list[Example]
    questions: np.ndarray


# ---- pool ----


def pool(store: RunDirectory, lineup: Lineup, task: str, settings: Settings, reporter: Reporter) -> dict:
    done = store.load(f"pool-{task}")
    if done is not None:
        return done
    arm, mdm = lineup["ARM"].model, lineup["MDM"].model
    reporter.begin(f"{task}: drawing questions both models solve", settings.pool)
    drawn = common_correct_pool(TASKS[task], lineup.tokenizer, arm, mdm, n=settings.pool, budget=settings.budget,
                                seed=settings.seed, max_length=settings.max_length, split=settings.split,
                                progress=lambda _, pooled, n: reporter.update(pooled, n))
    if len(drawn.arm) < 4:
        raise UsageError(f"only {len(drawn.arm)} of {drawn.drawn} {task} questions are solved by both models; raise "
                         f"--budget, or leave the task out (--tasks)")
    reporter.begin(f"{task}: every model's accuracy", len(lineup.members))
    accuracy = {}
    for index, member in enumerate(lineup.members):
        sample = TASKS[task].examples(lineup.tokenizer, settings.pool, seed=settings.seed + 1,
                                      view=View.for_model(member.model.config), max_length=settings.max_length,
                                      split=settings.split)
        accuracy[member.name] = float(solved(member.model, sample).mean())
        reporter.update(index + 1)
    result = {"drawn": drawn.drawn, "pool_accuracy": {"ARM": drawn.arm_accuracy, "MDM": drawn.mdm_accuracy},
              "accuracy": accuracy, "accuracy_sample": settings.pool,
              "arm": [dataclasses.asdict(e) for e in drawn.arm], "mdm": [dataclasses.asdict(e) for e in drawn.mdm]}
    result["views"] = view_differences(drawn.arm, drawn.mdm)
    examples = posed(lineup, result, settings, protocol="single")
    reporter.begin(f"{task}: every model on the pooled questions", len(lineup.members))
    result["solved_in_pool"] = {}
    for index, member in enumerate(lineup.members):
        result["solved_in_pool"][member.name] = float(solved(member.model, examples[member.name].examples).mean())
        reporter.update(index + 1)
    reporter.begin(f"{task}: the contrast of every model (clean against corrupted)", len(lineup.members))
    metric = TASKS[task].METRIC

    def contrasts(models, names):
        measured = contrast_metrics(models, [examples[name].examples for name in names] if len(names) > 1
                                    else examples[names[0]].examples, metric, batch_size=settings.batch_size,
                                    mesh=lineup.mesh)
        reporter.update(len(names))
        return measured

    measured = dict(zip(lineup.names, _run(list(lineup.members), settings, contrasts)))
    result["metrics"] = {name: {"clean": c.clean.tolist(), "corrupted": c.corrupted.tolist()}
                         for name, c in measured.items()}
    result["validity"] = {name: _validity(c, metric.higher_is_better) for name, c in measured.items()}
    store.save(f"pool-{task}", result)
    return result


def _validity(contrast, higher_is_better: bool) -> dict:
    checked = validity.validity(contrast.clean, contrast.corrupted, higher_is_better)
    fields = {key: _defined(value) if isinstance(value, float) else value
              for key, value in dataclasses.asdict(checked).items()}
    return fields | {"fails": checked.fails}


def view_differences(arm: list[Example], mdm: list[Example]) -> list[str]:
    """Every way the ARM's view of the pooled questions differs from the MDM's, read from the examples
    themselves (so a task of your own is described as truly as the shipped ones)."""
    differences = ["attention: the ARM's is causal, the MDM's bidirectional",
                   "answer positions: the MDM's hold its mask token; the ARM reads the answer after its prompt"]
    prompts_differ = sum(not _same_prompt(a, m) for a, m in zip(arm, mdm))
    if prompts_differ:
        differences.append(f"prompt: the two models are given different prompts on {prompts_differ} of "
                           f"{len(arm)} questions (the ARM a question whose answer comes last)")
    right_context = sum(len(m.clean) > m.answer_positions[-1] + 1 for m in mdm)
    if right_context:
        differences.append(f"right-hand context: the MDM sees tokens after the answer on {right_context} of "
                           f"{len(mdm)} questions; the ARM cannot read them")
    longer = sum(len(a.answer_positions) > 1 for a in arm)
    if longer:
        differences.append(f"multi-token answers ({longer} of {len(arm)} questions): the ARM is teacher-forced "
                           f"(it sees its own earlier answer tokens); the MDM, read in one step, sees every "
                           f"answer position masked")
    return differences


def _same_prompt(arm: Example, mdm: Example) -> bool:
    """Whether the ARM's and the MDM's views of one question hold the same tokens before the answer."""
    return arm.clean[: arm.answer_positions[0]] == mdm.clean[: mdm.answer_positions[0]]


def _reposed(example: Example, mask: int, own_mask: int) -> Example:
    """The MDM-view example with the MDM's mask token replaced by another model's."""
    if mask == own_mask:
        return example
    swap = [own_mask if token == mask else token for token in example.clean]
    corrupted = [own_mask if token == mask else token for token in example.corrupted]
    return dataclasses.replace(example, clean=swap, corrupted=corrupted)


def posed(lineup: Lineup, drawn: dict, settings: Settings, protocol: str | None = None, order: str | None = None,
          members: list[Member] | None = None) -> dict[str, Posed]:
    """Every model's examples: the ARM view for causal models, the MDM view (with its own mask token) for MDMs.
    With the multi-step protocol each MDM-view question becomes its denoising steps, and each ARM-view
    question is repeated as often, so that every model has as many examples (and can share a program)."""
    protocol, order = protocol or settings.protocol, order or settings.order
    arm_view = [Example(**e) for e in drawn["arm"]]
    mdm_view = [Example(**e) for e in drawn["mdm"]]
    mask = lineup["MDM"].model.config.mask_token_id
    steps = [1] * len(mdm_view)
    if protocol == "multi":
        steps = [min(settings.denoising_steps or len(e.answer_positions), len(e.answer_positions)) for e in mdm_view]
    questions = np.repeat(np.arange(len(mdm_view)), steps)
    result = {}
    for member in members or lineup.members:
        if not member.is_mdm:
            result[member.name] = Posed([arm_view[q] for q in questions], questions)
            continue
        own = [_reposed(e, mask, member.model.config.mask_token_id) for e in mdm_view]
        if protocol == "multi":
            model = member.model if order == "confidence" else None
            own = [step for index, (example, count) in enumerate(zip(own, steps))
                   for step in denoising_steps(example, count, order, seed=settings.seed + index, model=model)]
        result[member.name] = Posed(own, questions)
    return result


# ---- programs over models ----


def _programs(members: list[Member], settings: Settings) -> list[list[Member]]:
    """Members grouped into stacked programs: one architecture and dtype each, at most `models_per_program`."""
    groups: dict = {}
    for member in members:
        key = (member.model.architecture, member.model.embedding.dtype)
        groups.setdefault(key, []).append(member)
    size = settings.models_per_program or len(members)
    return [group[start: start + size] for group in groups.values() for start in range(0, len(group), size)]


def _run(members: list[Member], settings: Settings, function) -> list:
    """`function(models, names)` for every program (a model, or a stack), its results flattened in order."""
    results = []
    for group in _programs(members, settings):
        models = stack([m.model for m in group]) if len(group) > 1 else group[0].model
        out = function(models, [m.name for m in group])
        results += out if len(group) > 1 else [out]
    return results


def _per_question(rows: np.ndarray, questions: np.ndarray) -> np.ndarray:
    """Per-example rows averaged over the examples of each question (a question's denoising steps)."""
    counts = np.bincount(questions)
    summed = np.zeros((len(counts), rows.shape[1]), np.float64)
    np.add.at(summed, questions, rows.astype(np.float64))
    return (summed / counts[:, None]).astype(np.float32)


def _rows(lineup: Lineup, examples: dict[str, Posed], settings: Settings, task: str, reporter: Reporter,
          members: list[Member]) -> tuple[list[np.ndarray], list[float], list[float]]:
    metric = TASKS[task].METRIC
    total = sum(len(examples[m.name].examples) for m in members)
    done = [0]

    def scores(models, names):
        batches = [collate(examples[name].examples) for name in names]
        batch = batches if len(names) > 1 else batches[0]
        offset = done[0]
        result = attribute(models, batch, metric, method=settings.method, steps=settings.steps,
                           ablation=Ablation(settings.ablation), batch_size=settings.batch_size, per_example=True,
                           mesh=lineup.mesh,
                           progress=lambda d, n: reporter.update(offset + d * len(names), total))
        done[0] += len(names) * batches[0].size
        return result

    results = _run(members, settings, scores)
    rows = [_per_question(r.per_example, examples[m.name].questions) for r, m in zip(results, members)]
    return rows, [r.clean_metric for r in results], [r.corrupted_metric for r in results]


def scores(store: RunDirectory, lineup: Lineup, drawn: dict, task: str, settings: Settings, reporter: Reporter):
    """(member names, per-question rows, the stage's data)."""
    done = store.load(f"scores-{task}")
    if done is None:
        reporter.begin(f"{task}: attributing every model ({settings.method})")
        examples = posed(lineup, drawn, settings)
        rows, clean, corrupted = _rows(lineup, examples, settings, task, reporter, list(lineup.members))
        done = {"members": lineup.names, "clean_metric": clean, "corrupted_metric": corrupted,
                "examples": {name: len(p.examples) for name, p in examples.items()}}
        store.save(f"scores-{task}", done, {f"rows_{i}": r for i, r in enumerate(rows)})
    arrays = store.arrays(f"scores-{task}")
    return done["members"], [arrays[f"rows_{i}"] for i in range(len(done["members"]))], done


# ---- structure ----


def _summary(values: np.ndarray) -> dict:
    low, high = structure.interval(values)
    return {"mean": np.nanmean(values, axis=0).tolist(), "low": np.asarray(low).tolist(),
            "high": np.asarray(high).tolist()}


def _interval(point, replicates: np.ndarray) -> dict:
    low, high = structure.interval(replicates)
    return {"point": float(point), "low": float(low), "high": float(high)}


def structure_stage(store: RunDirectory, task: str, graph: Graph, names: list[str], rows: list[np.ndarray],
                    settings: Settings, reporter: Reporter) -> dict:
    done = store.load(f"structure-{task}")
    if done is not None:
        return done
    ks = sorted(k for k in (settings.ks or structure.k_sweep(graph)) if k <= graph.n_edges)
    headline = structure.headline_k(graph)
    pairs = list(itertools.combinations(range(len(names)), 2))
    means = [r.mean(0) for r in rows]

    def measures(model_means):
        importance = [structure.node_importance(graph, m, headline) for m in model_means]
        curves = [structure.jaccard_curve(model_means[a], model_means[b], ks) for a, b in pairs]
        com = [structure.centre_of_mass(structure.layer_distribution(graph, i)) for i in importance]
        special = [list(structure.specialisation(graph, i).values()) for i in importance]
        return np.concatenate([np.ravel(curves), com, np.ravel(special)])

    reporter.begin(f"{task}: bootstrap of the overlaps, layers and specialisation", settings.bootstrap)
    point = measures(means)
    seed = structure.task_seed(settings.seed, task)
    weights, halved = _resamples(len(rows[0]), settings, task)
    replicates = []
    for index, model_means in enumerate(structure.resampled_means(rows, weights)):
        replicates.append(measures(model_means))
        reporter.update(index + 1)
    replicates = np.stack(replicates)
    n_curves, n_models = len(pairs) * len(ks), len(names)
    curves = replicates[:, :n_curves].reshape(-1, len(pairs), len(ks))
    com = replicates[:, n_curves: n_curves + n_models]
    special = replicates[:, n_curves + n_models:].reshape(-1, n_models, 3)
    point_curves = point[:n_curves].reshape(len(pairs), len(ks))
    # Top-K Jaccard is biased under resampling: the interval is extrapolated from full to half-size resamples
    # (`structure.extrapolated_interval`, coverage checked in tests/test_calibration.py).
    halved_curves = np.stack([[structure.jaccard_curve(m[a], m[b], ks) for a, b in pairs]
                              for m in structure.resampled_means(rows, halved)])
    low, high = structure.extrapolated_interval(curves, halved_curves)
    reporter.begin(f"{task}: nulls (random edge sets, label swaps, disjoint half pools)", len(pairs) + len(names))
    column = ks.index(headline)
    label_swap, normalised_overlap = {}, {}
    for index, (a, b) in enumerate(pairs):
        null = structure.label_swap_null(rows[a], rows[b], ks, settings.null_draws, seed)
        key = f"{names[a]} vs {names[b]}"
        label_swap[key] = _summary(null) | {
            "p_value": structure.permutation_p_value(point_curves[index], null).tolist()}
        ratio = curves[:, index, column] / structure.resampled_null(rows[a], rows[b], [headline], weights, 1,
                                                                    seed)[:, 0]
        ratio_point = point_curves[index, column] / null[:, column].mean()
        ratio_low, ratio_high = structure.pivot_interval(ratio_point, ratio)
        normalised_overlap[key] = {"point": float(ratio_point), "low": float(ratio_low), "high": float(ratio_high)}
        reporter.update(index + 1)
    split_half = {}
    for index, name in enumerate(names):
        split_half[name] = _summary(structure.split_half_jaccard(rows[index], ks, settings.splits, seed))
        reporter.update(len(pairs) + index + 1)
    importance = {name: structure.node_importance(graph, m, headline) for name, m in zip(names, means)}
    connected = {name: structure.connected_top_k(graph, m, headline) for name, m in zip(names, means)}
    result = {
        "ks": ks, "headline_k": headline, "n_edges": graph.n_edges, "n_questions": len(rows[0]),
        "pairs": [[names[a], names[b]] for a, b in pairs],
        "jaccard": {"point": point_curves.tolist(), "low": low.tolist(), "high": high.tolist()},
        "jaccard_connected": [structure.jaccard(connected[names[a]], connected[names[b]]) for a, b in pairs],
        "connected_size": {name: int(c.sum()) for name, c in connected.items()},
        "null_random": _summary(structure.random_jaccard(graph.n_edges, ks, settings.null_draws, seed)),
        "null_label_swap": label_swap, "normalised_overlap": normalised_overlap,
        "null_split_half": split_half,
        "importance": {name: i.tolist() for name, i in importance.items()},
        "layers": {name: structure.layer_distribution(graph, i).tolist() for name, i in importance.items()},
        "centre_of_mass": {name: _interval(point[n_curves + m], com[:, m]) for m, name in enumerate(names)},
        "specialisation": {name: {measure: _interval(point[n_curves + n_models + 3 * m + j], special[:, m, j])
                                  for j, measure in enumerate(SPECIALISATION)}
                           for m, name in enumerate(names)},
        "top_components": {name: [[graph.sources[row].name, float(i[row])]
                                  for row in semantics.important_rows(graph, i, 10)] for name, i in importance.items()},
        "differences": {f"{names[a]} vs {names[b]}": {
            "centre_of_mass": _interval(point[n_curves + b] - point[n_curves + a], com[:, b] - com[:, a])} | {
            measure: _interval(point[n_curves + n_models + 3 * b + j] - point[n_curves + n_models + 3 * a + j],
                               special[:, b, j] - special[:, a, j])
            for j, measure in enumerate(SPECIALISATION)} for a, b in pairs},
    }
    headline_column = ks.index(headline)
    store.save(f"structure-{task}", result, {
        "jaccard_headline": curves[:, :, headline_column],
        "jaccard_headline_halved": halved_curves[:, :, headline_column],
        "centre_of_mass": com, "entropy": special[:, :, 0]})
    return result


# ---- faithfulness ----


def faithfulness_stage(store: RunDirectory, lineup: Lineup, drawn: dict, task: str, graph: Graph, names: list[str],
                       rows: list[np.ndarray], found: dict, settings: Settings, reporter: Reporter) -> dict:
    """Every compared model's top-K circuits over K (with a random circuit of each size beside them), each
    model's headline circuit run inside every other model (cross-faithfulness), and the smallest K at which each
    model's circuit reaches `settings.tau` (of the overlap sweep's K), with the overlap of those matched circuits.
    The circuits come from the whole pool; they are run on `settings.faithfulness_questions` of its questions
    (one forward per circuit and question), and the intervals resample those with the task's own weights."""
    done = store.load(f"faithfulness-{task}")
    if done is not None:
        return done
    members = lineup.compared
    means = {name: r.mean(0) for name, r in zip(names, rows)}
    ks, headline = found["ks"], found["headline_k"]
    random = faithfulness.random_circuits(graph, ks, 1, structure.task_seed(settings.seed, task))
    cross = faithfulness.cross_circuits(graph, [means[m.name] for m in members], headline)
    circuits = {m.name: np.concatenate([faithfulness.cross_circuits(graph, [means[m.name]] * len(ks), ks), random,
                                        cross]) for m in members}
    chosen = agree.question_sample(len(drawn["arm"]), settings.faithfulness_questions,
                                   structure.task_seed(settings.seed, task))
    examples = {name: [view.examples[i] for i in chosen]
                for name, view in posed(lineup, drawn, settings, protocol="single", members=members).items()}
    metric = TASKS[task].METRIC
    reporter.begin(f"{task}: faithfulness and cross-faithfulness of the circuits", len(members))

    def evaluations(models, names):
        batches = [collate(examples[name]) for name in names]
        result = evaluate(models, batches if len(names) > 1 else batches[0], [circuits[n] for n in names]
                          if len(names) > 1 else circuits[names[0]], metric, batch_size=settings.batch_size,
                          per_example=True, mesh=lineup.mesh)
        reporter.update(len(names))
        return result

    measured = dict(zip([m.name for m in members], _run(members, settings, evaluations)))
    weights, _ = _resamples(len(chosen), settings, task)
    result = {"ks": ks, "headline_k": headline, "tau": settings.tau, "questions": chosen.tolist(), "models": {}}
    n_ks = len(ks)
    for name, evaluated in measured.items():
        bands = faithfulness.interval(evaluated.circuit_rows, evaluated.clean_rows, evaluated.ablated_rows, weights,
                                      metric.higher_is_better)
        parts = {"curve": slice(0, n_ks), "random": slice(n_ks, 2 * n_ks), "cross": slice(2 * n_ks, None)}
        own, chance, inside = (_part(bands, part) for part in parts.values())
        result["models"][name] = {
            "defined": bool(evaluated.defined), "clean_metric": evaluated.clean_metric,
            "ablated_metric": evaluated.ablated_metric, "curve": own, "random": chance,
            # circuits[a] run in this model: F_this(circuit of a), its own at a = this model
            "circuits_of": {m.name: {key: inside[key][index] for key in ("point", "low", "high")}
                            for index, m in enumerate(members)},
            "smallest_faithful_k": faithfulness.smallest_k(ks, np.nan_to_num(bands.point[:n_ks], nan=-np.inf),
                                                           settings.tau)}
    matched = {}
    for a, b in itertools.combinations([m.name for m in members], 2):
        k_a, k_b = (result["models"][n]["smallest_faithful_k"] for n in (a, b))
        matched[f"{a} vs {b}"] = None if None in (k_a, k_b) else {
            "k": [k_a, k_b], "overlap": structure.jaccard(structure.top_k_set(means[a], k_a),
                                                          structure.top_k_set(means[b], k_b))}
    result["matched"] = matched
    # Every question's metrics (the circuits in the order curve, random, cross), to recompute any number above.
    rows = {f"{part}_{name}": getattr(evaluated, f"{part}_rows") for name, evaluated in measured.items()
            for part in ("circuit", "clean", "ablated")}
    store.save(f"faithfulness-{task}", result, rows)
    return result


def _part(bands: faithfulness.Interval, part: slice) -> dict:
    values = dataclasses.replace(bands, point=bands.point[part], low=bands.low[part], high=bands.high[part])
    return values.as_dict()


# ---- agreement with exact patching ----


def agreement_stage(store: RunDirectory, lineup: Lineup, drawn: dict, task: str, graph: Graph, names: list[str],
                    rows: list[np.ndarray], settings: Settings, reporter: Reporter) -> dict | None:
    """The ARM's and the MDM's attribution held against exact single-edge patching on `settings.exact_questions`
    questions of the pool (the same questions for both, and the method's scores averaged over those same
    questions): Spearman ρ and top-K Jaccard per model, and the method ceiling, the least within-model overlap
    of the method with exact patching, beside the ARM–MDM overlap. A graph of more than `agree.EDGE_BUDGET`
    edges patches the union of both models' top-K and `agree.SAMPLED_EDGES` others. None with
    `exact_questions` 0."""
    if not settings.exact_questions:
        return None
    done = store.load(f"agreement-{task}")
    if done is not None:
        return done
    members = [lineup[name] for name in MAIN_PAIR]
    examples = posed(lineup, drawn, settings, members=members)
    chosen = agree.question_sample(len(drawn["arm"]), settings.exact_questions, structure.task_seed(settings.seed,
                                                                                                     task))
    # With the multi-step protocol a question is several examples: exact patching averages over examples, so
    # the method's per-question rows are weighted by each question's count to be averaged over the same ones.
    counts = np.bincount(examples["MDM"].questions, minlength=len(drawn["arm"]))[chosen]
    method = {name: np.average(rows[names.index(name)][chosen], axis=0, weights=counts) for name in MAIN_PAIR}
    k = structure.headline_k(graph)
    edges = None
    if graph.n_edges > agree.EDGE_BUDGET:
        edges = agree.exact_sample(np.stack(list(method.values())), k, agree.SAMPLED_EDGES,
                                   structure.task_seed(settings.seed, task))
    n_patched = graph.n_edges if edges is None else len(edges)
    wanted = set(chosen.tolist())
    subsets = {name: [e for e, q in zip(examples[name].examples, examples[name].questions) if q in wanted]
               for name in MAIN_PAIR}
    reporter.begin(f"{task}: exact patching of {n_patched:,} edges on {len(chosen)} questions (ARM, MDM)")

    def patched(models, group):
        batches = [collate(subsets[name]) for name in group]
        return exact_edges(models, batches if len(group) > 1 else batches[0], TASKS[task].METRIC, edges=edges,
                           ablation=Ablation(settings.ablation),
                           batch_size=min(settings.batch_size, agree.EXACT_BATCH), edge_chunk=agree.EXACT_EDGE_CHUNK,
                           mesh=lineup.mesh, progress=reporter.update)

    exact = {name: scored.edges for name, scored in zip(MAIN_PAIR, _run(members, settings, patched))}
    measured = np.isfinite(exact["ARM"])
    models = {name: dataclasses.asdict(agree.agreement(method[name], exact[name], k)) for name in MAIN_PAIR}
    arm_mdm = {source: structure.jaccard(*(structure.top_k_set(np.where(measured, values[name], 0.0), k)
                                           for name in MAIN_PAIR))
               for source, values in (("method", method), ("exact", exact))}
    result = {"questions": chosen.tolist(), "k": k, "edges_patched": n_patched,
              "forwards": n_patched * sum(len(s) for s in subsets.values()), "models": models,
              "method_ceiling": min(m["jaccard"] for m in models.values()), "arm_vs_mdm_on_subsample": arm_mdm}
    store.save(f"agreement-{task}", result, {f"exact_{name}": values for name, values in exact.items()}
               | {f"method_{name}": values for name, values in method.items()})
    return result


# ---- semantics ----


def _decoded(tokenizer, tokens) -> list[str]:
    return [tokenizer.decode([int(t)], skip_special_tokens=False) for t in tokens]


def semantics_stage(store: RunDirectory, lineup: Lineup, drawn: dict, task: str, graph: Graph, found: dict,
                    settings: Settings, reporter: Reporter) -> dict:
    done = store.load(f"semantics-{task}")
    if done is not None:
        return done
    members = lineup.compared
    examples = posed(lineup, drawn, settings, protocol="single", members=members)
    reporter.begin(f"{task}: logit lens and neurons", len(members))
    result = {}
    for index, member in enumerate(members):
        batch = collate(examples[member.name].examples)
        importance = np.asarray(found["importance"][member.name])
        rows = semantics.important_rows(graph, importance, 5)
        lens = semantics.logit_lens(member.model, batch, rows, batch_size=settings.batch_size)
        components = [{"component": graph.sources[row].name, "importance": float(importance[row]),
                       "tokens": _decoded(lineup.tokenizer, tokens), "logits": logits.tolist(),
                       "answer_rank": float(rank), "answer_push": float(push)}
                      for row, tokens, logits, rank, push in zip(rows, lens.top_tokens, lens.top_logits,
                                                                 lens.answer_rank, lens.answer_push)]
        early = causal.early_layer_count(graph.n_layers)
        layer = max(range(early), key=lambda layer: importance[graph.mlp_row(layer)])
        neurons = semantics.neurons(member.model, batch, TASKS[task].METRIC, layer,
                                    batch_size=max(1, settings.batch_size // 2))
        described = []
        for neuron, places, activations, promoted in zip(neurons.top, neurons.top_inputs, neurons.top_activations,
                                                        neurons.promoted_tokens):
            inputs = []
            for (example, position), activation in zip(places, activations):
                tokens = batch.clean[example][max(0, position - 4): position + 1]
                inputs.append({"context": lineup.tokenizer.decode([int(t) for t in tokens], skip_special_tokens=False),
                               "token": _decoded(lineup.tokenizer, [batch.clean[example][position]])[0],
                               "activation": float(activation)})
            described.append({"neuron": int(neuron), "score": float(neurons.scores[neuron]), "inputs": inputs,
                              "promotes": _decoded(lineup.tokenizer, promoted)})
        score_share = np.sort(np.abs(neurons.scores))[::-1]
        result[member.name] = {"components": components, "mlp_layer": layer, "neurons": described,
                               "neuron_top_10_share": float(score_share[:10].sum() / max(score_share.sum(), 1e-30))}
        reporter.update(index + 1)
    store.save(f"semantics-{task}", result)
    return result


# ---- causal ----


def causal_stage(store: RunDirectory, lineup: Lineup, drawn: dict, task: str, graph: Graph, found: dict,
                 settings: Settings, reporter: Reporter) -> dict:
    done = store.load(f"causal-{task}")
    if done is not None:
        return done
    members = lineup.compared
    important = {m.name: causal.important_early(graph, np.asarray(found["importance"][m.name]), settings.causal_size)
                 for m in members}
    shared = np.logical_and.reduce([important[name] for name in MAIN_PAIR])
    sets = {}
    for index, member in enumerate(members):
        controls = causal.control_sets(graph, important[member.name], int(important[member.name].sum()),
                                       settings.causal_draws, settings.seed + index)
        sets[member.name] = np.concatenate([important[member.name][None], (important[member.name] & ~shared)[None],
                                            controls.random, controls.middle_late])
    examples = posed(lineup, drawn, settings, protocol="single", members=members)
    reporter.begin(f"{task}: zeroing important early components and controls", len(members))
    metric = TASKS[task].METRIC

    def effects(models, names):
        batches = [collate(examples[name].examples) for name in names]
        result = ablate_node_sets(models, batches if len(names) > 1 else batches[0], metric,
                                  [sets[n] for n in names] if len(names) > 1 else sets[names[0]],
                                  batch_size=settings.batch_size, mesh=lineup.mesh)
        reporter.update(len(names))
        return result

    measured = dict(zip([m.name for m in members], _run(members, settings, effects)))
    draws = settings.causal_draws
    result = {"size": settings.causal_size, "early_layers": causal.early_layer_count(graph.n_layers),
              "shared": [graph.sources[row].name for row in np.nonzero(shared)[0]], "models": {}}
    for name, effect in measured.items():
        # The share kept is a ratio over the clean − corrupted gap: undefined (None) where that gap is not real.
        retained = normalised(effect.metric, effect.clean_metric, effect.corrupted_metric, metric.higher_is_better)
        result["models"][name] = {
            "important": [graph.sources[row].name for row in np.nonzero(important[name])[0]],
            "retained": _defined(retained[0]),
            "retained_without_shared": _defined(retained[1]) if (important[name] & ~shared).any() else None,
            "random": _spread(retained[2: 2 + draws]), "middle_late": _spread(retained[2 + draws:]),
            "clean_metric": effect.clean_metric, "corrupted_metric": effect.corrupted_metric,
            "defined": bool(np.isfinite(retained[0]))}
    store.save(f"causal-{task}", result)
    return result


def _defined(value) -> float | None:
    """A float, or None (JSON null) where the value is undefined (NaN)."""
    return float(value) if np.isfinite(value) else None


def _spread(values: np.ndarray) -> dict:
    if not np.isfinite(values).all():
        return {"mean": None, "min": None, "max": None, "values": [None] * len(values)}
    return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max()),
            "values": values.tolist()}


# ---- robustness ----


def robustness_stage(store: RunDirectory, lineup: Lineup, drawn: dict, task: str, graph: Graph, names: list[str],
                     rows: list[np.ndarray], settings: Settings, reporter: Reporter) -> dict:
    done = store.load(f"robustness-{task}")
    if done is not None:
        return done
    headline = structure.headline_k(graph)
    arm, mdm = rows[names.index("ARM")], rows[names.index("MDM")]
    order = np.random.default_rng(structure.task_seed(settings.seed, task)).permutation(len(arm))
    halves = np.array_split(order, 2)
    result = {"halves": [float(structure.jaccard_curve(arm[h].mean(0), mdm[h].mean(0), [headline])[0])
                         for h in halves], "protocols": None}
    longest = max(len(e["answer_positions"]) for e in drawn["mdm"])
    if settings.protocol == "single" and longest > 1:
        reporter.begin(f"{task}: the MDM queried step by step (two reveal orders)")
        protocols = {}
        for reveal in ("left_to_right", "confidence"):
            multi = dataclasses.replace(settings, protocol="multi", order=reveal, denoising_steps=None)
            member = lineup["MDM"]
            examples = posed(lineup, drawn, multi, members=[member])
            stepwise = _rows(lineup, examples, multi, task, reporter, [member])[0][0]
            single, matched = _overlaps([(mdm, stepwise), (arm, stepwise)], headline, settings, task)
            protocols[reveal] = {"mdm_single_vs_stepwise": single, "arm_vs_mdm_stepwise": matched}
        result["protocols"] = protocols
    result["arm_prompt"] = _arm_prompt_row(lineup, drawn, task, graph, names, rows, settings, reporter)
    store.save(f"robustness-{task}", result)
    return result


def _resamples(n_questions: int, settings: Settings, task: str) -> tuple[np.ndarray, np.ndarray]:
    """The task's bootstrap weights `[R, N]` (its own seed, so two tasks resample independently) and their
    half-size resamples (`structure.halved_weights`), for the calibrated intervals of overlaps."""
    seed = structure.task_seed(settings.seed, task)
    weights = structure.bootstrap_weights(n_questions, settings.bootstrap, seed)
    return weights, structure.halved_weights(weights, seed)


def _overlaps(pairs: list[tuple[np.ndarray, np.ndarray]], k: int, settings: Settings, task: str) -> list[dict]:
    """The top-K overlap of each pair of per-question rows (the same questions), with the calibrated interval
    of `structure.extrapolated_interval`, from the task's own resamples."""
    weights, halved = _resamples(len(pairs[0][0]), settings, task)
    result = []
    for a, b in pairs:
        point = structure.jaccard_curve(a.mean(0), b.mean(0), [k])[0]
        replicates, smaller = (np.array([structure.jaccard_curve(m[0], m[1], [k])[0]
                                         for m in structure.resampled_means([a, b], w)]) for w in (weights, halved))
        low, high = structure.extrapolated_interval(replicates, smaller)
        result.append({"point": float(point), "low": float(low), "high": float(high)})
    return result


def arm_prompt_for_mdm(arm: Example, mask: int) -> Example:
    """The ARM's prompt posed to an MDM: the ARM view's tokens before the answer, then the mask token at every
    answer position (and nothing after it), the same answers and candidates: one question in one form for both."""
    start, length = arm.answer_positions[0], len(arm.answer_positions)
    return dataclasses.replace(arm, clean=list(arm.clean[:start]) + [mask] * length,
                               corrupted=list(arm.corrupted[:start]) + [mask] * length)


def _arm_prompt_row(lineup: Lineup, drawn: dict, task: str, graph: Graph, names: list[str], rows: list[np.ndarray],
                    settings: Settings, reporter: Reporter) -> dict | None:
    """Where the two models are given different prompts (infilling), the MDM attributed on the ARM's prompt:
    the view-matched overlap with the ARM, with its accuracy on that prompt. None where the prompts agree."""
    arm_view = [Example(**e) for e in drawn["arm"]]
    mdm_view = [Example(**e) for e in drawn["mdm"]]
    if all(_same_prompt(a, m) for a, m in zip(arm_view, mdm_view)):
        return None
    member = lineup["MDM"]
    reporter.begin(f"{task}: the MDM asked the ARM's prompt")
    questions = [arm_prompt_for_mdm(e, member.model.config.mask_token_id) for e in arm_view]
    examples = {member.name: Posed(questions, np.arange(len(questions)))}
    matched = _rows(lineup, examples, settings, task, reporter, [member])[0][0]
    arm, mdm = rows[names.index("ARM")], rows[names.index("MDM")]
    headline = structure.headline_k(graph)
    intervals = _overlaps([(arm, matched), (mdm, matched)], headline, settings, task)
    return {"solved": float(solved(member.model, questions).mean()),
            "arm_vs_mdm": intervals[0], "mdm_native_vs_arm_prompt": intervals[1]}

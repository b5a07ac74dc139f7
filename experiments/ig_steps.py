"""Which attribution method and how many integration steps rank edges like exact patching on the default pair,
and which gives the most faithful circuits (DESIGN section 6, point 3).

    python experiments/ig_steps.py [--pool 48] [--questions 32] [--tasks ioi countdown] [--json out.json]

For each task, the common-correct pool of the shipped ARM and MDM (test split, drawn as the comparison's pool
stage draws it, only smaller), and for each model: exact single-edge patching of every edge on a subsample of
the pool (the ground truth), and EAP, EAP-IG on inputs at 5, 20 and 50 steps and EAP-IG on activations at 5, on
the same subsample and on the whole pool (a whole run takes about 40 minutes on a shared 2-core CPU). Each
method is held against exact patching (`analysis.agreement`: Spearman over all edges and over the exact top-K,
top-K Jaccard; K = 200, the headline K of 1,997 edges) and by the faithfulness of its top-K circuits over the
whole pool, at K = 200 and over `structure.k_sweep`. The choice printed last rests on
those two criteria alone, never on the ARM–MDM overlaps they would give.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

from mdm_circuits import organisms
from mdm_circuits.analysis import agreement as agree
from mdm_circuits.analysis import structure
from mdm_circuits.circuits.attribution import attribute
from mdm_circuits.circuits.evaluation import evaluate
from mdm_circuits.circuits.graph import Graph
from mdm_circuits.circuits.patching import exact_edges
from mdm_circuits.circuits.selection import top_k
from mdm_circuits.comparison.settings import Settings
from mdm_circuits.decoding.accuracy import common_correct_pool
from mdm_circuits.tasks import TASKS
from mdm_circuits.tasks.batch import collate

# EAP-IG on activations (each node group interpolated while the rest runs clean) is measured beside the brief's
# three step counts of EAP-IG on inputs, at the comparison's 5 steps.
METHODS = (("eap", 1), ("eap_ig_inputs", 5), ("eap_ig_inputs", 20), ("eap_ig_inputs", 50), ("eap_ig_activations", 5))


def label(method: str, steps: int) -> str:
    return {"eap": "EAP", "eap_ig_inputs": f"EAP-IG({steps})", "eap_ig_activations": f"IG-act({steps})"}[method]


def scored(model, batch, metric, method: str, steps: int):
    return attribute(model, batch, metric, method=method, steps=steps, batch_size=16,
                     step_chunk=None if method == "eap" else 5)


def one_model(model, examples, subsample, metric, ks, k) -> dict:
    """Every row of one model's table: exact patching, then each method on the subsample and on the pool."""
    pool, part = collate(examples), collate([examples[i] for i in subsample])
    start = time.perf_counter()
    exact = exact_edges(model, part, metric, edge_chunk=agree.EXACT_EDGE_CHUNK, batch_size=agree.EXACT_BATCH)
    exact_seconds = time.perf_counter() - start
    rows = {("exact", 0, "subsample"): exact}
    start = time.perf_counter()
    for method, steps in METHODS:
        for where, batch in (("subsample", part), ("pool", pool)):
            rows[(method, steps, where)] = scored(model, batch, metric, method, steps)
    method_seconds = time.perf_counter() - start
    graph = exact.graph
    circuits = np.stack([top_k(graph, scores.matrix, kk) for scores in rows.values() for kk in ks])
    faithfulness = evaluate(model, pool, circuits, metric).faithfulness.reshape(len(rows), len(ks))
    table = []
    for (method, steps, where), scores, faith in zip(rows, rows.values(), faithfulness):
        agreed = agree.agreement(scores.edges, exact.edges, k)
        table.append({"method": method, "steps": steps, "questions": where, **dataclasses.asdict(agreed),
                      "faithfulness_at_k": float(faith[ks.index(k)]), "faithfulness": faith.tolist()})
    top = {key: structure.top_k_set(scores.edges, k) for key, scores in rows.items()}
    within = {f"EAP-IG(5) vs {label(method, steps)} ({where})": structure.jaccard(top[("eap_ig_inputs", 5, where)],
                                                                                 top[(method, steps, where)])
              for method, steps in (("eap", 1), ("eap_ig_inputs", 50)) for where in ("subsample", "pool")}
    return {"rows": table, "within": within, "exact_seconds": exact_seconds, "method_seconds": method_seconds,
            "clean_metric": exact.clean_metric, "corrupted_metric": exact.corrupted_metric}


def print_table(task: str, name: str, result: dict, n_pool: int, n_part: int, ks: list[int], k: int) -> None:
    print(f"\n{task} / {name}: pool {n_pool}, exact on {n_part} questions; exact patching of every edge "
          f"{result['exact_seconds']:.0f} s, every method {result['method_seconds']:.0f} s; clean metric "
          f"{result['clean_metric']:.3f}, corrupted {result['corrupted_metric']:.3f}")
    sweep = " ".join(f"{f'F@{kk}':>6}" for kk in ks)
    print(f"  {'method':<12} {'scored on':<10} {'rho all':>7} {f'rho top{k}':>9} {f'J@{k}':>6}   {sweep}")
    for row in result["rows"]:
        name = "exact" if row["method"] == "exact" else label(row["method"], row["steps"])
        where = f"{n_part} q" if row["questions"] == "subsample" else f"pool {n_pool}"
        faith = " ".join(f"{f:6.3f}" for f in row["faithfulness"])
        print(f"  {name:<12} {where:<10} {row['spearman']:7.3f} {row['spearman_top_k']:9.3f} {row['jaccard']:6.3f}   "
              f"{faith}")
    for pair, value in result["within"].items():
        print(f"  within-model top-{k} overlap {pair}: {value:.3f}")


def print_summary(results: dict, k: int) -> None:
    """Each method's mean over tasks and models, and the best by each criterion."""
    means = {}
    for per_task in results.values():
        for result in per_task.values():
            for row in result["rows"]:
                if row["method"] != "exact":
                    key = (label(row["method"], row["steps"]), row["questions"])
                    means.setdefault(key, []).append((row["spearman"], row["spearman_top_k"], row["jaccard"],
                                                      row["faithfulness_at_k"], np.mean(row["faithfulness"])))
    means = {key: np.mean(values, axis=0) for key, values in means.items()}
    print(f"\nmean over tasks and models   {'rho all':>7} {f'rho top{k}':>9} {f'J@{k}':>6} {f'F@{k}':>6} "
          f"{'F sweep':>7}")
    for (name, where), values in means.items():
        print(f"  {name:<12} {where:<14} " + " ".join(f"{v:7.3f}" for v in values))
    criteria = ("Spearman over all edges", f"Spearman over the exact top-{k}", f"top-{k} Jaccard with exact",
                f"faithfulness at K = {k}", "mean faithfulness over the K sweep")
    for index, criterion in enumerate(criteria):
        best = max(means, key=lambda key: means[key][index])
        print(f"best by {criterion}: {best[0]} scored on the {best[1]} ({means[best][index]:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=48)
    parser.add_argument("--questions", type=int, default=agree.EXACT_QUESTIONS)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--json", help="also write every number to this file")
    arguments = parser.parse_args()
    settings = Settings()
    pair = organisms.load()
    results = {}
    for task in arguments.tasks:
        drawn = common_correct_pool(TASKS[task], pair.tokenizer, pair.arm, pair.mdm, n=arguments.pool,
                                    budget=settings.budget, seed=settings.seed, split=settings.split)
        subsample = agree.question_sample(len(drawn.arm), arguments.questions, settings.seed)
        graph = Graph.for_model(pair.arm.config)
        k, ks = structure.headline_k(graph), structure.k_sweep(graph)
        results[task] = {}
        for name, model, examples in (("ARM", pair.arm, drawn.arm), ("MDM", pair.mdm, drawn.mdm)):
            results[task][name] = one_model(model, examples, subsample, TASKS[task].METRIC, ks, k)
            print_table(task, name, results[task][name], len(examples), len(subsample), ks, k)
    print_summary(results, k)
    if arguments.json:
        with open(arguments.json, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()

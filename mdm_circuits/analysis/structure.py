"""The structure of circuits: top-K edge sets and their overlap, component importance and its spread over
layers, with bootstrap confidence intervals over examples and nulls computed from data.

Everything here is a pure NumPy function of edge scores: one score per edge in the graph's edge order
(`Scores.edges`, `[E]`), or one row per example (`Scores.per_example`, `[N, E]`). Edges are ranked by
absolute score, ties by edge order.

- Jaccard overlap J(A, B) = |A ∩ B| / |A ∪ B| of two models' top-K edge sets: 1 for identical circuits, 0 for
  disjoint ones.
- Component importance s(v): the summed |score| of the top-K edges entering or leaving component v (DESIGN
  section 2), normalised to sum to 1 within each model, since the metric's scale differs between an ARM and
  an MDM.
- Layer distribution: the share of importance of each layer's heads and MLP (the input embedding apart).
  Its centre of mass, as a fraction of depth (0 = first layer, 1 = last), is the "early-layer processing"
  measure: lower is earlier.
- Specialisation: how sharply importance concentrates on few components (the input apart): normalised
  entropy (1 = spread evenly), Gini coefficient (0 = even) and the share of the top three.
- Nulls: two random edge sets of the same size (the overlap of chance), and the two disjoint halves of one
  model's own pool (the overlap that sampling noise leaves between circuits of the same model).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

from mdm_circuits.circuits.graph import Graph
from mdm_circuits.circuits.selection import prune
from mdm_circuits.errors import CircuitError


def headline_k(graph: Graph) -> int:
    """K = 1000 edges (the paper's headline, 0.1% of a 7B graph), or 10% of the edges of a graph too small for
    that to be a tenth of it."""
    return int(min(1000, max(1, round(0.1 * graph.n_edges))))


def k_sweep(graph: Graph) -> list[int]:
    """The K values swept by default: 1, 2, 5, 10, 20 and 50% of the edges, and 100, 1000, 10000 edges where the
    graph has them and no value of the first kind lies within 10% of them."""
    fractions = sorted({max(1, round(f * graph.n_edges)) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)}
                       | {headline_k(graph)})
    absolute = [k for k in (100, 1000, 10_000)
                if k <= graph.n_edges and all(abs(k - f) > 0.1 * k for f in fractions)]
    return sorted(fractions + absolute)


def ranking(edges: np.ndarray) -> np.ndarray:
    """Edge indices by decreasing |score| (stable: ties keep edge order)."""
    edges = np.asarray(edges, np.float32)
    if not np.isfinite(edges).all():
        raise CircuitError("edge scores hold NaN or infinite values; no circuit can be ranked from them")
    return np.argsort(-np.abs(edges), kind="stable")


def top_k_set(edges: np.ndarray, k: int) -> np.ndarray:
    """bool[E]: the k edges with the largest |score|."""
    edges = np.asarray(edges)
    if not 0 < k <= edges.shape[-1]:
        raise CircuitError(f"K = {k} is outside [1, {edges.shape[-1]}], the number of edges of this graph")
    chosen = np.zeros(edges.shape[-1], bool)
    chosen[ranking(edges)[:k]] = True
    return chosen


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A ∩ B| / |A ∪ B| of two boolean edge sets (1 for two empty sets)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def jaccard_curve(a_edges: np.ndarray, b_edges: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """J(top-K of a, top-K of b) for every K of `ks`, from one ranking of each."""
    rank_a, rank_b = ranking(a_edges), ranking(b_edges)
    n = len(rank_a)
    position_a, position_b = np.empty(n, np.int64), np.empty(n, np.int64)
    position_a[rank_a], position_b[rank_b] = np.arange(n), np.arange(n)
    values = []
    for k in ks:
        if not 0 < k <= n:
            raise CircuitError(f"K = {k} is outside [1, {n}], the number of edges of this graph")
        both = np.count_nonzero((position_a < k) & (position_b < k))
        values.append(both / (2 * k - both))
    return np.array(values)


def connected_top_k(graph: Graph, edges: np.ndarray, k: int) -> np.ndarray:
    """bool[E]: the top-K edges pruned to those on a path from the input to the logits."""
    return graph.edge_vector(prune(graph, graph.edge_matrix(top_k_set(edges, k), fill=False)))


def node_importance(graph: Graph, edges: np.ndarray, k: int) -> np.ndarray:
    """s(v) for every source node (input, heads, MLPs, in source order): the summed |score| of the top-K edges
    entering or leaving it, normalised to sum to 1 (all zeros if every chosen edge scores 0)."""
    values = np.where(top_k_set(edges, k), np.abs(np.asarray(edges, np.float64)), 0.0)
    sources, columns = graph.edge_indices
    owners = graph.column_owners[columns]
    importance = np.bincount(sources, values, graph.n_sources)
    importance += np.bincount(owners[owners >= 0], values[owners >= 0], graph.n_sources)
    total = importance.sum()
    return importance / total if total > 0 else importance


def layer_distribution(graph: Graph, importance: np.ndarray) -> np.ndarray:
    """[L]: the share of each layer's heads and MLP in the importance of the components (the input apart)."""
    _, per_layer = graph.layer_rows(np.asarray(importance))
    totals = per_layer.sum(axis=1)
    total = totals.sum()
    return totals / total if total > 0 else totals


def centre_of_mass(distribution: np.ndarray) -> float:
    """The mean layer of a layer distribution as a fraction of depth: 0 at the first layer, 1 at the last."""
    layers = len(distribution)
    return float(np.dot(np.arange(layers), distribution) / max(layers - 1, 1) / max(distribution.sum(), 1e-300))


def specialisation(graph: Graph, importance: np.ndarray, top: int = 3) -> dict[str, float]:
    """How sharply importance concentrates on few components (heads and MLPs; the input apart)."""
    _, per_layer = graph.layer_rows(np.asarray(importance, np.float64))
    shares = per_layer.reshape(-1)
    total = shares.sum()
    if total <= 0:
        return {"entropy": float("nan"), "gini": float("nan"), f"top_{top}_share": float("nan")}
    shares = shares / total
    nonzero = shares[shares > 0]
    entropy = float(-(nonzero * np.log(nonzero)).sum() / np.log(len(shares)))
    ordered = np.sort(shares)
    n = len(ordered)
    gini = float((2 * np.arange(1, n + 1) - n - 1).dot(ordered) / (n * ordered.sum()))
    return {"entropy": entropy, "gini": gini, f"top_{top}_share": float(np.sort(shares)[-top:].sum())}


# ---- resampling ----


def bootstrap_weights(n_examples: int, replicates: int, seed: int) -> np.ndarray:
    """[R, N]: each replicate's example weights, a resample with replacement (counts / N)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_examples, np.full(n_examples, 1 / n_examples), size=replicates) / n_examples


def resampled_means(rows: Sequence[np.ndarray], weights: np.ndarray, chunk: int = 32) -> Iterator[list[np.ndarray]]:
    """For each replicate (a row of `weights`), every model's mean scores under it, in chunks of replicates
    so that `[chunk, E]` is the largest array made. The models' rows share the examples (the same questions),
    so one resample serves them all."""
    for start in range(0, len(weights), chunk):
        part = weights[start: start + chunk].astype(np.float32)
        means = [part @ np.asarray(model_rows, np.float32) for model_rows in rows]
        for replicate in range(len(part)):
            yield [model_means[replicate] for model_means in means]


def bootstrap(statistic: Callable[[list[np.ndarray]], np.ndarray], rows: Sequence[np.ndarray], replicates: int,
              seed: int) -> np.ndarray:
    """`statistic(mean scores of every model)` under `replicates` resamples of the examples: `[R, ...]`."""
    weights = bootstrap_weights(len(rows[0]), replicates, seed)
    return np.stack([np.asarray(statistic(means), np.float64) for means in resampled_means(rows, weights)])


def interval(values: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The central `level` percentile interval over the first axis (NaNs ignored)."""
    tail = (1 - level) / 2 * 100
    return np.nanpercentile(values, tail, axis=0), np.nanpercentile(values, 100 - tail, axis=0)


def random_jaccard(n_edges: int, ks: Sequence[int], draws: int, seed: int) -> np.ndarray:
    """[draws, len(ks)]: the Jaccard overlap of two random edge sets of size K (the chance null)."""
    rng = np.random.default_rng(seed)
    values = np.empty((draws, len(ks)))
    for draw in range(draws):
        values[draw] = jaccard_curve(rng.random(n_edges), rng.random(n_edges), ks)
    return values


def split_half_jaccard(rows: np.ndarray, ks: Sequence[int], splits: int, seed: int) -> np.ndarray:
    """[splits, len(ks)]: the overlap of the circuits of two disjoint random halves of one model's examples
    (the noise null: how much circuits move between two samples of the same questions' kind)."""
    rows = np.asarray(rows, np.float32)
    n = len(rows)
    if n < 2:
        raise CircuitError("a split-half null needs at least two examples")
    rng = np.random.default_rng(seed)
    values = np.empty((splits, len(ks)))
    for split in range(splits):
        order = rng.permutation(n)
        first, second = rows[order[: n // 2]].mean(0), rows[order[n // 2: 2 * (n // 2)]].mean(0)
        values[split] = jaccard_curve(first, second, ks)
    return values

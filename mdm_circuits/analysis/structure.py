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
- Nulls: two random edge sets of the same size (the overlap of chance, `random_jaccard`), and the paired
  label-swap null (`label_swap_null`): each question's two rows swapped between the models with probability
  1/2, at the sample's full size, so that the models are exchangeable: J_null, the overlap that sampling noise
  alone leaves between two models with one circuit, and `permutation_p_value` the chance of an overlap as low
  as the observed one under it. The noise-normalised overlap J / J_null is 1 for exchangeable models.
  `split_half_jaccard` (two disjoint halves of one model's pool) describes how circuits found from N/2
  questions move; at N noise leaves more overlap than that.

Intervals. Noise level v: the variance of a model's mean scores in units of the sample's own (the variance of
one question's row over N): 0 for the population's means, 1 for the sample's, 2 for a bootstrap resample's
(`bootstrap_weights`: the sample's noise plus as much again) and 3 for a resample of N // 2 questions
(`halved_weights`). A top-K overlap of means is not a smooth function of them, and this shapes its intervals:
- It is biased: noise moves edges across the K-th place, so the overlap of noisy means differs from the
  population's, downwards when the models' noise is independent (upwards where much of it is shared), by an
  amount of the order of its standard error at every N (the edges near the threshold that noise moves grow in
  number like the noise's standard deviation). Replicates at level 2 carry the bias about twice, so the plain
  percentile interval (`interval`) misses: a 95% one covered the truth in 8-65% of simulated studies on
  populations like the test's, up to 93% on milder ones (83-90% on the pooled real questions).
- The point jumps: the overlap of the sample's means moves by a few edges' worth under small changes of the
  sample, more than the mean of its replicates does. Intervals anchored at the point (basic 2J - quantiles,
  bias-corrected percentile and BCa, whose z0 counts the replicates below the point) carry that jump into
  their centre and covered 40-86% in the same simulations; BCa's jackknife acceleration was near 0 and changed
  nothing, so no jackknife is offered.
- `extrapolated_interval` therefore anchors at the replicates' mean and extrapolates over noise levels, as
  SIMEX does: the drift of the mean from level 3 to level 2 gives the bias at level 2 under a growth law of the
  bias with the noise. The law is not known from data (the bias grows like the noise's variance where few edges
  lie near the threshold, like its standard deviation where a continuum does, hardly or even negatively where
  the models share their noise: in simulated populations the factor the drift needed ranged from below 0 to 8),
  so the interval is the percentile interval with its lower end moved by the least and its upper end by the
  greatest of three moves: no bias beyond level 2's, bias linear in the level, linear in its square root.
  `extrapolated_difference` does the same for a difference of two overlaps (one task's pairs share their
  resamples; two tasks' are independent, `task_seed`), each overlap under each law. Chosen by simulation
  (tests/test_calibration.py, three populations with independent and shared noise): a nominal 95% interval
  covered 0.96-1.00 for an overlap and for both kinds of difference, at 1.6-1.8 times the percentile
  interval's width for an overlap and 1.6-2.5 times for a difference; without the no-bias law it covered
  0.76-0.84 on one population, with the variance law alone 0.83 for one task's differences. It is conservative
  by design; the point can lie outside it (in none of 900 simulated studies).
- J / J_null is defined at the sample's size (level 1: E[J] / E[J_null] over samples of N questions, a
  quantity the data identify). Its replicates are the overlap of a resample over the label-swap null of the
  same resample (`resampled_null`); `pivot_interval` takes the pivot point - (quantiles - mean), the
  bootstrap's own estimand being its replicates' mean: it covered 0.96-0.98 with one swap per resample, 0.93-0.94
  with four (narrower), and 0.925-0.955 for differences of two such ratios, the point always inside.
"""

from __future__ import annotations

import zlib
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
    """[..., len(ks)]: J(top-K of a, top-K of b) for every K of `ks`, from one ranking of each; leading axes
    (replicates, draws) are ranked row by row."""
    position_a, position_b = _positions(a_edges), _positions(b_edges)
    n = position_a.shape[-1]
    values = []
    for k in ks:
        if not 0 < k <= n:
            raise CircuitError(f"K = {k} is outside [1, {n}], the number of edges of this graph")
        both = np.count_nonzero((position_a < k) & (position_b < k), axis=-1)
        values.append(both / (2 * k - both))
    return np.stack(values, axis=-1)


def _positions(edges: np.ndarray) -> np.ndarray:
    """[..., E]: each edge's place in its row's ranking (0 for the largest |score|; ties by edge order). One sort
    of unique 64-bit keys, |score|'s bits inverted above the edge's index (the bits of a non-negative float order
    as its value), gives the stable order in a third of a stable float sort's time."""
    edges = np.asarray(edges, np.float32)
    if not np.isfinite(edges).all():
        raise CircuitError("edge scores hold NaN or infinite values; no circuit can be ranked from them")
    n = edges.shape[-1]
    keys = (np.uint64(0xFFFFFFFF) - np.abs(edges).view(np.uint32)) << np.uint64(32) | np.arange(n, dtype=np.uint64)
    order = (np.sort(keys, axis=-1) & np.uint64(0xFFFFFFFF)).astype(np.int64)
    positions = np.empty_like(order)
    np.put_along_axis(positions, order, np.broadcast_to(np.arange(n), order.shape), axis=-1)
    return positions


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


def halved_weights(weights: np.ndarray, seed: int) -> np.ndarray:
    """[R, N]: for each resample of `weights` (counts / N), a random N // 2 of its N draws (counts / (N // 2)):
    itself a resample of N // 2 questions with replacement, at noise level 3 (module docstring). Sharing draws
    with its full resample makes the two means' difference, the extrapolation's slope, less noisy."""
    n = weights.shape[1]
    if n < 2:
        raise CircuitError("a halved resample needs at least two examples")
    rng = np.random.default_rng(seed)
    counts = np.rint(np.asarray(weights) * n).astype(np.int64)
    return np.stack([rng.multivariate_hypergeometric(row, n // 2) for row in counts]) / (n // 2)


def task_seed(seed: int, task: str) -> int:
    """The seed of one task's resamples and nulls: `seed` mixed with a CRC-32 of the task's name, so that two
    tasks draw independent resamples (their intervals combine as those of independent samples) and every
    process draws the same ones (`hash` of a string differs between processes)."""
    return int(np.random.SeedSequence([seed, zlib.crc32(task.encode())]).generate_state(1)[0])


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


# ---- intervals ----


def interval(values: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The central `level` percentile interval over the first axis (NaNs ignored). A top-K overlap's
    replicates are biased (module docstring): its intervals are `extrapolated_interval`'s."""
    tail = (1 - level) / 2 * 100
    return np.nanpercentile(values, tail, axis=0), np.nanpercentile(values, 100 - tail, axis=0)


def extrapolated_interval(replicates: np.ndarray, halved: np.ndarray,
                          level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The `level` interval of a top-K overlap's population value (noise level 0): the central percentile
    interval of its `replicates` (full resamples, noise level 2), its ends moved by the drift of their mean from
    that of its `halved` replicates (noise level 3), extrapolated to level 0 under each of the bias's growth laws
    (module docstring): the lower end by the least of the moves, the upper by the greatest. Over the first axis,
    for every trailing one, within [0, 1], where an overlap lies (cutting it there loses no coverage). The
    point estimate can lie outside it."""
    low, high = interval(np.asarray(replicates, np.float64), level)
    low, high = _moved(low, high, np.multiply.outer(_LAWS, _drift(replicates, halved)))
    return np.clip(low, 0.0, 1.0), np.clip(high, 0.0, 1.0)


def extrapolated_difference(first: np.ndarray, first_halved: np.ndarray, second: np.ndarray,
                            second_halved: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The `level` interval of the difference first - second of two overlaps' population values: the percentile
    interval of the replicates' differences, row by row (shared resamples for two overlaps of one task,
    independent ones, `task_seed`, for two tasks), its ends moved by the least and the greatest of the two
    drifts' extrapolations to level 0, each under each law, since the two overlaps' biases need not grow alike
    (module docstring). Over the first axis, for every trailing one, within [-1, 1]."""
    low, high = interval(np.asarray(first, np.float64) - np.asarray(second, np.float64), level)
    shifts = (np.multiply.outer(_LAWS, _drift(first, first_halved))[:, None]
              - np.multiply.outer(_LAWS, _drift(second, second_halved))[None])
    low, high = _moved(low, high, shifts.reshape(len(_LAWS) ** 2, *shifts.shape[2:]))
    return np.clip(low, -1.0, 1.0), np.clip(high, -1.0, 1.0)


# A statistic's drift between noise levels 2 and 3 (its mean at level 2 minus that at level 3) times these is
# its bias at level 2 under the three growth laws of the module docstring: none beyond level 2, linear in the
# noise level (2) and linear in its square root (sqrt 2 / (sqrt 3 - sqrt 2), about 4.45).
_LAWS = np.array([0.0, 2.0, np.sqrt(2) / (np.sqrt(3) - np.sqrt(2))])


def _drift(replicates: np.ndarray, halved: np.ndarray) -> np.ndarray:
    """The mean of the full replicates (level 2) minus that of the halved ones (level 3)."""
    return np.nanmean(np.asarray(replicates, np.float64), axis=0) - np.nanmean(np.asarray(halved, np.float64), axis=0)


def _moved(low: np.ndarray, high: np.ndarray, shifts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """low moved by the least of the `shifts` (over their first axis), high by the greatest."""
    return low + shifts.min(axis=0), high + shifts.max(axis=0)


def pivot_interval(point: np.ndarray, replicates: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The `level` interval of a statistic whose estimand is its own expectation at the sample's size (noise
    level 1, e.g. J / J_null): the basic (pivot) interval point - (quantiles - mean) of the `replicates`, the
    bootstrap's estimand being their mean. Over the first axis, for every trailing one."""
    replicates = np.asarray(replicates, np.float64)
    low, high = interval(replicates, level)
    centre = np.nanmean(replicates, axis=0)
    return point - (high - centre), point - (low - centre)


# ---- nulls ----


def random_jaccard(n_edges: int, ks: Sequence[int], draws: int, seed: int) -> np.ndarray:
    """[draws, len(ks)]: the Jaccard overlap of two random edge sets of size K (the chance null)."""
    rng = np.random.default_rng(seed)
    values = np.empty((draws, len(ks)))
    for draw in range(draws):
        values[draw] = jaccard_curve(rng.random(n_edges), rng.random(n_edges), ks)
    return values


def label_swap_null(rows_a: np.ndarray, rows_b: np.ndarray, ks: Sequence[int], draws: int, seed: int,
                    chunk: int = 32) -> np.ndarray:
    """[draws, len(ks)]: the paired label-swap null of the overlap of two models' circuits, at the sample's
    full size: in each draw every question's two rows are swapped between the models with probability 1/2,
    independently, and the top-K Jaccard of the two resulting means is taken. The two models are then
    exchangeable, so the null is the overlap that sampling noise alone leaves between two models with the same
    circuit, questions and pairing as these."""
    counts = np.ones((draws, len(rows_a)), np.int64)
    return _swapped_jaccard(rows_a, rows_b, ks, counts, np.random.default_rng(seed), chunk)


def resampled_null(rows_a: np.ndarray, rows_b: np.ndarray, ks: Sequence[int], weights: np.ndarray, swaps: int,
                   seed: int, chunk: int = 32) -> np.ndarray:
    """[R, len(ks)]: the label-swap null's mean overlap under each resample of `weights` (counts / N, as
    `bootstrap_weights` makes them), from `swaps` swaps of it: each drawn copy of a question has its two rows
    swapped with probability 1/2, as `label_swap_null` swaps the sample's questions. The overlap of the same
    resample over it is a replicate of J / J_null, for `pivot_interval`."""
    n = len(rows_a)
    counts = np.rint(np.asarray(weights, np.float64) * n).astype(np.int64)
    if not np.allclose(counts, np.asarray(weights) * n) or not (counts.sum(1) == n).all():
        raise CircuitError(f"the resample weights are not counts / {n}, as bootstrap_weights makes them")
    swapped = _swapped_jaccard(rows_a, rows_b, ks, np.repeat(counts, swaps, axis=0), np.random.default_rng(seed),
                               chunk)
    return swapped.reshape(len(counts), swaps, len(ks)).mean(1)


def permutation_p_value(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
    """[len(ks)]: the one-sided p-value of an overlap as low as `observed` under `null` ([draws, len(ks)]):
    (1 + #(null <= observed)) / (draws + 1), in (0, 1], never 0 for a finite number of draws."""
    null = np.asarray(null)
    return (1 + np.count_nonzero(null <= np.asarray(observed), axis=0)) / (len(null) + 1)


def _swapped_jaccard(rows_a: np.ndarray, rows_b: np.ndarray, ks: Sequence[int], counts: np.ndarray,
                     rng: np.random.Generator, chunk: int) -> np.ndarray:
    """[D, len(ks)]: for each row of `counts` (how often each question is drawn), the top-K Jaccard of the two
    models' means once each drawn copy's two rows are swapped with probability 1/2; `[2 chunk, E]` arrays at most
    (a's swapped scores are kept @ rows_a + swapped @ rows_b, never a `[draws, N, E]` array; as sums, since the
    ranking is scale free; one product per model for both of them)."""
    rows_a, rows_b = np.asarray(rows_a, np.float32), np.asarray(rows_b, np.float32)
    values = []
    for start in range(0, len(counts), chunk):
        part = counts[start: start + chunk]
        swapped = rng.binomial(part, 0.5)
        both = np.concatenate([part - swapped, swapped]).astype(np.float32)
        (kept_a, swapped_a), (kept_b, swapped_b) = np.split(both @ rows_a, 2), np.split(both @ rows_b, 2)
        values.append(jaccard_curve(kept_a + swapped_b, swapped_a + kept_b, ks))
    return np.concatenate(values)


def split_half_jaccard(rows: np.ndarray, ks: Sequence[int], splits: int, seed: int) -> np.ndarray:
    """[splits, len(ks)]: the overlap of the circuits of two disjoint random halves of one model's examples: how
    much circuits found from N/2 questions each move. A description at half size, below the overlap that noise
    leaves at the full N (`label_swap_null`)."""
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

"""Faithfulness over questions: point values and bootstrap intervals, the random-circuit baseline, the smallest
faithful K of a sweep and the circuits of a cross-faithfulness comparison, as pure NumPy functions of the
per-question rows that `circuits.evaluate(..., per_example=True)` returns.

Rows: `circuit_rows` `[S, N]` (the metric of each of S circuits on each of N questions), `clean_rows` and
`ablated_rows` `[N]` (the full and the empty circuit's). The faithfulness of circuit s is a ratio of means,

    F_s = (mean M(circuit s) − mean M(ablated)) / (mean M(clean) − mean M(ablated)),

not a mean of per-question ratios, which a question with a tiny gap of its own would swamp. F is undefined
(NaN) where the mean gap is below the floor of `circuits.normalised` or points against the metric's direction.
A bootstrap replicate weights the questions (`structure.bootstrap_weights`), so every replicate of every
circuit is one matrix product.

Cross-faithfulness is F of one model's circuit run inside another model, normalised by that other model's
own clean and ablated runs: a functional comparison of two circuits that edge overlap cannot give.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from mdm_circuits.analysis import structure
from mdm_circuits.circuits.graph import Graph
from mdm_circuits.circuits.normalised import defined, normalised
from mdm_circuits.circuits.selection import top_k
from mdm_circuits.errors import CircuitError

DEFAULT_TAU = 0.8
"""The faithfulness at which a circuit counts as found (`smallest_k`): it recovers 80% of the model's clean −
corrupted gap. A comparison's pre-registered rules (DESIGN section 6) should name the tau they use."""


def _check_rows(circuit_rows: np.ndarray, clean_rows: np.ndarray, ablated_rows: np.ndarray,
                weights: np.ndarray | None) -> None:
    n = clean_rows.shape[-1] if clean_rows.ndim else -1
    if (circuit_rows.ndim != 2 or clean_rows.shape != (n,) or ablated_rows.shape != (n,)
            or circuit_rows.shape[1] != n or (weights is not None and (weights.ndim != 2 or weights.shape[1] != n))):
        raise CircuitError(f"faithfulness takes circuit rows [S, N], clean and ablated rows [N] and weights [R, N]; "
                           f"got {circuit_rows.shape}, {clean_rows.shape}, {ablated_rows.shape} and "
                           f"{None if weights is None else weights.shape}")


def _means(values: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Means over the last (question) axis of `values` `[..., N]`: plain, or one per row of `weights` `[R, N]`,
    each row normalised to sum to one (`[R, ...]`)."""
    if weights is None:
        return values.mean(axis=-1)
    weights = weights / weights.sum(axis=1, keepdims=True)
    return (weights @ values.reshape(-1, values.shape[-1]).T).reshape(len(weights), *values.shape[:-1])


def faithfulness(circuit_rows, clean_rows, ablated_rows, weights=None, higher_is_better: bool = True) -> np.ndarray:
    """F of each circuit, `[S]`, NaN where undefined; with nonnegative question `weights` `[R, N]` (bootstrap
    replicates), F under each of them, `[R, S]`."""
    circuit_rows, clean_rows, ablated_rows = (np.asarray(rows, np.float64)
                                              for rows in (circuit_rows, clean_rows, ablated_rows))
    weights = None if weights is None else np.asarray(weights, np.float64)
    _check_rows(circuit_rows, clean_rows, ablated_rows, weights)
    clean, ablated = _means(clean_rows, weights), _means(ablated_rows, weights)
    return normalised(_means(circuit_rows, weights), clean[..., None], ablated[..., None], higher_is_better)


@dataclasses.dataclass(frozen=True)
class Interval:
    """F of each circuit, `point` `[S]`, with the central interval `low`, `high` `[S]` of its bootstrap
    replicates; all NaN where the point is undefined. `defined_share` is the share of replicates whose gap
    carries a ratio: the interval is taken over those alone, so a share well below one says it is too narrow."""

    point: np.ndarray
    low: np.ndarray
    high: np.ndarray
    defined_share: float

    def as_dict(self) -> dict:
        """Lists for a stage's JSON, undefined values as None (`null`)."""
        def listed(values):
            return [None if np.isnan(v) else float(v) for v in values]

        return {"point": listed(self.point), "low": listed(self.low), "high": listed(self.high),
                "defined_share": self.defined_share}


def interval(circuit_rows, clean_rows, ablated_rows, weights, higher_is_better: bool = True,
             level: float = 0.95) -> Interval:
    """F of each circuit and its percentile interval at `level` over the replicates `weights` `[R, N]` (pass
    the weights the other measures of a comparison resample with, so their replicates are paired)."""
    point = faithfulness(circuit_rows, clean_rows, ablated_rows, higher_is_better=higher_is_better)
    replicates = faithfulness(circuit_rows, clean_rows, ablated_rows, weights, higher_is_better)
    weights = np.asarray(weights, np.float64)
    carried = defined(_means(np.asarray(clean_rows, np.float64), weights),
                      _means(np.asarray(ablated_rows, np.float64), weights), higher_is_better)
    if carried.any():
        low, high = structure.interval(replicates[carried], level)
    else:
        low = high = np.full_like(point, np.nan)
    undefined = np.isnan(point)
    return Interval(point, np.where(undefined, np.nan, low), np.where(undefined, np.nan, high),
                    float(carried.mean()))


def random_circuits(graph: Graph, ks: Sequence[int], draws: int, seed: int) -> np.ndarray:
    """bool `[len(ks) · draws, n_sources, n_destinations]`: `draws` random edge sets of each size K of `ks`, the
    chance baseline beside a top-K curve. Row i · draws + d is draw d at ks[i]; draw d ranks the edges in one
    random order and takes its first K for every K, so its sets are nested, as top-K sets are."""
    ks = np.asarray(ks, dtype=int)
    if ks.ndim != 1 or not len(ks) or draws < 1:
        raise CircuitError(f"random circuits need one or more K and draws; got K = {ks.tolist()}, {draws} draws")
    if ((ks < 0) | (ks > graph.n_edges)).any():
        raise CircuitError(f"K = {ks.tolist()} reaches outside [0, {graph.n_edges}], the number of edges of this graph")
    ranks = np.random.default_rng(seed).permuted(np.tile(np.arange(graph.n_edges), (draws, 1)), axis=1)
    chosen = ranks[None] < ks[:, None, None]
    return np.stack([graph.edge_matrix(edges, fill=False) for edges in chosen.reshape(-1, graph.n_edges)])


def smallest_k(ks: Sequence[int], faithfulness: Sequence[float], tau: float = DEFAULT_TAU) -> int | None:
    """The smallest K of the swept `ks` whose faithfulness reaches `tau` (an undefined one never does), or None.

    Of the swept K only: faithfulness need not grow with K, so a K between two grid points may reach tau too."""
    ks, values = np.asarray(ks, dtype=int), np.asarray(faithfulness, np.float64)
    if ks.shape != values.shape or ks.ndim != 1:
        raise CircuitError(f"give one faithfulness per swept K; got {ks.shape} K and {values.shape} values")
    reached = ks[values >= tau]
    return int(reached.min()) if len(reached) else None


def cross_circuits(graph: Graph, edges: Sequence[np.ndarray], k: int | Sequence[int]) -> np.ndarray:
    """bool `[M, n_sources, n_destinations]`: the top-K circuit (by |score|, as `faithfulness_curve` chooses) of
    each of M models from its mean edge scores `edges[m]` `[E]`, at one K or at one K per model (matched
    faithfulness: each model's own smallest K).

    Passed as one array to `evaluate` on a stack of those models, it is run in every model: model b's
    `Evaluation` holds F_b(circuit of model a) at index a, its own circuit at a = b, cross-faithfulness elsewhere.
    """
    ks = np.asarray(k, dtype=int)
    if ks.ndim > 1 or (ks.ndim == 1 and len(ks) != len(edges)):
        raise CircuitError(f"give one K, or one per model ({len(edges)} models); got K = {ks.tolist()}")
    ks = np.broadcast_to(ks, (len(edges),))
    return np.stack([top_k(graph, graph.edge_matrix(np.asarray(scores)), int(size)) for scores, size in zip(edges, ks)])

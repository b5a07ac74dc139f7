"""How well an attribution method ranks edges against exact single-edge patching, the ground truth it
approximates (DESIGN section 6, point 3).

Pure NumPy functions of edge scores in the graph's edge order (`Scores.edges`, `[E]`). Exact scores come
from `circuits.patching.exact_edges`; where only some edges were patched (`exact_sample`), the others are NaN
and every measure is taken over the measured edges alone.

- Spearman ρ: the Pearson correlation of the two score vectors' ranks (ties share their average rank), on the
  signed scores: an edge that the method calls helpful and exact patching calls harmful counts as a
  disagreement. Over all measured edges, and over the exact top-K (does the method order the edges that
  matter, not just separate them from the many near-zero ones).
- Top-K Jaccard: the overlap of the two top-K edge sets by |score|, ties by edge order
  (`structure.ranking`), the measure every circuit comparison uses.

Cost of the ground truth: one forward per (edge, question). `EDGE_BUDGET` is the largest graph whose every
edge is patched by default, on `EXACT_QUESTIONS` questions; a larger graph patches the top-K of an attribution
and a random sample of the rest (`exact_sample`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mdm_circuits.analysis.structure import jaccard, ranking, top_k_set
from mdm_circuits.errors import CircuitError

# Questions `experiments/ig_steps.py` measures the exact ground truth on: a subsample of the pool, which keeps it to
# minutes on a CPU (a comparison's agreement stage takes `Settings.exact_questions`, 2 by default). Score the
# method on the same questions: on the default pair, a method scored on a pool of 48 instead agrees up to 0.2
# less in ρ, from question sampling alone (experiments/ig_steps.py).
EXACT_QUESTIONS = 32

# The largest graph (in edges) patched edge by edge by default. The cost rule: one forward per (edge, question),
# so at most EDGE_BUDGET × EXACT_QUESTIONS = 65,536 forwards per model and task; the default pair's 1,997 edges
# took 1.5–4 minutes per model and task on a shared 2-core CPU (edge_chunk 4, batch_size 8). GPT-2-small shapes
# (32,491 edges) and every 7B graph (~10^6) take the sampled route instead (`exact_sample`).
EDGE_BUDGET = 2048

# Beside the top-K of each model, the edges a larger graph patches at random (`exact_sample`): its cost is
# (union of the top-K + SAMPLED_EDGES) × questions forwards per model, at 7B (K = 1000) about 3,000 × 2.
SAMPLED_EDGES = 1000

# Edges × examples vmapped per step of the exact sweep: on a CPU 4 × 8 runs ~2.5× faster than the engine's
# defaults (64 × 32), whose arrays outgrow the caches.
EXACT_EDGE_CHUNK, EXACT_BATCH = 4, 8


@dataclasses.dataclass(frozen=True)
class Agreement:
    """How a method's edge scores agree with exact patching over the `n_measured` measured edges.

    spearman: Spearman ρ of the signed scores over every measured edge.
    spearman_top_k: Spearman ρ over the k measured edges with the largest exact |score|.
    jaccard: overlap of the method's and exact patching's top-k edges (by |score|) among the measured edges.
    """

    spearman: float
    spearman_top_k: float
    jaccard: float
    k: int
    n_measured: int


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n−1 of `values` in increasing order, tied values sharing the mean of their ranks."""
    values = np.asarray(values, np.float64)
    order = np.argsort(values, kind="stable")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.repeat(first + (counts - 1) / 2, counts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two equally long vectors (average ranks for ties); NaN where either is
    constant, since a correlation with a constant is undefined."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1:
        raise CircuitError(f"Spearman's ρ needs two vectors of one length, got shapes {a.shape} and {b.shape}")
    ra, rb = average_ranks(a) - (len(a) - 1) / 2, average_ranks(b) - (len(b) - 1) / 2
    scale = np.sqrt((ra @ ra) * (rb @ rb))
    return float(ra @ rb / scale) if scale > 0 else float("nan")


def agreement(method_edges: np.ndarray, exact_edges: np.ndarray, k: int) -> Agreement:
    """How a method's edge scores agree with exact patching's (`[E]` each, in edge order), over the edges
    whose exact score is finite (NaN marks an edge `exact_edges(edges=...)` did not patch)."""
    method_edges, exact_edges = np.asarray(method_edges, np.float64), np.asarray(exact_edges, np.float64)
    if method_edges.shape != exact_edges.shape or method_edges.ndim != 1:
        raise CircuitError(f"method and exact scores must be one vector per graph, of one length; got shapes "
                           f"{method_edges.shape} and {exact_edges.shape}")
    measured = np.isfinite(exact_edges)
    if not np.isfinite(method_edges).all():
        raise CircuitError("the method's edge scores hold NaN or infinite values")
    method, exact = method_edges[measured], exact_edges[measured]
    if not 1 < k <= len(exact):
        raise CircuitError(f"K = {k} must lie in [2, {len(exact)}], the number of measured edges")
    top = ranking(exact)[:k]
    return Agreement(spearman(method, exact), spearman(method[top], exact[top]),
                     jaccard(top_k_set(method, k), top_k_set(exact, k)), k, int(measured.sum()))


def exact_sample(scores_edges: np.ndarray, k: int, n_random: int, seed: int) -> np.ndarray:
    """The edges to patch where the graph is too large for every edge: the top-k of an attribution (by |score|)
    and `n_random` of the others drawn uniformly (seeded), as sorted indices into the edge order. The random
    part lets `agreement` see edges the attribution ranks low: without it an edge the method misses entirely
    could never show up. Scores of several models (`[M, E]`, patched in one stacked program) give the union
    of every model's top-k, and `n_random` of the edges outside it."""
    scores_edges = np.atleast_2d(scores_edges)
    n_edges = scores_edges.shape[1]
    if not 0 < k <= n_edges:
        raise CircuitError(f"k = {k} must lie in [1, {n_edges}], the number of edges")
    top = np.unique(np.concatenate([ranking(scores)[:k] for scores in scores_edges]))
    rest = np.setdiff1d(np.arange(n_edges), top)
    if not 0 <= n_random <= len(rest):
        raise CircuitError(f"n_random = {n_random} must lie in [0, {len(rest)}], the edges outside the top-{k}")
    drawn = np.random.default_rng(seed).choice(rest, size=n_random, replace=False)
    return np.sort(np.concatenate([top, drawn]))


def question_sample(n_questions: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of `size` pooled questions (all of them if the pool is no larger), drawn without
    replacement: the subsample exact patching is measured on."""
    if n_questions <= size:
        return np.arange(n_questions)
    return np.sort(np.random.default_rng(seed).choice(n_questions, size=size, replace=False))

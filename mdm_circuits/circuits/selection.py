"""Choosing circuits from scores: the top-K edges, greedy growth from the logits, and pruning.

A circuit is a boolean matrix `[n_sources, n_destinations]` over the graph's edges. Pruning (`prune`) drops
dangling edges: those whose source cannot be reached from the input, or whose destination cannot reach the
logits, through edges of the circuit.
"""

from __future__ import annotations

import heapq

import numpy as np

from mdm_circuits.circuits.graph import Graph, NodeKind
from mdm_circuits.errors import CircuitError


def _finite(graph: Graph, scores: np.ndarray) -> np.ndarray:
    values = graph.edge_vector(scores)
    if not np.isfinite(values).all():
        raise CircuitError(f"{np.size(values) - np.count_nonzero(np.isfinite(values))} edge scores are NaN or "
                           f"infinite; no circuit can be chosen from them (recompute the scores)")
    return values


def _ranking(graph: Graph, scores: np.ndarray, absolute: bool) -> np.ndarray:
    values = _finite(graph, scores)
    return np.argsort(-(np.abs(values) if absolute else values), kind="stable")


def _check_k(graph: Graph, k: int) -> None:
    if not 0 <= k <= graph.n_edges:
        raise CircuitError(f"K = {k} is outside [0, {graph.n_edges}], the number of edges of this graph")


def top_k(graph: Graph, scores: np.ndarray, k: int, *, absolute: bool = True) -> np.ndarray:
    """The k edges with the largest scores (by absolute value unless `absolute=False`)."""
    _check_k(graph, k)
    chosen = np.zeros(graph.n_edges, dtype=bool)
    chosen[_ranking(graph, scores, absolute)[:k]] = True
    return graph.edge_matrix(chosen, fill=False)


def greedy(graph: Graph, scores: np.ndarray, k: int, *, absolute: bool = True) -> np.ndarray:
    """Grow a circuit from the logits: repeatedly add the best-scoring edge into a node already in the
    circuit (the reference's `apply_greedy`), so every edge leads to the logits."""
    _check_k(graph, k)
    _finite(graph, scores)
    values = np.abs(scores) if absolute else np.asarray(scores)
    sources, destinations = graph.edge_indices
    incoming = {}  # source node row -> edges entering any of its inputs
    for edge, column in enumerate(destinations):
        node = graph.destinations[column][0]
        incoming.setdefault("logits" if node.kind == NodeKind.LOGITS else graph.source_index(node), []).append(edge)
    circuit = np.zeros_like(graph.edge_mask)
    heap = [(-values[sources[e], destinations[e]], e) for e in incoming["logits"]]
    heapq.heapify(heap)
    reached, size = set(), 0
    while heap and size < k:
        _, edge = heapq.heappop(heap)
        circuit[sources[edge], destinations[edge]] = True
        size += 1
        parent = int(sources[edge])
        if parent not in reached:
            reached.add(parent)
            for e in incoming.get(parent, []):
                heapq.heappush(heap, (-values[sources[e], destinations[e]], e))
    return circuit


def prune(graph: Graph, circuit: np.ndarray) -> np.ndarray:
    """Drop dangling edges until every remaining edge lies on a path from the input to the logits."""
    circuit = np.asarray(circuit, dtype=bool) & graph.edge_mask
    owned = graph.own_destinations
    while True:
        has_outgoing = circuit.any(axis=1)
        has_incoming = (circuit.any(axis=0)[None, :] & owned).any(axis=1)
        has_incoming[0] = True  # the input
        alive = has_outgoing & has_incoming
        alive_columns = (owned & alive[:, None]).any(axis=0)
        alive_columns[-1] = True  # the logits
        pruned = circuit & alive[:, None] & alive_columns[None, :]
        if (pruned == circuit).all():
            return pruned
        circuit = pruned

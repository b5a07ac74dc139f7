"""The `Scores` every attribution method returns: edge scores on the graph and how they were obtained."""

from __future__ import annotations

import dataclasses

import numpy as np

from mdm_circuits.circuits.graph import Graph


@dataclasses.dataclass(frozen=True)
class Scores:
    """Edge scores `[n_sources, n_destinations]` (zero off the edges) and how they were obtained.

    per_example: with `attribute(..., per_example=True)`, every example's score of every edge,
      `[n_examples, n_edges]` in the graph's edge order (their mean over examples is `edges`); else None.
    """

    graph: Graph
    matrix: np.ndarray
    method: str
    steps: int | None
    n_examples: int
    clean_metric: float
    corrupted_metric: float
    per_example: np.ndarray | None = None

    @property
    def edges(self) -> np.ndarray:
        """One score per edge, in the graph's edge order."""
        return self.graph.edge_vector(self.matrix)

    def to_json(self, path) -> None:
        """The scores in the reference's JSON format (edge names, `cfg` with d_model)."""
        self.graph.to_json(path, self.matrix)

    def node_importance(self, k: int | None = None, absolute: bool = True) -> np.ndarray:
        """s(v) for every source node: the sum of the scores (absolute by default) of the edges entering or
        leaving v, over the top-k edges if `k` is given (DESIGN's component importance), else all edges."""
        values = np.abs(self.edges) if absolute else self.edges
        if k is not None:
            keep = np.zeros_like(values, dtype=bool)
            keep[np.argsort(-values, kind="stable")[:k]] = True
            values = np.where(keep, values, 0)
        matrix = self.graph.edge_matrix(values.astype(np.float64))
        leaving = matrix.sum(axis=1)
        entering = (self.graph.own_destinations * matrix.sum(axis=0)[None, :]).sum(axis=1)
        return leaving + entering

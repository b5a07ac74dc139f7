"""Causal checks: zero the outputs of a model's important early components and measure the task, against random
components and against middle/late components of the same count.

- Early layers are the first third of the depth (at least one layer); middle/late layers are the rest.
- A model's important early components are the `size` heads and MLPs of its early layers with the largest
  s(v) (`structure.node_importance`). The input embedding is never ablated: zeroing it removes the question.
- Controls, `draws` of each: `size` components drawn uniformly from every head and MLP outside the important
  set (random), and `size` drawn from the middle/late layers (the same count in another layer band).
- Components in every compared model's important set (in small models often the first MLP) stay in the
  main set; the set without them is measured too, so that what is left is the effect of what differs.

The ablation itself is `circuits.patching.ablate_node_sets`; its `retained` is the share of the clean-minus-
corrupted metric gap that survives.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mdm_circuits.circuits.graph import Graph


def early_layer_count(n_layers: int) -> int:
    return max(1, n_layers // 3)


def _component_rows(graph: Graph, layers: range) -> np.ndarray:
    """The source rows of the heads and MLPs of `layers`."""
    return np.concatenate([np.append(graph.head_rows(layer), graph.mlp_row(layer)) for layer in layers])


def important_early(graph: Graph, importance: np.ndarray, size: int) -> np.ndarray:
    """bool[n_sources]: the `size` early components with the largest importance (those with any)."""
    rows = _component_rows(graph, range(early_layer_count(graph.n_layers)))
    ranked = rows[np.argsort(-np.asarray(importance)[rows], kind="stable")]
    chosen = np.zeros(graph.n_sources, bool)
    chosen[[row for row in ranked[:size] if importance[row] > 0]] = True
    return chosen


@dataclasses.dataclass(frozen=True)
class ControlSets:
    """`draws` sets of components of a given size: anywhere but the important set, and in the middle/late
    layers (rows: bool[draws, n_sources])."""

    random: np.ndarray
    middle_late: np.ndarray


def control_sets(graph: Graph, important: np.ndarray, size: int, draws: int, seed: int) -> ControlSets:
    rng = np.random.default_rng(seed)
    everywhere = _component_rows(graph, range(graph.n_layers))
    elsewhere = everywhere[~important[everywhere]]
    later = _component_rows(graph, range(early_layer_count(graph.n_layers), graph.n_layers))

    def draw(pool: np.ndarray) -> np.ndarray:
        sets = np.zeros((draws, graph.n_sources), bool)
        for row in range(draws):
            sets[row, rng.choice(pool, size=min(size, len(pool)), replace=False)] = True
        return sets

    return ControlSets(draw(elsewhere), draw(later))

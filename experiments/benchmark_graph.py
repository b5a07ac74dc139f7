"""Time building the EAP-IG graph's layout at the study's shapes (vectorised, cached per shape).

    python experiments/benchmark_graph.py

Builds, for Qwen2.5-7B and LLaMA-2-7B shapes, the edge indices, the edge mask, the column owners and the
destinations, then the ~10^6 edge names (needed only for JSON files), and a cached second lookup.
"""

from __future__ import annotations

import time

from mdm_circuits.circuits.graph import Graph
from mdm_circuits.model.presets import PRESETS


def main() -> None:
    for name in ("qwen2.5-7b", "llama-2-7b"):
        config = PRESETS[name]
        start = time.perf_counter()
        graph = Graph.for_model(config)
        _ = graph.edge_indices, graph.edge_mask, graph.own_destinations, graph.destinations
        built = time.perf_counter()
        _ = graph.edge_names
        named = time.perf_counter()
        again = Graph.for_model(config)
        _ = again.edge_mask
        cached = time.perf_counter()
        print(f"{name:11s} {graph.n_edges:>9,} edges: layout {built - start:6.3f} s, names {named - built:6.3f} s, "
              f"cached lookup {cached - named:8.6f} s")


if __name__ == "__main__":
    main()

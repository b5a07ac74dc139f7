"""Which SmolLM2-135M heads carry IOI: EAP-IG's node-aggregated scores against exact node patching.

    python experiments/smollm2_ioi_heads.py [--n 32] [--steps 5] [--top 10]

EAP-IG scores every edge; a head's importance is the summed |score| of the edges entering or leaving it.
Exact node patching replaces each head's output with its output on the corrupted prompt, one head at a
time, and measures the drop in logit difference. The script prints both top lists and their overlap.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from conversion import convert
from mdm_circuits.circuits.attribution import attribute
from mdm_circuits.circuits.graph import NodeKind
from mdm_circuits.circuits.patching import patch_nodes
from mdm_circuits.tasks import ioi
from mdm_circuits.tasks.batch import collate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()

    converted = convert("smollm2-135m-instruct")
    model, tokenizer = converted.model, converted.tokenizer
    batch = collate(ioi.examples(tokenizer, args.n, seed=0, max_length=16))
    start = time.perf_counter()
    scores = attribute(model, batch, ioi.METRIC, steps=args.steps)
    print(f"EAP-IG in {time.perf_counter() - start:.1f} s; logit difference clean {scores.clean_metric:.3f}, "
          f"corrupted {scores.corrupted_metric:.3f}")
    graph = scores.graph
    heads = [node for node in graph.sources if node.kind == NodeKind.HEAD]
    importance = scores.node_importance()
    by_eap_ig = sorted(heads, key=lambda node: -importance[graph.source_index(node)])[: args.top]

    start = time.perf_counter()
    effects = patch_nodes(model, batch, ioi.METRIC, nodes=heads)
    print(f"exact patching of {len(heads)} heads in {time.perf_counter() - start:.1f} s")
    by_patching = [node for node, _ in effects.top(args.top)]

    print(f"top {args.top} heads by EAP-IG importance: {', '.join(node.name for node in by_eap_ig)}")
    print(f"top {args.top} heads by exact patching:    {', '.join(node.name for node in by_patching)}")
    overlap = sorted({n.name for n in by_eap_ig} & {n.name for n in by_patching})
    print(f"overlap: {len(overlap)}/{args.top} ({', '.join(overlap)})")
    ranks = np.argsort(np.argsort([-importance[graph.source_index(n)] for n in heads]))
    exact_ranks = np.argsort(np.argsort(-effects.values))
    print(f"Spearman correlation over all {len(heads)} heads: {np.corrcoef(ranks, exact_ranks)[0, 1]:.3f}")


if __name__ == "__main__":
    main()

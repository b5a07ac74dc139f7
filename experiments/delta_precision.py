"""What storing Δ in the activations' dtype costs: EAP-IG scores of SmolLM2-135M in bfloat16 with Δ (and the
operands of its products) in bfloat16, as `attribute` runs them, against the same bfloat16 model with Δ in
float32 (so every product with Δ runs in float32; the per-step x̂ of the norm correction stays bfloat16), and
both against the float32 model.

    python experiments/delta_precision.py [--n 32] [--k 200]

Printed per comparison: the largest and the median error over edges relative to the largest score, the
Spearman correlation over edges, and the overlap of the top-K edges by |score|.
"""

from __future__ import annotations

import argparse
import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from conversion import convert
from mdm_circuits.circuits import attribution
from mdm_circuits.tasks import ioi, metrics
from mdm_circuits.tasks.batch import collate


def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(np.float64)


def compared(a: np.ndarray, b: np.ndarray, k: int) -> str:
    error = np.abs(a - b) / np.abs(b).max()
    top = lambda x: set(np.argsort(-np.abs(x))[:k].tolist())  # noqa: E731
    spearman = np.corrcoef(_ranks(a), _ranks(b))[0, 1]
    return (f"max error {error.max():.2e}, median {np.median(error):.2e} (of the largest |score|); "
            f"Spearman {spearman:.5f}; top-{k} overlap {len(top(a) & top(b)) / k:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--k", type=int, default=200)
    args = parser.parse_args()
    converted = convert("smollm2-135m-instruct")
    batch = collate(ioi.examples(converted.tokenizer, args.n, seed=0, max_length=16))
    full = converted.model
    half = jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16) if leaf.dtype == jnp.float32 else leaf, full)

    def scores(model):
        # A fresh trace each time, so that a patched `_patching_differences` is the one compiled.
        attribution._attribute_batch.clear_cache()
        result = attribution.attribute(model, batch, metrics.logit_difference, batch_size=args.n)
        return result.matrix[result.graph.edge_mask]

    narrow = scores(half)
    with mock.patch.object(attribution, "_patching_differences",
                           functools.partial(attribution._patching_differences, dtype=jnp.float32)):
        wide = scores(half)
    reference = scores(full)
    print(f"SmolLM2-135M, {args.n} IOI prompts, EAP-IG m=5, {reference.size:,} edges")
    print(f"bfloat16 model, Δ in bfloat16 vs in float32:  {compared(narrow, wide, args.k)}")
    print(f"bfloat16 model (Δ in float32) vs float32 model: {compared(wide, reference, args.k)}")
    print(f"bfloat16 model (Δ in bfloat16) vs float32 model: {compared(narrow, reference, args.k)}")


if __name__ == "__main__":
    main()

"""EAP-IG at 7B shapes with random weights, timed against its floor, with compile time and peak memory.

    python experiments/benchmark_7b.py --preset qwen2.5-7b --n 500         # on a GPU, as is
    python experiments/benchmark_7b.py --reduced --n 32                     # on a CPU: 2 layers, narrower

Random weights (bfloat16) at the preset's shapes (Qwen2.5-7B or LLaMA-2-7B), `--n` random questions of
`--length` tokens with a one-token answer (the metric's value does not matter to the time), EAP-IG with
`--steps` steps in slices of `--batch-size` (default: the largest that `circuits.plans.largest_fit` finds for
the device's memory, or 8 where the device does not report it). The floor is the work any EAP-IG
implementation must run (see `benchmark_attribution.py`): two plain forwards, m forward+backward passes and
the score contraction, timed on one slice and scaled to all of them. The floor's forwards compute logits
at every position, which EAP-IG never needs; at 7B that is under a tenth of a forward. `--reduced` keeps the
preset's grouped-query layout at 2 layers of width 512 and a 4,096-token vocabulary (so that the unembedding
does not dominate), for a CPU.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from benchmark_attribution import floor_seconds
from flax import nnx

from mdm_circuits.circuits import plans
from mdm_circuits.circuits.attribution import attribute
from mdm_circuits.model.presets import PRESETS
from mdm_circuits.model.transformer import Transformer
from mdm_circuits.tasks import metrics
from mdm_circuits.tasks.batch import Example, collate

GiB = 2**30


def random_questions(vocab: int, n: int, length: int, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    questions = []
    for _ in range(n):
        clean = rng.integers(3, vocab, length).tolist()
        corrupted = clean[:-2] + rng.integers(3, vocab, 2).tolist()
        answer, other = rng.choice(np.arange(3, vocab), 2, replace=False).tolist()
        questions.append(Example(clean, corrupted, [length], [[answer]], [[other]], metrics.logit_difference.name))
    return questions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("qwen2.5-7b", "llama-2-7b"), default="qwen2.5-7b")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--reduced", action="store_true", help="2 layers of width 512, 4,096 tokens (for a CPU)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"),
                        help="weights (default: bfloat16, float32 with --reduced: a CPU runs bfloat16 products "
                             "through slow conversion paths that would make the floor meaningless)")
    args = parser.parse_args()

    config = PRESETS[args.preset]
    if args.reduced:
        heads, kv = 8, max(1, 8 * config.n_kv_heads // config.n_heads)
        config = config.replace(n_layers=2, d_model=512, n_heads=heads, n_kv_heads=kv, head_dim=64, d_mlp=1376,
                                vocab_size=4096)
    dtype = jnp.dtype(args.dtype or ("float32" if args.reduced else "bfloat16"))
    device = jax.devices()[0]
    limit = (device.memory_stats() or {}).get("bytes_limit")
    batch_size = args.batch_size
    if batch_size is None and limit:
        batch_size, _, _ = plans.largest_fit(config, int(limit * 0.9), seq_len=args.length, steps=args.steps,
                                             dtype=dtype)
    batch_size = batch_size or 8
    print(f"{args.preset}{' (reduced)' if args.reduced else ''}: {config.n_layers} layers, d_model {config.d_model}; "
          f"{args.n} questions of {args.length} tokens; EAP-IG m={args.steps}; batch {batch_size}; {dtype.name}; "
          f"{device.device_kind} ({jax.default_backend()})", flush=True)

    model = Transformer(config, rngs=nnx.Rngs(0), dtype=dtype)
    batch = collate(random_questions(config.vocab_size, args.n, args.length))
    metric = metrics.logit_difference
    start = time.perf_counter()
    jax.block_until_ready(attribute(model, batch, metric, steps=args.steps, batch_size=batch_size).matrix)
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(attribute(model, batch, metric, steps=args.steps, batch_size=batch_size).matrix)
    steady = time.perf_counter() - start
    print(f"EAP-IG: first call {first:.2f} s (compile about {first - steady:.2f} s), steady {steady:.2f} s",
          flush=True)

    one_slice = collate(random_questions(config.vocab_size, batch_size, args.length))
    slices = math.ceil(args.n / batch_size)
    floor = {part: seconds * slices for part, seconds in floor_seconds(model, one_slice, metric, args.steps).items()}
    for part, seconds in floor.items():
        print(f"  floor: {part:22s} {seconds:7.2f} s ({slices} slices)")
    total = sum(floor.values())
    print(f"EAP-IG steady / floor: {steady:.2f} s / {total:.2f} s = {steady / total:.2f}")
    stats = device.memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        print(f"peak device memory: {stats['peak_bytes_in_use'] / GiB:.2f} GiB")
    else:
        plan = plans.program_memory(config, batch=batch_size, seq_len=args.length, steps=args.steps, dtype=dtype)
        print(f"peak device memory: not reported by {jax.default_backend()}; one slice compiles to "
              f"{plan.peak_bytes / GiB:.2f} GiB")


if __name__ == "__main__":
    main()

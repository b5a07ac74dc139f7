"""Compiled memory (XLA's memory_analysis) of the plain forward, the intervened forward without
interventions, the plain gradient program (forward + backward to the embeddings, `plan --mode gradient`) and
one EAP-IG batch, compiled with abstract weights (nothing is allocated), with EAP-IG's temporaries over the
gradient program's.

    python experiments/memory_report.py [--models smollm2-135m,qwen2.5-7b,llama-2-7b]

SmolLM2 is compiled in float32 with 32 prompts of 16 tokens, the 7B presets in bfloat16 with 8 of 64; EAP-IG
takes 5 steps, one per chunk. The plain and the intervened forward run the same block step, so their
temporaries should agree; arguments should be the parameters (counted once) plus the inputs. The figures
are for the backend that runs the script: on a CPU, XLA computes bfloat16 matrix products through float32
copies of the weights, which inflates the 7B temporaries of every program alike.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from mdm_circuits.circuits.ablations import Ablation
from mdm_circuits.circuits.attribution import _attribute_batch
from mdm_circuits.circuits.interventions import run
from mdm_circuits.circuits.plans import abstract_batch
from mdm_circuits.model.planning import plan
from mdm_circuits.model.presets import PRESETS
from mdm_circuits.model.transformer import abstract_model, parameters
from mdm_circuits.tasks import metrics

SHAPES = {"smollm2-135m": (jnp.float32, 32, 16), "qwen2.5-7b": (jnp.bfloat16, 8, 64),
          "llama-2-7b": (jnp.bfloat16, 8, 64)}
MiB = 2**20


def _report(what: str, compiled, seconds: float) -> int:
    """Print a compiled program's memory; return its temporaries in bytes."""
    memory = compiled.memory_analysis()
    print(f"  {what:30s} arguments {memory.argument_size_in_bytes / MiB:9.1f} MiB  temporaries "
          f"{memory.temp_size_in_bytes / MiB:9.1f} MiB  outputs {memory.output_size_in_bytes / MiB:7.1f} MiB  "
          f"(compiled in {seconds:.1f} s)", flush=True)
    return memory.temp_size_in_bytes


def _compiled(function, *arguments, **static):
    start = time.perf_counter()
    compiled = jax.jit(function, static_argnames=tuple(static)).lower(*arguments, **static).compile()
    return compiled, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(SHAPES))
    args = parser.parse_args()
    print(f"backend {jax.default_backend()}")
    for name in args.models.split(","):
        dtype, batch, length = SHAPES[name]
        model = abstract_model(PRESETS[name], dtype)
        parameter_bytes = sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(parameters(model)))
        print(f"{name}, {jnp.dtype(dtype).name}, {batch} x {length} tokens: parameters {parameter_bytes / MiB:.1f} MiB")
        tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)

        def plain(model, tokens):
            return jax.vmap(model)(tokens)

        def intervened(model, tokens):
            return jax.vmap(lambda t: model.unembed(run(model, model.embed(t), keep_sources=False).final))(tokens)

        _report("plain forward (logits)", *_compiled(plain, model, tokens))
        _report("intervened forward (logits)", *_compiled(intervened, model, tokens))
        gradient = plan(PRESETS[name], batch=batch, seq_len=length, dtype=dtype, mode="gradient")
        print(f"  {'gradient program':30s} temporaries {gradient.temp_bytes / MiB:9.1f} MiB", flush=True)
        weights = jax.ShapeDtypeStruct((batch,), bool)
        attribution = _report("EAP-IG, 5 steps (one batch)", *_compiled(
            _attribute_batch.__wrapped__, model, abstract_batch(batch, length), weights, None, Ablation(),
            model_axis=None, metric=metrics.logit_difference, method="eap_ig_inputs", steps=5, step_chunk=1,
            aggregation="sum", per_example=False, rows_dtype=jnp.dtype(jnp.float32), mesh=None))
        print(f"  EAP-IG temporaries / gradient program's: {attribution / gradient.temp_bytes:.2f}")


if __name__ == "__main__":
    main()

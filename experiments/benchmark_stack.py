"""First-call and warm times of EAP-IG on the default pair: each model on its own, then as one stack.

    python experiments/benchmark_stack.py [--task ioi] [--n 64] [--steps 5]

The ARM is posed the questions in its view, the MDM and the adaptation checkpoints in the MDM view (one
token longer for a masked answer). Each model alone compiles a program for its batch's shapes; models of
equal shapes (the checkpoints) reuse it, since the conventions are data. A stack runs every model in one
program: ARM and MDM, or the whole trajectory.
"""

from __future__ import annotations

import argparse
import time

import jax

from mdm_circuits import organisms
from mdm_circuits.circuits.attribution import attribute
from mdm_circuits.model.transformer import stack
from mdm_circuits.tasks import TASKS
from mdm_circuits.tasks.batch import collate
from mdm_circuits.tasks.views import View


def timed(function, repeats: int = 2) -> tuple[float, float]:
    """(first call, best later call) wall times, blocking on the results."""
    times = []
    for _ in range(1 + repeats):
        start = time.perf_counter()
        jax.block_until_ready(function())
        times.append(time.perf_counter() - start)
    return times[0], min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="ioi", choices=sorted(TASKS))
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    arm, mdm, tokenizer = organisms.load()
    trajectory = [model for _, model in organisms.trajectory()]
    task = TASKS[args.task]
    arm_batch = collate(task.examples(tokenizer, args.n, seed=0, view=View.for_model(arm.config)))
    mdm_batch = collate(task.examples(tokenizer, args.n, seed=0, view=View.for_model(mdm.config)))
    print(f"{args.task}: {args.n} questions, EAP-IG with {args.steps} steps; ARM batch {arm_batch.clean.shape[1]} "
          f"tokens, MDM batch {mdm_batch.clean.shape[1]}; backend {jax.default_backend()}")

    def scores(models, batch):
        result = attribute(models, batch, task.METRIC, steps=args.steps, batch_size=args.n)
        return [s.matrix for s in result] if isinstance(result, list) else result.matrix

    rows = [("ARM alone", lambda: scores(arm, arm_batch)), ("MDM alone", lambda: scores(mdm, mdm_batch))]
    rows += [(f"trajectory checkpoint {i} alone", lambda model=model: scores(model, mdm_batch))
             for i, model in enumerate(trajectory)]
    separate_first = separate_warm = 0.0
    for name, function in rows:
        first, warm = timed(function)
        separate_first, separate_warm = separate_first + first, separate_warm + warm
        print(f"  {name:32s} first call {first:6.2f} s, warm {warm:6.2f} s")
    print(f"  {'all of them, one by one':32s} first calls {separate_first:6.2f} s, warm {separate_warm:6.2f} s")
    pair = stack([arm, mdm])
    first, warm = timed(lambda: scores(pair, [arm_batch, mdm_batch]))
    print(f"  {'stack of ARM and MDM':32s} first call {first:6.2f} s, warm {warm:6.2f} s")
    along = stack(trajectory)
    first, warm = timed(lambda: scores(along, mdm_batch))
    print(f"  {f'stack of the {len(trajectory)} checkpoints':32s} first call {first:6.2f} s, warm {warm:6.2f} s")


if __name__ == "__main__":
    main()

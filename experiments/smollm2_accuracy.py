"""SmolLM2-135M-Instruct's accuracy on each task, as an ARM and read as an (untrained) MDM.

    python experiments/smollm2_accuracy.py [--n 200] [--tasks ioi,greater_than,countdown,infilling]

The ARM view continues each prompt greedily. The MDM view is the same weights with bidirectional attention
and `<|endoftext|>` as the mask token, filling the masked answer by diffusion decoding. SmolLM2 was never
trained as an MDM, so that view's accuracy is expected to be low; it shows the pipeline end to end.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from conversion import convert
from mdm_circuits.decoding.accuracy import solved
from mdm_circuits.model.transformer import with_config
from mdm_circuits.tasks import TASKS
from mdm_circuits.tasks.views import View


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--tasks", default=",".join(TASKS))
    args = parser.parse_args()

    converted = convert("smollm2-135m-instruct")
    arm, tokenizer = converted.model, converted.tokenizer
    mdm = with_config(arm, arm.config.replace(attention="bidirectional",
                                              mask_token_id=tokenizer.token_to_id("<|endoftext|>")))
    for name in args.tasks.split(","):
        task = TASKS[name]
        for label, model in (("ARM", arm), ("as MDM", mdm)):
            start = time.perf_counter()
            examples = task.examples(tokenizer, args.n, seed=0, view=View.for_model(model.config))
            accuracy = float(np.mean(solved(model, examples)))
            print(f"{name:13s} {label:7s} {accuracy:.3f}  ({args.n} prompts, {time.perf_counter() - start:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    main()

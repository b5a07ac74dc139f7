"""The default ARM/MDM pair ("model organisms"), trained by the project and shipped with it, and its controls.

A small Qwen2-family ARM is pretrained on the four tasks' train split (causal next-token loss), then
post-trained into an MDM the way Dream and DiffuLLaMA were made from their parents: the same weights under
bidirectional attention, the one-position logit shift kept, the masked diffusion loss (see `training`). The
checkpoints along the adaptation (step 0 is the ARM's weights under the MDM's settings) let one watch the
mechanism shift during post-training. Two controls ship beside the pair: the continued ARM (the ARM trained
on with its causal loss, on the MDM's data for the MDM's steps: "more training" without diffusion) and the
MDM's second seed (the same adaptation, other data order and masks: the between-run null).

    from mdm_circuits import organisms
    pair = organisms.load()                 # pair.arm, pair.mdm, pair.tokenizer
    continued = organisms.control("continued_arm")
    for step, model in organisms.trajectory():
        ...

`mdm-circuits organisms train DIR` regenerates everything (`recipe.build`); `load(DIR)` reads a rebuilt
set instead of the shipped one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import tokenizers

from mdm_circuits.model import checkpoint
from mdm_circuits.model.transformer import Transformer, with_config

SHIPPED = Path(__file__).parent / "data"
ARM, MDM, TRAJECTORY, REPORT = "arm", "mdm", "trajectory", "organisms.json"
CONTINUED_ARM, MDM_SEED_2 = "continued_arm", "mdm_seed_2"
CONTROLS = (CONTINUED_ARM, MDM_SEED_2)
MODELS = (ARM, MDM, *CONTROLS)


class Organisms(NamedTuple):
    arm: Transformer
    mdm: Transformer
    tokenizer: tokenizers.Tokenizer


def _directory(directory: str | Path | None) -> Path:
    directory = SHIPPED if directory is None else Path(directory)
    if not (directory / REPORT).exists():
        raise checkpoint.CheckpointError(
            f"{directory} holds no complete set of organisms (no {REPORT}); build one with "
            f"`mdm-circuits organisms train {directory}`")
    return directory


def load(directory: str | Path | None = None) -> Organisms:
    """The ARM, the MDM post-trained from it, and their tokenizer (the shipped ones by default)."""
    directory = _directory(directory)
    return Organisms(checkpoint.load(directory / ARM), checkpoint.load(directory / MDM),
                     checkpoint.load_tokenizer(directory / ARM))


def control(name: str, directory: str | Path | None = None) -> Transformer:
    """A control by name: "continued_arm" (causal) or "mdm_seed_2" (an MDM)."""
    if name not in CONTROLS:
        raise checkpoint.CheckpointError(f"no control named {name!r}; the controls are {', '.join(CONTROLS)}")
    directory = _directory(directory)
    if not (directory / name).exists():
        raise checkpoint.CheckpointError(f"{directory} has no {name}/ (built before controls shipped); rebuild "
                                         f"it with `mdm-circuits organisms train {directory}`")
    return checkpoint.load(directory / name)


def report(directory: str | Path | None = None) -> dict:
    """What the build recorded: seeds, recipe, training times, accuracies, checkpoint sizes."""
    return json.loads((_directory(directory) / REPORT).read_text())


def trajectory_steps(directory: str | Path | None = None) -> list[int]:
    return [int(step) for step in report(directory)["trajectory_steps"]]


def trajectory_model(step: int, directory: str | Path | None = None) -> Transformer:
    """The MDM after `step` adaptation steps: the ARM's weights under the MDM's settings at step 0, the
    final MDM at the last step."""
    directory = _directory(directory)
    steps = trajectory_steps(directory)
    if step not in steps:
        raise checkpoint.CheckpointError(f"no adaptation checkpoint of step {step}; the steps saved are {steps}")
    if step == 0:
        mdm_config = checkpoint.read_manifest(directory / MDM)[0]
        return with_config(checkpoint.load(directory / ARM), mdm_config)
    if step == steps[-1]:
        return checkpoint.load(directory / MDM)
    return checkpoint.load(directory / TRAJECTORY / f"step_{step:06d}")


def trajectory(directory: str | Path | None = None):
    """(step, model) along the adaptation, in order (models are loaded one at a time)."""
    for step in trajectory_steps(directory):
        yield step, trajectory_model(step, directory)

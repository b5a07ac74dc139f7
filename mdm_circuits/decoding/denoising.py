"""The MDM query protocol: single- and multi-step.

Multi-step querying (`denoising_steps`): S steps reveal the answer positions in a fixed order (left to
right, by the model's confidence, or seeded random). Step s poses the example with the positions revealed
so far filled in (the clean run with the clean answer, the corrupted run with the counterfactual) and
scores the positions still masked. Each step is an ordinary example, so every attribution method and
circuit evaluation takes the steps as a batch: their mean over the steps is the default aggregation.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import jax
import numpy as np

from mdm_circuits.errors import BatchError
from mdm_circuits.model.transformer import Transformer
from mdm_circuits.tasks.batch import Example, collate

Order = Literal["left_to_right", "confidence", "random"]


def _with_revealed(tokens: Sequence[int], positions: Sequence[int], values: Sequence[int]) -> list[int]:
    tokens = list(tokens)
    for position, value in zip(positions, values):
        tokens[position] = value
    return tokens


def _step_example(example: Example, revealed: Sequence[int], masked: Sequence[int]) -> Example:
    """The example with answer slots `revealed` filled in (clean answer, counterfactual in the corrupted run)
    and the slots `masked` scored."""
    at = [example.answer_positions[a] for a in revealed]
    return dataclasses.replace(
        example,
        clean=_with_revealed(example.clean, at, [example.correct[a][0] for a in revealed]),
        corrupted=_with_revealed(example.corrupted, at, [example.incorrect[a][0] for a in revealed]),
        answer_positions=[example.answer_positions[a] for a in masked],
        correct=[example.correct[a] for a in masked],
        incorrect=[example.incorrect[a] for a in masked],
    )


def confidence(model: Transformer, example: Example) -> np.ndarray:
    """The model's confidence (top probability) at each answer position of the clean example."""
    batch = collate([example])
    logits = _logits(model, batch.clean[0], batch.valid[0])
    read = np.asarray(batch.read_positions(model.config)[0])[: len(example.answer_positions)]
    return np.asarray(jax.nn.softmax(logits[read]).max(axis=-1))


_logits = jax.jit(lambda model, tokens, valid: model(tokens, valid=valid))


def denoising_steps(example: Example, steps: int, order: Order = "left_to_right", *, seed: int = 0,
                    model: Transformer | None = None) -> list[Example]:
    """The example as S = `steps` denoising steps, each an `Example` scoring its still-masked positions.

    Args:
      example: an MDM-view example (its answer positions hold the mask token).
      steps: S, between 1 and the number of answer positions. Step s scores the positions still masked, then
        reveals round(n (s+1) / S) − round(n s / S) of them.
      order: which positions are revealed first: "left_to_right"; "random" (seeded); "confidence": the ones
        `model` is most confident of in the clean run at that step (recomputed after every reveal).
      model: the model, for order "confidence".
    """
    n = len(example.answer_positions)
    if not 1 <= steps <= n:
        raise BatchError(f"steps must be between 1 and the {n} answer positions, got {steps}")
    if order not in ("left_to_right", "confidence", "random"):
        raise BatchError(f"unknown reveal order {order!r}; use left_to_right, confidence or random")
    if order == "confidence" and model is None:
        raise BatchError("reveal order 'confidence' needs the model")
    random_order = list(np.random.default_rng(seed).permutation(n))
    boundaries = [round(n * s / steps) for s in range(steps + 1)]
    revealed, posed = [], []
    for s in range(steps):
        masked = [a for a in range(n) if a not in revealed]
        step = _step_example(example, revealed, masked)
        posed.append(step)
        count = boundaries[s + 1] - boundaries[s]
        if order == "left_to_right":
            revealed += masked[:count]
        elif order == "random":
            revealed += [a for a in random_order if a in masked][:count]
        else:
            ranked = np.argsort(-confidence(model, step), kind="stable")
            revealed += [masked[i] for i in ranked[:count]]
    return posed


def multi_step(examples: Sequence[Example], steps: int, order: Order = "left_to_right", *, seed: int = 0,
               model: Transformer | None = None) -> list[Example]:
    """Every example as `steps` denoising steps, in one list: attributing or evaluating it as one batch
    gives the mean over steps (the same number of steps per example, so the mean over examples of the
    mean over steps). `steps` = 1 is the single-step query itself."""
    posed = []
    for index, example in enumerate(examples):
        posed += denoising_steps(example, steps, order, seed=seed + index, model=model)
    return posed

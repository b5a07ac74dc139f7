"""Task accuracy of a model, and the common-correct pool of an ARM/MDM pair.

An example is solved when the model's generated answer is one the example accepts (`Example.solved_by`):
an ARM continues its prompt greedily; an MDM fills its masked answer positions by diffusion decoding, one
position per step, most confident first. The pool holds the examples both models of a pair solve, each
posed in its own model's view (the same underlying question).
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mdm_circuits.decoding.generation import Unmasking, diffuse, greedy
from mdm_circuits.errors import BatchError
from mdm_circuits.model.transformer import Transformer
from mdm_circuits.tasks.batch import Example
from mdm_circuits.tasks.views import View


def generate_answers(model: Transformer, examples: Sequence[Example], *, batch_size: int = 64,
                     unmasking: Unmasking = "confidence", seed: int = 0) -> list[tuple[int, ...]]:
    """The answer tokens the model generates for each example (one per answer position).

    Batches are padded to `batch_size` rows and to lengths in multiples of 16, so a few compiled programs
    serve every batch."""
    answers = []
    for start in range(0, len(examples), batch_size):
        part = examples[start: start + batch_size]
        widest = max(len(e.answer_positions) for e in part)
        causal = model.config.attention == "causal"
        # An ARM writes its answer after the prompt; an MDM fills the masked positions in place.
        needed = max(e.answer_positions[0] + widest if causal else len(e.clean) for e in part)
        length = -(-needed // 16) * 16
        tokens = np.zeros((batch_size, length), np.int32)
        valid = np.zeros((batch_size, length), bool)
        prompt_lengths = np.ones(batch_size, np.int32)
        answer_positions = np.zeros((batch_size, widest), np.int32)
        for row, example in enumerate(part):
            given = example.clean[: example.answer_positions[0]] if causal else example.clean
            tokens[row, : len(given)] = given
            valid[row, : len(given)] = True
            prompt_lengths[row] = example.answer_positions[0]
            positions = list(example.answer_positions)
            answer_positions[row] = positions + positions[:1] * (widest - len(positions))
        if causal:
            generated = jax.vmap(greedy, in_axes=(None, 0, 0, None))(model, jnp.asarray(tokens),
                                                                     jnp.asarray(prompt_lengths), widest)
        else:
            keys = jax.random.split(jax.random.key(seed + start), batch_size)
            generated = jax.vmap(lambda t, v, k, a: diffuse(model, t, v, k, a, steps=widest, unmasking=unmasking))(
                jnp.asarray(tokens), jnp.asarray(valid), keys, jnp.asarray(answer_positions))
        generated = np.asarray(generated)
        answers += [tuple(int(generated[row, p]) for p in example.answer_positions)
                    for row, example in enumerate(part)]
    return answers


def solved(model: Transformer, examples: Sequence[Example], **options) -> np.ndarray:
    """Whether the model solves each example."""
    return np.array([example.solved_by(answer)
                     for example, answer in zip(examples, generate_answers(model, examples, **options))])


@dataclasses.dataclass(frozen=True)
class Pool:
    """Examples solved by both models, posed to each (`arm[i]` and `mdm[i]` are the same question)."""

    arm: list[Example]
    mdm: list[Example]
    drawn: int
    arm_accuracy: float
    mdm_accuracy: float


def _check_aligned(for_arm: list[Example], for_mdm: list[Example]) -> None:
    """The two views must pose the same questions in the same order (same answers, as many of them)."""
    if len(for_arm) != len(for_mdm) or any(a.correct != m.correct or a.incorrect != m.incorrect
                                           for a, m in zip(for_arm, for_mdm)):
        raise BatchError("the task posed other questions in the ARM view than in the MDM view (the same seed must draw "
                         "the same questions in both views); a task of your own must choose its questions before "
                         "posing them in a view")


def common_correct_pool(task: ModuleType, tokenizer, arm: Transformer, mdm: Transformer, *, n: int = 500,
                        budget: int = 5000, chunk: int = 100, seed: int = 0, max_length: int | None = None,
                        split: str = "all", progress: Callable[[int, int, int], None] | None = None) -> Pool:
    """Draw examples of `task` until `n` are solved by both models or `budget` examples have been drawn.

    Examples are drawn in chunks (chunk i with seed `seed` · 1000003 + i), posed to each model in its own
    view, and deduplicated: a repeated question is skipped but counts against the budget, so a task with
    few distinct questions ends with all of them. `progress` is called with (drawn, pooled, n) after every
    chunk. `Pool.drawn` and the accuracies are over the distinct examples drawn. `split` chooses the task's
    questions ("train", "test" or "all", see `tasks.splits`).
    """
    for name, value in (("n", n), ("budget", budget), ("chunk", chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BatchError(f"{name} must be a positive integer, got {value!r}")
    arm_view, mdm_view = View.for_model(arm.config), View.for_model(mdm.config)
    drawn_from = {} if split == "all" else {"split": split}  # a task of your own need not know splits
    pooled_arm, pooled_mdm, seen = [], [], set()
    attempted, drawn, arm_correct, mdm_correct, index = 0, 0, 0, 0, 0
    while len(pooled_arm) < n and attempted < budget:
        size = min(chunk, budget - attempted)
        attempted += size
        chunk_seed = seed * 1_000_003 + index
        index += 1
        # Both views are drawn whole and cut by length together: cut one by one, a question too long in one view
        # only would shift every later question of that view against the other's.
        for_arm = task.examples(tokenizer, size, seed=chunk_seed, view=arm_view, **drawn_from)
        for_mdm = task.examples(tokenizer, size, seed=chunk_seed, view=mdm_view, **drawn_from)
        _check_aligned(for_arm, for_mdm)
        fresh = []
        for i, example in enumerate(for_arm):
            question = (tuple(example.clean), tuple(example.corrupted))
            if max_length is not None and max(len(example.clean), len(for_mdm[i].clean)) > max_length:
                continue
            if question not in seen:
                seen.add(question)
                fresh.append(i)
        if not fresh:
            continue
        for_arm, for_mdm = [for_arm[i] for i in fresh], [for_mdm[i] for i in fresh]
        by_arm, by_mdm = solved(arm, for_arm), solved(mdm, for_mdm)
        drawn += len(fresh)
        arm_correct += int(by_arm.sum())
        mdm_correct += int(by_mdm.sum())
        both = np.nonzero(by_arm & by_mdm)[0][: n - len(pooled_arm)]
        pooled_arm += [for_arm[i] for i in both]
        pooled_mdm += [for_mdm[i] for i in both]
        if progress is not None:
            progress(drawn, len(pooled_arm), n)
    return Pool(pooled_arm, pooled_mdm, drawn, arm_correct / max(drawn, 1), mdm_correct / max(drawn, 1))

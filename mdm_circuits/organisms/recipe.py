"""How the organisms are made: the corpus, the two training stages, the exported checkpoints, the report.

Training questions come from the task generators with seeds from `TRAIN_SEED` on; evaluation uses the
generators' usual seeds (0, 1, ... as `accuracy.common_correct_pool` draws them), so the two never share a
seed (a question may still recur by chance: the report counts how many evaluation questions did).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx

from mdm_circuits.decoding.accuracy import solved
from mdm_circuits.errors import TrainingError
from mdm_circuits.model import checkpoint
from mdm_circuits.model.config import ModelConfig
from mdm_circuits.model.transformer import Transformer, with_config
from mdm_circuits.organisms import ARM, MDM, REPORT, TRAJECTORY, vocabulary
from mdm_circuits.tasks import TASKS
from mdm_circuits.tasks.batch import Example
from mdm_circuits.tasks.views import View
from mdm_circuits.training import (
    Corpus,
    TrainConfig,
    masked_diffusion_loss,
    restore_params,
    sample_masks,
    saved_steps,
    train,
)

TRAIN_SEED = 10**12
TRAINING_STATE = "training_state"  # the resumable checkpoints inside a build directory (never shipped)
EVAL_SEED = 0


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that decides the organisms (the defaults are what ships).

    Attributes:
      d_model, n_layers, n_heads, n_kv_heads, d_mlp: the Qwen2-family shape (q/k/v biases, GQA, SwiGLU).
      examples_per_task: training questions drawn per task.
      arm, mdm: the two training stages (the MDM stage starts from the ARM's final weights).
      trajectory: how many adaptation checkpoints to ship, evenly spaced, step 0 and the last included.
      eval_examples: held-out questions per task for the accuracy table (seed `EVAL_SEED`).
      progress_examples: held-out questions per task for the accuracy printed during training.
      init_seed: the ARM's initial weights.
    """

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 512
    examples_per_task: int = 20_000
    arm: TrainConfig = TrainConfig("causal", steps=2500, batch_size=64, learning_rate=3e-3, warmup_steps=200,
                                   seed=1, checkpoint_every=500, log_every=250)
    mdm: TrainConfig = TrainConfig("masked_diffusion", steps=1500, batch_size=64, learning_rate=1e-3,
                                   warmup_steps=100, seed=2, checkpoint_every=300, log_every=300)
    trajectory: int = 6
    eval_examples: int = 400
    progress_examples: int = 48
    init_seed: int = 0

    def model_config(self, tokenizer: tokenizers.Tokenizer) -> ModelConfig:
        return ModelConfig(vocab_size=tokenizer.get_vocab_size(), d_model=self.d_model, n_layers=self.n_layers,
                           n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.d_model // self.n_heads,
                           d_mlp=self.d_mlp, qkv_bias=True, norm_eps=1e-6)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def training_answer(task: str, example: Example, rng: random.Random) -> list[int]:
    """The answer a training sequence ends with: any larger year ending for Greater-Than (as text would
    have it), the first correct candidate (Countdown: the first solution) otherwise."""
    if task == "greater_than":
        return [rng.choice(example.correct[0])]
    return [candidates[0] for candidates in example.correct]


def sequence(task: str, example: Example, view: View, eos: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """(tokens, answer positions) of an example with its answer written in, followed by <eos>."""
    answer = training_answer(task, example, rng)
    if view.is_mdm:
        tokens = list(example.clean)
        for position, token in zip(example.answer_positions, answer):
            tokens[position] = token
    else:
        tokens = list(example.clean[: example.answer_positions[0]]) + answer
    return tokens + [eos], list(example.answer_positions)


def corpus(tokenizer: tokenizers.Tokenizer, view: View, per_task: int, seed: int = TRAIN_SEED) -> Corpus:
    """Training sequences of every task in `view`, padded to a multiple of 8; the answers are maskable."""
    eos = tokenizer.token_to_id(vocabulary.EOS)
    rows = []
    for index, (name, task) in enumerate(TASKS.items()):
        rng = random.Random(seed + index)
        rows += [sequence(name, example, view, eos, rng)
                 for example in task.examples(tokenizer, per_task, seed=seed + index, view=view)]
    length = -(-max(len(tokens) for tokens, _ in rows) // 8) * 8
    tokens = np.zeros((len(rows), length), np.int32)
    valid = np.zeros((len(rows), length), bool)
    maskable = np.zeros((len(rows), length), bool)
    for row, (sequence_tokens, answer_positions) in enumerate(rows):
        tokens[row, : len(sequence_tokens)] = sequence_tokens
        valid[row, : len(sequence_tokens)] = True
        maskable[row, answer_positions] = True
    return Corpus(jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(maskable))


def evaluation_examples(tokenizer: tokenizers.Tokenizer, view: View, n: int) -> dict[str, list[Example]]:
    return {name: task.examples(tokenizer, n, seed=EVAL_SEED, view=view) for name, task in TASKS.items()}


def solved_by_task(model: Transformer, examples: dict[str, list[Example]]) -> dict[str, np.ndarray]:
    """Whether the model solves each example of each task (greedy for an ARM, diffusion for an MDM)."""
    return {name: solved(model, posed) for name, posed in examples.items()}


def _mean(by_task: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float(np.mean(hits)) for name, hits in by_task.items()}


def accuracies(model: Transformer, examples: dict[str, list[Example]]) -> dict[str, float]:
    """The fraction of each task's examples the model solves."""
    return _mean(solved_by_task(model, examples))


def held_out_loss(model: Transformer, sequences: Corpus, seed: int = 0) -> float:
    """The masked diffusion loss of `model` (under MDM settings) on `sequences`, with seeded masks."""
    masked, t = sample_masks(jax.random.key(seed), sequences.maskable)
    return float(jax.jit(masked_diffusion_loss)(model, sequences, masked, t))


def _unseen(arm_corpus: Corpus, examples: dict[str, list[Example]]) -> dict[str, np.ndarray]:
    """For each ARM-view example, whether its prompt is absent from the training sequences."""
    tokens, answers = np.asarray(arm_corpus.tokens), np.asarray(arm_corpus.maskable)
    trained_on = {tuple(row[: np.argmax(answer)]) for row, answer in zip(tokens, answers)}
    return {name: np.array([tuple(e.clean[: e.answer_positions[0]]) not in trained_on for e in posed])
            for name, posed in examples.items()}


def _remove_commit_markers(directory: Path) -> None:
    """Orbax marks a finished save with a file holding the saving machine's absolute path. Restores from a
    local directory never read it, and shipped package data must not carry the build machine's paths."""
    for marker in directory.rglob("commit_success.txt"):
        marker.unlink()


def _directory_size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def build(directory: str | Path, recipe: Recipe = Recipe(), *, work: str | Path | None = None,
          progress: Callable[[str], None] = print) -> dict:
    """Train both organisms and write them, the adaptation trajectory and the report to `directory`.

    Resumable: the training checkpoints live in `work` (default `directory`/training_state) and a rerun continues
    from them (the timings then cover only the rerun). Returns the report (also `directory`/organisms.json).
    """
    directory = Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise TrainingError(f"{directory} is a file; give a directory to build the organisms in")
    work = directory / TRAINING_STATE if work is None else Path(work).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / REPORT).unlink(missing_ok=True)  # an interrupted build never looks complete
    tokenizer = vocabulary.build()
    arm_config = recipe.model_config(tokenizer)
    mdm_config = arm_config.replace(attention="bidirectional", mask_token_id=tokenizer.token_to_id(vocabulary.MASK))
    views = {ARM: View(), MDM: View.for_model(mdm_config)}
    timings = {}

    began = time.perf_counter()
    corpora = {name: corpus(tokenizer, view, recipe.examples_per_task) for name, view in views.items()}
    timings["corpus_s"] = time.perf_counter() - began
    progress(f"corpus: {corpora[ARM].size} sequences per view ({recipe.examples_per_task} per task), "
             f"{timings['corpus_s']:.0f} s")
    held_out = {name: evaluation_examples(tokenizer, view, recipe.progress_examples) for name, view in views.items()}

    progress(f"ARM pretraining: {recipe.arm.steps} steps of {recipe.arm.batch_size} sequences")
    began = time.perf_counter()
    arm = train(Transformer(arm_config, rngs=nnx.Rngs(recipe.init_seed)), corpora[ARM], recipe.arm, work / ARM,
                evaluate=lambda model: accuracies(model, held_out[ARM]), progress=progress)
    timings["arm_training_s"] = time.perf_counter() - began

    progress(f"ARM → MDM adaptation: {recipe.mdm.steps} steps of {recipe.mdm.batch_size} sequences")
    began = time.perf_counter()
    mdm = train(with_config(arm, mdm_config), corpora[MDM], recipe.mdm, work / MDM, keep=None,
                evaluate=lambda model: accuracies(model, held_out[MDM]), progress=progress)
    timings["mdm_training_s"] = time.perf_counter() - began

    steps = _spread(recipe.mdm.steps, recipe.trajectory, saved_steps(work / MDM))
    along = {0: with_config(arm, mdm_config), steps[-1]: mdm}
    along |= {step: restore_params(work / MDM, along[0], step) for step in steps[1:-1]}
    checkpoint.save(directory / ARM, arm, tokenizer)
    checkpoint.save(directory / MDM, mdm, tokenizer)
    shutil.rmtree(directory / TRAJECTORY, ignore_errors=True)
    for step in steps[1:-1]:  # step 0 is the ARM's weights, the last step the MDM's
        checkpoint.save(directory / TRAJECTORY / f"step_{step:06d}", along[step])
    for name in (ARM, MDM, TRAJECTORY):
        _remove_commit_markers(directory / name)

    progress(f"evaluating on {recipe.eval_examples} held-out questions per task")
    began = time.perf_counter()
    summary, trajectory_accuracy, trajectory_loss = _evaluate(
        tokenizer, views, corpora[ARM], {ARM: arm, MDM: mdm}, {step: along[step] for step in steps},
        recipe.eval_examples, progress)
    timings["evaluation_s"] = time.perf_counter() - began
    result = {
        "recipe": recipe.to_dict(),
        "train_seed": TRAIN_SEED,
        "eval_seed": EVAL_SEED,
        "timings": timings,
        **summary,
        "sample_accuracy": {name: accuracies(model, held_out[name]) for name, model in ((ARM, arm), (MDM, mdm))},
        "trajectory_steps": steps,
        "trajectory_accuracy": dict(zip(map(str, steps), trajectory_accuracy)),
        "trajectory_masked_diffusion_loss": dict(zip(map(str, steps), trajectory_loss)),
        "sizes_bytes": {name: _directory_size(directory / name) for name in (ARM, MDM, TRAJECTORY)},
    }
    (directory / REPORT).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _evaluate(tokenizer, views, arm_corpus, pair, trajectory, n, progress):
    """(summary, accuracies, losses): the pair's accuracy on every held-out question and on those never seen
    in training; the accuracy and masked diffusion loss of each trajectory model under MDM settings."""
    evaluation = {name: evaluation_examples(tokenizer, view, n) for name, view in views.items()}
    unseen = _unseen(arm_corpus, evaluation[ARM])
    solved = {name: solved_by_task(model, evaluation[name]) for name, model in pair.items()}
    loss_corpus = corpus(tokenizer, views[MDM], n, seed=EVAL_SEED)
    accuracy, loss = [], []
    for step, model in trajectory.items():
        accuracy.append(accuracies(model, evaluation[MDM]))
        loss.append(held_out_loss(model, loss_corpus))
        progress(f"  adaptation step {step}: masked diffusion loss {loss[-1]:.3f}  "
                 + "  ".join(f"{task} {value:.3f}" for task, value in accuracy[-1].items()))
    summary = {
        "accuracy": {name: _mean(by_task) for name, by_task in solved.items()},
        "accuracy_on_unseen_questions": {
            name: {task: float(np.mean(hits[unseen[task]])) if unseen[task].any() else None
                   for task, hits in by_task.items()} for name, by_task in solved.items()},
        "eval_questions_seen_in_training": {task: float(1 - np.mean(mask)) for task, mask in unseen.items()},
    }
    return summary, accuracy, loss


def _spread(total: int, count: int, saved: list[int]) -> list[int]:
    """`count` saved steps spread evenly over 0..`total` (the nearest saved step to each target)."""
    targets = np.linspace(0, total, count)
    chosen = sorted({min(saved, key=lambda s: abs(s - target)) for target in targets})
    if len(chosen) < count:
        raise TrainingError(f"the adaptation saved only {saved}; {count} trajectory checkpoints need more "
                            f"(lower checkpoint_every)")
    return [int(step) for step in chosen]


QUICK = Recipe(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_mlp=64, examples_per_task=200,
               arm=TrainConfig("causal", steps=20, batch_size=16, warmup_steps=5, seed=1, checkpoint_every=10,
                               log_every=10),
               mdm=TrainConfig("masked_diffusion", steps=12, batch_size=16, warmup_steps=2, seed=2,
                               checkpoint_every=2, log_every=6),
               eval_examples=16, progress_examples=8)
"""A smoke test of the whole pipeline in seconds (a tiny model that learns little)."""


def accuracy_table(report: dict) -> str:
    """The report's accuracies as Markdown: the pair (on every held-out question, and on those whose prompt
    never occurred in training), then the adaptation trajectory."""
    tasks = list(report["accuracy"]["arm"])

    def cells(scores):
        return " | ".join("—" if scores[task] is None else f"{scores[task]:.3f}" for task in tasks)

    lines = ["| model | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for name, label in (("arm", "ARM (causal, greedy)"), ("mdm", "MDM (bidirectional, diffusion)")):
        lines.append(f"| {label} | {cells(report['accuracy'][name])} |")
        lines.append(f"| {label}, unseen prompts only | {cells(report['accuracy_on_unseen_questions'][name])} |")
    seen = report["eval_questions_seen_in_training"]
    lines.append("| share of prompts seen in training | " + " | ".join(f"{seen[task]:.3f}" for task in tasks) + " |")
    lines += ["", "| adaptation step | masked diffusion loss | " + " | ".join(tasks) + " |",
              "|---" * (len(tasks) + 2) + "|"]
    for step, scores in report["trajectory_accuracy"].items():
        loss = report["trajectory_masked_diffusion_loss"][step]
        lines.append(f"| {step} | {loss:.3f} | {cells(scores)} |")
    return "\n".join(lines)

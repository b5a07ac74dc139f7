"""How the organisms are made: the corpus, the training stages, the exported checkpoints, the report.

Training questions are the tasks' train split (`tasks.splits`), drawn with seeds from `TRAIN_SEED` on. The
accuracies are measured on the test split, whose questions never occur in training (templates, year
decades, number sets and sentences held out), and on fresh train-split questions for comparison.

Four stages: the ARM (causal pretraining), the MDM adapted from it, and two controls that start from the
same ARM: the continued ARM (causal loss, the MDM's data, steps and schedule) and the MDM's second seed
(the same adaptation with other data order and mask draws).
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
from mdm_circuits.organisms import ARM, CONTINUED_ARM, MDM, MDM_SEED_2, MODELS, REPORT, TRAJECTORY, vocabulary
from mdm_circuits.tasks import TASKS
from mdm_circuits.tasks.batch import Example
from mdm_circuits.tasks.splits import Split
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
SPLITS = (Split.TEST, Split.TRAIN)  # the accuracy table's splits: unseen questions first


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that decides the organisms (the defaults are what ships).

    Attributes:
      d_model, n_layers, n_heads, n_kv_heads, d_mlp: the Qwen2-family shape (q/k/v biases, GQA, SwiGLU).
      examples_per_task: training questions drawn per task (train split).
      arm, mdm: the two stages of the pair (the MDM stage starts from the ARM's final weights).
      second_seed: the seed of the MDM's second adaptation (data order and mask draws).
      trajectory: how many adaptation checkpoints to ship, evenly spaced, step 0 and the last included.
      eval_examples: test-split (and train-split) questions per task for the accuracy table (seed `EVAL_SEED`).
      progress_examples: test-split questions per task for the accuracy printed during training.
      init_seed: the ARM's initial weights.
    """

    d_model: int = 128
    n_layers: int = 8
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 384
    examples_per_task: int = 20_000
    arm: TrainConfig = TrainConfig("causal", steps=2500, batch_size=64, learning_rate=3e-3, warmup_steps=200,
                                   seed=1, checkpoint_every=500, log_every=500)
    mdm: TrainConfig = TrainConfig("masked_diffusion", steps=1500, batch_size=64, learning_rate=1e-3,
                                   warmup_steps=100, seed=2, checkpoint_every=500, log_every=500)
    second_seed: int = 3
    trajectory: int = 4
    eval_examples: int = 400
    progress_examples: int = 48
    init_seed: int = 0

    @property
    def continued_arm(self) -> TrainConfig:
        """The control for "more training": the MDM stage's data order, steps and schedule, causal loss."""
        return dataclasses.replace(self.mdm, objective="causal")

    @property
    def mdm_seed_2(self) -> TrainConfig:
        """The between-run control: the MDM stage with another seed."""
        return dataclasses.replace(self.mdm, seed=self.second_seed)

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


def corpus(tokenizer: tokenizers.Tokenizer, view: View, per_task: int, seed: int = TRAIN_SEED,
           split: Split = Split.TRAIN) -> Corpus:
    """Sequences of every task's `split` in `view`, padded to a multiple of 8; the answers are maskable."""
    eos = tokenizer.token_to_id(vocabulary.EOS)
    rows = []
    for index, (name, task) in enumerate(TASKS.items()):
        rng = random.Random(seed + index)
        rows += [sequence(name, example, view, eos, rng)
                 for example in task.examples(tokenizer, per_task, seed=seed + index, view=view, split=split)]
    length = -(-max(len(tokens) for tokens, _ in rows) // 8) * 8
    tokens = np.zeros((len(rows), length), np.int32)
    valid = np.zeros((len(rows), length), bool)
    maskable = np.zeros((len(rows), length), bool)
    for row, (sequence_tokens, answer_positions) in enumerate(rows):
        tokens[row, : len(sequence_tokens)] = sequence_tokens
        valid[row, : len(sequence_tokens)] = True
        maskable[row, answer_positions] = True
    return Corpus(jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(maskable))


def evaluation_examples(tokenizer: tokenizers.Tokenizer, view: View, n: int, split: Split = Split.TEST
                        ) -> dict[str, list[Example]]:
    return {name: task.examples(tokenizer, n, seed=EVAL_SEED, view=view, split=split) for name, task in TASKS.items()}


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


def in_corpus(arm_corpus: Corpus, examples: dict[str, list[Example]]) -> dict[str, np.ndarray]:
    """For each ARM-view example, whether its question (the prompt before the answer) is one of the
    training sequences' (the whole corpus is searched)."""
    tokens, answers = np.asarray(arm_corpus.tokens), np.asarray(arm_corpus.maskable)
    trained_on = {tuple(row[: np.argmax(answer)]) for row, answer in zip(tokens, answers)}
    return {name: np.array([tuple(e.clean[: e.answer_positions[0]]) in trained_on for e in posed])
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
    """Train the pair and its controls and write them, the adaptation trajectory and the report to `directory`.

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
    progress(f"corpus: {corpora[ARM].size} sequences per view ({recipe.examples_per_task} per task, train split), "
             f"{timings['corpus_s']:.0f} s")
    held_out = {name: evaluation_examples(tokenizer, view, recipe.progress_examples) for name, view in views.items()}

    def stage(name, title, start, config, view, keep=2):
        progress(f"{title}: {config.steps} steps of {config.batch_size} sequences")
        began = time.perf_counter()
        model = train(start, corpora[view], config, work / name, keep=keep,
                      evaluate=lambda model: accuracies(model, held_out[view]), progress=progress)
        timings[f"{name}_training_s"] = time.perf_counter() - began
        return model

    arm = stage(ARM, "ARM pretraining", Transformer(arm_config, rngs=nnx.Rngs(recipe.init_seed)), recipe.arm, ARM)
    as_mdm = with_config(arm, mdm_config)
    models = {ARM: arm,
              MDM: stage(MDM, "ARM → MDM adaptation", as_mdm, recipe.mdm, MDM, keep=None),
              CONTINUED_ARM: stage(CONTINUED_ARM, "control: the ARM trained on, causal", arm, recipe.continued_arm,
                                   ARM),
              MDM_SEED_2: stage(MDM_SEED_2, "control: the adaptation with another seed", as_mdm, recipe.mdm_seed_2,
                                MDM)}

    steps = _spread(recipe.mdm.steps, recipe.trajectory, saved_steps(work / MDM))
    along = {0: as_mdm, steps[-1]: models[MDM]}
    along |= {step: restore_params(work / MDM, as_mdm, step) for step in steps[1:-1]}
    for name, model in models.items():
        checkpoint.save(directory / name, model, tokenizer if name == ARM else None)
    shutil.rmtree(directory / TRAJECTORY, ignore_errors=True)
    for step in steps[1:-1]:  # step 0 is the ARM's weights, the last step the MDM's
        checkpoint.save(directory / TRAJECTORY / f"step_{step:06d}", along[step])
    for name in (*MODELS, TRAJECTORY):
        _remove_commit_markers(directory / name)

    progress(f"evaluating on {recipe.eval_examples} questions per task and split")
    began = time.perf_counter()
    summary, trajectory_accuracy, trajectory_loss = _evaluate(
        tokenizer, views, corpora[ARM], models, {step: along[step] for step in steps}, recipe.eval_examples,
        progress)
    timings["evaluation_s"] = time.perf_counter() - began
    result = {
        "recipe": recipe.to_dict() | {"continued_arm": dataclasses.asdict(recipe.continued_arm),
                                      "mdm_seed_2": dataclasses.asdict(recipe.mdm_seed_2)},
        "train_seed": TRAIN_SEED,
        "eval_seed": EVAL_SEED,
        "timings": timings,
        **summary,
        "sample_accuracy": {name: accuracies(model, held_out[_view(model)]) for name, model in models.items()},
        "trajectory_steps": steps,
        "trajectory_accuracy": dict(zip(map(str, steps), trajectory_accuracy)),
        "trajectory_masked_diffusion_loss": dict(zip(map(str, steps), trajectory_loss)),
        "parameters": sum(leaf.size for leaf in jax.tree.leaves(nnx.state(arm, nnx.Param))),
        "sizes_bytes": {name: _directory_size(directory / name) for name in (*MODELS, TRAJECTORY)},
    }
    (directory / REPORT).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _view(model: Transformer) -> str:
    return MDM if model.config.is_mdm else ARM


def _evaluate(tokenizer, views, arm_corpus, models, trajectory, n, progress):
    """(summary, accuracies, losses): every model's accuracy per split (each in its own view), the share of
    each split's questions found in the training corpus; the test-split accuracy and masked diffusion loss
    of each trajectory model under MDM settings."""
    evaluation = {split.value: {name: evaluation_examples(tokenizer, view, n, split) for name, view in views.items()}
                  for split in SPLITS}
    accuracy = {name: {split: accuracies(model, posed[_view(model)]) for split, posed in evaluation.items()}
                for name, model in models.items()}
    seen = {split: {task: float(np.mean(hits)) for task, hits in in_corpus(arm_corpus, posed[ARM]).items()}
            for split, posed in evaluation.items()}
    loss_corpus = corpus(tokenizer, views[MDM], n, seed=EVAL_SEED, split=Split.TEST)
    trajectory_accuracy, loss = [], []
    for step, model in trajectory.items():
        trajectory_accuracy.append(accuracies(model, evaluation[Split.TEST.value][MDM]))
        loss.append(held_out_loss(model, loss_corpus))
        progress(f"  adaptation step {step}: masked diffusion loss {loss[-1]:.3f}  "
                 + "  ".join(f"{task} {value:.3f}" for task, value in trajectory_accuracy[-1].items()))
    return {"accuracy": accuracy, "eval_questions_in_training": seen}, trajectory_accuracy, loss


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


LABELS = {ARM: "ARM (causal, greedy)", MDM: "MDM (bidirectional, diffusion)",
          CONTINUED_ARM: "continued ARM (causal, greedy)", MDM_SEED_2: "MDM seed 2 (bidirectional, diffusion)"}


def accuracy_table(report: dict) -> str:
    """The report's accuracies as Markdown: every model on the test split (questions never seen in training)
    and on fresh train-split questions, the share of each split found in the corpus, then the trajectory."""
    tasks = list(report["accuracy"][ARM][Split.TEST.value])

    def cells(scores):
        return " | ".join(f"{scores[task]:.3f}" for task in tasks)

    lines = ["| model | split | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 2) + "|"]
    for split in SPLITS:
        for name, label in LABELS.items():
            lines.append(f"| {label} | {split.value} | {cells(report['accuracy'][name][split.value])} |")
    for split in SPLITS:
        lines.append(f"| share of questions in the training corpus | {split.value} | "
                     f"{cells(report['eval_questions_in_training'][split.value])} |")
    lines += ["", "| adaptation step | masked diffusion loss | " + " | ".join(tasks) + " |",
              "|---" * (len(tasks) + 2) + "|"]
    for step, scores in report["trajectory_accuracy"].items():
        loss = report["trajectory_masked_diffusion_loss"][step]
        lines.append(f"| {step} | {loss:.3f} | {cells(scores)} |")
    return "\n".join(lines)

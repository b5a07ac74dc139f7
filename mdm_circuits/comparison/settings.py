"""What a comparison run is: the models, the tasks and every protocol choice, as one frozen value.

A run's output directory records its settings (`settings.json`); every file a stage writes carries their
fingerprint (`mdm_circuits.outputs`), so a rerun with the same settings resumes and a rerun with other
settings never mixes with what is there.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

from mdm_circuits.errors import UsageError
from mdm_circuits.tasks import TASKS
from mdm_circuits.tasks.splits import Split

Protocol = Literal["single", "multi"]
MdmKind = Literal["dream", "diffullama", "llada"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """One comparison.

    Attributes:
      arm, mdm: model directories (converted, or Hugging Face checkpoints to convert); None for both takes the
        default pair shipped with the package, with its controls and its adaptation trajectory.
      mdm_kind: how to read a Hugging Face MDM whose config cannot tell (DiffuLLaMA is a plain Llama config).
      controls: extra models as (name, directory): a continued ARM, another seed, checkpoints...
      tasks: the tasks compared.
      pool: common-correct questions per task (both models solve them), drawn from at most `budget`.
      split: the tasks' split the questions come from ("test": held out from the default pair's training;
        "train"; "all"; see `tasks.splits`).
      method, steps: the attribution method and its integration steps.
      protocol: how the MDM is queried: "single" (every answer position masked, read once) or "multi"
        (`denoising_steps` steps revealing the answer in `order`, attributed at every step, averaged).
      ks: circuit sizes swept (empty: 1, 2, 5, 10, 20, 50% of the edges and 100, 1000, 10000 edges).
      ablation: what an edge's or node's removal is measured against ("corrupted", "zero", "mean", ...).
      seed: the seed of the pools, bootstrap, nulls and random controls.
      bootstrap: resamples of the pool for every confidence interval (95%, percentile).
      null_draws, splits: random edge-set pairs and disjoint half-pool splits for the two nulls.
      causal_size, causal_draws: components zeroed in the causal check, and draws of each control set.
      exact_questions: pooled questions on which the ARM's and the MDM's attribution is held against exact
        single-edge patching (the agreement stage; 0 leaves it out). Its cost: edges × questions forwards per model.
      faithfulness_questions: pooled questions every compared circuit is run on (faithfulness, cross-faithfulness;
        one forward per circuit and question).
      tau: the faithfulness at which a circuit counts as found (the comparison at matched faithfulness).
      max_length: leave out questions longer than this many tokens.
      batch_size: examples per compiled program.
      models_per_program: at most this many models of one architecture run as one stacked program (0: all).
    """

    arm: str | None = None
    mdm: str | None = None
    mdm_kind: MdmKind | None = None
    controls: tuple[tuple[str, str], ...] = ()
    tasks: tuple[str, ...] = tuple(TASKS)
    pool: int = 200
    budget: int = 2000
    split: str = "test"
    method: str = "eap_ig_inputs"
    steps: int = 5
    protocol: Protocol = "single"
    denoising_steps: int | None = None
    order: str = "left_to_right"
    ks: tuple[int, ...] = ()
    ablation: str = "corrupted"
    seed: int = 0
    bootstrap: int = 500
    null_draws: int = 200
    splits: int = 20
    causal_size: int = 3
    causal_draws: int = 10
    tau: float = 0.8
    exact_questions: int = 2
    faithfulness_questions: int = 64
    max_length: int | None = None
    batch_size: int = 32
    models_per_program: int = 0

    def __post_init__(self):
        problems = []
        if (self.arm is None) != (self.mdm is None):
            problems.append("give both --arm and --mdm, or neither (for the default pair)")
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown or not self.tasks:
            problems.append(f"unknown or no task(s) {unknown}; choose from {sorted(TASKS)}")
        for name in ("pool", "budget", "steps", "bootstrap", "null_draws", "splits", "causal_size", "causal_draws",
                     "batch_size", "faithfulness_questions"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.exact_questions < 0:
            problems.append(f"exact_questions must be 0 (no exact patching) or positive, got {self.exact_questions}")
        if not 0 < self.tau <= 1:
            problems.append(f"tau must lie in (0, 1], got {self.tau}")
        if self.pool < 4:
            problems.append(f"a pool of {self.pool} questions cannot be split into halves for the nulls; use >= 4")
        if self.split not in {split.value for split in Split}:
            problems.append(f"split must be test, train or all, got {self.split!r}")
        if self.protocol not in ("single", "multi"):
            problems.append(f"protocol must be single or multi, got {self.protocol!r}")
        if self.order not in ("left_to_right", "confidence", "random"):
            problems.append(f"order must be left_to_right, confidence or random, got {self.order!r}")
        names = [name for name, _ in self.controls]
        builtin = ("ARM", "MDM", "ARM as MDM", "continued ARM", "MDM seed 2")
        reserved = [n for n in names if n in builtin or n.startswith("step ")]
        if len(set(names)) != len(names) or reserved:
            problems.append(f"control names must be distinct and not {', '.join(map(repr, builtin))} or 'step N' "
                            f"(the names of the built-in models), got {names}")
        if problems:
            raise UsageError("invalid comparison settings: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> Settings:
        data = dict(data)
        data["controls"] = tuple(tuple(pair) for pair in data.get("controls", ()))
        data["tasks"] = tuple(data.get("tasks", ()))
        data["ks"] = tuple(data.get("ks", ()))
        return cls(**data)

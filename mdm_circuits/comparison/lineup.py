"""The models a comparison runs: the ARM, the MDM post-trained from it, and the controls.

- The default pair (no `--arm`/`--mdm`) brings its two controls, the continued ARM and the MDM's second seed,
  and its adaptation trajectory: step 0 is the ARM's weights posed as an MDM (the query-format control), then
  the checkpoints along the adaptation (the last is the MDM).
- A given pair brings the ARM's weights posed as an MDM when both share an architecture.
- `--control NAME=DIR` adds any model: a continued ARM, another seed, checkpoints. A model with a mask token
  is posed the MDM view and set beside the MDM, any other the ARM view, beside the ARM.

A directory is a converted model (`mdm-circuits convert`) or a Hugging Face checkpoint, converted on the fly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tokenizers
from jax.sharding import Mesh

from mdm_circuits import organisms
from mdm_circuits.comparison.settings import Settings
from mdm_circuits.errors import UsageError
from mdm_circuits.model import checkpoint
from mdm_circuits.model.transformer import Transformer, with_config

QUERY_FORMAT = "ARM as MDM"
SHIPPED_CONTROLS = {organisms.CONTINUED_ARM: "continued ARM", organisms.MDM_SEED_2: "MDM seed 2"}


@dataclasses.dataclass(frozen=True)
class Member:
    """A model of the comparison. `role`: "arm", "mdm", "query format" (the ARM's weights posed as an MDM),
    "trajectory" (an adaptation checkpoint, `step` set) or "control"."""

    name: str
    model: Transformer
    role: str
    step: int | None = None

    @property
    def is_mdm(self) -> bool:
        return self.model.config.is_mdm

    @property
    def baseline(self) -> str | None:
        """The model this one is set beside: the ARM for the query-format control and causal controls, the
        MDM for MDM controls."""
        if self.role == "query format":
            return "ARM"
        if self.role == "control":
            return "MDM" if self.is_mdm else "ARM"
        return None


@dataclasses.dataclass(frozen=True)
class Lineup:
    """The models, their tokenizer, where they came from, and the device mesh the circuit programs run on
    (None: the default device)."""

    members: tuple[Member, ...]
    tokenizer: tokenizers.Tokenizer
    source: str
    mesh: Mesh | None = None

    def __getitem__(self, name: str) -> Member:
        for member in self.members:
            if member.name == name:
                return member
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [member.name for member in self.members]

    @property
    def contrasts(self) -> list[tuple[str, str]]:
        """ARM vs MDM, then each control beside its baseline (ARM vs ARM as MDM, ARM vs continued ARM, MDM vs
        MDM seed 2...). The ARM and the MDM are the first two members, so every pair is in member order, as
        the structure stage's pairs are."""
        return [("ARM", "MDM")] + [(m.baseline, m.name) for m in self.members if m.baseline is not None]

    @property
    def controls(self) -> list[tuple[str, str]]:
        """The training controls beside their baselines (the contrasts less ARM vs MDM and the query format)."""
        return [(m.baseline, m.name) for m in self.members if m.role == "control"]

    @property
    def compared(self) -> list[Member]:
        """The models the semantics and causal stages measure: all but the adaptation checkpoints."""
        return [m for m in self.members if m.role != "trajectory"]

    @property
    def trajectory(self) -> list[Member]:
        """The query-format control and the adaptation checkpoints, in step order, then the MDM; empty where
        there are no checkpoints."""
        if not any(m.role == "trajectory" for m in self.members):
            return []
        steps = [m for m in self.members if m.role in ("query format", "trajectory")]
        return sorted(steps, key=lambda m: m.step) + [self["MDM"]]


def _load(directory: str, kind: str | None) -> tuple[Transformer, tokenizers.Tokenizer | None]:
    path = Path(directory)
    if (path / checkpoint.MANIFEST).exists():
        return checkpoint.load(path), checkpoint.load_tokenizer(path)
    if (path / "config.json").exists():
        from conversion import convert

        converted = convert(path, mdm=True if kind == "diffullama" else None)
        return converted.model, converted.tokenizer
    raise UsageError(f"{directory} is neither a converted model (no {checkpoint.MANIFEST}) nor a Hugging Face "
                     f"checkpoint (no config.json)")


def load(settings: Settings, mesh: Mesh | None = None) -> Lineup:
    if settings.arm is None:
        arm, mdm, tokenizer = organisms.load()
        steps = organisms.trajectory_steps()
        members = [Member("ARM", arm, "arm"), Member("MDM", mdm, "mdm", steps[-1])]
        members += [Member(label, organisms.control(name), "control") for name, label in SHIPPED_CONTROLS.items()]
        for step in steps[:-1]:  # the last checkpoint is the MDM itself
            model = organisms.trajectory_model(step)
            members.append(Member(QUERY_FORMAT, model, "query format", 0) if step == 0
                           else Member(f"step {step}", model, "trajectory", step))
        source = "the default pair shipped with mdm_circuits (see README, 'The default pair')"
    else:
        (arm, tokenizer), (mdm, _) = _load(settings.arm, None), _load(settings.mdm, settings.mdm_kind)
        if tokenizer is None:
            raise UsageError(f"{settings.arm} has no tokenizer.json; the tasks need the ARM's tokenizer")
        members = [Member("ARM", arm, "arm"), Member("MDM", mdm, "mdm")]
        if arm.architecture == mdm.architecture:
            members.append(Member(QUERY_FORMAT, with_config(arm, mdm.config), "query format", 0))
        source = f"ARM {settings.arm}, MDM {settings.mdm}"
    for name, directory in settings.controls:
        members.append(Member(name, _load(directory, None)[0], "control"))
    arm, mdm = members[0].model.config, members[1].model.config
    if arm.is_mdm or arm.attention != "causal":
        raise UsageError("the ARM must be causal without a mask token; check --arm (and that --mdm is the MDM)")
    if not mdm.is_mdm:
        raise UsageError("the MDM has no mask token; for DiffuLLaMA pass --mdm-kind diffullama, or convert it "
                         "with `mdm-circuits convert --mdm`")
    for member in members:
        shape = (member.model.config.n_layers, member.model.config.n_heads)
        if shape != (arm.n_layers, arm.n_heads):
            raise UsageError(f"{member.name} has {shape[0]} layers of {shape[1]} heads, the ARM {arm.n_layers} of "
                             f"{arm.n_heads}: circuits are compared edge by edge, so every model must have the "
                             f"ARM's graph (an MDM post-trained from it does)")
        if member.model.config.vocab_size != arm.vocab_size:
            raise UsageError(f"{member.name} has a vocabulary of {member.model.config.vocab_size} tokens, the ARM "
                             f"{arm.vocab_size}: the models of a comparison must share the ARM's tokenizer")
    return Lineup(tuple(members), tokenizer, source, mesh)

"""The model configuration: one frozen dataclass for every decoder family the project converts.

Architecture differences between Qwen2, Llama and LLaDA live in these fields (and in the conversion
name tables), never in `if family == ...` branches inside the layers.

A `ModelConfig` is an `Architecture` (shapes and the constants of the computation, which compiled programs
specialise on) plus three conventions (attention, logit shift, mask token), which travel into compiled
programs as data: an ARM and the MDM post-trained from it, and every checkpoint along the way, share one
`Architecture` and therefore one compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

from mdm_circuits.errors import ConfigError

AttentionKind = Literal["causal", "bidirectional"]

__all__ = ["Architecture", "AttentionKind", "ConfigError", "ModelConfig"]


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Shape and constants of a pre-norm decoder with RMSNorm, RoPE, grouped-query attention and SwiGLU.

    Attributes:
      vocab_size: rows of the embedding table (and width of the logits).
      d_model: width of the residual stream.
      n_layers: number of decoder blocks.
      n_heads: query heads per layer.
      n_kv_heads: key/value heads per layer; `n_heads` must be a multiple of it (grouped-query attention).
      head_dim: width of one head.
      d_mlp: hidden width of the SwiGLU MLP.
      rope_theta: base of the rotary position embedding (Hugging Face layout: rotated halves, not pairs).
      rope_in_float32: rotate queries and keys in float32 and cast back (LLaDA's `rope_full_precision`);
        otherwise rotate in the activation dtype with the tables cast to it (Hugging Face Qwen2 and Llama).
        The two differ only for bfloat16 parameters.
      norm_eps: epsilon inside the RMSNorm square root.
      qkv_bias: whether the query, key and value projections have biases (Qwen2, Dream).
      tie_embeddings: whether the unembedding is the transposed embedding table.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    rope_theta: float = 10_000.0
    rope_in_float32: bool = False
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ConfigError(f"invalid {type(self).__name__}: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_mlp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                problems.append(f"{name} must be a positive number, got {value!r}")
        for name in ("rope_in_float32", "qkv_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not problems and self.n_heads % self.n_kv_heads:
            problems.append(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if not problems and self.head_dim % 2:
            problems.append(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        return problems

    @property
    def heads_per_kv(self) -> int:
        """Query heads sharing one key/value head (G in the axis glossary)."""
        return self.n_heads // self.n_kv_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig(Architecture):
    """An `Architecture` and the conventions a checkpoint is read with.

    Attributes (besides the architecture's):
      attention: `causal` for an autoregressive model, `bidirectional` for a masked diffusion model.
      logit_shift: True when the output at position i predicts the token at i + 1 (ARMs, and MDMs
        post-trained from them such as Dream and DiffuLLaMA); False when it predicts the token at i (LLaDA).
      mask_token_id: the token an MDM reads as "masked"; None for a model that has none (an ARM).
    """

    attention: AttentionKind = "causal"
    logit_shift: bool = True
    mask_token_id: int | None = None

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if not isinstance(self.logit_shift, bool):
            problems.append(f"logit_shift must be a bool, got {self.logit_shift!r}")
        if self.attention not in get_args(AttentionKind):
            problems.append(f"attention must be one of {get_args(AttentionKind)}, got {self.attention!r}")
        mask = self.mask_token_id
        if mask is not None and not problems and (
                isinstance(mask, bool) or not isinstance(mask, int) or not 0 <= mask < self.vocab_size):
            problems.append(f"mask_token_id must be a token id in [0, vocab_size={self.vocab_size}), got {mask!r}")
        return problems

    @property
    def architecture(self) -> Architecture:
        """The static part: what a compiled program specialises on."""
        return Architecture(**{field.name: getattr(self, field.name) for field in dataclasses.fields(Architecture)})

    @property
    def is_mdm(self) -> bool:
        """A masked diffusion model is one that has a mask token to read."""
        return self.mask_token_id is not None

    @property
    def read_offset(self) -> int:
        """How many positions before an answer token its logits are read (1 with the logit shift, else 0)."""
        return 1 if self.logit_shift else 0

    def read_position(self, position):
        """The output position whose logits predict the token at `position` (an int or an array)."""
        return position - self.read_offset

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown ModelConfig field(s) {unknown}; known fields are {sorted(known)}")
        missing = sorted(
            field.name for field in dataclasses.fields(cls)
            if field.name not in data and field.default is dataclasses.MISSING)
        if missing:
            raise ConfigError(f"ModelConfig is missing required field(s) {missing}")
        return cls(**data)

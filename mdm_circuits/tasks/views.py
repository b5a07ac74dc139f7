"""Posing a task to an ARM or to an MDM: the same question, two views.

- ARM view: the prompt, then the answer tokens (teacher forcing). The logits at position p − 1 predict the
  answer token at p. A right-hand context cannot be given (an ARM reads left to right); tasks that need
  one pose an ARM-form prompt instead (see `tasks.infilling`).
- MDM view: the prompt, the answer positions holding the model's mask token, the right-hand context, then
  optionally `canvas` more mask positions (a generation canvas). The answer at p is read at
  `config.read_position(p)`: p − 1 for Dream and DiffuLLaMA (shifted logits), p for LLaDA.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from mdm_circuits.errors import BatchError
from mdm_circuits.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class View:
    """How an example is posed: to an ARM (`mask_token_id` None) or to an MDM."""

    mask_token_id: int | None = None
    canvas: int = 0

    @classmethod
    def for_model(cls, config: ModelConfig, canvas: int = 0) -> View:
        return cls(config.mask_token_id, canvas) if config.is_mdm else cls()

    @property
    def is_mdm(self) -> bool:
        return self.mask_token_id is not None

    def pose(self, prompt: Sequence[int], answer: Sequence[int], suffix: Sequence[int] = ()
             ) -> tuple[list[int], list[int]]:
        """(tokens, answer positions) of a prompt, its answer and a right-hand context."""
        answer_positions = list(range(len(prompt), len(prompt) + len(answer)))
        if not self.is_mdm:
            if suffix:
                raise BatchError("an ARM reads left to right: a right-hand context after the answer cannot be "
                                 "posed to it; pose the question with its context in the prompt")
            return list(prompt) + list(answer[:-1]), answer_positions
        masked = [self.mask_token_id] * len(answer)
        return list(prompt) + masked + list(suffix) + [self.mask_token_id] * self.canvas, answer_positions

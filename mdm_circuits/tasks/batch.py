"""Clean/corrupted example pairs, and batches of them as arrays.

An example is a clean token sequence, a corrupted one of the same length, the positions of its answer
tokens and, at each answer position, the candidate tokens that count as correct and as incorrect (one
each for IOI; a set for Greater-Than; one per answer token for a multi-token answer). The metric reads the
logits at `config.read_position(p)` for each answer position p: p − 1 for shifted models (ARMs, Dream,
DiffuLLaMA), p for LLaDA.

Axis letters: B examples, T positions, A answer positions, C candidates per answer position.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Bool, Int

from mdm_circuits.errors import BatchError
from mdm_circuits.model.config import ModelConfig
from mdm_circuits.model.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class Example:
    """One clean/corrupted pair, posed to one kind of model (see `diffusion.View`).

    clean, corrupted: token sequences of equal length.
    answer_positions: where the answer's tokens go (the metric reads `config.read_position` of each).
    correct, incorrect: per answer position, the candidate tokens the metric counts for and against; the
      first candidate is the answer itself (the counterfactual for `incorrect`).
    metric: the name of the metric the example is scored with (see `metrics.METRICS`).
    accepted: the token sequences (one token per answer position) that count as solving the example when
      the model generates its answer; by default the first correct candidate at every position.
    """

    clean: Sequence[int]
    corrupted: Sequence[int]
    answer_positions: Sequence[int]
    correct: Sequence[Sequence[int]]
    incorrect: Sequence[Sequence[int]]
    metric: str = "logit_difference"
    accepted: Sequence[Sequence[int]] = ()

    def solved_by(self, answer: Sequence[int]) -> bool:
        """Whether generated answer tokens (one per answer position) solve the example."""
        accepted = self.accepted or [[candidates[0] for candidates in self.correct]]
        return tuple(answer) in {tuple(a) for a in accepted}


@struct.dataclass
class Batch:
    clean: Int[Array, "B T"]
    corrupted: Int[Array, "B T"]
    valid: Bool[Array, "B T"]
    answer_positions: Int[Array, "B A"]
    answer_mask: Bool[Array, "B A"]
    correct: Int[Array, "B A C"]
    correct_mask: Bool[Array, "B A C"]
    incorrect: Int[Array, "B A C"]
    incorrect_mask: Bool[Array, "B A C"]

    @property
    def size(self) -> int:
        return self.clean.shape[0]

    def __getitem__(self, index) -> Batch:
        """Rows of the batch; an integer index gives one example (arrays without the batch axis)."""
        if isinstance(index, int) and not -self.size <= index < self.size:
            raise IndexError(f"example {index} of a batch of {self.size}")
        return jax.tree.map(lambda array: array[index], self)

    def __iter__(self):
        return (self[i] for i in range(self.size))

    def read_positions(self, model: ModelConfig | Transformer) -> Int[Array, "B A"]:
        """Where the logits predicting each answer token are read (padded slots read position 0). `model` is a
        configuration or a model (whose readout offset may be traced data)."""
        return jnp.where(self.answer_mask, model.read_position(self.answer_positions), 0)

    def check(self, config: ModelConfig) -> None:
        """Raise if the arrays' shapes disagree, any example's answer is read outside its own tokens or a token is
        outside the vocabulary. Values are checked only where this process can read them: abstract
        (`jax.ShapeDtypeStruct`), traced and other processes' arrays get the shape checks alone."""
        self._check_shapes()
        if not all(_readable(leaf) for leaf in jax.tree.leaves(self)):
            return
        positions = config.read_position(np.asarray(self.answer_positions))
        lengths = np.asarray(self.valid).sum(axis=1)
        bad = np.asarray(self.answer_mask) & ((positions < 0) | (positions >= lengths[:, None]))
        if bad.any():
            row = int(np.nonzero(bad.any(axis=1))[0][0])
            raise BatchError(
                f"example {row}: an answer at position {int(np.asarray(self.answer_positions)[bad][0])} is read "
                f"from the logits at position {int(positions[bad][0])}, outside its {int(lengths[row])} tokens "
                f"(logit_shift={config.logit_shift}); an ARM needs the tokens before the answer, an MDM the "
                f"masked answer position itself")
        for name in ("clean", "corrupted", "correct", "incorrect"):
            check_token_ids(getattr(self, name), config.vocab_size, f"the {name} tokens")
        self._check_view(config)

    def _check_shapes(self) -> None:
        shapes = {name: tuple(getattr(self, name).shape) for name in
                  ("clean", "corrupted", "valid", "answer_positions", "answer_mask", "correct", "correct_mask",
                   "incorrect", "incorrect_mask")}
        groups = (("clean", "corrupted", "valid"), ("answer_positions", "answer_mask"), ("correct", "correct_mask"),
                  ("incorrect", "incorrect_mask"))
        for group in groups:
            if len({shapes[name] for name in group}) > 1:
                raise BatchError("the batch's " + ", ".join(f"{name} {shapes[name]}" for name in group) + " must have "
                                 "one shape; build batches with tasks.batch.collate")
        if (len({shape[:1] for shape in shapes.values()}) > 1
                or shapes["correct"][:2] != shapes["answer_mask"] or shapes["incorrect"][:2] != shapes["answer_mask"]):
            raise BatchError(f"the batch's arrays disagree on the number of examples or answer positions ({shapes}); "
                             f"build batches with tasks.batch.collate")

    def _check_view(self, config: ModelConfig) -> None:
        """Refuse examples posed in the other model's view: an MDM reads its answer from masked positions; an
        ARM's last answer token is never input (teacher forcing), and a bidirectional model without a mask
        token would see the answer it is asked for."""
        positions, lengths = np.asarray(self.answer_positions), np.asarray(self.valid).sum(axis=1)
        answers = np.asarray(self.answer_mask)
        if config.is_mdm:
            held = np.take_along_axis(np.asarray(self.clean), np.minimum(positions, self.clean.shape[1] - 1), axis=1)
            wrong = answers & (held != config.mask_token_id)
            if wrong.any():
                row = int(np.nonzero(wrong.any(axis=1))[0][0])
                raise BatchError(f"example {row}: an answer position holds token {int(held[wrong][0])}, not the MDM's "
                                 f"mask token {config.mask_token_id}; pose the examples in the MDM view "
                                 f"(View.for_model(config))")
        elif config.attention != "causal":
            raise BatchError("a bidirectional model without a mask token cannot be asked a question: it would see "
                             "the answer; give it a mask token (an MDM config) or causal attention")
        else:
            last = np.max(np.where(answers, positions, -1), axis=1)
            inside = last < lengths
            if inside.any():
                row = int(np.nonzero(inside)[0][0])
                raise BatchError(f"example {row}: its last answer token sits inside the {int(lengths[row])} input "
                                 f"tokens; an ARM must not be given the answer it predicts (these look like MDM-view "
                                 f"examples: pose them with View() for an ARM)")


def _readable(array) -> bool:
    """Whether this process holds `array`'s values (not abstract, traced, or split over other processes)."""
    if isinstance(array, np.ndarray):
        return True
    return isinstance(array, jax.Array) and not isinstance(array, jax.core.Tracer) and array.is_fully_addressable


def check_token_ids(tokens, vocab_size: int, what: str = "tokens") -> None:
    """Refuse token ids outside [0, vocab_size): above it the embedding is NaN, below it they wrap to other
    tokens, and either way every number computed from them would be wrong."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)]
        raise BatchError(f"{what} hold token ids outside the vocabulary [0, {vocab_size}) (e.g. {int(bad[0])}); a "
                         f"tokenizer of another model, or ids computed wrongly")


def collate(examples: Sequence[Example], pad_id: int = 0) -> Batch:
    """Pad examples (right padding) into one batch, checking that each clean/corrupted pair aligns."""
    if not examples:
        raise BatchError("no examples")
    for i, example in enumerate(examples):
        if len(example.clean) != len(example.corrupted):
            raise BatchError(
                f"example {i}: clean has {len(example.clean)} tokens, corrupted {len(example.corrupted)}; "
                f"attribution compares the two position by position, so they must have the same length")
        if not (len(example.answer_positions) == len(example.correct) == len(example.incorrect)) or not len(
                example.answer_positions):
            raise BatchError(f"example {i}: needs one or more answer positions, each with correct and "
                             f"incorrect candidates ({len(example.answer_positions)} positions, "
                             f"{len(example.correct)} correct, {len(example.incorrect)} incorrect)")
        if any(not candidates for candidates in (*example.correct, *example.incorrect)):
            raise BatchError(f"example {i}: an answer position has no candidate tokens")
    length = max(len(example.clean) for example in examples)
    n_answers = max(len(example.answer_positions) for example in examples)
    n_candidates = max(len(c) for example in examples for c in (*example.correct, *example.incorrect))

    def padded(rows, width):
        return np.array([list(row) + [pad_id] * (width - len(row)) for row in rows], dtype=np.int32)

    def mask(lengths, width):
        return np.arange(width)[None, :] < np.array(lengths)[:, None]

    def candidates(field):
        tokens = np.zeros((len(examples), n_answers, n_candidates), np.int32)
        present = np.zeros((len(examples), n_answers, n_candidates), bool)
        for i, example in enumerate(examples):
            for a, options in enumerate(getattr(example, field)):
                tokens[i, a, : len(options)] = options
                present[i, a, : len(options)] = True
        return jnp.asarray(tokens), jnp.asarray(present)

    correct, correct_mask = candidates("correct")
    incorrect, incorrect_mask = candidates("incorrect")
    return Batch(
        clean=jnp.asarray(padded([e.clean for e in examples], length)),
        corrupted=jnp.asarray(padded([e.corrupted for e in examples], length)),
        valid=jnp.asarray(mask([len(e.clean) for e in examples], length)),
        answer_positions=jnp.asarray(padded([e.answer_positions for e in examples], n_answers)),
        answer_mask=jnp.asarray(mask([len(e.answer_positions) for e in examples], n_answers)),
        correct=correct, correct_mask=correct_mask, incorrect=incorrect, incorrect_mask=incorrect_mask,
    )


def stack_batches(batches: Sequence[Batch]) -> Batch:
    """Batches of equally many examples on a leading model axis (`[M, B, ...]`), each padded to the longest
    sequence, answer and candidate list: one batch per model of a stack, e.g. the same questions posed to an
    ARM in its view and to an MDM in its own. Padding is never read: padded positions are invalid, padded
    answers and candidates masked out."""
    sizes = {batch.size for batch in batches}
    if len(sizes) != 1:
        raise BatchError(f"the batches of a stack must hold equally many examples, got {sorted(sizes)}; pose the "
                         "same questions to every model")

    def stacked(*arrays: Array) -> Array:
        shape = np.max([array.shape for array in arrays], axis=0)
        return jnp.stack([jnp.pad(array, [(0, want - have) for have, want in zip(array.shape, shape)])
                          for array in arrays])

    return jax.tree.map(stacked, *batches)

"""Small named relayouts from checkpoint tensors (PyTorch `[out, in]` layout) to the model's parameters.

Every transform is lossless: conversion only moves numbers, it never folds norms, rescales queries or
otherwise changes the computation. The name appears in error messages.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    apply: Callable[[np.ndarray], np.ndarray]

    def __call__(self, array: np.ndarray) -> np.ndarray:
        return self.apply(array)

    def then(self, other: Transform) -> Transform:
        return Transform(f"{self.name} then {other.name}", lambda array: other(self(array)))


identity = Transform("identity", lambda array: array)

transpose = Transform("transpose", lambda array: array.T)


def split_output_heads(n_heads: int) -> Transform:
    """A q/k/v projection `[n * E, D]` to per-head weights `[D, n, E]`."""
    return Transform(
        f"split_output_heads({n_heads})",
        lambda array: array.T.reshape(array.shape[1], n_heads, array.shape[0] // n_heads))


def split_bias_heads(n_heads: int) -> Transform:
    """A q/k/v bias `[n * E]` to `[n, E]`."""
    return Transform(
        f"split_bias_heads({n_heads})", lambda array: array.reshape(n_heads, array.shape[0] // n_heads))


def split_input_heads(n_heads: int) -> Transform:
    """The output projection `[D, n * E]` to per-head weights `[n, E, D]`."""
    return Transform(
        f"split_input_heads({n_heads})",
        lambda array: array.T.reshape(n_heads, array.shape[1] // n_heads, array.shape[0]))


def undo_gguf_rope_permutation(n_heads: int) -> Transform:
    """Invert llama.cpp's q/k row permutation (interleaved rotary pairs back to Hugging Face's halves).

    llama.cpp's converter applies, per head of E rows, `reshape(2, E/2).swapaxes` so the two rotary halves
    become adjacent pairs; here the rows of each head go back from (E/2, 2) to (2, E/2).
    """

    def apply(array: np.ndarray) -> np.ndarray:
        rows = array.shape[0]
        per_head = array.reshape(n_heads, rows // n_heads // 2, 2, *array.shape[1:])
        return per_head.swapaxes(1, 2).reshape(array.shape)

    return Transform(f"undo_gguf_rope_permutation({n_heads})", apply)

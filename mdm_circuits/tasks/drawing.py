"""Drawing a task's examples: random attempts, each kept or refused, until enough are kept."""

from __future__ import annotations

from typing import Callable

from mdm_circuits.errors import BatchError
from mdm_circuits.tasks.batch import Example


def draw(n: int, attempt: Callable[[int], Example | None], *, what: str, max_length: int | None,
         patience: int = 50) -> list[Example]:
    """Call `attempt(number kept so far)` until `n` examples are kept.

    An attempt is refused when it returns None, when its clean and corrupted runs differ in length, or when
    it is longer than `max_length` tokens. After `patience` · n attempts the draw fails clearly."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise BatchError(f"the number of {what} must be a positive integer, got {n!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise BatchError(f"max_length must be a positive integer of tokens (or None), got {max_length!r}")
    examples, attempts = [], 0
    while len(examples) < n:
        attempts += 1
        if attempts > patience * n:
            raise BatchError(f"could not build {n} {what} of at most {max_length} tokens")
        example = attempt(len(examples))
        if example is None or len(example.clean) != len(example.corrupted) or (
                max_length is not None and len(example.clean) > max_length):
            continue
        examples.append(example)
    return examples

"""Countdown: reach a target with a few numbers (each used once) and + and −, evaluated left to right.

Clean: "Numbers: 3, 5, 12. Target: 14. Solution:" → " 12+5-3" (the first solution in a fixed enumeration
order). Corrupted: the same numbers with another target whose first solution has the same number of
tokens (" 12-5+3" for target 10). The metric is log P(clean solution) − log P(corrupted solution), summed
over the answer's tokens. Every example is solvable by construction (the target is the value of a random
expression) and checked by brute force; every solution of the answer's token length counts as correct.
"""

from __future__ import annotations

import itertools
import random
import zlib

import tokenizers

from mdm_circuits.tasks.batch import Example
from mdm_circuits.tasks.drawing import draw
from mdm_circuits.tasks.metrics import log_probability_difference
from mdm_circuits.tasks.splits import Split, as_split
from mdm_circuits.tasks.text import continuation, prompt
from mdm_circuits.tasks.views import View

NAME = "countdown"
METRIC = log_probability_difference

PROMPT = "Numbers: {numbers}. Target: {target}. Solution:"
N_NUMBERS = 3
LARGEST = 20


def _expressions(numbers: tuple[int, ...]):
    """(text, value) of every expression using each number once with + and − (left to right), in a fixed
    order: permutations in order, then operators, + before −."""
    for order in dict.fromkeys(itertools.permutations(numbers)):
        for operators in itertools.product("+-", repeat=len(numbers) - 1):
            value = order[0]
            for operator, number in zip(operators, order[1:]):
                value = value + number if operator == "+" else value - number
            yield str(order[0]) + "".join(o + str(x) for o, x in zip(operators, order[1:])), value


def held_out(numbers: tuple[int, ...]) -> bool:
    """Whether a set of numbers belongs to the test split (one set in five, by a hash independent of order)."""
    return zlib.crc32(",".join(map(str, sorted(numbers))).encode()) % 5 == 0


def solutions(numbers: tuple[int, ...], target: int) -> list[str]:
    """Every expression of the numbers (see `_expressions`) that equals `target`, in the fixed order."""
    return [text for text, value in _expressions(numbers) if value == target]


def examples(tokenizer: tokenizers.Tokenizer, n: int, *, seed: int = 0, view: View = View(),
             max_length: int | None = None, split: Split | str = Split.ALL) -> list[Example]:
    """`n` Countdown pairs, reproducible for a seed (the same pairs in either view). `split`: "test" for the
    sets of numbers `held_out` marks, "train" for the others, or "all"."""
    split = as_split(split)
    rng = random.Random(seed)

    def attempt(kept: int) -> Example | None:
        numbers = tuple(rng.sample(range(1, LARGEST + 1), N_NUMBERS))
        while not split.keeps(held_out(numbers)):
            numbers = tuple(rng.sample(range(1, LARGEST + 1), N_NUMBERS))
        reachable = sorted({value for _, value in _expressions(numbers) if 1 <= value < 100})
        target, other = rng.sample(reachable, 2)
        listed = ", ".join(map(str, numbers))
        question = prompt(tokenizer, PROMPT.format(numbers=listed, target=target))
        other_question = prompt(tokenizer, PROMPT.format(numbers=listed, target=other))
        answer = continuation(tokenizer, " " + solutions(numbers, target)[0])
        other_answer = continuation(tokenizer, " " + solutions(numbers, other)[0])
        if len(question) != len(other_question) or len(answer) != len(other_answer) or answer == other_answer:
            return None
        (clean, positions), (corrupted, _) = view.pose(question, answer), view.pose(other_question, other_answer)
        accepted = [tokens for tokens in (continuation(tokenizer, " " + s) for s in solutions(numbers, target))
                    if len(tokens) == len(answer)]
        return Example(clean, corrupted, positions, [[t] for t in answer], [[t] for t in other_answer],
                       METRIC.name, accepted=accepted)

    return draw(n, attempt, what="Countdown pairs", max_length=max_length, patience=200)

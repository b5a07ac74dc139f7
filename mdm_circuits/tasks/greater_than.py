"""Greater-Than (Hanna et al., 2023).

Clean: "The war lasted from the year 1732 to the year 17" → any ending larger than 32. Corrupted: the start
year is the lowest one the task poses (`counterfactual_start`: "... from the year 1702 to the year 17"), so
nearly every ending is larger and the prompt no longer pins down the threshold. The metric is the
probability mass on the endings larger than the clean start minus the mass on the others, at the answer
position; both runs are scored with the clean question's sets, so the gap measures how much the clean start
year moves the model's mass above it.

The task adapts to how the tokenizer writes years:
- two-digit tokens (GPT-2-like: "1732" = "17" "32"): the answer is one two-digit token, YY > XX, and the
  start years end in 02-98;
- single digits (Qwen2, Llama, SmolLM2: "1732" = "1" "7" "3" "2"): the answer is the tens digit, and the
  start year always ends in 9 (1709, 1729, 1759...), so an ending is larger exactly when its tens digit is.
A tokenizer that writes years any other way is refused.

Why the lowest posed start, not Hanna et al.'s "01": the counterfactual must be a prompt the models know
(DESIGN §6.6). The default pair's training text holds only posed start years and larger endings, so the
token "01" never occurs in it: a corrupted "...01" feeds an untrained embedding, and the models put their
mass on late endings, which the clean sets count as correct. Measured on the shipped pair (200 test-split
questions; share of questions with a positive clean − corrupted gap, and the median gap; "pooled" = the 159
both models solve):

    corrupted start        ARM share (pooled)  median   MDM share (pooled)  median
    01 (Hanna et al.)      0.20 (0.21)         -0.075   0.50 (0.52)         -0.000
    02 (lowest posed)      1.00 (1.00)         +0.736   0.985 (0.99)        +0.343
    start - 20 (>= 02)     0.83 (0.93)         +0.244   0.815 (0.88)        +0.143
    start - 40 (>= 02)     0.995 (1.00)        +0.612   0.915 (0.97)        +0.229
    start + 10             0.17 (0.20)         -0.079   0.015 (0.02)        -0.321

The models do read the start year (a start 10 higher raises the corrupted metric), but a start above the
clean one cannot work with the clean sets: an answer above it is above the clean start too. The lowest
posed start works for both models and keeps Hanna et al.'s idea (the lowest start year) within the task's
own years; it was chosen by these shares alone (`analysis.validity`). Digit by digit (SmolLM2-135M-Instruct,
200 test questions) "09" gives every question a positive gap too (median +1.79; "01": +1.73).
A question whose clean start is already the lowest (only the train and "all" splits pose it) has no
contrast: its corrupted prompt is its clean one.
"""

from __future__ import annotations

import random

import tokenizers

from mdm_circuits.errors import BatchError
from mdm_circuits.tasks.batch import Example
from mdm_circuits.tasks.drawing import draw
from mdm_circuits.tasks.metrics import probability_difference
from mdm_circuits.tasks.splits import Split, as_split
from mdm_circuits.tasks.text import continuation, prompt
from mdm_circuits.tasks.views import View

NAME = "greater_than"
METRIC = probability_difference

NOUNS = ("war", "conflict", "expedition", "dynasty", "reign", "strike", "drought", "campaign", "occupation",
         "journey", "partnership", "tradition")
TEMPLATES = (
    "The {noun} lasted from the year {start} to the year {century}",
    "The {noun} started in the year {start} and ended in the year {century}",
    "The {noun} went on from {start} to {century}",
)
CENTURIES = tuple(range(11, 20))
HELD_OUT_DECADES = (2, 5, 7)  # the test split's start years end in 20-29, 50-59 or 70-79


def year_tokens(tokenizer: tokenizers.Tokenizer) -> str:
    """'pairs' if the tokenizer writes a year's last two digits as one token after its century, 'digits' if
    it writes every digit as its own token."""
    century = continuation(tokenizer, " 17")
    years = {ending: continuation(tokenizer, f" 17{ending:02d}") for ending in range(100)}
    if all(tokens[: len(century)] == century and len(tokens) == len(century) + 1 for tokens in years.values()):
        return "pairs"
    digits = [continuation(tokenizer, str(d)) for d in range(10)]
    if all(len(d) == 1 for d in digits) and all(
            tokens[-2:] == [digits[ending // 10][0], digits[ending % 10][0]] for ending, tokens in years.items()):
        return "digits"
    raise BatchError("this tokenizer writes years neither as a century and a two-digit token nor digit by digit; "
                     f"' 1732' becomes {continuation(tokenizer, ' 1732')}; Greater-Than cannot pose its question")


def start_endings(mode: str) -> range:
    """The endings of the start years the task poses, for a year_tokens `mode`: 02-98 as two-digit tokens;
    09, 19 ... 89 digit by digit (ending in 9, a larger ending is one with a larger tens digit)."""
    return range(2, 99) if mode == "pairs" else range(9, 99, 10)


def counterfactual_start(mode: str) -> int:
    """The corrupted prompt's start ending: the lowest the task poses (see the module doc)."""
    return start_endings(mode)[0]


def examples(tokenizer: tokenizers.Tokenizer, n: int, *, seed: int = 0, view: View = View(),
             max_length: int | None = None, split: Split | str = Split.ALL) -> list[Example]:
    """`n` Greater-Than pairs, reproducible for a seed (the same pairs in either view). `split`: "test" for
    start years ending in the decades `HELD_OUT_DECADES`, "train" for the others, or "all"."""
    split = as_split(split)
    mode = year_tokens(tokenizer)
    starts = [s for s in start_endings(mode) if split.keeps(s // 10 in HELD_OUT_DECADES)]
    lowest = counterfactual_start(mode)
    rng = random.Random(seed)
    endings_of = {}  # century -> {ending: its token}, for two-digit endings

    def attempt(kept: int) -> Example:
        template, noun, century = rng.choice(TEMPLATES), rng.choice(NOUNS), rng.choice(CENTURIES)
        start = rng.choice(starts)
        if mode == "pairs":
            if century not in endings_of:
                endings_of[century] = {e: continuation(tokenizer, f" {century}{e:02d}")[-1] for e in range(100)}
            endings = endings_of[century]
            larger = [endings[e] for e in range(start + 1, 100)]
            others = [endings[e] for e in range(0, start + 1)]
        else:
            tens = start // 10
            digit = {d: continuation(tokenizer, str(d))[0] for d in range(10)}
            larger = [digit[d] for d in range(tens + 1, 10)]
            others = [digit[d] for d in range(0, tens + 1)]
        clean = prompt(tokenizer, template.format(noun=noun, start=f"{century}{start:02d}", century=century))
        corrupted = prompt(tokenizer, template.format(noun=noun, start=f"{century}{lowest:02d}", century=century))
        (clean, positions), (corrupted, _) = view.pose(clean, [larger[0]]), view.pose(corrupted, [larger[0]])
        return Example(clean, corrupted, positions, [larger], [others], METRIC.name,
                       accepted=[[token] for token in larger])

    return draw(n, attempt, what="Greater-Than prompts", max_length=max_length)

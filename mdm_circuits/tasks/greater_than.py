"""Greater-Than (Hanna et al., 2023).

Clean: "The war lasted from the year 1732 to the year 17" → any ending larger than 32. Corrupted: the start
year ends in 01 ("... from the year 1701 to the year 17"), so nearly every ending is larger and the prompt
no longer pins down the threshold. The metric is the probability mass on the endings larger than the start
minus the mass on the others, at the answer position.

The task adapts to how the tokenizer writes years:
- two-digit tokens (GPT-2-like: "1732" = "17" "32"): the answer is one two-digit token, YY > XX;
- single digits (Qwen2, Llama, SmolLM2: "1732" = "1" "7" "3" "2"): the answer is the tens digit, and the
  start year always ends in 9 (1729, 1759...), so an ending is larger exactly when its tens digit is.
A tokenizer that writes years any other way is refused.
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


def examples(tokenizer: tokenizers.Tokenizer, n: int, *, seed: int = 0, view: View = View(),
             max_length: int | None = None, split: Split | str = Split.ALL) -> list[Example]:
    """`n` Greater-Than pairs, reproducible for a seed (the same pairs in either view). `split`: "test" for
    start years ending in the decades `HELD_OUT_DECADES`, "train" for the others, or "all"."""
    split = as_split(split)
    mode = year_tokens(tokenizer)
    starts = [s for s in (range(2, 99) if mode == "pairs" else range(9, 99, 10))
              if split.keeps(s // 10 in HELD_OUT_DECADES)]
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
        corrupted = prompt(tokenizer, template.format(noun=noun, start=f"{century}01", century=century))
        (clean, positions), (corrupted, _) = view.pose(clean, [larger[0]]), view.pose(corrupted, [larger[0]])
        return Example(clean, corrupted, positions, [larger], [others], METRIC.name,
                       accepted=[[token] for token in larger])

    return draw(n, attempt, what="Greater-Than prompts", max_length=max_length)

"""Semantic infilling: a word fixed by the context to its right.

Clean: "The ___ barked at the mailman." → " dog"; corrupted: the deciding word swapped ("meowed") → " cat".
The metric is the logit difference, answer minus counterfactual.
- MDM view: the word's position holds the mask token in place, the deciding context after it.
- ARM view: the same sentence as a fill-in-the-blank question whose answer restates its start, "Fill in
  the blank: The ___ barked at the mailman.\nThe" → " dog", so the deciding context lies to the left of
  the answer.

Frames whose answers are not single tokens, or whose two deciding words differ in token count, are left
out for the tokenizer at hand.
"""

from __future__ import annotations

import random

import tokenizers

from mdm_circuits.batch import BatchError, Example
from mdm_circuits.diffusion import View
from mdm_circuits.metrics import logit_difference
from mdm_circuits.tasks.drawing import draw
from mdm_circuits.tasks.text import continuation, prompt

NAME = "infilling"
METRIC = logit_difference

BLANK = "___"
ARM_QUESTION = "Fill in the blank:"
# (sentence, (answer, deciding word), (other answer, other deciding word)); {word} and {decider} placeholders.
FRAMES = (
    ("The {word} {decider} at the mailman.", ("dog", "barked"), ("cat", "meowed")),
    ("The {word} {decider} in the stable.", ("horse", "neighed"), ("cow", "mooed")),
    ("The {word} {decider} in the forest at night.", ("owl", "hooted"), ("wolf", "howled")),
    ("The {word} {decider} across the sea.", ("ship", "sailed"), ("plane", "flew")),
    ("The {word} {decider} on the sofa.", ("cat", "purred"), ("dog", "barked")),
    ("The {word} {decider} behind the wall.", ("mouse", "squeaked"), ("bird", "chirped")),
    ("The {word} {decider} through the grass.", ("snake", "slithered"), ("rabbit", "hopped")),
    ("The {word} {decider} in the kitchen.", ("phone", "rang"), ("kettle", "whistled")),
    ("The {word} {decider} on the pond.", ("duck", "quacked"), ("frog", "croaked")),
    ("The {word} {decider} around the flowers.", ("bee", "buzzed"), ("butterfly", "fluttered")),
    ("The {word} {decider} in the jungle.", ("lion", "roared"), ("monkey", "chattered")),
    ("The {word} {decider} in the field.", ("sheep", "bleated"), ("cow", "mooed")),
    ("The {word} {decider} in the mud.", ("pig", "oinked"), ("duck", "quacked")),
    ("The {word} {decider} at dawn.", ("rooster", "crowed"), ("dog", "barked")),
    ("The {word} {decider} in the river.", ("fish", "swam"), ("bear", "fished")),
    ("The {word} {decider} over the fence.", ("horse", "jumped"), ("ball", "bounced")),
)


def usable_frames(tokenizer: tokenizers.Tokenizer) -> list[tuple[str, tuple[str, str], tuple[str, str]]]:
    """The frames whose answers are single tokens and whose deciding words have the same token count."""
    usable = []
    for frame in FRAMES:
        sentence, (word, decider), (other, other_decider) = frame
        words = [continuation(tokenizer, " " + w) for w in (word, other)]
        deciders = [continuation(tokenizer, " " + d) for d in (decider, other_decider)]
        if all(len(w) == 1 for w in words) and words[0] != words[1] and len(deciders[0]) == len(deciders[1]):
            usable.append(frame)
    return usable


def _pose(tokenizer, view, sentence, answer_token, decider):
    before, after = sentence.split("{word}")
    after = after.format(decider=decider)
    if view.is_mdm:
        return view.pose(prompt(tokenizer, before.rstrip()), [answer_token], continuation(tokenizer, after))
    question = prompt(tokenizer, ARM_QUESTION + " " + before + BLANK + after + "\n" + before.rstrip())
    return view.pose(question, [answer_token])


def examples(tokenizer: tokenizers.Tokenizer, n: int, *, seed: int = 0, view: View = View(),
             max_length: int | None = None) -> list[Example]:
    """`n` infilling pairs, reproducible for a seed (the same pairs in either view); each frame is used in
    both directions (either answer as the clean one)."""
    frames = usable_frames(tokenizer)
    if len(frames) < 2:
        raise BatchError(f"only {len(frames)} infilling frames have single-token answers and deciding words of "
                         f"equal length for this tokenizer; at least 2 are needed")
    rng = random.Random(seed)

    def attempt(kept: int) -> Example:
        sentence, first, second = rng.choice(frames)
        (word, decider), (other, other_decider) = (first, second) if rng.random() < 0.5 else (second, first)
        answer, counterfactual = continuation(tokenizer, " " + word)[0], continuation(tokenizer, " " + other)[0]
        clean, positions = _pose(tokenizer, view, sentence, answer, decider)
        corrupted, _ = _pose(tokenizer, view, sentence, answer, other_decider)
        return Example(clean, corrupted, positions, [[answer]], [[counterfactual]], METRIC.name)

    return draw(n, attempt, what="infilling prompts", max_length=max_length)

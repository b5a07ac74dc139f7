"""Indirect Object Identification (Wang et al., 2022).

Clean: "When Mary and John went to the store, John gave a drink to" → " Mary" (the indirect object), with
the subject " John" as the counterfactual; ABBA and BABA orders. Corrupted (ABC): the same template with
three different names, so no name repeats and the sentence no longer says who the indirect object is. The
metric is the logit difference, indirect object minus subject.

Names, places and objects must each be one token (with their leading space) for the tokenizer given;
those that are not are left out, and the generator fails clearly if too few remain.
"""

from __future__ import annotations

import random

import tokenizers

from mdm_circuits.errors import BatchError
from mdm_circuits.tasks.batch import Example
from mdm_circuits.tasks.drawing import draw
from mdm_circuits.tasks.metrics import logit_difference
from mdm_circuits.tasks.splits import Split, as_split
from mdm_circuits.tasks.text import prompt, single_tokens
from mdm_circuits.tasks.views import View

NAME = "ioi"
METRIC = logit_difference

# {A} is the indirect object, {B} the subject (repeated); BABA order swaps their first mention. No template
# starts with a name: a name opening the text would be a different token (no leading space).
TEMPLATES = (
    "When {A} and {B} went to the {place}, {B} gave a {object} to",
    "When {A} and {B} got a {object} at the {place}, {B} decided to give it to",
    "After {A} and {B} went to the {place}, {B} gave a {object} to",
    "While {A} and {B} were working at the {place}, {B} gave a {object} to",
    "While {A} and {B} were commuting to the {place}, {B} gave a {object} to",
    "After the lunch, {A} and {B} went to the {place}. {B} gave a {object} to",
    "Afterwards, {A} and {B} went to the {place}. {B} gave a {object} to",
    "Then, {A} and {B} had a long argument. Afterwards {B} said to",
    "Then, {A} and {B} were thinking about going to the {place}. {B} wanted to give a {object} to",
    "Friends {A} and {B} found a {object} at the {place}. {B} gave it to",
    "Then, {A} and {B} had a lot of fun at the {place}. {B} gave a {object} to",
    "The {place} that {A} and {B} went to had a {object}. {B} gave it to",
)
NAMES = (
    "Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Anna", "Paul", "Emma", "Mark", "Laura",
    "Kate", "Sarah", "Lisa", "Mike", "David", "Peter", "Rose", "Alice", "Bob", "Jack", "Luke", "Ben",
    "Sam", "Adam", "Jane", "Max", "Ryan", "Eric", "Steve", "Kevin", "Brian", "Jessica", "Michael",
    "Robert", "William", "Richard", "Thomas", "Charles", "Daniel", "Matthew", "George", "Henry",
)
HELD_OUT_TEMPLATES = (0, 2, 6)  # the test split's templates; their words all occur in the others
PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station", "park",
          "beach", "market", "library")
OBJECTS = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack", "book", "ball",
           "letter", "gift")


def _words(tokenizer, words, kind, needed):
    found = single_tokens(tokenizer, words)
    if len(found) < needed:
        raise BatchError(f"only {len(found)} of the {kind} are single tokens for this tokenizer "
                         f"({sorted(found)}); IOI needs at least {needed}")
    return sorted(found)


def examples(tokenizer: tokenizers.Tokenizer, n: int, *, seed: int = 0, view: View = View(),
             max_length: int | None = None, split: Split | str = Split.ALL) -> list[Example]:
    """`n` IOI pairs, alternating ABBA and BABA, reproducible for a seed (the same pairs in either view).

    Args:
      tokenizer: the model's tokenizer; names, places and objects are kept only where they are one token.
      n: number of pairs.
      seed: the random seed (templates, names, places, objects).
      view: ARM (the answer is the token after the prompt) or MDM (a masked answer position is appended).
      max_length: leave out examples longer than this many tokens (as posed).
      split: "train" or "test" (templates `HELD_OUT_TEMPLATES`), or "all".
    """
    split = as_split(split)
    templates = [t for i, t in enumerate(TEMPLATES) if split.keeps(i in HELD_OUT_TEMPLATES)]
    names = _words(tokenizer, NAMES, "names", 5)
    places, objects = _words(tokenizer, PLACES, "places", 1), _words(tokenizer, OBJECTS, "objects", 1)
    name_ids = single_tokens(tokenizer, names)
    rng = random.Random(seed)

    def attempt(kept: int) -> Example:
        template = rng.choice(templates)
        a, b, c, d, e = rng.sample(names, 5)
        fill = dict(place=rng.choice(places), object=rng.choice(objects))
        first, second = (b, a) if kept % 2 else (a, b)
        clean = prompt(tokenizer, template.replace("{A} and {B}", f"{first} and {second}").format(A=a, B=b, **fill))
        # ABC: the two first mentions and the repeated subject become three new names.
        corrupted = prompt(tokenizer, template.replace("{A} and {B}", f"{c} and {d}").format(A=c, B=e, **fill))
        (clean, positions), (corrupted, _) = view.pose(clean, [name_ids[a]]), view.pose(corrupted, [name_ids[a]])
        return Example(clean, corrupted, positions, [[name_ids[a]]], [[name_ids[b]]], METRIC.name)

    return draw(n, attempt, what="IOI prompts", max_length=max_length)

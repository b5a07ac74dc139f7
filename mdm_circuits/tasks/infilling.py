"""Semantic infilling: a word fixed by the context to its right.

Clean: "The ___ barked at the mailman." → " dog"; corrupted: the deciding word swapped ("meowed") → " cat".
The metric is the logit difference, answer minus counterfactual.
- MDM view: the word's position holds the mask token in place, the deciding context after it.
- ARM view: the same sentence as a fill-in-the-blank question whose answer restates its start, "Fill in
  the blank: The ___ barked at the mailman.\nThe" → " dog", so the deciding context lies to the left of
  the answer.
`form="question"` poses the MDM the ARM's question too, its answer position masked at the end and nothing
after it, so both models can take one prompt (a view-matched comparison); the default, "native", poses each
view its own form above. An ARM takes the question in either form.

A frame holds several (word, decider) choices; any two make a pair. Choices whose answer is not a single
token are left out for the tokenizer at hand, and only choices whose deciders have equal token counts are
paired.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import random
from typing import Literal, get_args

import tokenizers

from mdm_circuits.errors import BatchError
from mdm_circuits.tasks.batch import Example
from mdm_circuits.tasks.drawing import draw
from mdm_circuits.tasks.metrics import logit_difference
from mdm_circuits.tasks.splits import Split, as_split
from mdm_circuits.tasks.text import continuation, prompt
from mdm_circuits.tasks.views import View

NAME = "infilling"
METRIC = logit_difference

BLANK = "___"
ARM_QUESTION = "Fill in the blank:"

Form = Literal["native", "question"]
FORMS = get_args(Form)


@dataclasses.dataclass(frozen=True)
class Frame:
    """A sentence with a blank ({word}) decided by a later word ({decider}), and the (word, decider) choices
    that fill it. Each decider fits its own word and none of the others, so any two choices make a clean
    and a corrupted question."""

    sentence: str
    choices: tuple[tuple[str, str], ...]


FRAMES = (
    Frame("The {word} {decider} at the mailman.", (("dog", "barked"), ("cat", "meowed"), ("parrot", "squawked"))),
    Frame("The {word} {decider} in the stable.", (("horse", "neighed"), ("cow", "mooed"), ("donkey", "brayed"))),
    Frame("The {word} {decider} in the forest at night.",
          (("owl", "hooted"), ("wolf", "howled"), ("bear", "growled"), ("cricket", "chirped"))),
    Frame("The {word} {decider} across the sea.", (("ship", "sailed"), ("plane", "flew"), ("whale", "swam"))),
    Frame("The {word} {decider} on the sofa.", (("cat", "purred"), ("dog", "barked"), ("baby", "giggled"))),
    Frame("The {word} {decider} behind the wall.", (("mouse", "squeaked"), ("bird", "chirped"), ("clock", "ticked"))),
    Frame("The {word} {decider} through the grass.", (("snake", "slithered"), ("rabbit", "hopped"))),
    Frame("The {word} {decider} in the kitchen.",
          (("phone", "rang"), ("kettle", "whistled"), ("clock", "ticked"), ("fridge", "hummed"),
           ("tap", "dripped"), ("bacon", "sizzled"), ("oven", "beeped"), ("chef", "cooked"))),
    Frame("The {word} {decider} on the pond.", (("duck", "quacked"), ("frog", "croaked"), ("swan", "glided"))),
    Frame("The {word} {decider} around the flowers.", (("bee", "buzzed"), ("butterfly", "fluttered"))),
    Frame("The {word} {decider} in the jungle.",
          (("lion", "roared"), ("monkey", "chattered"), ("elephant", "trumpeted"), ("parrot", "squawked"),
           ("snake", "hissed"))),
    Frame("The {word} {decider} in the field.", (("sheep", "bleated"), ("cow", "mooed"), ("tractor", "rumbled"))),
    Frame("The {word} {decider} in the mud.", (("pig", "oinked"), ("duck", "quacked"), ("worm", "wriggled"))),
    Frame("The {word} {decider} at dawn.", (("rooster", "crowed"), ("dog", "barked"), ("sun", "rose"))),
    Frame("The {word} {decider} in the river.", (("fish", "swam"), ("bear", "fished"), ("boat", "drifted"))),
    Frame("The {word} {decider} over the fence.", (("horse", "jumped"), ("ball", "bounced"))),
    Frame("The {word} {decider} in the farmyard.",
          (("dog", "barked"), ("cat", "meowed"), ("cow", "mooed"), ("horse", "neighed"), ("sheep", "bleated"),
           ("pig", "oinked"), ("duck", "quacked"), ("rooster", "crowed"), ("donkey", "brayed"), ("hen", "clucked"),
           ("goose", "honked"), ("turkey", "gobbled"))),
    Frame("The {word} {decider} all day.",
          (("baker", "baked"), ("painter", "painted"), ("writer", "wrote"), ("teacher", "taught"),
           ("builder", "built"), ("driver", "drove"), ("singer", "sang"), ("dancer", "danced"),
           ("hunter", "hunted"), ("fisherman", "fished"), ("swimmer", "swam"), ("runner", "ran"),
           ("climber", "climbed"), ("gardener", "weeded"))),
    Frame("The {word} {decider} in the pan.",
          (("bacon", "sizzled"), ("popcorn", "popped"), ("soup", "simmered"), ("butter", "melted"),
           ("water", "boiled"))),
    Frame("The {word} {decider} in the distance.",
          (("bell", "tolled"), ("drum", "boomed"), ("siren", "wailed"), ("thunder", "rumbled"),
           ("wolf", "howled"))),
    Frame("The {word} {decider} in the dark.",
          (("candle", "flickered"), ("star", "twinkled"), ("firefly", "glowed"), ("owl", "hooted"),
           ("door", "creaked"))),
    Frame("The {word} {decider} over the hills.",
          (("wind", "blew"), ("thunder", "rumbled"), ("rain", "poured"), ("lightning", "flashed"),
           ("sun", "shone"), ("eagle", "soared"))),
    Frame("The {word} {decider} the paper.",
          (("stapler", "stapled"), ("eraser", "erased"), ("printer", "printed"), ("shredder", "shredded"))),
    Frame("The {word} {decider} the floor.", (("broom", "swept"), ("mop", "wiped"), ("dog", "licked"))),
    Frame("The {word} {decider} in the garden.",
          (("flower", "bloomed"), ("bee", "buzzed"), ("cricket", "chirped"), ("sprinkler", "sprayed"))),
    Frame("The {word} {decider} down the hill.",
          (("ball", "rolled"), ("river", "flowed"), ("skier", "skied"), ("sled", "slid"))),
    Frame("The {word} {decider} on the branch.", (("bird", "perched"), ("apple", "ripened"), ("monkey", "swung"))),
    Frame("The {word} {decider} the nuts under the tree.", (("squirrel", "buried"), ("hammer", "cracked"))),
    Frame("The {word} {decider} into the station.",
          (("train", "chugged"), ("crowd", "poured"), ("pigeon", "fluttered"))),
    Frame("The {word} {decider} out of its shell.", (("chick", "hatched"), ("snail", "crept"))),
    Frame("The {word} {decider} its tail.", (("dog", "wagged"), ("peacock", "fanned"), ("lizard", "dropped"))),
)


@functools.cache
def held_out_cells() -> frozenset[tuple[str, str]]:
    """The (sentence, word) cells of the test split: where a (word, decider) choice occurring in several
    frames first occurs. Training sees the choice in its other frames, never the held-out sentence."""
    frames_of = collections.defaultdict(list)
    for frame in FRAMES:
        for choice in frame.choices:
            frames_of[choice].append(frame.sentence)
    return frozenset((sentences[0], word) for (word, _), sentences in frames_of.items() if len(sentences) > 1)


def usable_frames(tokenizer: tokenizers.Tokenizer) -> list[Frame]:
    """The frames cut down to the choices this tokenizer can pose: single-token words with distinct tokens,
    grouped by their deciders' token count (a clean and a corrupted question must align); a group needs two."""
    usable = []
    for frame in FRAMES:
        answers = {word: continuation(tokenizer, " " + word) for word, _ in frame.choices}
        tokens = collections.Counter(tuple(a) for a in answers.values())
        by_decider_length = collections.defaultdict(list)
        for word, decider in frame.choices:
            if len(answers[word]) == 1 and tokens[tuple(answers[word])] == 1:
                by_decider_length[len(continuation(tokenizer, " " + decider))].append((word, decider))
        usable += [Frame(frame.sentence, tuple(group)) for group in by_decider_length.values() if len(group) >= 2]
    return usable


def _pose(tokenizer, view, form, sentence, answer_token, decider):
    before, after = sentence.split("{word}")
    after = after.format(decider=decider)
    if view.is_mdm and form == "native":
        return view.pose(prompt(tokenizer, before.rstrip()), [answer_token], continuation(tokenizer, after))
    question = prompt(tokenizer, ARM_QUESTION + " " + before + BLANK + after + "\n" + before.rstrip())
    return view.pose(question, [answer_token])


def examples(tokenizer: tokenizers.Tokenizer, n: int, *, seed: int = 0, view: View = View(),
             max_length: int | None = None, split: Split | str = Split.ALL, form: Form = "native") -> list[Example]:
    """`n` infilling pairs, reproducible for a seed (the same pairs in either view and form): a frame and a
    choice (the clean question), then another choice of the frame (the corrupted one). `split`: "test" for
    the clean sentences `held_out_cells` names, "train" for the others, or "all". `form`: "native" (each
    view's own prompt) or "question" (the fill-in-the-blank question for an MDM too; see the module doc)."""
    split = as_split(split)
    if form not in FORMS:
        raise BatchError(f"unknown infilling form {form!r}; the forms are {', '.join(FORMS)}")
    frames = usable_frames(tokenizer)
    if not frames:
        raise BatchError("no infilling frame has two single-token answers whose deciding words have the same "
                         "token count for this tokenizer; add frames to tasks.infilling.FRAMES or pose your own "
                         "examples with tasks.jsonl")
    cells = [(frame, choice) for frame in frames for choice in frame.choices
             if split.keeps((frame.sentence, choice[0]) in held_out_cells())]
    if not cells:
        raise BatchError(f"no infilling question of the {split.value!r} split can be posed with this tokenizer")
    rng = random.Random(seed)

    def attempt(kept: int) -> Example:
        frame, (word, decider) = rng.choice(cells)
        other, other_decider = rng.choice([choice for choice in frame.choices if choice[0] != word])
        answer, counterfactual = continuation(tokenizer, " " + word)[0], continuation(tokenizer, " " + other)[0]
        clean, positions = _pose(tokenizer, view, form, frame.sentence, answer, decider)
        corrupted, _ = _pose(tokenizer, view, form, frame.sentence, answer, other_decider)
        return Example(clean, corrupted, positions, [[answer]], [[counterfactual]], METRIC.name)

    return draw(n, attempt, what="infilling prompts", max_length=max_length)

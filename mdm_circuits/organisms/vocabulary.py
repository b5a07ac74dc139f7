"""The organisms' word-level tokenizer, built from the tasks' own word lists and templates.

Words and punctuation marks are tokens; numbers are split into two-digit pieces ("1732" → "17" "32"),
so a year reads as a century and a two-digit ending (Greater-Than's GPT-2-like form) and every Countdown
number up to 99 is one token. A prompt starts with <bos>; <mask> is the MDM's mask token.
"""

from __future__ import annotations

import re

import tokenizers
from tokenizers import models, pre_tokenizers, processors

from mdm_circuits.tasks import countdown, greater_than, infilling, ioi

PAD, BOS, EOS, MASK, UNK = "<pad>", "<bos>", "<eos>", "<mask>", "<unk>"
SPECIAL = (PAD, BOS, EOS, MASK, UNK)
_PLACEHOLDER = re.compile(r"\{\w+\}")


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Whitespace(),
        pre_tokenizers.Split(tokenizers.Regex(r"\d\d"), behavior="isolated"),
    ])


def task_texts() -> list[str]:
    """Every template and word the four tasks can write (placeholders left out)."""
    texts = [*ioi.TEMPLATES, *ioi.NAMES, *ioi.PLACES, *ioi.OBJECTS, *greater_than.TEMPLATES, *greater_than.NOUNS,
             countdown.PROMPT, "+ -", infilling.BLANK, infilling.ARM_QUESTION]
    for frame in infilling.FRAMES:
        texts += [frame.sentence, *(word for choice in frame.choices for word in choice)]
    texts += [str(d) for d in range(10)] + [f"{n:02d}" for n in range(100)]
    return [_PLACEHOLDER.sub(" ", text) for text in texts]


def build() -> tokenizers.Tokenizer:
    """The tokenizer: special tokens first (<pad> = 0), then the tasks' words in sorted order."""
    splitter = _pre_tokenizer()
    words = sorted({piece for text in task_texts() for piece, _ in splitter.pre_tokenize_str(text)})
    vocabulary = {token: index for index, token in enumerate([*SPECIAL, *words])}
    tokenizer = tokenizers.Tokenizer(models.WordLevel(vocabulary, unk_token=UNK))
    tokenizer.pre_tokenizer = splitter
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, vocabulary[BOS])])
    tokenizer.add_special_tokens(list(SPECIAL))
    return tokenizer

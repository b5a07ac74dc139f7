"""Task generators against a small word-level tokenizer built here."""

from __future__ import annotations

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from mdm_circuits.batch import BatchError, collate
from mdm_circuits.tasks import ioi


def word_tokenizer(words) -> tokenizers.Tokenizer:
    """Every word (with its leading space, as byte-level tokenizers have it) is one token."""
    vocabulary = {"[UNK]": 0}
    for word in words:
        vocabulary.setdefault(word, len(vocabulary))
    tokenizer = tokenizers.Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r" ?[A-Za-z]+|[^ A-Za-z]"), "isolated")
    return tokenizer


TEXT = " ".join(ioi.TEMPLATES) + " " + " ".join(ioi.NAMES + ioi.PLACES + ioi.OBJECTS)
WORDS = {piece for piece, _ in pre_tokenizers.Split(tokenizers.Regex(r" ?[A-Za-z]+|[^ A-Za-z]"), "isolated")
         .pre_tokenize_str(" " + TEXT.replace("{", " ").replace("}", " "))}


def test_pairs_align_and_answer_the_indirect_object():
    tokenizer = word_tokenizer(WORDS)
    examples = ioi.examples(tokenizer, 12, seed=3)
    for example in examples:
        assert len(example.clean) == len(example.corrupted)
        assert example.answer_positions == [len(example.clean)]
        correct, incorrect = example.correct[0][0], example.incorrect[0][0]
        assert correct != incorrect
        # The subject appears twice in the clean prompt, the indirect object once; ABC repeats no name.
        assert example.clean.count(incorrect) == 2 and example.clean.count(correct) == 1
        names = {tokenizer.token_to_id(" " + name) for name in ioi.NAMES}
        corrupted_names = [t for t in example.corrupted if t in names]
        assert len(corrupted_names) == len(set(corrupted_names)) == 3
    assert examples == ioi.examples(tokenizer, 12, seed=3)  # reproducible for a seed
    assert examples != ioi.examples(tokenizer, 12, seed=4)
    collate(examples)


def test_mdm_view_appends_the_mask_at_the_answer_position():
    tokenizer = word_tokenizer(WORDS)
    for example in ioi.examples(tokenizer, 4, seed=0, mask_token_id=999):
        assert example.clean[-1] == example.corrupted[-1] == 999
        assert example.answer_positions == [len(example.clean) - 1]


def test_names_split_into_several_tokens_are_left_out_or_refused():
    split_names = {" " + name for name in ioi.NAMES[:3]}  # only three names are single tokens
    tokenizer = word_tokenizer(WORDS - {" " + name for name in ioi.NAMES} | split_names)
    with pytest.raises(BatchError, match="only 3 of the names are single tokens"):
        ioi.examples(tokenizer, 2)
    six = word_tokenizer(WORDS - {" " + name for name in ioi.NAMES[6:]})
    for example in ioi.examples(six, 8):
        assert {six.id_to_token(t) for t in example.clean} & {" " + n for n in ioi.NAMES[6:]} == set()


def test_max_length_filters_templates():
    tokenizer = word_tokenizer(WORDS)
    assert all(len(e.clean) <= 14 for e in ioi.examples(tokenizer, 10, max_length=14))
    with pytest.raises(BatchError, match="at most 3 tokens"):
        ioi.examples(tokenizer, 1, max_length=3)

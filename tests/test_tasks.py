"""Task generators against a small word-level tokenizer built here."""

from __future__ import annotations

import re

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from mdm_circuits.errors import BatchError
from mdm_circuits.tasks import countdown, greater_than, infilling, ioi, jsonl
from mdm_circuits.tasks.batch import collate
from mdm_circuits.tasks.views import View


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
    for example in ioi.examples(tokenizer, 4, seed=0, view=View(999)):
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


def sentencepiece_like_tokenizer(words) -> tokenizers.Tokenizer:
    """Llama-style: a '▁' is prepended and spaces become '▁', so ' Mary' alone is '▁' '▁Mary' but mid-sentence
    one token, '▁Mary'."""
    from tokenizers import decoders, normalizers

    pieces = {"▁" + w.strip() for w in words if w.strip()} | {"▁", ",", "."}
    vocabulary = {"[UNK]": 0, **{piece: i + 1 for i, piece in enumerate(sorted(pieces))}}
    tokenizer = tokenizers.Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex("▁?[^▁,.]+|▁|[,.]"), "isolated")
    tokenizer.decoder = decoders.Metaspace()
    return tokenizer


def test_names_are_found_in_context_for_sentencepiece_tokenizers():
    tokenizer = sentencepiece_like_tokenizer(WORDS)
    assert len(tokenizer.encode(" Mary").ids) == 2  # alone, the name is two tokens
    examples = ioi.examples(tokenizer, 6, seed=1)
    for example in examples:
        assert tokenizer.id_to_token(example.correct[0][0]) in {"▁" + name for name in ioi.NAMES}
        assert example.clean.count(example.incorrect[0][0]) == 2


def pattern_tokenizer(pattern: str, texts) -> tokenizers.Tokenizer:
    """Word-level over the pieces `pattern` cuts `texts` into (every piece it could meet is in the vocabulary)."""
    splitter = pre_tokenizers.Split(tokenizers.Regex(pattern), "isolated")
    pieces = {piece for text in texts for piece, _ in splitter.pre_tokenize_str(text)}
    tokenizer = tokenizers.Tokenizer(models.WordLevel({p: i for i, p in enumerate(["[UNK]", *sorted(pieces)])},
                                                      unk_token="[UNK]"))
    tokenizer.pre_tokenizer = splitter
    return tokenizer


NUMBERS = [f"{a}{b}" for a in " x" for b in [str(d) for d in range(10)] + [f"{d:02d}" for d in range(100)]]
SENTENCES = ioi.TEMPLATES + greater_than.TEMPLATES + tuple(f.sentence for f in infilling.FRAMES) + (countdown.PROMPT,)
TEXTS = [" ".join(SENTENCES),
         " " + " ".join(greater_than.NOUNS), " " + " ".join(w for f in infilling.FRAMES for c in f.choices for w in c),
         " ___ Fill in the blank Numbers Target Solution + - , . : \n" + " ".join(NUMBERS)]
TEXTS.append(",".join(" ".join(TEXTS).split()))  # every word also at the start of a text, without its space
DIGITS = r" ?[A-Za-z_]+| ?\d|[^\sA-Za-z\d_]| "
PAIRS = r" ?[A-Za-z_]+| ?\d\d|\d| ?[^\sA-Za-z\d_]| "


@pytest.mark.parametrize("task", [ioi, greater_than, countdown, infilling], ids=lambda t: t.NAME)
@pytest.mark.parametrize("view", [View(), View(0)], ids=["arm", "mdm"])
def test_every_task_poses_aligned_reproducible_pairs(task, view):
    tokenizer = pattern_tokenizer(DIGITS, TEXTS + [" ".join(ioi.NAMES + ioi.PLACES + ioi.OBJECTS)])
    examples = task.examples(tokenizer, 8, seed=1, view=view)
    assert examples == task.examples(tokenizer, 8, seed=1, view=view)
    assert examples != task.examples(tokenizer, 8, seed=2, view=view)
    for example in examples:
        assert len(example.clean) == len(example.corrupted)
        assert example.metric == task.METRIC.name
        assert [c[0] for c in example.correct] != [c[0] for c in example.incorrect]
        assert example.solved_by([c[0] for c in example.correct])
        for position in example.answer_positions:
            if view.is_mdm:
                assert example.clean[position] == example.corrupted[position] == 0
        assert 0 not in (example.clean if not view.is_mdm else [])
    collate(examples)


def _text(tokenizer, tokens):
    return "".join(tokenizer.id_to_token(t) for t in tokens)


def test_greater_than_adapts_to_how_years_are_written():
    digits = pattern_tokenizer(DIGITS, TEXTS)
    pairs = pattern_tokenizer(PAIRS, TEXTS)
    assert greater_than.year_tokens(digits) == "digits" and greater_than.year_tokens(pairs) == "pairs"
    for example in greater_than.examples(digits, 10, seed=0):
        start = int(re.findall(r"\d{4}", _text(digits, example.clean).replace(" ", ""))[0][2:])
        larger = sorted(int(digits.id_to_token(t)) for t in example.correct[0])
        assert start % 10 == 9 and larger == list(range(start // 10 + 1, 10))  # decided by the tens digit
        assert "01" in _text(digits, example.corrupted)
    for example in greater_than.examples(pairs, 10, seed=3):
        start = int(re.findall(r"\d{4}", _text(pairs, example.clean).replace(" ", ""))[0][2:])
        assert sorted(int(pairs.id_to_token(t)) for t in example.correct[0]) == list(range(start + 1, 100))
        assert len(example.correct[0]) + len(example.incorrect[0]) == 100
    with pytest.raises(BatchError, match="writes years neither"):
        greater_than.examples(pattern_tokenizer(r" ?[A-Za-z_]+| ?\d+|[^\sA-Za-z\d_]| ", TEXTS), 1)


def test_countdown_answers_reach_their_targets():
    tokenizer = pattern_tokenizer(DIGITS, TEXTS)
    for example in countdown.examples(tokenizer, 6, seed=0):
        text = _text(tokenizer, example.clean)
        numbers = [int(n) for n in text.split("Numbers:")[1].split(".")[0].replace(" ", "").split(",")]
        target = int(text.split("Target:")[1].split(".")[0].replace(" ", ""))
        for accepted in example.accepted:
            expression = "".join(tokenizer.id_to_token(t) for t in accepted).replace(" ", "")
            assert eval(expression) == target
            assert sorted(int(n) for n in expression.replace("-", "+").split("+")) == sorted(numbers)
        assert countdown.solutions(tuple(numbers), target)


def test_infilling_poses_the_context_after_the_mask_for_an_mdm_and_before_the_answer_for_an_arm():
    tokenizer = pattern_tokenizer(DIGITS, TEXTS)
    arm, mdm = infilling.examples(tokenizer, 1, seed=0)[0], infilling.examples(tokenizer, 1, seed=0, view=View(0))[0]
    assert arm.answer_positions == [len(arm.clean)]                  # the answer comes after the question
    assert mdm.answer_positions[0] < len(mdm.clean) - 1              # the deciding words follow the mask
    assert arm.correct == mdm.correct and arm.incorrect == mdm.incorrect


def test_infilling_pairs_only_choices_whose_deciders_have_the_same_length():
    for frame in infilling.FRAMES:
        words, deciders = zip(*frame.choices)
        assert len(set(words)) == len(words) and len(set(deciders)) == len(deciders)
        assert frame.sentence.index("{word}") < frame.sentence.index("{decider}")
    # "-ed" split off: "sailed" = " sail" "ed" is two tokens, "flew" and "swam" one each.
    tokenizer = pattern_tokenizer(r" ?[A-Za-z]+?(?=ed\b)|ed\b" + "|" + DIGITS, TEXTS)
    assert tokenizer.encode(" sailed flew").tokens == [" sail", "ed", " flew"]
    usable = infilling.usable_frames(tokenizer)
    assert [f.choices for f in usable if "sea" in f.sentence] == [(("plane", "flew"), ("whale", "swam"))]
    kitchen = next(f for f in infilling.FRAMES if "kitchen" in f.sentence)
    assert [f.choices for f in usable if "kitchen" in f.sentence] == [kitchen.choices[1:]]  # not "rang"
    examples = infilling.examples(tokenizer, 50, seed=0)
    assert all(len(e.clean) == len(e.corrupted) for e in examples)


def test_infilling_refuses_a_tokenizer_that_cannot_pose_any_frame():
    tokenizer = word_tokenizer([" dog"])  # every other answer is the same [UNK], so no frame has two answers
    assert infilling.usable_frames(tokenizer) == []
    with pytest.raises(BatchError, match="no infilling frame"):
        infilling.examples(tokenizer, 1)


def test_user_examples_from_jsonl(tmp_path):
    tokenizer = pattern_tokenizer(DIGITS, TEXTS + [" " + " ".join(ioi.NAMES)])
    path = tmp_path / "mine.jsonl"
    path.write_text(
        '{"prompt": "When Mary and John went to the store, John gave a drink to", '
        '"corrupted_prompt": "When Anna and Paul went to the store, Mark gave a drink to", '
        '"answer": " Mary", "counterfactual": " John"}\n\n'
        '{"prompt": "The", "corrupted_prompt": "The", "suffix": " barked at the mailman.", '
        '"corrupted_suffix": " meowed at the mailman.", "answer": " dog", "counterfactual": " cat"}\n')
    with pytest.raises(BatchError, match="line 3: an ARM reads left to right"):
        jsonl.load(path, tokenizer)
    examples = jsonl.load(path, tokenizer, View(0))
    assert len(examples) == 2 and examples[1].clean[1] == 0
    path.write_text('{"prompt": "a", "corrupted_prompt": "a b", "answer": " Mary", "counterfactual": " John"}\n')
    with pytest.raises(BatchError, match="line 1: clean has 1 tokens, corrupted 2"):
        jsonl.load(path, tokenizer)
    path.write_text('{"prompt": "a", "answer": " Mary", "counterfactual": " John", "extra": 1}\n')
    with pytest.raises(BatchError, match=r"line 1: missing text field\(s\) \['corrupted_prompt'\]; unknown field"):
        jsonl.load(path, tokenizer)
    path.write_text('{"prompt": "a", "corrupted_prompt": "b", "answer": " Mary", "counterfactual": " John", '
                    '"metric": "accuracy"}\n')
    with pytest.raises(BatchError, match="unknown metric 'accuracy'"):
        jsonl.load(path, tokenizer)

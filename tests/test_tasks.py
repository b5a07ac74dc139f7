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
        assert _start(digits, example.corrupted) == greater_than.counterfactual_start("digits")
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


# ---- train and test splits ----


@pytest.fixture(scope="module")
def organisms_tokenizer():
    from mdm_circuits.organisms import vocabulary

    return vocabulary.build()


def _questions(task, tokenizer, split, n=300):
    return {tuple(e.clean) for e in task.examples(tokenizer, n, seed=5, split=split)}


@pytest.mark.parametrize("task", [ioi, greater_than, countdown, infilling], ids=lambda t: t.NAME)
def test_the_test_split_shares_no_question_with_the_train_split(task, organisms_tokenizer):
    train, test = _questions(task, organisms_tokenizer, "train"), _questions(task, organisms_tokenizer, "test")
    assert train and test and not train & test
    everything = _questions(task, organisms_tokenizer, "all", 2000)
    assert everything & train and everything & test  # "all" draws from both


def _template_index(text: str) -> int:
    """Which IOI template a decoded word-level prompt was written from."""
    for index, template in enumerate(ioi.TEMPLATES):
        spaced = re.sub(r"([,.])", r" \1", template)
        pattern = re.escape(spaced).replace(re.escape("{A}"), r"\w+").replace(re.escape("{B}"), r"\w+")
        pattern = re.sub(r"\\\{\w+\\\}", r"\\w+", pattern)
        if re.fullmatch(pattern, text):
            return index
    raise AssertionError(f"no template writes {text!r}")


def test_each_split_holds_out_what_its_task_says(organisms_tokenizer):
    decode = organisms_tokenizer.decode
    for split, held_out in (("test", True), ("train", False)):
        for example in greater_than.examples(organisms_tokenizer, 100, seed=1, split=split):
            start = int(re.search(r"\b1\d (\d\d)\b", decode(example.clean)).group(1))
            assert (start // 10 in greater_than.HELD_OUT_DECADES) == held_out
        for example in countdown.examples(organisms_tokenizer, 100, seed=1, split=split):
            listed = re.search(r"Numbers : (.*?) \. Target", decode(example.clean)).group(1)
            assert countdown.held_out(tuple(int(n) for n in listed.split(" , "))) == held_out
        for example in ioi.examples(organisms_tokenizer, 100, seed=1, split=split):
            assert (_template_index(decode(example.clean)) in ioi.HELD_OUT_TEMPLATES) == held_out
        for example in infilling.examples(organisms_tokenizer, 100, seed=1, split=split):
            text, word = decode(example.clean), decode(example.correct[0])
            cell = next((frame.sentence, word) for frame in infilling.FRAMES
                        if frame.sentence.split("{word} {decider}")[1].rstrip(".").strip() in text
                        and any(w == word for w, _ in frame.choices)
                        and any(d in text for _, d in frame.choices))
            assert (cell in infilling.held_out_cells()) == held_out


def test_what_the_test_split_holds_out_is_learnable_from_the_train_split():
    """Every word of a held-out IOI template occurs in the training templates or another task's text, and
    every held-out infilling sentence's (word, decider) pair occurs in a training sentence of another frame."""
    from mdm_circuits.organisms import vocabulary

    def words(text):
        return {piece for piece, _ in vocabulary._pre_tokenizer().pre_tokenize_str(re.sub(r"\{\w+\}", " ", text))}

    others = set().union(*map(words, [*greater_than.TEMPLATES, countdown.PROMPT, infilling.ARM_QUESTION,
                                       *(frame.sentence for frame in infilling.FRAMES)]))
    trained = set().union(*(words(t) for i, t in enumerate(ioi.TEMPLATES) if i not in ioi.HELD_OUT_TEMPLATES))
    for index in ioi.HELD_OUT_TEMPLATES:
        assert words(ioi.TEMPLATES[index]) <= trained | others, ioi.TEMPLATES[index]
    cells = infilling.held_out_cells()
    assert len(cells) >= 10
    for sentence, word in cells:
        decider = dict(next(f for f in infilling.FRAMES if f.sentence == sentence).choices)[word]
        assert any((word, decider) in frame.choices and (frame.sentence, word) not in cells
                   for frame in infilling.FRAMES if frame.sentence != sentence)


# ---- the Greater-Than counterfactual and the view-matched infilling question ----


def _start(tokenizer, tokens) -> int:
    """The start year's ending in a Greater-Than prompt."""
    return int(re.findall(r"\d{4}", _text(tokenizer, tokens).replace(" ", ""))[0][2:])


@pytest.mark.parametrize("pattern, mode, lowest", [(DIGITS, "digits", 9), (PAIRS, "pairs", 2)], ids=["digits", "pairs"])
@pytest.mark.parametrize("view", [View(), View(0)], ids=["arm", "mdm"])
def test_greater_than_corrupts_only_the_start_year_to_the_lowest_one_posed(pattern, mode, lowest, view):
    tokenizer = pattern_tokenizer(pattern, TEXTS)
    assert greater_than.year_tokens(tokenizer) == mode and greater_than.counterfactual_start(mode) == lowest
    for example in greater_than.examples(tokenizer, 30, seed=2, view=view, split="test"):
        clean, corrupted = _start(tokenizer, example.clean), _start(tokenizer, example.corrupted)
        assert corrupted == lowest < clean
        changed = [i for i, (a, b) in enumerate(zip(example.clean, example.corrupted)) if a != b]
        assert len(example.clean) == len(example.corrupted) and len(changed) == 1  # the tens digit, or the ending
        assert changed[0] < example.answer_positions[0]
        # One answer position and the clean question's candidates, which both runs are scored with.
        larger = sorted(int(tokenizer.id_to_token(t)) for t in example.correct[0])
        assert larger == (list(range(clean // 10 + 1, 10)) if mode == "digits" else list(range(clean + 1, 100)))


def test_infilling_poses_an_mdm_the_arm_question_with_its_answer_masked_at_the_end():
    tokenizer = pattern_tokenizer(DIGITS, TEXTS)
    arm = infilling.examples(tokenizer, 20, seed=4)
    mdm = infilling.examples(tokenizer, 20, seed=4, view=View(0), form="question")
    assert infilling.examples(tokenizer, 20, seed=4, form="question") == arm  # an ARM takes the question anyway
    for a, m in zip(arm, mdm):
        position = a.answer_positions[0]
        assert m.answer_positions == a.answer_positions == [len(a.clean)]
        assert m.clean == [*a.clean, 0] and m.corrupted == [*a.corrupted, 0]
        assert (m.correct, m.incorrect, m.accepted, m.metric) == (a.correct, a.incorrect, a.accepted, a.metric)
        assert m.clean[position] == 0
    native = infilling.examples(tokenizer, 20, seed=4, view=View(0))
    assert [(e.correct, e.incorrect) for e in native] == [(e.correct, e.incorrect) for e in mdm]
    collate(mdm)
    with pytest.raises(BatchError, match="unknown infilling form 'cloze'"):
        infilling.examples(tokenizer, 1, form="cloze")

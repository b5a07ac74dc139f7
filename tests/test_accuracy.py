"""Accuracy by generation, and the common-correct pool, on models whose answers are known in advance."""

from __future__ import annotations

import dataclasses
import random
import types

import numpy as np
import pytest

from mdm_circuits.decoding.accuracy import common_correct_pool, generate_answers, solved
from mdm_circuits.errors import BatchError
from mdm_circuits.model.transformer import with_config
from mdm_circuits.tasks.batch import Example
from mdm_circuits.tasks.views import View
from test_diffusion import successor_model

MASK = 11


def successor_task(wrong_every: int) -> types.ModuleType:
    """Prompts of random tokens whose answer is the last token's successor (what the successor models
    predict), except every `wrong_every`-th example, which asks for something else; answers of 1 or 2
    tokens."""

    def examples(tokenizer, n, *, seed=0, view=View(), max_length=None):
        rng = random.Random(seed)
        out = []
        for index in range(n):
            prompt = [rng.randrange(11) for _ in range(rng.randint(2, 5))]
            answer = [(prompt[-1] + 1) % 11, (prompt[-1] + 2) % 11][: rng.randint(1, 2)]
            if (seed * 1000 + index) % wrong_every == 0:
                answer = [(a + 5) % 11 for a in answer]
            tokens, positions = view.pose(prompt, answer)
            out.append(Example(tokens, tokens, positions, [[a] for a in answer], [[(a + 1) % 11] for a in answer]))
        return out

    return types.SimpleNamespace(examples=examples, NAME="successor")


@pytest.fixture(scope="module")
def pair():
    mdm = successor_model()
    arm = with_config(mdm, mdm.config.replace(attention="causal", mask_token_id=None))
    return arm, mdm


def test_generated_answers_follow_each_models_view(pair):
    arm, mdm = pair
    task = successor_task(wrong_every=1_000_000)
    for model in pair:
        examples = task.examples(None, 20, seed=1, view=View.for_model(model.config))
        answers = generate_answers(model, examples, batch_size=8)
        assert all(list(a) == [c[0] for c in e.correct] for a, e in zip(answers, examples))
        assert solved(model, examples, batch_size=8).all()


def test_pool_keeps_what_both_solve_and_reports_accuracy(pair):
    arm, mdm = pair
    task = successor_task(wrong_every=4)
    pool = common_correct_pool(task, None, arm, mdm, n=30, budget=80, chunk=20)
    assert len(pool.arm) == len(pool.mdm) == 30
    assert pool.drawn == 40 and pool.arm_accuracy == pool.mdm_accuracy == pytest.approx(0.75)
    assert solved(arm, pool.arm).all() and solved(mdm, pool.mdm).all()
    for arm_example, mdm_example in zip(pool.arm, pool.mdm):  # the same questions, each in its own view
        assert arm_example.correct == mdm_example.correct
        assert MASK in mdm_example.clean and MASK not in arm_example.clean
    short = common_correct_pool(task, None, arm, mdm, n=1000, budget=50, chunk=20)
    assert short.drawn == 50 and len(short.arm) < 1000


def test_a_task_with_few_distinct_questions_pools_each_once(pair):
    """Repeats are skipped but count against the budget, so drawing ends with every distinct question."""
    arm, mdm = pair
    successor = successor_task(wrong_every=1_000_000)

    def examples(tokenizer, n, *, seed=0, view=View(), max_length=None):
        return [successor.examples(tokenizer, 1, seed=1 + (seed + i) % 3, view=view)[0] for i in range(n)]

    few = types.SimpleNamespace(examples=examples, NAME="few")
    pool = common_correct_pool(few, None, arm, mdm, n=200, budget=100, chunk=10)
    assert pool.drawn == len(pool.arm) == 3


def test_mask_token_never_generated(pair):
    _, mdm = pair
    examples = successor_task(wrong_every=1_000_000).examples(None, 10, seed=3, view=View(MASK))
    assert all(MASK not in answer for answer in generate_answers(mdm, examples))
    assert not np.any([MASK in e.correct[0] for e in examples])


def test_a_length_limit_cuts_both_views_of_a_question_together(pair):
    """The MDM view one token longer (right-hand context): a question that only its MDM view makes too long is
    left out of both views, so the two lists stay the same questions in the same order."""
    arm, mdm = pair
    successor = successor_task(wrong_every=1_000_000)

    def examples(tokenizer, n, *, seed=0, view=View(), max_length=None):
        posed = successor.examples(tokenizer, n, seed=seed, view=view)
        if view.mask_token_id is not None:
            posed = [dataclasses.replace(e, clean=e.clean + [3], corrupted=e.corrupted + [3]) for e in posed]
        return [e for e in posed if max_length is None or len(e.clean) <= max_length]

    longer = types.SimpleNamespace(examples=examples, NAME="longer")
    everything = common_correct_pool(longer, None, arm, mdm, n=200, budget=60, chunk=20)
    pool = common_correct_pool(longer, None, arm, mdm, n=200, budget=60, chunk=20, max_length=6)
    assert 0 < len(pool.arm) < len(everything.arm)
    for arm_example, mdm_example in zip(pool.arm, pool.mdm, strict=True):
        assert arm_example.correct == mdm_example.correct
        assert max(len(arm_example.clean), len(mdm_example.clean)) <= 6
    # the MDM view is the longer one here, so it alone decides which questions fit
    assert [e.correct for e in pool.arm] == [e.correct for e in everything.mdm if len(e.clean) <= 6]


def test_a_task_that_poses_other_questions_in_each_view_is_refused(pair):
    arm, mdm = pair
    successor = successor_task(wrong_every=1_000_000)

    def examples(tokenizer, n, *, seed=0, view=View(), max_length=None):
        return successor.examples(tokenizer, n, seed=seed + (view.mask_token_id is not None), view=view)

    with pytest.raises(BatchError, match="other questions in the ARM view than in the MDM view"):
        common_correct_pool(types.SimpleNamespace(examples=examples, NAME="shifted"), None, arm, mdm, n=10, budget=20)

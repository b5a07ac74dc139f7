"""Metrics on hand-computed cases, and where they read the logits."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mdm_circuits.model.config import ModelConfig
from mdm_circuits.tasks import metrics
from mdm_circuits.tasks.batch import Example, collate

LOGITS = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.4, 0.1]]))


def _row(correct, incorrect, positions=(3, 4)):
    return collate([Example([0] * 5, [0] * 5, list(positions), correct, incorrect)])[0]


def test_logit_difference_averages_candidates_then_positions():
    example = _row([[3], [2]], [[0], [1]])
    expected = ((np.log(0.4) - np.log(0.1)) + (np.log(0.4) - np.log(0.25))) / 2
    assert metrics.logit_difference(LOGITS, example, LOGITS) == pytest.approx(expected, rel=1e-6)


def test_probability_difference_sums_candidate_sets():
    example = _row([[2, 3], [2]], [[0], [0, 1]])
    expected = ((0.3 + 0.4 - 0.1) + (0.4 - 0.25 - 0.25)) / 2
    assert metrics.probability_difference(LOGITS, example, LOGITS) == pytest.approx(expected, rel=1e-5)


def test_log_probabilities_of_multi_token_answers():
    example = _row([[3], [2]], [[1], [0]])
    correct = np.log(0.4) + np.log(0.4)
    assert metrics.answer_log_probability(LOGITS, example, LOGITS) == pytest.approx(correct, rel=1e-5)
    incorrect = np.log(0.2) + np.log(0.25)
    assert metrics.log_probability_difference(LOGITS, example, LOGITS) == pytest.approx(correct - incorrect, rel=1e-5)


def test_padded_answer_positions_are_ignored():
    one_position = collate([Example([0] * 5, [0] * 5, [3], [[3]], [[0]]),
                            Example([0] * 5, [0] * 5, [3, 4], [[3], [2]], [[0], [1]])])[0]
    assert metrics.logit_difference(LOGITS, one_position, LOGITS) == pytest.approx(np.log(4.0), rel=1e-6)


def test_kl_to_clean():
    example = _row([[3], [2]], [[0], [1]])
    assert metrics.kl_to_clean(LOGITS, example, LOGITS) == pytest.approx(0.0, abs=1e-7)
    shifted = LOGITS[::-1]
    p, q = np.exp(LOGITS), np.exp(shifted)
    expected = np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1))
    assert metrics.kl_to_clean(shifted, example, LOGITS) == pytest.approx(expected, rel=1e-5)
    assert not metrics.kl_to_clean.higher_is_better
    assert metrics.kl_to_clean.loss(shifted, example, LOGITS) == pytest.approx(expected, rel=1e-5)
    assert metrics.logit_difference.loss(LOGITS, example, LOGITS) == pytest.approx(
        -metrics.logit_difference(LOGITS, example, LOGITS))


def test_read_position_is_shifted_for_arms_and_dream_but_not_for_llada():
    base = dict(vocab_size=10, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4, d_mlp=8)
    batch = collate([Example([1, 2, 3, 4], [1, 2, 3, 5], [3], [[1]], [[2]])])
    assert batch.read_positions(ModelConfig(**base)).tolist() == [[2]]
    dream = ModelConfig(**base, attention="bidirectional", mask_token_id=9)
    assert batch.read_positions(dream).tolist() == [[2]]
    llada = ModelConfig(**base, attention="bidirectional", logit_shift=False, mask_token_id=9)
    assert batch.read_positions(llada).tolist() == [[3]]

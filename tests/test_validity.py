"""The contrast check: per-question clean and corrupted metrics as attribution averages them, and the rule that
flags a task whose corrupted prompt scores as well as its clean one."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mdm_circuits.analysis.validity import MIN_SHARE_POSITIVE, contrast_metrics, median_interval, validity
from mdm_circuits.circuits.attribution import attribute
from mdm_circuits.errors import BatchError
from mdm_circuits.model.config import ModelConfig
from mdm_circuits.model.transformer import stack
from mdm_circuits.tasks import metrics
from mdm_circuits.tasks.batch import collate
from mdm_circuits.testing import random_examples, random_model

MASK = 39
ARM = ModelConfig(vocab_size=40, d_model=24, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_mlp=32,
                  qkv_bias=True)
MDM = ARM.replace(attention="bidirectional", mask_token_id=MASK)


def test_positive_gaps_pass():
    clean = np.linspace(1.0, 2.0, 50)
    result = validity(clean, clean - 0.3)
    assert result.n == 50 and result.share_positive == 1.0 and result.non_positive == 0
    assert result.median_gap == pytest.approx(0.3) and result.median_low > 0 and not result.fails
    assert result.clean_mean == pytest.approx(1.5) and result.corrupted_mean == pytest.approx(1.2)


def test_a_negative_median_gap_fails():
    gaps = np.concatenate([np.full(30, -0.2), np.full(20, 0.5)])
    result = validity(np.zeros(50), -gaps)
    assert result.median_gap == pytest.approx(-0.2) and result.non_positive == 30 and result.fails


def test_too_few_positive_gaps_fail_though_the_median_is_positive():
    gaps = np.concatenate([np.full(30, -0.1), np.linspace(0.1, 1.0, 70)])
    result = validity(gaps, np.zeros(100))
    assert result.share_positive == pytest.approx(0.7) and result.share_positive < MIN_SHARE_POSITIVE
    assert result.median_low > 0 and result.fails and result.non_positive == 30


def test_a_small_pool_fails_while_its_median_interval_reaches_zero():
    """Eight of ten gaps positive: the share passes, but the 95% interval of the median reaches below zero."""
    gaps = np.array([-0.2, -0.1, *np.linspace(0.1, 0.8, 8)])
    result = validity(gaps, np.zeros(10))
    assert result.share_positive == 0.8 and result.median_gap > 0
    assert result.median_low <= 0 and result.fails
    assert validity(np.ones(5), np.zeros(5)).fails  # five questions cannot bound a median at 95%


def test_lower_is_better_metrics_take_the_gap_the_other_way():
    clean, corrupted = np.zeros(20), np.linspace(0.1, 1.0, 20)  # e.g. a KL: the clean run is closer
    assert not validity(clean, corrupted, higher_is_better=False).fails
    assert validity(clean, corrupted).share_positive == 0


def test_the_median_interval_is_the_exact_order_statistic_interval():
    values = np.arange(1.0, 101.0)
    assert median_interval(values) == (40.0, 61.0)    # the textbook [x_(40), x_(61)] for n = 100
    assert median_interval(values[:10]) == (2.0, 9.0)
    assert median_interval(values[:5]) == (-np.inf, np.inf)
    rng = np.random.default_rng(0)                     # coverage of the true median 0 by simulation
    covered = [low <= 0 <= high for low, high in (median_interval(rng.normal(size=30)) for _ in range(2000))]
    assert 0.94 <= np.mean(covered) <= 0.975  # exact: 0.957 for n = 30


def test_validity_refuses_values_that_are_not_one_per_question():
    with pytest.raises(BatchError, match="one clean and one corrupted value per question"):
        validity(np.zeros(3), np.zeros(4))


@pytest.fixture(scope="module")
def pair():
    arm = random_examples(ARM, 7, seed=2, min_length=5, max_length=7)
    mdm = [dataclasses.replace(e, clean=[*e.clean, MASK], corrupted=[*e.corrupted, MASK]) for e in arm]
    return random_model(ARM, 0), random_model(MDM, 1), arm, mdm


@pytest.mark.parametrize("metric", [metrics.logit_difference, metrics.probability_difference], ids=lambda m: m.name)
def test_contrast_metrics_are_the_runs_attribution_averages(pair, metric):
    arm, _, examples, _ = pair
    contrast = contrast_metrics(arm, examples, metric, batch_size=3)  # three slices, the last padded
    assert contrast.clean.shape == contrast.corrupted.shape == (7,)
    scores = attribute(arm, collate(examples), metric, method="eap", batch_size=4)
    assert contrast.clean.mean() == pytest.approx(scores.clean_metric, abs=1e-5)
    assert contrast.corrupted.mean() == pytest.approx(scores.corrupted_metric, abs=1e-5)
    assert not np.allclose(contrast.clean, contrast.clean[0])  # per question, not a repeated mean


def test_a_stack_gives_every_model_its_own_questions(pair):
    arm, mdm, arm_examples, mdm_examples = pair
    together = contrast_metrics(stack([arm, mdm]), [arm_examples, mdm_examples], metrics.logit_difference)
    for model, examples, result in zip((arm, mdm), (arm_examples, mdm_examples), together):
        alone = contrast_metrics(model, examples, metrics.logit_difference)
        np.testing.assert_allclose(result.clean, alone.clean, atol=1e-5)
        np.testing.assert_allclose(result.corrupted, alone.corrupted, atol=1e-5)
    with pytest.raises(BatchError, match="one model takes one list of examples"):
        contrast_metrics(arm, [arm_examples], metrics.logit_difference)

"""Faithfulness per question: evaluate's per-example rows, ratios that are undefined rather than wild, bootstrap
replicates, cross-faithfulness in a stack, random baselines and the smallest faithful K of a sweep.

Every evaluation here runs three circuits (a random one, the full graph, the empty one) on five questions of
one shape, so the single-model and the stacked programs each compile once."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mdm_circuits import circuits
from mdm_circuits.analysis import faithfulness, structure
from mdm_circuits.circuits.graph import Graph
from mdm_circuits.model.config import ModelConfig
from mdm_circuits.model.transformer import stack
from mdm_circuits.tasks import metrics
from mdm_circuits.tasks.batch import collate
from mdm_circuits.testing import random_examples, random_model

CONFIG = ModelConfig(vocab_size=40, d_model=24, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_mlp=32,
                     qkv_bias=True)
GRAPH = Graph.for_model(CONFIG)
METRIC = metrics.logit_difference
# The logit difference negated, so lower is better: the clean − ablated gap points the other way.
NEGATED = metrics.Metric("negated_logit_difference", lambda logits, example, clean: -METRIC(logits, example, clean),
                         higher_is_better=False)
OPTIONS = dict(batch_size=2, per_example=True)  # five questions in three slices, the last one padded


def _examples(seed: int):
    return random_examples(CONFIG, 5, seed, min_length=6, max_length=6)


def _circuits(seed: int) -> np.ndarray:
    """[a random circuit of 40 edges, the full graph, the empty circuit]."""
    random = faithfulness.random_circuits(GRAPH, [40], 1, seed)[0]
    return np.stack([random, GRAPH.edge_mask, np.zeros_like(GRAPH.edge_mask)])


@pytest.fixture(scope="module")
def first():
    """A model whose clean − corrupted gap on its questions is defined (1.31 against −0.12), its batch,
    circuits and their evaluation."""
    model, batch, chosen = random_model(CONFIG, 1), collate(_examples(1)), _circuits(1)
    return model, batch, chosen, circuits.evaluate(model, batch, chosen, METRIC, **OPTIONS)


@pytest.fixture(scope="module")
def second():
    model, batch, chosen = random_model(CONFIG, 3), collate(_examples(3)), _circuits(3)
    return model, batch, chosen, circuits.evaluate(model, batch, chosen, METRIC, **OPTIONS)


def _rows(evaluation: circuits.Evaluation) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return evaluation.circuit_rows, evaluation.clean_rows, evaluation.ablated_rows


def test_per_example_rows_average_to_the_means(first):
    _, _, _, evaluation = first
    rows, clean, ablated = _rows(evaluation)
    assert rows.shape == (3, 5) and clean.shape == ablated.shape == (5,)
    np.testing.assert_allclose(rows.mean(axis=1), evaluation.circuit_metric, rtol=1e-5, atol=1e-6)
    assert clean.mean() == pytest.approx(evaluation.clean_metric, rel=1e-5)
    assert ablated.mean() == pytest.approx(evaluation.ablated_metric, rel=1e-5)
    # The full circuit is the clean run and the empty one the ablated run, question by question.
    np.testing.assert_allclose(rows[1], clean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rows[2], ablated, rtol=1e-5, atol=1e-5)
    assert np.ptp(rows[0]) > 0.1 and np.abs(rows[0] - clean).max() > 0.1  # the rows are per question


def test_full_circuit_is_one_and_empty_circuit_is_zero(first):
    _, _, _, evaluation = first
    values = faithfulness.faithfulness(*_rows(evaluation))
    np.testing.assert_allclose(values[1:], [1.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(values, evaluation.faithfulness_where_defined, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(values, evaluation.faithfulness, rtol=1e-5, atol=1e-6)
    assert evaluation.defined and abs(values[0]) > 0.01 and abs(values[0] - 1) > 0.01


def test_undefined_where_the_corrupted_input_is_the_clean_one(first):
    model, _, chosen, _ = first
    same = collate([dataclasses.replace(example, corrupted=example.clean) for example in _examples(1)])
    evaluation = circuits.evaluate(model, same, chosen, METRIC, **OPTIONS)
    assert not evaluation.defined
    assert np.isnan(evaluation.faithfulness_where_defined).all()
    assert np.isnan(faithfulness.faithfulness(*_rows(evaluation))).all()
    found = faithfulness.interval(*_rows(evaluation), structure.bootstrap_weights(5, 20, 0))
    assert np.isnan(found.point).all() and np.isnan(found.low).all() and np.isnan(found.high).all()
    assert found.defined_share == 0.0 and found.as_dict()["point"] == [None, None, None]
    # Only rounding separates the two runs, which the plain ratio's guard of 1e-8 does not catch.
    assert 0 < abs(evaluation.clean_metric - evaluation.ablated_metric) < 1e-5


def test_the_metric_direction_decides_whether_the_ratio_is_defined(first):
    model, batch, chosen, evaluation = first
    negated = circuits.evaluate(model, batch, chosen, NEGATED, **OPTIONS)
    assert negated.higher_is_better is False and negated.defined
    np.testing.assert_allclose(negated.faithfulness_where_defined, evaluation.faithfulness_where_defined, rtol=1e-5)
    rows = _rows(negated)
    np.testing.assert_allclose(faithfulness.faithfulness(*rows, higher_is_better=False),
                               evaluation.faithfulness_where_defined, rtol=1e-5)
    assert np.isnan(faithfulness.faithfulness(*rows, higher_is_better=True)).all()  # a gap the wrong way
    # A gap of 0.01 on a metric near 1 is below the floor: undefined, where the plain ratio gives a number.
    tiny = circuits.Evaluation(np.array([0.5]), clean_metric=1.0, ablated_metric=0.99)
    assert not tiny.defined and np.isnan(tiny.faithfulness_where_defined[0]) and tiny.faithfulness[0] < -40


def test_a_stack_evaluates_as_separate_runs(first, second):
    (model_a, batch_a, chosen_a, alone_a), (model_b, batch_b, chosen_b, alone_b) = first, second
    together = circuits.evaluate(stack([model_a, model_b]), [batch_a, batch_b], [chosen_a, chosen_b], METRIC,
                                 **OPTIONS)
    for stacked, alone in zip(together, (alone_a, alone_b)):
        np.testing.assert_allclose(stacked.circuit_metric, alone.circuit_metric, rtol=1e-5, atol=1e-6)
        for rows, separate in zip(_rows(stacked), _rows(alone)):
            np.testing.assert_allclose(rows, separate, rtol=1e-5, atol=1e-6)
    assert abs(alone_a.clean_metric - alone_b.clean_metric) > 0.1  # a swap of the models would show


def test_a_copy_of_a_model_gives_cross_faithfulness_equal_to_its_own(first):
    model, batch, _, _ = first
    rng = np.random.default_rng(0)
    own = faithfulness.cross_circuits(GRAPH, [rng.normal(size=GRAPH.n_edges), rng.normal(size=GRAPH.n_edges)], 30)
    chosen = np.concatenate([own, GRAPH.edge_mask[None]])  # [model 0's circuit, model 1's, the full graph]
    evaluations = circuits.evaluate(stack([model, model]), batch, chosen, METRIC, **OPTIONS)
    matrix = np.stack([e.faithfulness_where_defined[:2] for e in evaluations])  # [evaluating model, circuit's]
    np.testing.assert_allclose(matrix[1, 0], matrix[0, 0], rtol=1e-5)
    np.testing.assert_allclose(matrix[0, 1], matrix[1, 1], rtol=1e-5)
    assert abs(matrix[0, 0] - matrix[1, 1]) > 0.01  # the two circuits differ, so a mix-up would show
    cross = [faithfulness.interval(*_rows(e), structure.bootstrap_weights(5, 50, 1)) for e in evaluations]
    np.testing.assert_allclose(cross[1].point[0], cross[0].point[0], rtol=1e-5)
    np.testing.assert_allclose(cross[1].low[0], cross[0].low[0], rtol=1e-5)


def test_cross_circuits_are_each_models_top_k():
    rng = np.random.default_rng(1)
    edges = [rng.normal(size=GRAPH.n_edges) for _ in range(3)]
    chosen = faithfulness.cross_circuits(GRAPH, edges, [5, 10, 20])
    assert chosen.sum(axis=(1, 2)).tolist() == [5, 10, 20]
    for circuit, scores, k in zip(chosen, edges, [5, 10, 20]):
        assert (circuit == circuits.top_k(GRAPH, GRAPH.edge_matrix(scores), k)).all()
    assert not (chosen[0] <= chosen[1]).all()  # each model's own ranking, not one shared
    with pytest.raises(circuits.CircuitError, match="one per model"):
        faithfulness.cross_circuits(GRAPH, edges, [5, 10])


def test_replicates_are_faithfulness_of_resampled_questions():
    rng = np.random.default_rng(2)
    n = 7
    clean, ablated = rng.normal(2.0, 0.5, n), rng.normal(0.0, 0.5, n)
    rows = ablated + rng.uniform(0, 1, (4, 1)) * (clean - ablated) + rng.normal(0, 0.1, (4, n))
    weights = structure.bootstrap_weights(n, 200, 3)
    replicates = faithfulness.faithfulness(rows, clean, ablated, weights)
    assert replicates.shape == (200, 4)
    for replicate in (0, 57):
        picked = np.repeat(np.arange(n), np.round(weights[replicate] * n).astype(int))
        np.testing.assert_allclose(replicates[replicate],
                                   faithfulness.faithfulness(rows[:, picked], clean[picked], ablated[picked]))
    found = faithfulness.interval(rows, clean, ablated, weights)
    np.testing.assert_allclose(found.point, faithfulness.faithfulness(rows, clean, ablated))
    np.testing.assert_allclose(found.low, np.percentile(replicates, 2.5, axis=0))
    np.testing.assert_allclose(found.high, np.percentile(replicates, 97.5, axis=0))
    assert (found.low < found.high).all() and found.defined_share == 1.0


def test_random_circuits_have_the_requested_sizes():
    ks = [0, 3, 40, GRAPH.n_edges]
    drawn = faithfulness.random_circuits(GRAPH, ks, 4, seed=5)
    assert drawn.shape == (len(ks) * 4, GRAPH.n_sources, GRAPH.n_destinations) and drawn.dtype == bool
    assert drawn.sum(axis=(1, 2)).tolist() == [k for k in ks for _ in range(4)]
    assert not (drawn & ~GRAPH.edge_mask).any()
    by_k = drawn.reshape(len(ks), 4, *GRAPH.edge_mask.shape)
    assert (by_k[1] <= by_k[2]).all()  # each draw's sets are nested
    assert len({row.tobytes() for row in by_k[2]}) == 4  # and the draws differ
    assert (faithfulness.random_circuits(GRAPH, ks, 4, seed=5) == drawn).all()
    with pytest.raises(circuits.CircuitError, match="outside"):
        faithfulness.random_circuits(GRAPH, [GRAPH.n_edges + 1], 1, seed=0)


def test_smallest_k_of_the_sweep():
    ks = [1, 5, 10, 20, 50]
    values = [0.1, 0.5, 0.85, np.nan, 0.95]
    assert faithfulness.smallest_k(ks, values) == 10
    assert faithfulness.smallest_k(ks, values, tau=0.9) == 50  # the undefined K = 20 never reaches it
    assert faithfulness.smallest_k(ks, values, tau=0.99) is None
    assert faithfulness.smallest_k([50, 10, 5], [0.9, 0.85, 0.2]) == 10  # the smallest K, not the first listed
    assert faithfulness.DEFAULT_TAU == 0.8
    with pytest.raises(circuits.CircuitError, match="one faithfulness per swept K"):
        faithfulness.smallest_k(ks, values[:3])

"""The comparison's measures on hand-made scores (where the answer is known), nulls and intervals on synthetic
data, and the semantic and causal tools against identities they must satisfy on a random model."""

from __future__ import annotations

import numpy as np
import pytest

from mdm_circuits.analysis import causal, semantics, structure
from mdm_circuits.circuits.ablations import Ablation
from mdm_circuits.circuits.attribution import attribute
from mdm_circuits.circuits.graph import INPUT, LOGITS, Graph, Port, head, mlp
from mdm_circuits.circuits.interventions import run
from mdm_circuits.circuits.patching import ablate_node_sets, patch_nodes
from mdm_circuits.model.config import ModelConfig
from mdm_circuits.tasks import metrics
from mdm_circuits.tasks.batch import collate
from mdm_circuits.testing import random_examples, random_model

GRAPH = Graph(3, 2)
CONFIG = ModelConfig(vocab_size=40, d_model=24, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=8, d_mlp=32,
                     qkv_bias=True)


def _scores(pairs: dict) -> np.ndarray:
    """Edge scores of GRAPH: zero but for {(source node, destination node, port): score}."""
    matrix = np.zeros((GRAPH.n_sources, GRAPH.n_destinations))
    for (source, target, port), value in pairs.items():
        matrix[GRAPH.source_index(source), GRAPH.destination_index(target, port)] = value
    return GRAPH.edge_vector(matrix)


def test_identical_circuits_overlap_fully_and_disjoint_ones_not_at_all():
    rng = np.random.default_rng(0)
    a = rng.normal(size=GRAPH.n_edges)
    assert structure.jaccard_curve(a, a, [1, 5, 20]).tolist() == [1.0, 1.0, 1.0]
    assert structure.jaccard_curve(a, -3 * a, [5]).tolist() == [1.0]  # ranked by magnitude: scale free
    b = np.zeros_like(a)
    b[structure.ranking(a)[5:15]] = np.arange(10, 0, -1)  # b's top 10 are a's 6th to 15th, in order
    assert structure.jaccard_curve(a, b, [5]).tolist() == [0.0]
    assert structure.jaccard_curve(a, b, [10]).tolist() == [pytest.approx(5 / 15)]
    for k in (1, 7, GRAPH.n_edges):
        assert structure.jaccard_curve(a, b, [k])[0] == pytest.approx(
            structure.jaccard(structure.top_k_set(a, k), structure.top_k_set(b, k)))


def test_component_importance_sums_the_top_edges_at_both_ends():
    edges = _scores({(INPUT, mlp(0), None): 2.0, (head(0, 1), LOGITS, None): -1.0,
                     (mlp(0), head(1, 0), Port.K): 0.5, (INPUT, mlp(2), None): 0.1})
    importance = structure.node_importance(GRAPH, edges, k=3)  # the 0.1 edge is outside the top 3
    expected = np.zeros(GRAPH.n_sources)
    expected[GRAPH.source_index(INPUT)] = 2.0
    expected[GRAPH.source_index(mlp(0))] = 2.0 + 0.5          # entering, then leaving
    expected[GRAPH.source_index(head(0, 1))] = 1.0
    expected[GRAPH.source_index(head(1, 0))] = 0.5
    np.testing.assert_allclose(importance, expected / expected.sum())


def test_layer_centre_of_mass_and_specialisation_on_known_shares():
    def importance_at(rows):
        values = np.zeros(GRAPH.n_sources)
        values[rows] = 1.0
        return values / values.sum()

    first = importance_at([GRAPH.mlp_row(0)])
    last = importance_at(list(GRAPH.head_rows(2)))
    even = importance_at(list(range(1, GRAPH.n_sources)))
    assert structure.centre_of_mass(structure.layer_distribution(GRAPH, first)) == 0.0
    assert structure.centre_of_mass(structure.layer_distribution(GRAPH, last)) == 1.0
    assert structure.centre_of_mass(structure.layer_distribution(GRAPH, even)) == pytest.approx(0.5)
    np.testing.assert_allclose(structure.layer_distribution(GRAPH, even), [1 / 3] * 3)
    sharp, spread = structure.specialisation(GRAPH, first), structure.specialisation(GRAPH, even)
    n = GRAPH.n_sources - 1
    assert sharp == {"entropy": 0.0, "gini": pytest.approx((n - 1) / n), "top_3_share": 1.0}
    assert spread == {"entropy": pytest.approx(1.0), "gini": pytest.approx(0.0, abs=1e-12),
                      "top_3_share": pytest.approx(3 / n)}


def test_bootstrap_intervals_cover_the_true_value():
    """95% intervals of a mean, over 60 synthetic pools drawn around a known truth, cover it about 95% of the
    time (a wrong resampling scheme, e.g. without replacement, would not)."""
    truth = np.linspace(-1, 1, 12)
    covered = 0
    for trial in range(60):
        rows = truth + np.random.default_rng(trial).normal(scale=2.0, size=(80, truth.size))
        replicates = structure.bootstrap(lambda means: means[0][3], [rows], replicates=300, seed=trial)
        low, high = structure.interval(replicates)
        covered += low <= truth[3] <= high
    assert 0.85 <= covered / 60 <= 1.0


def test_nulls_are_computed_from_the_data():
    ks = [10, 50]
    chance = structure.random_jaccard(400, ks, draws=300, seed=0)
    for column, k in enumerate(ks):
        shared = k * k / 400  # expected |A ∩ B| of two random K-subsets of 400 edges
        assert chance[:, column].mean() == pytest.approx(shared / (2 * k - shared), rel=0.15)
    rng = np.random.default_rng(1)
    signal = np.where(np.arange(400) < 10, 5.0, 0.0)
    strong = signal + rng.normal(scale=0.5, size=(60, 400))
    noise = rng.normal(size=(60, 400))
    assert structure.split_half_jaccard(strong, [10], splits=20, seed=0).mean() == 1.0
    assert structure.split_half_jaccard(noise, [10], splits=20, seed=0).mean() < 0.2


def test_headline_k_and_sweep_follow_the_graph():
    assert structure.headline_k(Graph(28, 28)) == 1000
    assert structure.headline_k(GRAPH) == round(0.1 * GRAPH.n_edges)
    assert structure.headline_k(GRAPH) in structure.k_sweep(GRAPH)
    assert {1000, 10_000} <= set(structure.k_sweep(Graph(32, 32)))


def test_causal_sets_are_matched_in_count_and_layer_band():
    importance = np.zeros(GRAPH.n_sources)
    importance[[GRAPH.mlp_row(0), GRAPH.head_rows(0)[1], GRAPH.mlp_row(2), 0]] = [0.5, 0.3, 0.9, 1.0]
    important = causal.important_early(GRAPH, importance, size=3)
    # Layer 0 is the early band of 3 layers; the input is never chosen; the late MLP is not early.
    assert set(np.nonzero(important)[0]) == {GRAPH.mlp_row(0), GRAPH.head_rows(0)[1]}
    controls = causal.control_sets(GRAPH, important, size=2, draws=25, seed=0)
    later_rows = {*GRAPH.head_rows(1), *GRAPH.head_rows(2), GRAPH.mlp_row(1), GRAPH.mlp_row(2)}
    for sets in (controls.random, controls.middle_late):
        assert (sets.sum(axis=1) == 2).all() and not sets[:, 0].any()
        assert not (sets & important).any()
    assert all(set(np.nonzero(row)[0]) <= later_rows for row in controls.middle_late)
    assert len({tuple(row) for row in controls.random}) > 1  # several different draws


@pytest.fixture(scope="module")
def setup():
    model = random_model(CONFIG, 3)
    return model, collate(random_examples(CONFIG, 6, 3, min_length=6, max_length=7))


def test_direct_logits_of_every_component_sum_to_the_logits(setup):
    model, batch = setup
    example = batch[0]
    result = run(model, model.embed(example.clean), valid=example.valid)
    read = int(example.read_positions(model)[0])
    contributions = model.direct_logits(result.sources[:, read], result.final[read])
    np.testing.assert_allclose(contributions.sum(0), model.unembed(result.final)[read], rtol=1e-4, atol=1e-4)
    lens = semantics.logit_lens(model, batch, np.array([1, 3]), top=4, batch_size=4)
    assert lens.top_tokens.shape == (2, 4) and (np.diff(lens.top_logits, axis=1) <= 0).all()


def test_neuron_scores_add_up_to_the_mlps_edge_scores(setup):
    """Δh · ∂L/∂h summed over an MLP's neurons is Δ(its output) · ∂L/∂(its output): the EAP scores of the
    edges leaving it, summed."""
    model, batch = setup
    metric = metrics.logit_difference
    eap = attribute(model, batch, metric, method="eap")
    graph = eap.graph
    for layer in (0, 1):
        found = semantics.neurons(model, batch, metric, layer, top=3, batch_size=4)
        assert found.scores.shape == (CONFIG.d_mlp,)
        leaving = eap.matrix[graph.mlp_row(layer)].sum()
        assert found.scores.sum() == pytest.approx(leaving, rel=1e-3, abs=1e-5 * float(np.abs(eap.matrix).max()))
        assert found.top_inputs.shape == (3, 3, 2) and found.promoted_tokens.shape == (3, 5)


def test_ablating_a_set_of_one_node_is_patching_that_node(setup):
    model, batch = setup
    metric = metrics.logit_difference
    graph = Graph.for_model(CONFIG)
    sets = np.zeros((2, graph.n_sources), bool)
    sets[0, graph.mlp_row(1)] = True
    sets[1, [graph.mlp_row(1), *graph.head_rows(0)]] = True
    together = ablate_node_sets(model, batch, metric, sets)
    alone = patch_nodes(model, batch, metric, nodes=[mlp(1)], ablation=Ablation("zero"))
    # patch_nodes reports the loss change; ablate_node_sets the metric itself.
    assert together.metric[0] == pytest.approx(together.clean_metric - alone.values[0], rel=1e-4, abs=1e-5)
    assert together.metric[1] != pytest.approx(together.metric[0])
    nothing = ablate_node_sets(model, batch, metric, np.zeros((1, graph.n_sources), bool))
    assert nothing.retained[0] == pytest.approx(1.0, abs=1e-5)

"""Circuit selection and evaluation: baselines, one-edge removal by hand, pruning, curves, refusals."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mdm_circuits import circuits
from mdm_circuits.circuits.attribution import attribute
from mdm_circuits.circuits.graph import LOGITS, Graph, Port, head, mlp
from mdm_circuits.model.config import ModelConfig
from mdm_circuits.model.layers import rotary_tables
from mdm_circuits.model.transformer import head_outputs
from mdm_circuits.tasks import metrics
from mdm_circuits.tasks.batch import collate
from mdm_circuits.testing import random_examples, random_model

CONFIG = ModelConfig(vocab_size=40, d_model=24, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_mlp=32,
                     qkv_bias=True)
METRIC = metrics.logit_difference


@pytest.fixture(scope="module")
def setup():
    model = random_model(CONFIG, 7)
    batch = collate(random_examples(CONFIG, 3, 7, min_length=6, max_length=6))
    return model, batch, Graph.for_model(CONFIG)


def test_full_circuit_is_clean_and_empty_circuit_is_ablated(setup):
    model, batch, graph = setup
    scores = attribute(model, batch, METRIC, method="eap")
    evaluation = circuits.evaluate(model, batch, np.stack([graph.edge_mask, np.zeros_like(graph.edge_mask)]), METRIC)
    np.testing.assert_allclose(evaluation.circuit_metric, [scores.clean_metric, scores.corrupted_metric],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(evaluation.ablated_metric, scores.corrupted_metric, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(evaluation.faithfulness, [1.0, 0.0], atol=1e-4)


def forward_with_one_edge_corrupted(model, clean_tokens, corrupted_tokens, source_head, target):
    """By hand: head (0, source_head)'s output in `target`'s input comes from the corrupted run."""
    n = clean_tokens.shape[0]
    mask = model.attention_mask(jnp.ones(n, dtype=bool))
    rope = rotary_tables(jnp.arange(n), CONFIG.head_dim, CONFIG.rope_theta)
    graphdef, state = nnx.split(model)
    swap = (head_outputs(graphdef, state, corrupted_tokens)[0, :, source_head]
            - head_outputs(graphdef, state, clean_tokens)[0, :, source_head])
    node, port = target
    x = model.embed(clean_tokens)
    for layer, block in enumerate(map(model.layer, range(model.config.n_layers))):
        attn = block.attn
        q, k, v = attn.project(block.attn_norm(x))
        k, v = attn.expand_kv(k), attn.expand_kv(v)
        if layer == 1 and node.kind.name == "HEAD":
            q2, k2, v2 = attn.project(block.attn_norm(x + swap))
            altered = {Port.Q: (q, q2), Port.K: (k, attn.expand_kv(k2)), Port.V: (v, attn.expand_kv(v2))}
            original, replacement = altered[port]
            changed = original.at[:, node.head].set(replacement[:, node.head])
            q, k, v = [changed if p == port else altered[p][0] for p in (Port.Q, Port.K, Port.V)]
        x = x + attn.output(attn.attend(q, k, v, mask=mask, rope=rope))
        mlp_in = x + swap if (layer == 1 and node == mlp(1)) else x
        x = x + block.mlp(block.mlp_norm(mlp_in))
    return model.unembed(x + swap if node == LOGITS else x)


@pytest.mark.parametrize("target", [(head(1, 2), Port.Q), (head(1, 3), Port.K), (head(1, 0), Port.V),
                                    (mlp(1), None), (LOGITS, None)])
def test_removing_one_edge_equals_a_hand_built_forward(setup, target):
    model, batch, graph = setup
    source = head(0, 1)
    circuit = graph.edge_mask.copy()
    circuit[graph.source_index(source), graph.destination_index(*target)] = False
    evaluated = circuits.evaluate(model, batch, circuit, METRIC).circuit_metric[0]
    by_hand = np.mean([METRIC(forward_with_one_edge_corrupted(model, e.clean, e.corrupted, 1, target)[
        e.read_positions(CONFIG)], e, None) for e in batch])
    np.testing.assert_allclose(evaluated, by_hand, rtol=1e-4, atol=1e-6)
    clean = circuits.evaluate(model, batch, graph.edge_mask, METRIC).clean_metric
    assert abs(by_hand - clean) > 1e-4  # the edge matters, so the comparison can fail


def test_curve_is_one_program_over_many_k(setup):
    model, batch, graph = setup
    scores = attribute(model, batch, METRIC, steps=3)
    ks = [1, 10, 40, graph.n_edges]
    curve = circuits.faithfulness_curve(model, batch, scores, METRIC, ks)
    one_by_one = [circuits.evaluate(model, batch, circuits.top_k(graph, scores.matrix, k), METRIC).faithfulness[0]
                  for k in ks]
    np.testing.assert_allclose(curve.faithfulness, one_by_one, rtol=1e-4, atol=1e-5)
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-4)


def test_smallest_faithful_circuit(setup):
    model, batch, graph = setup
    scores = attribute(model, batch, METRIC, steps=3)
    k, circuit, faithfulness = circuits.smallest_faithful(model, batch, scores, METRIC, tau=0.8)
    assert faithfulness >= 0.8 and circuit.sum() == k
    assert circuits.evaluate(model, batch, circuit, METRIC).faithfulness[0] == pytest.approx(faithfulness, abs=1e-5)
    if k > 1:  # bisection leaves K − 1 below tau
        below = circuits.evaluate(model, batch, circuits.top_k(graph, scores.matrix, k - 1), METRIC)
        assert below.faithfulness[0] < 0.8


def test_top_k_orders_by_magnitude_or_sign():
    graph = Graph(1, 2)
    values = np.linspace(-1, 0.5, graph.n_edges)  # the most negative edge is the largest in magnitude
    scores = graph.edge_matrix(values)
    by_magnitude = graph.edge_vector(circuits.top_k(graph, scores, 1))
    signed = graph.edge_vector(circuits.top_k(graph, scores, 1, absolute=False))
    assert by_magnitude[0] and signed[-1]
    with pytest.raises(circuits.CircuitError, match=rf"K = {graph.n_edges + 1} is outside \[0, {graph.n_edges}\]"):
        circuits.top_k(graph, scores, graph.n_edges + 1)


def test_greedy_grows_from_the_logits_and_prune_removes_dangling_edges():
    graph = Graph(2, 2)
    rng = np.random.default_rng(0)
    scores = graph.edge_matrix(rng.normal(size=graph.n_edges))
    grown = circuits.greedy(graph, scores, 12)
    assert grown.sum() == 12
    # It starts with the best edge into the logits, and every edge enters a node that already leads on.
    into_logits = np.abs(scores[:, -1])
    assert grown[np.argmax(into_logits), -1]
    for source, column in zip(*np.nonzero(grown)):
        node = graph.destinations[column][0]
        assert node == LOGITS or grown[graph.source_index(node)].any()
    # An edge into a head that writes nowhere dangles; so does an edge out of a head nothing feeds.
    dangling = np.zeros_like(graph.edge_mask)
    dangling[graph.source_index(head(0, 0)), graph.destination_index(head(1, 1), Port.Q)] = True
    dangling[graph.source_index(head(1, 0)), graph.destination_index(LOGITS)] = True
    path = np.zeros_like(graph.edge_mask)
    path[0, graph.destination_index(mlp(0))] = True
    path[graph.source_index(mlp(0)), graph.destination_index(LOGITS)] = True
    assert (circuits.prune(graph, dangling | path) == path).all()

from __future__ import annotations

import json

import numpy as np
import pytest

from mdm_circuits.circuits.graph import INPUT, LOGITS, Graph, Port, head, mlp
from mdm_circuits.errors import GraphError


@pytest.mark.parametrize("layers, heads, expected", [
    (12, 12, 32_491),       # GPT-2 small, as the reference's n_edges('gpt2')
    (30, 9, 123_211),       # SmolLM2-135M
    (28, 28, 935_747),      # Qwen2.5-7B / Dream
    (32, 32, 1_592_881),    # LLaMA-2-7B / DiffuLLaMA
])
def test_edge_counts_follow_the_formula(layers, heads, expected):
    assert Graph(layers, heads).n_edges == expected


@pytest.mark.parametrize("layers, heads", [(1, 1), (3, 2), (12, 12)])
def test_enumerated_edges_match_the_count_and_the_mask(layers, heads):
    graph = Graph(layers, heads)
    assert len(graph.edges) == graph.n_edges == graph.edge_mask.sum()


def test_reference_order_and_names():
    graph = Graph(2, 2)
    names = [edge.name for edge in graph.edges]
    assert names[:7] == ["input->a0.h0<q>", "input->a0.h0<k>", "input->a0.h0<v>", "input->a0.h1<q>",
                         "input->a0.h1<k>", "input->a0.h1<v>", "input->m0"]
    assert names[7:9] == ["a0.h0->m0", "a0.h1->m0"]
    assert "a0.h1->m1" in names and "a1.h0->m1" in names and "a1.h0->a1.h1<q>" not in names
    assert names[-1] == "m1->logits" and len(names) == len(set(names))
    assert [node.name for node in graph.nodes] == ["input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1",
                                                   "logits"]


def test_indices_match_the_reference_layout():
    graph = Graph(3, 4)
    assert graph.source_index(INPUT) == 0
    assert graph.source_index(head(1, 2)) == 1 + 1 * 5 + 2
    assert graph.source_index(mlp(2)) == 1 + 2 * 5 + 4
    assert graph.destination_index(head(1, 2), Port.K) == 1 * 13 + 1 * 4 + 2
    assert graph.destination_index(mlp(1)) == 1 * 13 + 12
    assert graph.destination_index(LOGITS) == graph.n_destinations - 1
    assert graph.edge_mask.sum() == graph.n_edges
    # An edge's entry in the score matrix is where its indices say.
    for edge, source, destination in zip(graph.edges, *graph.edge_indices):
        assert (source, destination) == (graph.source_index(edge.source),
                                         graph.destination_index(edge.target, edge.port))
    with pytest.raises(GraphError, match="needs a port"):
        graph.destination_index(head(0, 0))


def test_json_round_trip(tmp_path):
    graph = Graph(2, 3, d_model=16)
    rng = np.random.default_rng(0)
    scores = graph.edge_matrix(rng.normal(size=graph.n_edges).astype(np.float32))
    circuit = graph.edge_matrix(rng.random(graph.n_edges) < 0.3, fill=False)
    graph.to_json(tmp_path / "circuit.json", scores, circuit)
    document = json.loads((tmp_path / "circuit.json").read_text())
    assert document["cfg"] == {"n_layers": 2, "n_heads": 3, "parallel_attn_mlp": False, "d_model": 16}
    assert set(document["edges"]["input->a0.h1<q>"]) == {"score", "in_graph"}
    read_scores, read_circuit = graph.from_json(tmp_path / "circuit.json")
    np.testing.assert_array_equal(read_scores, scores)
    np.testing.assert_array_equal(read_circuit, circuit)


def test_file_for_another_graph_is_refused(tmp_path):
    other = Graph(2, 3, d_model=8)
    other.to_json(tmp_path / "other.json", np.zeros((other.n_sources, other.n_destinations)))
    with pytest.raises(GraphError, match="written for a graph of 2 layers x 3 heads; this model's graph has 2 x 4"):
        Graph(2, 4).from_json(tmp_path / "other.json")
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(GraphError, match="not an EAP-IG graph file"):
        Graph(2, 4).from_json(tmp_path / "junk.json")
    document = json.loads((tmp_path / "other.json").read_text())
    document["edges"]["input->m0"] = 3
    (tmp_path / "broken.json").write_text(json.dumps(document))
    with pytest.raises(GraphError, match="an edge entry is not"):
        other.from_json(tmp_path / "broken.json")
    with pytest.raises(GraphError, match="records d_model"):
        Graph(2, 3).to_json(tmp_path / "x.json", np.zeros((other.n_sources, other.n_destinations)))


def _enumerated(n_layers: int, n_heads: int) -> list[tuple[str, int, int]]:
    """The graph written out edge by edge from its definition, the way the reference builds it: (name,
    source index, destination index)."""
    sources = ["input"] + [name for layer in range(n_layers)
                           for name in [f"a{layer}.h{h}" for h in range(n_heads)] + [f"m{layer}"]]
    edges = []
    for layer in range(n_layers):
        upstream = 1 + layer * (n_heads + 1)
        for source in range(upstream):
            for h in range(n_heads):
                for port, letter in enumerate("qkv"):
                    column = layer * (3 * n_heads + 1) + port * n_heads + h
                    edges.append((f"{sources[source]}->a{layer}.h{h}<{letter}>", source, column))
        for source in range(upstream + n_heads):
            edges.append((f"{sources[source]}->m{layer}", source, layer * (3 * n_heads + 1) + 3 * n_heads))
    edges += [(f"{name}->logits", source, n_layers * (3 * n_heads + 1)) for source, name in enumerate(sources)]
    return edges


@pytest.mark.parametrize("layers, heads", [(1, 1), (2, 3), (3, 2), (5, 4)])
def test_vectorised_layout_equals_an_edge_by_edge_enumeration(layers, heads):
    graph = Graph(layers, heads)
    expected = _enumerated(layers, heads)
    assert list(graph.edge_names) == [name for name, _, _ in expected]
    np.testing.assert_array_equal(graph.edge_indices[0], [source for _, source, _ in expected])
    np.testing.assert_array_equal(graph.edge_indices[1], [column for _, _, column in expected])
    mask = np.zeros((graph.n_sources, graph.n_destinations), bool)
    mask[graph.edge_indices] = True
    np.testing.assert_array_equal(graph.edge_mask, mask)
    for column, (node, port) in enumerate(graph.destinations[:-1]):
        assert graph.own_destinations[:, column].nonzero()[0].tolist() == [graph.source_index(node)]


def test_layout_helpers_round_trip():
    graph = Graph(3, 2)
    rows = np.arange(graph.n_sources * 2).reshape(graph.n_sources, 2)
    first, per_layer = graph.layer_rows(rows)
    assert per_layer.shape == (3, 3, 2) and (per_layer[1, 2] == rows[graph.mlp_row(1)]).all()
    np.testing.assert_array_equal(graph.join_rows(first, per_layer), rows)
    columns = np.arange(graph.n_destinations)
    per_layer, logits = graph.layer_columns(columns)
    assert per_layer[2, 3 * 2] == graph.destination_index(mlp(2)) and logits == graph.destination_index(LOGITS)
    heads = per_layer[:, :-1].reshape(3, 3, 2)
    assert heads[1, 2, 0] == graph.destination_index(head(1, 0), Port.V)
    np.testing.assert_array_equal(graph.join_layer_columns(per_layer, logits), columns)


def test_graphs_are_built_once_per_shape():
    from mdm_circuits.model.config import ModelConfig

    config = ModelConfig(vocab_size=8, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4, d_mlp=8)
    assert Graph.for_model(config) is Graph.for_model(config.replace(attention="bidirectional"))

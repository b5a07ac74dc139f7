from __future__ import annotations

import json

import numpy as np
import pytest

from mdm_circuits.circuits.graph import INPUT, LOGITS, Graph, GraphError, Port, head, mlp


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

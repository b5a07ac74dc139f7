"""The EAP-IG computation graph, in the PyTorch reference's (hannamw/EAP-IG) order and names.

Nodes are the input embedding, every attention head, every MLP and the logits. A node's output is what it
writes to the residual stream (a head's is z·W_O without any output bias); a destination's input is the
residual stream it reads, before its norm. A head has three inputs (q, k, v), each its own copy of the
residual stream. Sources of a head in layer l: the input and every head and MLP of earlier layers; an MLP's
also include the heads of its own layer; the logits read every node.

Scores and circuits are matrices `[n_sources, n_destinations]` with the reference's layout:
  source index:      input 0; a{l}.h{h} 1 + l(H+1) + h; m{l} 1 + l(H+1) + H
  destination index: a{l}.h{h}<q|k|v> l(3H+1) + {0,1,2}H + h; m{l} l(3H+1) + 3H; logits last
Only the entries of real edges (`Graph.edge_mask`) carry meaning. Strings appear only at the boundary
(names, JSON); code addresses nodes with the typed `Node`, `Port` and integer indices.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np

from mdm_circuits.errors import GraphError


class NodeKind(enum.Enum):
    INPUT = "input"
    HEAD = "head"
    MLP = "mlp"
    LOGITS = "logits"


class Port(enum.Enum):
    """Which input of an attention head an edge enters."""

    Q = "q"
    K = "k"
    V = "v"


@dataclasses.dataclass(frozen=True, order=True)
class Node:
    kind: NodeKind
    layer: int | None = None
    head: int | None = None

    @property
    def name(self) -> str:
        match self.kind:
            case NodeKind.INPUT:
                return "input"
            case NodeKind.HEAD:
                return f"a{self.layer}.h{self.head}"
            case NodeKind.MLP:
                return f"m{self.layer}"
            case NodeKind.LOGITS:
                return "logits"


INPUT = Node(NodeKind.INPUT)
LOGITS = Node(NodeKind.LOGITS)


def head(layer: int, index: int) -> Node:
    return Node(NodeKind.HEAD, layer, index)


def mlp(layer: int) -> Node:
    return Node(NodeKind.MLP, layer)


@dataclasses.dataclass(frozen=True)
class Edge:
    source: Node
    target: Node
    port: Port | None = None

    @property
    def name(self) -> str:
        port = "" if self.port is None else f"<{self.port.value}>"
        return f"{self.source.name}->{self.target.name}{port}"



@dataclasses.dataclass(frozen=True)
class Graph:
    """The graph of a model with `n_layers` blocks of `n_heads` heads (`d_model` only goes into JSON files,
    where the reference reads it).

    The graph is the one owner of the node and column layout: other modules index score matrices and node
    rows through its indices and layout helpers. Every array property is built with vectorised arithmetic
    and cached; `Graph.for_model` returns one cached graph per shape."""

    n_layers: int
    n_heads: int
    d_model: int | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def for_model(cls, config) -> Graph:
        return _graph(config.n_layers, config.n_heads, config.d_model)

    # ---- sizes and indices ----

    @property
    def n_sources(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def n_destinations(self) -> int:
        return self.n_layers * (3 * self.n_heads + 1) + 1

    @property
    def n_edges(self) -> int:
        """Σ_l [3H (1 + l(H+1)) + (1 + l(H+1) + H)] + 1 + L(H+1), without enumerating the edges."""
        return int(self.upstream[:-1].sum()) + self.n_sources

    def source_index(self, node: Node) -> int:
        stride = self.n_heads + 1
        match node.kind:
            case NodeKind.INPUT:
                return 0
            case NodeKind.HEAD:
                return 1 + node.layer * stride + node.head
            case NodeKind.MLP:
                return 1 + node.layer * stride + self.n_heads
        raise GraphError(f"{node.name} writes nothing; it is not a source")

    def destination_index(self, node: Node, port: Port | None = None) -> int:
        stride = 3 * self.n_heads + 1
        match node.kind:
            case NodeKind.HEAD:
                if port is None:
                    raise GraphError(f"an edge into {node.name} needs a port (q, k or v)")
                return node.layer * stride + list(Port).index(port) * self.n_heads + node.head
            case NodeKind.MLP:
                return node.layer * stride + 3 * self.n_heads
            case NodeKind.LOGITS:
                return self.n_destinations - 1
        raise GraphError(f"{node.name} reads nothing; it is not a destination")

    def upstream_count(self, node: Node) -> int:
        """How many sources (a prefix of the source order) feed `node`."""
        match node.kind:
            case NodeKind.HEAD:
                return 1 + node.layer * (self.n_heads + 1)
            case NodeKind.MLP:
                return 1 + node.layer * (self.n_heads + 1) + self.n_heads
            case NodeKind.LOGITS:
                return self.n_sources
        raise GraphError(f"{node.name} reads nothing")

    @functools.cached_property
    def upstream(self) -> np.ndarray:
        """int[n_destinations]: how many sources (a prefix of the source order) feed each column."""
        h = self.n_heads
        first = 1 + np.arange(self.n_layers) * (h + 1)                       # sources before layer l's heads
        per_layer = np.concatenate([np.repeat(first[:, None], 3 * h, axis=1), (first + h)[:, None]], axis=1)
        return _frozen(np.append(per_layer.reshape(-1), self.n_sources))

    # ---- layout helpers: rows are sources, columns destinations ----

    def head_rows(self, layer: int) -> np.ndarray:
        """The source rows of layer `layer`'s heads, in head order."""
        first = 1 + layer * (self.n_heads + 1)
        return np.arange(first, first + self.n_heads)

    def mlp_row(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def layer_rows(self, rows):
        """Rows in source order, split into the input's row and `[L, H + 1, ...]` (each layer's heads, then
        its MLP). Works on NumPy and JAX arrays alike."""
        return rows[0], rows[1:].reshape(self.n_layers, self.n_heads + 1, *rows.shape[1:])

    def join_rows(self, first, per_layer):
        """Inverse of `layer_rows`: the input's row and `[L, H + 1, ...]` as rows in source order."""
        xp = _namespace(per_layer)
        return xp.concatenate([first[None], per_layer.reshape(-1, *per_layer.shape[2:])])

    def layer_columns(self, columns):
        """Columns in destination order (last axis), split into `[..., L, 3H + 1]` (each layer's heads'
        q inputs, then their k and v inputs, then its MLP's input) and the logits' column `[...]`."""
        return (columns[..., :-1].reshape(*columns.shape[:-1], self.n_layers, 3 * self.n_heads + 1),
                columns[..., -1])

    def join_layer_columns(self, per_layer, logits):
        """Inverse of `layer_columns`: `[..., L, 3H + 1]` and the logits' column `[...]` in destination order."""
        xp = _namespace(per_layer)
        return xp.concatenate([per_layer.reshape(*per_layer.shape[:-2], -1), logits[..., None]], axis=-1)

    # ---- nodes and edges, in the reference's order ----

    @functools.cached_property
    def nodes(self) -> tuple[Node, ...]:
        """Sources in source-index order, then the logits."""
        layers = [(*(head(l, h) for h in range(self.n_heads)), mlp(l)) for l in range(self.n_layers)]
        return (INPUT, *(node for layer in layers for node in layer), LOGITS)

    @functools.cached_property
    def sources(self) -> tuple[Node, ...]:
        return self.nodes[:-1]

    @functools.cached_property
    def destinations(self) -> tuple[tuple[Node, Port | None], ...]:
        """(node, port) of every destination column, in column order."""
        columns = []
        for layer in range(self.n_layers):
            columns += [(head(layer, h), port) for port in Port for h in range(self.n_heads)]
            columns.append((mlp(layer), None))
        return (*columns, (LOGITS, None))

    @functools.cached_property
    def edge_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """(source index, destination index) of every edge, in the reference's edge order: layer by layer,
        the heads' inputs (by source, then head, then q/k/v), the MLP's input (by source); the logits last."""
        h = self.n_heads
        stride = 3 * h + 1
        ports = (np.arange(3)[None, :] * h + np.arange(h)[:, None]).reshape(-1)      # head-major, then q/k/v
        sources, destinations = [], []
        for layer in range(self.n_layers):
            upstream = 1 + layer * (h + 1)
            sources += [np.repeat(np.arange(upstream), 3 * h), np.arange(upstream + h)]
            destinations += [np.tile(layer * stride + ports, upstream), np.full(upstream + h, layer * stride + 3 * h)]
        sources.append(np.arange(self.n_sources))
        destinations.append(np.full(self.n_sources, self.n_destinations - 1))
        return (_frozen(np.concatenate(sources).astype(np.int32)),
                _frozen(np.concatenate(destinations).astype(np.int32)))

    @functools.cached_property
    def edge_mask(self) -> np.ndarray:
        """bool[n_sources, n_destinations]: which entries of a score matrix are real edges."""
        return _frozen(np.arange(self.n_sources)[:, None] < self.upstream[None, :])

    @functools.cached_property
    def column_owners(self) -> np.ndarray:
        """int[n_destinations]: the source node each destination column belongs to (a head's q, k and v
        inputs, an MLP's input); −1 for the logits."""
        owners = np.empty(self.n_destinations, dtype=np.int64)
        per_layer, _ = self.layer_columns(owners)
        rows = 1 + np.arange(self.n_layers)[:, None] * (self.n_heads + 1)
        per_layer[:, :-1] = np.tile(rows + np.arange(self.n_heads)[None, :], 3)
        per_layer[:, -1] = rows[:, 0] + self.n_heads
        owners[-1] = -1
        return _frozen(owners)

    @functools.cached_property
    def own_destinations(self) -> np.ndarray:
        """bool[n_sources, n_destinations]: the destination columns that belong to each source node (a head's
        q, k and v inputs, an MLP's input); the input node has none."""
        return _frozen(np.arange(self.n_sources)[:, None] == self.column_owners[None, :])

    @functools.cached_property
    def edges(self) -> tuple[Edge, ...]:
        """Every edge as typed nodes, in edge order (for small graphs: at 7B shapes this is ~10^6 objects)."""
        columns = self.destinations
        return tuple(Edge(self.sources[s], columns[d][0], columns[d][1]) for s, d in zip(*self.edge_indices))

    @functools.cached_property
    def edge_names(self) -> tuple[str, ...]:
        """Every edge's name in the reference's naming (`a0.h1->m1`, `input->a2.h0<q>`), in edge order."""
        sources = [node.name + "->" for node in self.sources]
        columns = [node.name + ("" if port is None else f"<{port.value}>") for node, port in self.destinations]
        return tuple(sources[s] + columns[d] for s, d in zip(self.edge_indices[0].tolist(),
                                                             self.edge_indices[1].tolist()))

    def edge_vector(self, matrix) -> np.ndarray:
        """The entries of `[..., n_sources, n_destinations]` matrices, one per edge in edge order."""
        return np.asarray(matrix)[..., self.edge_indices[0], self.edge_indices[1]]

    def edge_matrix(self, vector: np.ndarray, fill: Any = 0) -> np.ndarray:
        """Inverse of `edge_vector`: a matrix with `vector` at the edges and `fill` elsewhere."""
        vector = np.asarray(vector)
        if vector.shape != (self.n_edges,):
            raise GraphError(f"expected one value per edge ({self.n_edges}), got shape {vector.shape}")
        matrix = np.full((self.n_sources, self.n_destinations), fill, dtype=vector.dtype)
        matrix[self.edge_indices] = vector
        return matrix

    # ---- JSON in the reference's naming ----

    def to_json(self, path: str | Path, scores: np.ndarray, circuit: np.ndarray | None = None) -> None:
        """Write scores (and a circuit, else no edge is in it) in the reference's `Graph.to_json` format."""
        Path(path).write_text(self.json(scores, circuit))

    def json(self, scores: np.ndarray, circuit: np.ndarray | None = None) -> str:
        """Scores (and a circuit) as the text of the reference's `Graph.to_json` format."""
        if self.d_model is None:
            raise GraphError("the reference's JSON format records d_model; build the graph with Graph.for_model")
        scores = self.edge_vector(scores)
        in_graph = np.zeros(self.n_edges, bool) if circuit is None else self.edge_vector(circuit)
        nodes_in = nodes_in_circuit(self, circuit) if circuit is not None else set()
        document = {
            "cfg": {"n_layers": self.n_layers, "n_heads": self.n_heads, "parallel_attn_mlp": False,
                    "d_model": self.d_model},
            "nodes": {node.name: {"in_graph": node in nodes_in or node == LOGITS} for node in self.nodes},
            "edges": {name: {"score": float(score), "in_graph": bool(kept)}
                      for name, score, kept in zip(self.edge_names, scores.tolist(), in_graph.tolist())},
        }
        return json.dumps(document)

    def from_json(self, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
        """Read (scores, circuit) matrices from a reference-format JSON file written for this graph."""
        try:
            document = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise GraphError(f"{path}: not JSON ({error})") from error
        if not isinstance(document, dict) or not isinstance(document.get("cfg"), dict) or not isinstance(
                document.get("edges"), dict):
            raise GraphError(f"{path}: not an EAP-IG graph file (needs a 'cfg' and an 'edges' object)")
        cfg = document["cfg"]
        if None not in (self.d_model, cfg.get("d_model")) and cfg["d_model"] != self.d_model:
            raise GraphError(f"{path}: written for a model of d_model {cfg['d_model']}; this model's is "
                             f"{self.d_model} (same layers and heads, another model)")
        shape = (cfg.get("n_layers"), cfg.get("n_heads"))
        if shape != (self.n_layers, self.n_heads) or cfg.get("parallel_attn_mlp", False):
            raise GraphError(f"{path}: written for a graph of {shape[0]} layers x {shape[1]} heads"
                             f"{' with parallel attention/MLP' if cfg.get('parallel_attn_mlp') else ''}; "
                             f"this model's graph has {self.n_layers} x {self.n_heads}")
        names = self.edge_names
        edges = document["edges"]
        missing, unknown = set(names) - set(edges), set(edges) - set(names)
        if missing or unknown:
            raise GraphError(f"{path}: edges do not match this graph ({len(missing)} missing, e.g. "
                             f"{sorted(missing)[:3]}; {len(unknown)} unknown, e.g. {sorted(unknown)[:3]})")
        try:
            scores = np.array([np.nan if edges[n].get("score") is None else edges[n]["score"] for n in names],
                              dtype=np.float32)
            in_graph = np.array([bool(edges[n].get("in_graph", False)) for n in names])
        except (AttributeError, TypeError, ValueError) as error:
            raise GraphError(f"{path}: an edge entry is not {{'score': number, 'in_graph': bool}} ({error})") from error
        return self.edge_matrix(scores, fill=np.float32(0)), self.edge_matrix(in_graph, fill=False)


def nodes_in_circuit(graph: Graph, circuit: np.ndarray) -> set[Node]:
    """Nodes touched by at least one edge of the circuit."""
    sources, destinations = np.nonzero(np.asarray(circuit) & graph.edge_mask)
    return ({graph.sources[i] for i in sources} | {graph.destinations[j][0] for j in destinations})


@functools.cache
def _graph(n_layers: int, n_heads: int, d_model: int | None) -> Graph:
    return Graph(n_layers, n_heads, d_model)


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _namespace(array):
    """NumPy for NumPy arrays, jax.numpy otherwise (the layout helpers serve host and traced arrays)."""
    if isinstance(array, np.ndarray):
        return np
    import jax.numpy as jnp

    return jnp

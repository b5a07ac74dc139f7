"""Exact patching against hand-built forwards, and the vmapped sweep against a Python loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mdm_circuits.circuits.ablations import Ablation
from mdm_circuits.circuits.graph import Graph, head, mlp
from mdm_circuits.circuits.interventions import Interventions, NodePatch, run
from mdm_circuits.circuits.patching import patch_nodes
from mdm_circuits.circuits.runs import read_logits
from mdm_circuits.model.config import ModelConfig
from mdm_circuits.model.layers import rotary_tables
from mdm_circuits.model.transformer import head_outputs
from mdm_circuits.tasks import metrics
from mdm_circuits.tasks.batch import collate
from mdm_circuits.testing import random_examples, random_model

CONFIG = ModelConfig(vocab_size=40, d_model=24, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_mlp=32,
                     qkv_bias=True)


def forward_replacing_head(model, tokens, layer, index, replacement):
    """The model written out by hand, with one head's output (z·W_O) replaced."""
    n = tokens.shape[0]
    mask = model.attention_mask(jnp.ones(n, dtype=bool))
    rope = rotary_tables(jnp.arange(n), CONFIG.head_dim, CONFIG.rope_theta)
    x = model.embed(tokens)
    for l, block in enumerate(map(model.layer, range(model.config.n_layers))):
        outputs = block.attn.head_outputs(block.attn.heads(block.attn_norm(x), mask=mask, rope=rope))
        if l == layer:
            outputs = outputs.at[:, index].set(replacement)
        x = x + outputs.sum(1)
        x = x + block.mlp(block.mlp_norm(x))
    return model.unembed(x)


@pytest.mark.parametrize("layer, index", [(0, 1), (1, 3)])
def test_patching_one_head_equals_a_forward_with_its_output_replaced(layer, index):
    model = random_model(CONFIG, 0)
    batch = collate(random_examples(CONFIG, 3, 0, min_length=6, max_length=6))
    effects = patch_nodes(model, batch, metrics.logit_difference, nodes=[head(layer, index)])
    graphdef, state = nnx.split(model)
    losses = []
    for example in batch:
        corrupted = head_outputs(graphdef, state, example.corrupted)[layer, :, index]
        patched = forward_replacing_head(model, example.clean, layer, index, corrupted)
        clean = forward_replacing_head(model, example.clean, layer, index,
                                       head_outputs(graphdef, state, example.clean)[layer, :, index])
        read = example.read_positions(CONFIG)
        losses.append(metrics.logit_difference.loss(patched[read], example, None)
                      - metrics.logit_difference.loss(clean[read], example, None))
    np.testing.assert_allclose(effects.values[0], np.mean(losses), rtol=1e-4, atol=1e-6)


def test_vmapped_sweep_equals_a_loop_of_single_patches():
    """Every node at every position in one program, against one `run` per (node, position)."""
    model = random_model(CONFIG, 1)
    batch = collate(random_examples(CONFIG, 2, 1))
    sweep = patch_nodes(model, batch, metrics.logit_difference, per_position=True, chunk=8)
    graph = Graph.for_model(CONFIG)
    length = batch.clean.shape[1]
    assert sweep.values.shape == (graph.n_sources, length)
    expected = np.zeros_like(sweep.values)
    for example in batch:
        clean = run(model, model.embed(example.clean), valid=example.valid)
        corrupted = run(model, model.embed(example.corrupted), valid=example.valid)
        clean_logits = read_logits(model, clean.final, example)
        clean_loss = metrics.logit_difference.loss(clean_logits, example, clean_logits)
        for source in range(graph.n_sources):
            for position in range(length):
                keep = jnp.ones((graph.n_sources, length)).at[source, position].set(0.0)
                result = run(model, model.embed(example.clean),
                             Interventions(nodes=NodePatch(keep, corrupted.sources)), valid=example.valid)
                loss = metrics.logit_difference.loss(read_logits(model, result.final, example), example,
                                                     clean_logits)
                expected[source, position] += float(loss - clean_loss) / batch.size
    # Unpatched runs add the heads' outputs in one projection, patched runs one by one: rounding differs.
    np.testing.assert_allclose(sweep.values, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # Every position of a node at once, for a few nodes, against single runs.
    whole = patch_nodes(model, batch, metrics.logit_difference)
    assert whole.values.shape == (graph.n_sources,)
    for source in (0, 3, graph.n_sources - 1):
        effect = 0.0
        for example in batch:
            clean = run(model, model.embed(example.clean), valid=example.valid)
            corrupted = run(model, model.embed(example.corrupted), valid=example.valid)
            clean_logits = read_logits(model, clean.final, example)
            keep = jnp.ones((graph.n_sources, length)).at[source].set(0.0)
            result = run(model, model.embed(example.clean), Interventions(nodes=NodePatch(keep, corrupted.sources)),
                         valid=example.valid)
            effect += float(metrics.logit_difference.loss(read_logits(model, result.final, example), example,
                                                          clean_logits)
                            - metrics.logit_difference.loss(clean_logits, example, clean_logits)) / batch.size
        assert whole.values[source] == pytest.approx(effect, rel=1e-4, abs=1e-4 * np.abs(whole.values).max())


def test_zero_ablation_of_an_mlp():
    model = random_model(CONFIG, 2)
    batch = collate(random_examples(CONFIG, 2, 2, min_length=5, max_length=5))
    effects = patch_nodes(model, batch, metrics.logit_difference, nodes=[mlp(1)], ablation=Ablation("zero"))
    losses = []
    for example in batch:
        clean = run(model, model.embed(example.clean))
        without = clean.final - clean.sources[Graph.for_model(CONFIG).source_index(mlp(1))]  # last MLP: no downstream
        read = example.read_positions(CONFIG)
        losses.append(metrics.logit_difference.loss(model.unembed(without)[read], example, None)
                      - metrics.logit_difference.loss(model.unembed(clean.final)[read], example, None))
    np.testing.assert_allclose(effects.values[0], np.mean(losses), rtol=1e-4, atol=1e-6)
    assert effects.top(1)[0][0] == mlp(1)


def test_unpatched_run_is_the_model():
    model = random_model(CONFIG, 3)
    tokens = jnp.array([3, 1, 4, 1, 5, 9])
    result = run(model, model.embed(tokens))
    np.testing.assert_allclose(model.unembed(result.final), jax.jit(lambda m, t: m(t))(model, tokens),
                               rtol=1e-5, atol=1e-5)
    graphdef, state = nnx.split(model)
    np.testing.assert_allclose(result.sources[1:5].swapaxes(0, 1), head_outputs(graphdef, state, tokens)[0],
                               rtol=1e-5, atol=1e-6)


def test_the_intervened_forward_compiles_to_the_plain_forwards_memory():
    """The plain and the intervened forward are one block step: without interventions they compile to the
    same temporaries, and the parameters are arguments once (not restacked into temporaries)."""
    model = random_model(CONFIG.replace(n_layers=4), 0)
    tokens = jax.ShapeDtypeStruct((4, 12), jnp.int32)
    plain = jax.jit(lambda m, t: jax.vmap(m)(t)).lower(model, tokens).compile().memory_analysis()
    intervened = jax.jit(lambda m, t: jax.vmap(lambda x: m.unembed(run(m, m.embed(x), keep_sources=False).final))(
        t)).lower(model, tokens).compile().memory_analysis()
    assert intervened.temp_size_in_bytes <= 1.1 * plain.temp_size_in_bytes
    assert intervened.argument_size_in_bytes == plain.argument_size_in_bytes

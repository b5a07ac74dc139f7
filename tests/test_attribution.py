"""Attribution against the definitions: finite differences, exact patching, and clear refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_examples, random_model, run as run_model
from mdm_circuits import metrics
from mdm_circuits.ablations import Ablation
from mdm_circuits.attribution import attribute
from mdm_circuits.batch import Example, collate
from mdm_circuits.config import ModelConfig
from mdm_circuits.graph import Graph, Port
from mdm_circuits.interventions import EdgeWeights, Interventions, run
from mdm_circuits.scoring import AttributionError, read_logits

CONFIG = ModelConfig(vocab_size=40, d_model=24, n_layers=2, n_heads=3, n_kv_heads=1, head_dim=8, d_mlp=32,
                     qkv_bias=True)


def test_eap_equals_finite_differences_along_each_edge():
    """EAP's score of edge u→v is the derivative of the loss as v's input moves along Δ_u: checked for
    every edge of the graph (q, k, v, MLP and logits destinations), in float64."""
    with jax.enable_x64(True):
        model = random_model(CONFIG, seed=3, dtype=jnp.float64)
        batch = collate(random_examples(CONFIG, 1, seed=3))
        scores = attribute(model, batch, metrics.logit_difference, method="eap").matrix
        example = batch[0]
        clean = run(model, model.embed(example.clean), valid=example.valid)
        corrupted = run(model, model.embed(example.corrupted), valid=example.valid)
        graph = Graph.for_model(CONFIG)
        full = jnp.ones((graph.n_sources, graph.n_destinations), jnp.float64)

        @jax.jit
        def loss_with(source, destination, epsilon):
            # Weight 1 − ε on the edge: v reads its clean input plus ε · (corrupted − clean output of u).
            weights = full.at[source, destination].set(1 - epsilon)
            result = run(model, model.embed(example.clean),
                         Interventions(edges=EdgeWeights(weights, corrupted.sources)), valid=example.valid)
            return metrics.logit_difference.loss(read_logits(model, result.final, example), example, None)

        epsilon = 1e-4
        sources, destinations = graph.edge_indices
        difference = jax.vmap(lambda s, d: (loss_with(s, d, epsilon) - loss_with(s, d, -epsilon)) / (2 * epsilon))(
            jnp.asarray(sources), jnp.asarray(destinations))
    eap = scores[sources, destinations]
    scale = np.abs(difference).max()
    assert scale > 1e-3  # the model is far from trivial
    np.testing.assert_allclose(eap, np.asarray(difference), rtol=1e-3, atol=1e-6 * scale)
    ports = {graph.destinations[d][1] for d in destinations}
    assert {Port.Q, Port.K, Port.V, None} <= ports


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


def _flip_examples(model, n, seed):
    """IOI-like pairs: the answer is the model's clean prediction, the counterfactual its prediction on the
    corrupted input, kept only where the corruption changes the prediction."""
    examples = []
    for example in random_examples(CONFIG, 6 * n, seed, changed=1):
        clean = int(jnp.argmax(run_model(model, example.clean)[-1]))
        corrupted = int(jnp.argmax(run_model(model, example.corrupted)[-1]))
        if clean != corrupted:
            examples.append(Example(example.clean, example.corrupted, example.answer_positions, [[clean]],
                                    [[corrupted]]))
    return examples[:n]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_integrated_gradients_rank_edges_closer_to_exact_patching_than_eap(seed):
    """With 50 steps, EAP-IG's Spearman correlation with exact edge patching beats EAP's by at least 0.1 on
    these fixed seeds (measured: EAP 0.58/0.61/0.55, EAP-IG 0.72/0.82/0.69)."""
    model = random_model(CONFIG, seed)
    batch = collate(_flip_examples(model, 16, seed))
    metric = metrics.probability_difference
    exact = attribute(model, batch, metric, method="exact").edges
    eap = attribute(model, batch, metric, method="eap").edges
    eap_ig = attribute(model, batch, metric, method="eap_ig_inputs", steps=50, step_chunk=10).edges
    assert _spearman(exact, eap_ig) >= _spearman(exact, eap) + 0.1


def test_one_integration_step_is_eap_from_the_corrupted_input():
    """m = 1 evaluates the gradient at α = 0 only: the corrupted input."""
    model = random_model(CONFIG, 0)
    batch = collate(random_examples(CONFIG, 4, 0))
    one_step = attribute(model, batch, metrics.logit_difference, method="eap_ig_inputs", steps=1).matrix
    swapped = batch.replace(clean=batch.corrupted, corrupted=batch.clean)
    eap_at_corrupted = attribute(model, swapped, metrics.logit_difference, method="eap").matrix
    # Δ flips sign when clean and corrupted swap; the gradient is then taken at the corrupted input, but
    # the metric's reference answers stay the same.
    np.testing.assert_allclose(one_step, -eap_at_corrupted, rtol=1e-4, atol=1e-7)


def test_chunked_steps_and_batches_do_not_change_scores():
    model = random_model(CONFIG, 1)
    batch = collate(random_examples(CONFIG, 7, 1))
    reference = attribute(model, batch, metrics.logit_difference, steps=4, batch_size=8).matrix
    chunked = attribute(model, batch, metrics.logit_difference, steps=4, step_chunk=2, batch_size=3).matrix
    np.testing.assert_allclose(chunked, reference, rtol=1e-4, atol=1e-7)


def test_mean_aggregation_divides_by_each_length():
    model = random_model(CONFIG, 2)
    examples = random_examples(CONFIG, 1, 2)
    batch = collate(examples)
    summed = attribute(model, batch, metrics.logit_difference, method="eap").matrix
    mean = attribute(model, batch, metrics.logit_difference, method="eap", aggregation="mean").matrix
    np.testing.assert_allclose(mean, summed / len(examples[0].clean), rtol=1e-5, atol=1e-8)


def test_zero_ablation_scores_measure_against_zero():
    """Δ = 0 − clean for zero ablation, so its EAP scores equal −(clean output · gradient)."""
    model = random_model(CONFIG, 4)
    batch = collate(random_examples(CONFIG, 2, 4))
    zero = attribute(model, batch, metrics.logit_difference, method="eap", ablation=Ablation("zero"))
    swapped = batch.replace(corrupted=jnp.zeros_like(batch.corrupted))
    assert zero.matrix.shape == (zero.graph.n_sources, zero.graph.n_destinations)
    assert not np.allclose(zero.matrix, attribute(model, swapped, metrics.logit_difference, method="eap").matrix)
    assert np.abs(zero.matrix).max() > 0


def test_mean_and_resample_ablations_run():
    model = random_model(CONFIG, 5)
    batch = collate(random_examples(CONFIG, 4, 5))
    for kind in ("mean", "mean_positional", "resample"):
        scores = attribute(model, batch, metrics.logit_difference, method="eap", ablation=Ablation(kind))
        assert np.isfinite(scores.matrix).all() and np.abs(scores.matrix).max() > 0


def test_activation_integrals_agree_with_input_integrals_for_the_input_node():
    """Interpolating the input node's output is interpolating the input embeddings: the edges leaving the
    input get the same scores from both EAP-IG variants."""
    model = random_model(CONFIG, 6)
    batch = collate(random_examples(CONFIG, 3, 6))
    inputs = attribute(model, batch, metrics.logit_difference, method="eap_ig_inputs", steps=3).matrix
    activations = attribute(model, batch, metrics.logit_difference, method="eap_ig_activations", steps=3).matrix
    np.testing.assert_allclose(activations[0], inputs[0], rtol=1e-4, atol=1e-7)
    assert not np.allclose(activations[1:], inputs[1:])


# ---- refusals ----


def test_clean_and_corrupted_of_different_lengths():
    with pytest.raises(ValueError, match="clean has 4 tokens, corrupted 5"):
        collate([Example([1, 2, 3, 4], [1, 2, 3, 4, 5], [4], [[1]], [[2]])])


def test_metric_producing_nan():
    model = random_model(CONFIG, 0)
    batch = collate(random_examples(CONFIG, 3, 0))
    broken = metrics.Metric("broken", lambda logits, example, clean: jnp.log(logits[0, 0] - logits[0, 0] - 1.0))
    with pytest.raises(AttributionError, match=r"metric is not finite on the clean run of example\(s\) \[0, 1, 2\]"):
        attribute(model, batch, broken)


def test_answer_read_outside_the_tokens():
    model = random_model(CONFIG, 0)
    batch = collate([Example([1, 2, 3], [1, 2, 4], [0], [[1]], [[2]])])  # shifted: reads position -1
    with pytest.raises(ValueError, match="read from the logits at position -1"):
        attribute(model, batch, metrics.logit_difference)


def test_unknown_method_and_bad_steps():
    model = random_model(CONFIG, 0)
    batch = collate(random_examples(CONFIG, 2, 0))
    with pytest.raises(AttributionError, match="unknown method"):
        attribute(model, batch, metrics.logit_difference, method="integrated")
    with pytest.raises(AttributionError, match="multiple of step_chunk"):
        attribute(model, batch, metrics.logit_difference, steps=5, step_chunk=2)
    with pytest.raises(AttributionError, match="use method='eap' for zero ablation"):
        attribute(model, batch, metrics.logit_difference, ablation=Ablation("zero"))

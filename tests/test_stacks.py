"""Models of one architecture run as one program: a stack gives what separate runs give, per-example scores
average to the batch result, and a second model of the same shapes compiles nothing new."""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np
import pytest

from mdm_circuits import circuits
from mdm_circuits.circuits.ablations import Ablation
from mdm_circuits.circuits.attribution import attribute
from mdm_circuits.circuits.graph import Graph
from mdm_circuits.circuits.patching import patch_nodes
from mdm_circuits.errors import BatchError, ConfigError
from mdm_circuits.model.config import ModelConfig
from mdm_circuits.model.transformer import stack, with_config
from mdm_circuits.tasks import metrics
from mdm_circuits.tasks.batch import collate
from mdm_circuits.testing import random_examples, random_model

MASK = 39
ARM = ModelConfig(vocab_size=40, d_model=24, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_mlp=32,
                  qkv_bias=True)
MDM = ARM.replace(attention="bidirectional", mask_token_id=MASK)
METRIC = metrics.logit_difference


def _posed(n: int, seed: int):
    """The same random questions in the ARM view (answer read at the last token) and the MDM view (a masked
    answer position appended, so the MDM's batch is one token longer)."""
    arm = random_examples(ARM, n, seed, min_length=5, max_length=7)
    mdm = [dataclasses.replace(e, clean=[*e.clean, MASK], corrupted=[*e.corrupted, MASK]) for e in arm]
    return collate(arm), collate(mdm)


@pytest.fixture(scope="module")
def pair():
    arm, mdm = random_model(ARM, 0), random_model(MDM, 1)
    return arm, mdm, *_posed(5, 0)


def _close(stacked: np.ndarray, separate: np.ndarray, tolerance: float = 1e-5) -> None:
    np.testing.assert_allclose(stacked, separate, rtol=tolerance, atol=tolerance * np.abs(separate).max())


@pytest.mark.parametrize("method", ["eap", "eap_ig_inputs", "eap_ig_activations"])
def test_a_stack_of_arm_and_mdm_scores_as_separate_runs(pair, method):
    arm, mdm, arm_batch, mdm_batch = pair
    together = attribute(stack([arm, mdm]), [arm_batch, mdm_batch], METRIC, method=method, steps=2, batch_size=3)
    apart = [attribute(arm, arm_batch, METRIC, method=method, steps=2, batch_size=3),
             attribute(mdm, mdm_batch, METRIC, method=method, steps=2, batch_size=3)]
    assert len(together) == 2
    for stacked, separate in zip(together, apart):
        _close(stacked.matrix, separate.matrix)
        assert stacked.clean_metric == pytest.approx(separate.clean_metric, rel=1e-5)
        assert stacked.corrupted_metric == pytest.approx(separate.corrupted_metric, rel=1e-5)
    assert not np.allclose(together[0].matrix, together[1].matrix)  # two different models, two circuits


def test_a_stack_evaluates_circuits_and_patches_nodes_as_separate_runs(pair):
    arm, mdm, arm_batch, mdm_batch = pair
    models, batches = stack([arm, mdm]), [arm_batch, mdm_batch]
    scores = attribute(models, batches, METRIC, method="eap")
    ks = [3, 30, 100]
    curves = circuits.faithfulness_curve(models, batches, scores, METRIC, ks, batch_size=3)
    for model, batch, model_scores, curve in zip((arm, mdm), batches, scores, curves):
        separate = circuits.faithfulness_curve(model, batch, model_scores, METRIC, ks, batch_size=3)
        _close(curve.evaluation.circuit_metric, separate.evaluation.circuit_metric)
        assert curve.evaluation.ablated_metric == pytest.approx(separate.evaluation.ablated_metric, rel=1e-5)
    effects = patch_nodes(models, batches, METRIC, per_position=True)
    for model, batch, stacked in zip((arm, mdm), batches, effects):
        separate = patch_nodes(model, batch, METRIC, per_position=True)
        assert separate.values.shape[1] == batch.clean.shape[1]
        # The stack pads the ARM's batch to the MDM's length: the padded position is never patched in earnest.
        _close(stacked.values[:, : separate.values.shape[1]], separate.values)


def test_a_trajectory_shares_one_batch(pair):
    """Checkpoints along an adaptation (here: three MDMs) with one batch for all, every mean ablation fitted
    per model."""
    _, mdm, _, mdm_batch = pair
    trajectory = [mdm, random_model(MDM, 2), random_model(MDM, 3)]
    ablation = Ablation("mean")
    together = attribute(stack(trajectory), mdm_batch, METRIC, method="eap", ablation=ablation)
    for model, stacked in zip(trajectory, together):
        _close(stacked.matrix, attribute(model, mdm_batch, METRIC, method="eap", ablation=ablation).matrix)


def test_per_example_rows_average_to_the_batch_result(pair):
    arm, _, arm_batch, _ = pair
    scores = attribute(arm, arm_batch, METRIC, steps=3, batch_size=2, per_example=True)
    assert scores.per_example.shape == (arm_batch.size, scores.graph.n_edges)
    _close(scores.per_example.mean(axis=0), scores.edges)
    assert np.ptp(scores.per_example, axis=0).max() > 0  # the examples differ
    # One example alone gives its row.
    alone = attribute(arm, arm_batch[np.array([3])], METRIC, steps=3)
    _close(scores.per_example[3], alone.edges)
    # bfloat16 storage keeps the rows to its precision; the mean is still taken in float32.
    compact = attribute(arm, arm_batch, METRIC, steps=3, batch_size=2, per_example=True,
                        per_example_dtype=jax.numpy.bfloat16)
    assert compact.per_example.dtype == jax.numpy.bfloat16
    _close(compact.matrix, scores.matrix)
    _close(compact.per_example.astype(np.float32), scores.per_example, tolerance=1e-2)


def test_a_second_model_of_the_same_shapes_compiles_nothing(pair, caplog):
    """The conventions (attention, readout, mask token) are data: MDMs with other weights or another readout
    reuse every program the first one compiled."""
    _, mdm, _, mdm_batch = pair
    others = (random_model(MDM, 4), with_config(mdm, MDM.replace(logit_shift=False)))  # other weights, readout
    scores = attribute(mdm, mdm_batch, METRIC, steps=2)
    circuits.evaluate(mdm, mdm_batch, circuits.top_k(Graph.for_model(MDM), scores.matrix, 10), METRIC)
    with caplog.at_level(logging.WARNING, logger="jax"), jax.log_compiles(True):
        for model in others:
            scores = attribute(model, mdm_batch, METRIC, steps=2)
            circuits.evaluate(model, mdm_batch, circuits.top_k(scores.graph, scores.matrix, 10), METRIC)
    compiled = [record.getMessage() for record in caplog.records if "Compiling" in record.getMessage()]
    assert not compiled, compiled


def test_stacks_refuse_what_cannot_run_together(pair):
    arm, mdm, arm_batch, mdm_batch = pair
    with pytest.raises(ConfigError, match="another architecture than model 0 .*n_layers 2 vs 3"):
        stack([arm, random_model(ARM.replace(n_layers=3), 0)])
    with pytest.raises(BatchError, match="equally many examples"):
        attribute(stack([arm, mdm]), [arm_batch, mdm_batch[np.arange(3)]], METRIC)
    with pytest.raises(BatchError, match="one per model of a stack"):
        attribute(arm, [arm_batch, arm_batch], METRIC)
    # Each model's batch is checked against its own conventions: LLaDA-style (unshifted) logits read the
    # answer at its own position, which the ARM view leaves outside the tokens.
    unshifted = with_config(mdm, MDM.replace(logit_shift=False))
    with pytest.raises(BatchError, match="model 1 of the stack: example 0"):
        attribute(stack([mdm, unshifted]), [mdm_batch, arm_batch], METRIC)

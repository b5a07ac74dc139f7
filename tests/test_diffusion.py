"""The MDM view, the multi-step protocol and the decoders."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mdm_circuits.circuits.attribution import attribute
from mdm_circuits.decoding.denoising import denoising_steps, multi_step
from mdm_circuits.decoding.generation import diffuse, greedy
from mdm_circuits.errors import BatchError
from mdm_circuits.model.config import ModelConfig
from mdm_circuits.tasks import metrics
from mdm_circuits.tasks.batch import Example, collate
from mdm_circuits.tasks.views import View
from mdm_circuits.testing import random_examples, random_model

MASK = 39
MDM = ModelConfig(vocab_size=40, d_model=24, n_layers=2, n_heads=3, n_kv_heads=1, head_dim=8, d_mlp=32,
                  attention="bidirectional", mask_token_id=MASK)


def test_views_pose_the_same_question():
    arm, mdm = View(), View(MASK, canvas=2)
    assert arm.pose([1, 2, 3], [7, 8]) == ([1, 2, 3, 7], [3, 4])       # teacher forcing
    assert mdm.pose([1, 2, 3], [7, 8], [5]) == ([1, 2, 3, MASK, MASK, 5, MASK, MASK], [3, 4])
    with pytest.raises(BatchError, match="ARM reads left to right"):
        arm.pose([1, 2], [3], [4])
    assert View.for_model(MDM) == View(MASK) and View.for_model(MDM.replace(mask_token_id=None)) == View()


def test_answer_is_read_before_the_mask_when_shifted_and_at_it_otherwise():
    tokens, positions = View(MASK).pose([1, 2, 3], [7])
    batch = collate([Example(tokens, tokens, positions, [[7]], [[8]])])
    assert batch.clean[0, 3] == MASK
    assert batch.read_positions(MDM).tolist() == [[2]]                                  # Dream, DiffuLLaMA
    assert batch.read_positions(MDM.replace(logit_shift=False)).tolist() == [[3]]       # LLaDA


def _mdm_example(length=5, answer=3):
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, MASK, length).tolist()
    other = list(prompt)
    other[1] = (other[1] + 1) % MASK
    answers = rng.integers(0, MASK, answer).tolist()
    counterfactuals = [(a + 1) % MASK for a in answers]
    (clean, positions), (corrupted, _) = View(MASK).pose(prompt, answers), View(MASK).pose(other, answers)
    return Example(clean, corrupted, positions, [[a] for a in answers], [[c] for c in counterfactuals],
                   "log_probability_difference")


def test_one_step_is_the_single_step_query():
    example = _mdm_example()
    assert denoising_steps(example, 1) == [example]
    assert multi_step([example, example], 1) == [example, example]


def test_steps_reveal_in_order_and_score_what_is_still_masked():
    example = _mdm_example(answer=3)
    steps = denoising_steps(example, 3)
    positions = example.answer_positions
    assert [s.answer_positions for s in steps] == [positions, positions[1:], positions[2:]]
    assert steps[1].clean[positions[0]] == example.correct[0][0]       # the clean run reveals the answer
    assert steps[1].corrupted[positions[0]] == example.incorrect[0][0]  # the corrupted one its counterfactual
    assert steps[1].clean[positions[1]] == MASK
    random_order = denoising_steps(example, 3, "random", seed=2)
    assert sorted(len(s.answer_positions) for s in random_order) == [1, 2, 3]
    with pytest.raises(BatchError, match="between 1 and the 3 answer positions"):
        denoising_steps(example, 4)
    with pytest.raises(BatchError, match="needs the model"):
        denoising_steps(example, 2, "confidence")


def test_confidence_order_follows_the_model():
    model = random_model(MDM, 0)
    example = _mdm_example(answer=3)
    steps = denoising_steps(example, 3, "confidence", model=model)
    from mdm_circuits.decoding.denoising import confidence

    first = int(np.argmax(confidence(model, steps[0])))
    assert example.answer_positions[first] not in steps[1].answer_positions


def test_attribution_over_steps_is_the_mean_of_each_step():
    """Aggregation over steps, by hand: the multi-step batch's scores are the mean of each step's scores."""
    model = random_model(MDM, 1)
    example = _mdm_example(answer=2)
    steps = denoising_steps(example, 2)
    metric = metrics.log_probability_difference
    together = attribute(model, collate(steps), metric, method="eap").matrix
    each = [attribute(model, collate([step]), metric, method="eap").matrix for step in steps]
    np.testing.assert_allclose(together, np.mean(each, axis=0), rtol=1e-4, atol=1e-7)


def successor_model() -> nnx.Module:
    """A bidirectional model that determines every token: attention and MLP write nothing, token t's
    embedding is one-hot and the unembedding maps it to t + 1, while the mask token's embedding is zero, so
    a position after a mask is uncertain (uniform) and a position after a known token is not."""
    config = ModelConfig(vocab_size=12, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_mlp=8,
                         attention="bidirectional", mask_token_id=11)
    model = random_model(config, 0, scale=0.0)
    graphdef, state = nnx.split(model)
    embedding, unembedding = np.zeros((12, 16), np.float32), np.zeros((16, 12), np.float32)
    for token in range(11):
        embedding[token, token] = 1.0
        unembedding[token, (token + 1) % 11] = 5.0
    state["embedding"][...], state["unembedding"][...] = jnp.asarray(embedding), jnp.asarray(unembedding)
    return nnx.merge(graphdef, state)


def test_diffusion_decoder_recovers_the_determined_sequence():
    model = successor_model()
    tokens = jnp.array([3, 11, 11, 11, 11, 0])
    valid = jnp.array([True] * 5 + [False])
    at = jnp.array([1, 2, 3, 4])
    decoded = diffuse(model, tokens, valid, jax.random.key(0), at, steps=4)
    assert decoded.tolist() == [3, 4, 5, 6, 7, 0]
    # Random order reveals positions whose left neighbour is still masked: it does not recover it.
    random_order = diffuse(model, tokens, valid, jax.random.key(0), at, steps=4, unmasking="random")
    assert random_order.tolist() != [3, 4, 5, 6, 7, 0]
    for unmasking in ("margin", "entropy"):
        assert diffuse(model, tokens, valid, jax.random.key(0), at, steps=4, unmasking=unmasking).tolist() == [
            3, 4, 5, 6, 7, 0]
    # Two steps for four positions: two reveals per step; repeated positions count once.
    two_steps = diffuse(model, tokens, valid, jax.random.key(0), jnp.array([1, 2, 3, 4, 4]), steps=2)
    assert (two_steps[1:5] != 11).all()


def test_greedy_decoding_matches_a_python_loop():
    model = random_model(MDM.replace(attention="causal", mask_token_id=None), 2)
    prompt = [5, 7, 9, 1]
    buffer = jnp.array(prompt + [0] * 6)
    decoded = greedy(model, buffer, jnp.array(len(prompt)), 6)
    sequence = list(prompt)
    for _ in range(6):
        sequence.append(int(jnp.argmax(model(jnp.array(sequence))[-1])))
    assert decoded.tolist() == sequence
    with pytest.raises(ValueError, match="needs a causal model"):
        greedy(random_model(MDM, 0), buffer, jnp.array(4), 2)


def test_multi_step_examples_plug_into_attribution_with_random_examples():
    model = random_model(MDM.replace(logit_shift=False), 3)
    examples = [Example(e.clean + [MASK], e.corrupted + [MASK], [len(e.clean)], e.correct, e.incorrect)
                for e in random_examples(MDM, 3, 3)]
    scores = attribute(model, collate(multi_step(examples, 1)), metrics.logit_difference, method="eap")
    assert np.isfinite(scores.matrix).all()

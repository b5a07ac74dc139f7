"""The training objectives and loop: losses computed by hand, masking, resumption, annealing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mdm_circuits.errors import TrainingError
from mdm_circuits.model.config import ModelConfig
from mdm_circuits.model.transformer import Transformer
from mdm_circuits.training import (
    Corpus,
    TrainConfig,
    annealed_pattern,
    causal_lm_loss,
    masked_diffusion_loss,
    restore_params,
    sample_masks,
    saved_steps,
    train,
)

ARM = ModelConfig(vocab_size=23, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_mlp=32,
                  qkv_bias=True)
MDM = ARM.replace(attention="bidirectional", mask_token_id=22)


def counting_corpus(n=64, length=10):
    """Sequences that count up from a random start (mod 20): predictable after the first token."""
    starts = np.random.default_rng(0).integers(0, 20, n)
    tokens = ((starts[:, None] + np.arange(length)[None]) % 20 + 1).astype(np.int32)
    valid = np.ones(tokens.shape, bool)
    valid[::2, -2:] = False  # some padding
    maskable = np.zeros(tokens.shape, bool)
    maskable[:, 4:] = True
    return Corpus(jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(maskable & valid))


def log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)


def test_causal_loss_matches_a_hand_computation():
    model = Transformer(ARM, rngs=nnx.Rngs(0))
    corpus = counting_corpus(4)
    expected, count = 0.0, 0
    for tokens, valid in zip(np.asarray(corpus.tokens), np.asarray(corpus.valid)):
        logp = log_softmax(model(jnp.asarray(tokens), valid=jnp.asarray(valid)))
        for p in range(1, len(tokens)):
            if valid[p]:
                expected -= logp[p - 1, tokens[p]]
                count += 1
    np.testing.assert_allclose(causal_lm_loss(model, corpus), expected / count, rtol=1e-5)


def test_masked_diffusion_loss_matches_a_hand_computation():
    """Only masked tokens count, each weighted by 1/t, read at p − 1 (the logit shift), normalised by the
    number of masked tokens; the model sees the mask token at the masked positions."""
    model = Transformer(MDM, rngs=nnx.Rngs(1))
    corpus = counting_corpus(2)
    masked = np.zeros(corpus.tokens.shape, bool)
    masked[0, [4, 6]] = True
    masked[1, [5]] = True
    t = np.array([0.5, 0.25], np.float32)
    expected = 0.0
    for row in range(2):
        tokens = np.where(masked[row], MDM.mask_token_id, np.asarray(corpus.tokens[row]))
        logp = log_softmax(model(jnp.asarray(tokens), valid=corpus.valid[row]))
        for p in np.nonzero(masked[row])[0]:
            expected -= logp[p - 1, corpus.tokens[row, p]] / t[row]
    loss = masked_diffusion_loss(model, corpus, jnp.asarray(masked), jnp.asarray(t))
    np.testing.assert_allclose(loss, expected / 3, rtol=1e-5)


def test_masked_diffusion_loss_needs_a_mask_token():
    with pytest.raises(TrainingError, match="mask token"):
        masked_diffusion_loss(Transformer(ARM, rngs=nnx.Rngs(0)), counting_corpus(2),
                              jnp.ones((2, 10), bool), jnp.ones(2))


def test_sample_masks_masks_only_maskable_tokens_at_rate_t():
    maskable = jnp.zeros((4000, 50), bool).at[:, 10:].set(True)
    masked, t = sample_masks(jax.random.key(0), maskable, t_min=1e-3)
    masked, t = np.asarray(masked), np.asarray(t)
    assert not masked[:, :10].any()
    assert 1e-3 <= t.min() and t.max() <= 1
    # The masked fraction of each sequence follows its t: regress one on the other.
    fraction = masked[:, 10:].mean(axis=1)
    assert np.abs(fraction - t).mean() < 0.07
    assert np.corrcoef(fraction, t)[0, 1] > 0.95


def test_annealed_pattern_opens_the_causal_mask_at_the_given_ratio():
    causal = np.tril(np.ones((64, 64), bool))
    assert (np.asarray(annealed_pattern(jax.random.key(0), 64, 0.0)) == causal).all()
    assert np.asarray(annealed_pattern(jax.random.key(0), 64, 1.0)).all()
    opened = np.asarray(annealed_pattern(jax.random.key(0), 64, 0.3))[~causal].mean()
    assert abs(opened - 0.3) < 0.03


@pytest.mark.parametrize("objective,config", [("causal", ARM), ("masked_diffusion", MDM)])
def test_training_lowers_the_loss(tmp_path, objective, config):
    lines = []
    train(Transformer(config, rngs=nnx.Rngs(0)), counting_corpus(),
          TrainConfig(objective, steps=60, batch_size=16, learning_rate=1e-2, warmup_steps=5, log_every=20,
                      anneal_steps=30 if objective == "masked_diffusion" else 0),
          tmp_path, progress=lines.append)
    losses = [float(line.split("loss ")[1].split()[0]) for line in lines]
    assert len(losses) == 3 and losses[-1] < 0.6 * losses[0], lines


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_parameters(tmp_path):
    config = TrainConfig("masked_diffusion", steps=30, batch_size=8, warmup_steps=5, checkpoint_every=10,
                         log_every=10, anneal_steps=20)

    def fresh():
        return Transformer(MDM, rngs=nnx.Rngs(0))

    uninterrupted = train(fresh(), counting_corpus(), config, tmp_path / "whole", keep=None,
                          progress=lambda line: None)

    def interrupt(line):
        if line.startswith("step 20/"):
            raise Interrupted

    with pytest.raises(Interrupted):
        train(fresh(), counting_corpus(), config, tmp_path / "parts", progress=interrupt)
    assert saved_steps(tmp_path / "parts") == [10, 20]
    lines = []
    # A different initialisation proves the weights come from the checkpoint.
    resumed = train(Transformer(MDM, rngs=nnx.Rngs(7)), counting_corpus(), config, tmp_path / "parts",
                    progress=lines.append)
    assert lines[0].startswith("resuming from step 20")
    for a, b in zip(jax.tree.leaves(nnx.state(uninterrupted)), jax.tree.leaves(nnx.state(resumed))):
        np.testing.assert_array_equal(a, b)
    # With keep=None every checkpoint stays, and step 0 is the initial model.
    assert saved_steps(tmp_path / "whole") == [0, 10, 20, 30]
    initial = restore_params(tmp_path / "whole", Transformer(MDM, rngs=nnx.Rngs(3)), 0)
    for a, b in zip(jax.tree.leaves(nnx.state(fresh())), jax.tree.leaves(nnx.state(initial))):
        np.testing.assert_array_equal(a, b)


def test_a_finished_run_is_not_extended_into(tmp_path):
    config = TrainConfig("causal", steps=10, batch_size=4, warmup_steps=2, checkpoint_every=5, log_every=5)
    train(Transformer(ARM, rngs=nnx.Rngs(0)), counting_corpus(), config, tmp_path, progress=lambda line: None)
    with pytest.raises(TrainingError, match="past this run"):
        train(Transformer(ARM, rngs=nnx.Rngs(0)), counting_corpus(), TrainConfig(
            "causal", steps=5, batch_size=4, warmup_steps=2), tmp_path, progress=lambda line: None)


@pytest.mark.parametrize("changes,match", [
    (dict(objective="autoregressive"), "unknown objective"),
    (dict(steps=0), "steps must be positive"),
    (dict(warmup_steps=10), "warmup_steps"),
    (dict(t_min=0.0), "t_min"),
])
def test_bad_train_configs_are_refused(changes, match):
    arguments = dict(objective="causal", steps=10, warmup_steps=2) | changes
    with pytest.raises(TrainingError, match=match):
        TrainConfig(**arguments)

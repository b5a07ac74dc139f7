"""Generating answers, jitted: greedy decoding for ARMs and a Dream-style diffusion decoder for MDMs.

Both work on one sequence (batch with `vmap`) held in a fixed-size buffer, so one compiled program serves
every prompt of a batch.

Diffusion decoding (`diffuse`): the given positions, which hold the mask token, are filled in `steps` steps.
At each step the model reads the whole sequence (bidirectionally); every still-masked position gets a
candidate token (the most likely, or a sample at `temperature`) and a score; the step reveals the
best-scoring masked positions, as many as keep the reveals even over the steps. A position p is read
from the logits at `config.read_position(p)` (p − 1 for Dream and DiffuLLaMA, p for LLaDA). Scores
("unmasking"): the candidate's probability ("confidence"), the gap between the two most likely tokens
("margin"), the negative entropy ("entropy"), or a seeded random draw ("random"). The mask token itself is
never a candidate.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from mdm_circuits.errors import DecodingError
from mdm_circuits.model.transformer import Transformer
from mdm_circuits.tasks.batch import check_token_ids

Unmasking = Literal["confidence", "margin", "entropy", "random"]


def greedy(model: Transformer, tokens: Int[Array, " T"], length: Int[Array, ""], n_new: int) -> Int[Array, " T"]:
    """Continue the prompt `tokens[:length]` greedily for `n_new` tokens, written from position `length` on.

    `tokens` must have room (length + n_new ≤ T). A causal model never reads the positions after the one it
    predicts, so the rest of the buffer may hold anything. (Inside a traced program the model's attention
    cannot be checked: give it a causal model.)"""
    config = model.known_config()
    if config is not None and config.attention != "causal":
        raise DecodingError("greedy decoding reads one position at a time; it needs a causal model (use diffuse)")
    _check_tokens(model, tokens)
    return _greedy(model, tokens, length, n_new)


@functools.partial(jax.jit, static_argnames=("n_new",))
def _greedy(model, tokens, length, n_new):
    def step(i, buffer):
        position = length + i
        logits = model.logits_at(buffer, model.read_position(position)[None])[0]
        return buffer.at[position].set(jnp.argmax(logits).astype(buffer.dtype))

    return jax.lax.fori_loop(0, n_new, step, tokens)


def _check_tokens(model: Transformer, tokens) -> None:
    """Out-of-range ids poison every logit (or wrap to other tokens); checked where the tokens are concrete."""
    if not isinstance(tokens, jax.core.Tracer):
        check_token_ids(tokens, model.architecture.vocab_size, "the tokens to decode")


def _scores(logits, candidates, probabilities, unmasking: Unmasking, key):
    match unmasking:
        case "confidence":
            return jnp.take_along_axis(probabilities, candidates[:, None], axis=-1)[:, 0]
        case "margin":
            top_two = jax.lax.top_k(probabilities, 2)[0]
            return top_two[:, 0] - top_two[:, 1]
        case "entropy":
            return jnp.sum(probabilities * jnp.log(jnp.clip(probabilities, 1e-30)), axis=-1)
        case "random":
            return jax.random.uniform(key, candidates.shape)
    raise DecodingError(f"unknown unmasking {unmasking!r}; use confidence, margin, entropy or random")


def diffuse(
    model: Transformer,
    tokens: Int[Array, " T"],
    valid: Bool[Array, " T"],
    key: Array,
    at: Int[Array, " A"],
    *,
    steps: int,
    unmasking: Unmasking = "confidence",
    temperature: float | Array = 0.0,
) -> Int[Array, " T"]:
    """Fill the positions `at` (which hold the mask token; repeats allowed) in `steps` steps (see the module
    doc); only their logits are computed. (Inside a traced program the mask token cannot be checked: give
    it an MDM.)"""
    config = model.known_config()
    if config is not None and config.mask_token_id is None:
        raise DecodingError("diffusion decoding needs a model with a mask token (an MDM)")
    if unmasking not in ("confidence", "margin", "entropy", "random"):
        raise DecodingError(f"unknown unmasking {unmasking!r}; use confidence, margin, entropy or random")
    _check_tokens(model, tokens)
    return _diffuse(model, tokens, valid, key, at, steps=steps, unmasking=unmasking, temperature=temperature)


@functools.partial(jax.jit, static_argnames=("steps", "unmasking"))
def _diffuse(model, tokens, valid, key, at, *, steps, unmasking, temperature):
    mask_id = model.conventions.mask_token[...].astype(tokens.dtype)
    first_copy = jnp.argmax(at[None, :] == at[:, None], axis=1)  # for each entry, its position's first entry
    first = jnp.arange(at.shape[0]) == first_copy
    masked_at_start = jnp.sum(first & (tokens[at] == mask_id))
    read = jnp.clip(model.read_position(at), 0, tokens.shape[0] - 1)

    def step(s, state):
        buffer, key = state
        key, sample_key, score_key = jax.random.split(key, 3)
        logits = model.logits_at(buffer, read, valid=valid).at[:, mask_id].set(-jnp.inf)
        probabilities = jax.nn.softmax(logits, axis=-1)
        sampled = jax.random.categorical(sample_key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
        candidates = jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(buffer.dtype)
        masked = first & (buffer[at] == mask_id)
        score = jnp.where(masked, _scores(logits, candidates, probabilities, unmasking, score_key), -jnp.inf)
        # Reveal so that after step s, round(n (s + 1) / steps) of the n masked positions are filled.
        count = (jnp.round(masked_at_start * (s + 1) / steps) - jnp.round(masked_at_start * s / steps)).astype(int)
        rank = jnp.argsort(jnp.argsort(-score))
        reveal = (masked & (rank < count))[first_copy]  # repeated entries follow their first one
        return buffer.at[at].set(jnp.where(reveal, candidates[first_copy], buffer[at])), key

    return jax.lax.fori_loop(0, steps, step, (tokens, key))[0]

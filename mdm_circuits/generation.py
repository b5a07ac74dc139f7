"""Generating answers, jitted: greedy decoding for ARMs and a Dream-style diffusion decoder for MDMs.

Both work on one sequence (batch with `vmap`) held in a fixed-size buffer, so one compiled program serves
every prompt of a batch.

Diffusion decoding (`diffuse`): the positions holding the mask token are filled in `steps` steps. At each
step the model reads the whole sequence (bidirectionally); every masked position gets a candidate token
(the most likely, or a sample at `temperature`) and a score; the step reveals the best-scoring masked
positions, as many as keep the reveals even over the steps. Scores ("unmasking"): the candidate's
probability ("confidence"), the gap between the two most likely tokens ("margin"), the negative entropy
("entropy"), or a seeded random draw ("random"). The mask token itself is never a candidate.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from mdm_circuits.model import Transformer

Unmasking = Literal["confidence", "margin", "entropy", "random"]


@functools.partial(jax.jit, static_argnames=("n_new",))
def greedy(model: Transformer, tokens: Int[Array, " T"], length: Int[Array, ""], n_new: int) -> Int[Array, " T"]:
    """Continue the prompt `tokens[:length]` greedily for `n_new` tokens, written from position `length` on.

    `tokens` must have room (length + n_new ≤ T). A causal model never reads the positions after the one it
    predicts, so the rest of the buffer may hold anything."""
    if model.config.attention != "causal":
        raise ValueError("greedy decoding reads one position at a time; it needs a causal model (use diffuse)")

    def step(i, buffer):
        logits = model(buffer)
        position = length + i
        return buffer.at[position].set(jnp.argmax(logits[model.config.read_position(position)]).astype(buffer.dtype))

    return jax.lax.fori_loop(0, n_new, step, tokens)


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
    raise ValueError(f"unknown unmasking {unmasking!r}; use confidence, margin, entropy or random")


@functools.partial(jax.jit, static_argnames=("steps", "unmasking"))
def diffuse(
    model: Transformer,
    tokens: Int[Array, " T"],
    valid: Bool[Array, " T"],
    key: Array,
    *,
    steps: int,
    unmasking: Unmasking = "confidence",
    temperature: float | Array = 0.0,
) -> Int[Array, " T"]:
    """Fill the real positions of `tokens` that hold the mask token, in `steps` steps (see the module doc)."""
    config = model.config
    if config.mask_token_id is None:
        raise ValueError("diffusion decoding needs a model with a mask token (an MDM)")
    mask_id = config.mask_token_id
    masked_at_start = jnp.sum((tokens == mask_id) & valid)

    def step(s, state):
        buffer, key = state
        key, sample_key, score_key = jax.random.split(key, 3)
        logits = model(buffer, valid=valid)
        if config.logit_shift:  # the logits at p − 1 predict position p; position 0 reads its own
            logits = jnp.concatenate([logits[:1], logits[:-1]])
        logits = logits.at[:, mask_id].set(-jnp.inf)
        probabilities = jax.nn.softmax(logits, axis=-1)
        sampled = jax.random.categorical(sample_key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
        candidates = jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(buffer.dtype)
        masked = (buffer == mask_id) & valid
        score = jnp.where(masked, _scores(logits, candidates, probabilities, unmasking, score_key), -jnp.inf)
        # Reveal so that after step s, round(n (s + 1) / steps) of the n masked positions are filled.
        count = (jnp.round(masked_at_start * (s + 1) / steps) - jnp.round(masked_at_start * s / steps)).astype(int)
        rank = jnp.argsort(jnp.argsort(-score))
        reveal = masked & (rank < count)
        return jnp.where(reveal, candidates, buffer), key

    return jax.lax.fori_loop(0, steps, step, (tokens, key))[0]

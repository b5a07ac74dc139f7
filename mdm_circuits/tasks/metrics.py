"""Task metrics: pure functions of the logits at the answer's read positions, one example, and the clean
run's logits there (which only the KL metric looks at).

Each metric says whether higher is better. Attribution differentiates the metric as a loss (negated when
higher is better), as the PyTorch EAP-IG reference does: a positive edge score means that corrupting the
edge lowers the task performance.

Axis letters: A answer positions, C candidates per position, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from mdm_circuits.tasks.batch import Batch


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[Float[Array, "A V"], Batch, Float[Array, "A V"]], Float[Array, ""]]
    higher_is_better: bool = True

    def __call__(self, logits: Float[Array, "A V"], example: Batch, clean_logits: Float[Array, "A V"]):
        return self.fn(logits, example, clean_logits)

    def loss(self, logits: Float[Array, "A V"], example: Batch, clean_logits: Float[Array, "A V"]):
        value = self.fn(logits, example, clean_logits)
        return -value if self.higher_is_better else value


def _mean_over(values: Float[Array, "..."], mask: Bool[Array, "..."], axis: int) -> Float[Array, "..."]:
    count = jnp.maximum(jnp.sum(mask, axis=axis), 1).astype(values.dtype)
    return jnp.sum(jnp.where(mask, values, 0), axis=axis) / count


def _gather(table: Float[Array, "A V"], tokens: Int[Array, "A C"]) -> Float[Array, "A C"]:
    return jnp.take_along_axis(table, tokens, axis=-1)


def _logit_difference(logits, example, clean_logits):
    good = _mean_over(_gather(logits, example.correct), example.correct_mask, -1)
    bad = _mean_over(_gather(logits, example.incorrect), example.incorrect_mask, -1)
    return _mean_over(good - bad, example.answer_mask, 0)


def _probability_difference(logits, example, clean_logits):
    probabilities = jax.nn.softmax(logits, axis=-1)
    good = jnp.sum(jnp.where(example.correct_mask, _gather(probabilities, example.correct), 0), -1)
    bad = jnp.sum(jnp.where(example.incorrect_mask, _gather(probabilities, example.incorrect), 0), -1)
    return _mean_over(good - bad, example.answer_mask, 0)


def _log_probability(logits, tokens, token_mask, answer_mask):
    """log P(answer) summed over answer positions; at each position, of any of its candidates."""
    log_probabilities = _gather(jax.nn.log_softmax(logits, axis=-1), tokens)
    per_position = jax.nn.logsumexp(jnp.where(token_mask, log_probabilities, -jnp.inf), axis=-1)
    return jnp.sum(jnp.where(answer_mask, per_position, 0))


def _answer_log_probability(logits, example, clean_logits):
    return _log_probability(logits, example.correct, example.correct_mask, example.answer_mask)


def _log_probability_difference(logits, example, clean_logits):
    return (_log_probability(logits, example.correct, example.correct_mask, example.answer_mask)
            - _log_probability(logits, example.incorrect, example.incorrect_mask, example.answer_mask))


def _kl_to_clean(logits, example, clean_logits):
    clean = jax.nn.log_softmax(clean_logits, axis=-1)
    current = jax.nn.log_softmax(logits, axis=-1)
    per_position = jnp.sum(jnp.exp(clean) * (clean - current), axis=-1)
    return _mean_over(per_position, example.answer_mask, 0)


logit_difference = Metric("logit_difference", _logit_difference)
"""Mean logit of the correct candidates minus that of the incorrect ones (IOI: indirect object − subject)."""

probability_difference = Metric("probability_difference", _probability_difference)
"""Probability mass on the correct candidates minus that on the incorrect ones (Greater-Than)."""

answer_log_probability = Metric("answer_log_probability", _answer_log_probability)
"""log P(correct answer), summed over the answer's tokens."""

log_probability_difference = Metric("log_probability_difference", _log_probability_difference)
"""log P(correct answer) − log P(incorrect answer), over all answer tokens (Countdown)."""

kl_to_clean = Metric("kl_to_clean", _kl_to_clean, higher_is_better=False)
"""KL(clean ‖ current) at the answer positions, averaged over them."""

METRICS = MappingProxyType({metric.name: metric for metric in (
    logit_difference, probability_difference, answer_log_probability, log_probability_difference, kl_to_clean)})

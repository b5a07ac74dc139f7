"""Whether a task's contrast works for a model: the clean run must score better than the corrupted one, per
question, for most questions (DESIGN §6.1). Attribution and faithfulness measure how a model gets from the
corrupted metric to the clean one; where the corrupted prompt scores as well as the clean one, there is no
gap to explain, and every circuit found on it is read off noise.

The gap of a question is M(clean) − M(corrupted) in the metric's good direction (M(corrupted) − M(clean)
for a metric where lower is better). A contrast FAILS for a model when either
- fewer than `MIN_SHARE_POSITIVE` of its questions have a positive gap (> 0), or
- the lower end of the 95% interval of the median gap is not positive.
The second guards small pools: with over half the gaps positive the median is positive, but with ten
questions, eight positive gaps still leave the median's interval reaching below zero.

The interval of the median is the exact distribution-free one from order statistics (the number of gaps
below the true median is Binomial(n, 1/2)): [g_(k), g_(n+1−k)] of the sorted gaps, with the largest k whose
coverage 1 − 2 · P(B ≤ k − 1) is at least `CONFIDENCE`. It needs no resampling and no seed; below six
questions no k reaches 95%, and the interval is (−inf, inf).

Controls are checked too: a control that solves fewer than `IN_DISTRIBUTION` of the pooled questions (which
the ARM and the MDM both solve) is out of distribution, e.g. the ARM's weights posed as an MDM, whose mask
embedding was never trained; it measures a broken model rather than the factor it was meant to isolate.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mdm_circuits.circuits.ablations import Ablation
from mdm_circuits.circuits.runs import as_models, for_every_model, model_batches, over_batches, plain_runs
from mdm_circuits.errors import BatchError
from mdm_circuits.model.transformer import ModelStack, Transformer
from mdm_circuits.tasks.batch import Example, collate
from mdm_circuits.tasks.metrics import Metric

MIN_SHARE_POSITIVE = 0.8
CONFIDENCE = 0.95
IN_DISTRIBUTION = 0.5


class Contrast(NamedTuple):
    """Per-question metric values `[N]` of the clean and the corrupted runs."""

    clean: np.ndarray
    corrupted: np.ndarray


def _metrics(model, batch, weights, partners, *, metric):
    """One model's slice as `over_batches` takes it: nothing summed, each example's (clean, corrupted) row."""
    _, _, _, clean, corrupted = plain_runs(model, metric, batch, Ablation(), partners)
    return jnp.zeros((), clean.dtype), jnp.stack([clean, corrupted], axis=-1), clean, corrupted


@functools.partial(jax.jit, static_argnames=("model_axis", "metric"))
def _metrics_batch(models, batch, weights, partners, *, model_axis, metric):
    return for_every_model(functools.partial(_metrics, metric=metric), model_axis, (0, None, 0))(
        models, batch, weights, partners)


def contrast_metrics(models: Transformer | ModelStack, examples: Sequence[Example] | Sequence[Sequence[Example]],
                     metric: Metric, *, batch_size: int = 32, mesh: Mesh | None = None) -> Contrast | list[Contrast]:
    """Every question's clean and corrupted metric values (the runs `attribute` and `evaluate` average).

    `examples` are posed in the model's view; for a `ModelStack`, one list for every model or one list per
    model (the same questions, each in its model's view), and one `Contrast` per model is returned."""
    chosen = as_models(models, mesh)
    per_model = bool(examples) and not isinstance(examples[0], Example)
    if per_model and not chosen.stacked:
        raise BatchError("one model takes one list of examples; give a list per model only with a ModelStack")
    batches = [collate(part) for part in examples] if per_model else collate(examples)
    batch = model_batches(chosen, batches)
    totals = over_batches(chosen, batch, batch_size, Ablation(), lambda part, weights, partners: _metrics_batch(
        chosen.tree, part, weights, partners, model_axis=chosen.axis, metric=metric))
    rows = np.asarray(totals.rows, np.float64)
    return chosen.results([Contrast(row[:, 0], row[:, 1]) for row in rows])


def gaps(clean, corrupted, higher_is_better: bool = True) -> np.ndarray:
    """Per question, M(clean) − M(corrupted) in the metric's good direction."""
    clean, corrupted = np.asarray(clean, np.float64), np.asarray(corrupted, np.float64)
    return clean - corrupted if higher_is_better else corrupted - clean


def median_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact order-statistic interval of the median of `values` (see the module doc)."""
    ordered = np.sort(np.asarray(values, np.float64))
    n = len(ordered)
    log_pmf = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
               for i in range(n + 1)]
    below = np.cumsum(np.exp(log_pmf))  # P(B ≤ i)
    k = 0
    while k + 1 <= n // 2 and 1 - 2 * below[k] >= confidence:
        k += 1
    if k == 0:
        return -math.inf, math.inf
    return float(ordered[k - 1]), float(ordered[n - k])


@dataclasses.dataclass(frozen=True)
class Validity:
    """Whether a task's contrast works for one model, over its `n` questions.

    share_positive: the share of questions whose gap is positive.
    median_gap, median_low, median_high: the median gap and its exact 95% interval.
    non_positive: the questions whose gap is not positive (what keeping only positive-gap questions removes).
    clean_mean, corrupted_mean: the mean metrics of the two runs (what attribution reports).
    """

    n: int
    share_positive: float
    median_gap: float
    median_low: float
    median_high: float
    non_positive: int
    clean_mean: float
    corrupted_mean: float

    @property
    def fails(self) -> bool:
        """The rule of the module doc: too few positive gaps, or a median gap not above zero."""
        return self.share_positive < MIN_SHARE_POSITIVE or not self.median_low > 0


def validity(clean, corrupted, higher_is_better: bool = True, confidence: float = CONFIDENCE) -> Validity:
    """The contrast's validity from per-question clean and corrupted metric values (`contrast_metrics`);
    `higher_is_better` is the metric's (`Metric.higher_is_better`)."""
    clean, corrupted = np.asarray(clean, np.float64), np.asarray(corrupted, np.float64)
    if clean.shape != corrupted.shape or clean.ndim != 1 or not len(clean):
        raise BatchError(f"give one clean and one corrupted value per question (shapes {clean.shape} and "
                         f"{corrupted.shape})")
    gap = gaps(clean, corrupted, higher_is_better)
    low, high = median_interval(gap, confidence)
    return Validity(len(gap), float(np.mean(gap > 0)), float(np.median(gap)), low, high, int(np.sum(gap <= 0)),
                    float(clean.mean()), float(corrupted.mean()))


def failing(by_model: dict[str, dict], names: tuple[str, ...] = ("ARM", "MDM")) -> list[str]:
    """Of `names`, the models whose contrast fails, from each model's saved `Validity` fields (with `fails`):
    a task failing for the ARM or the MDM is shown under a warning, and no finding reads it."""
    return [name for name in names if by_model[name]["fails"]]

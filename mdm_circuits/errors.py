"""Every refusal of user input raises a subclass of `Error`, one per area, so a caller (the command line
among them) can catch them all at once and show the message, which names the problem and the fix.

The subclasses are also `ValueError`s, since each is a value the library cannot use as given.
"""

from __future__ import annotations


class Error(Exception):
    """Base class of the library's refusals."""


class ConfigError(Error, ValueError):
    """A model configuration that is inconsistent or has fields this library does not know."""


class CheckpointError(Error, ValueError):
    """A directory that does not hold a complete saved model."""


class BatchError(Error, ValueError):
    """Examples that cannot be posed, compared or scored as given."""


class UnknownTask(BatchError, KeyError):
    """A task name that is not one of the library's tasks."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class GraphError(Error, ValueError):
    """A graph, score file or circuit file that does not fit the model at hand."""


class InterventionError(Error, ValueError):
    """Interventions that cannot be applied together, or an ablation that cannot be formed."""


class AttributionError(Error, ValueError):
    """Attribution that cannot give meaningful scores for the inputs given."""


class CircuitError(Error, ValueError):
    """A circuit request that cannot be met (K out of range, undefined faithfulness...)."""


class DecodingError(Error, ValueError):
    """A generation request the model cannot serve (greedy decoding of an MDM, diffusion without a mask)."""


class TrainingError(Error, ValueError):
    """A training run that cannot start or resume as asked."""


class PlanningError(Error, ValueError):
    """A memory plan that cannot be compiled as asked."""


class UsageError(Error, ValueError):
    """Command-line arguments that contradict each other or the model."""

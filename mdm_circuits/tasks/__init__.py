"""Tasks posed to ARMs and MDMs: generators of clean/corrupted example pairs checked against a tokenizer.

Each task module offers `examples(tokenizer, n, *, seed=0, view=View(), max_length=None)`, its `NAME` and
the `METRIC` its examples are scored with; the same seed gives the same questions in either view.
"""

from types import MappingProxyType

from mdm_circuits.tasks import countdown, greater_than, infilling, ioi

TASKS = MappingProxyType({task.NAME: task for task in (ioi, greater_than, countdown, infilling)})

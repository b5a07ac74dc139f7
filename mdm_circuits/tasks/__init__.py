"""Tasks posed to ARMs and MDMs: generators of clean/corrupted example pairs checked against a tokenizer.

Each task module offers `examples(tokenizer, n, *, seed, max_length, mask_token_id)` and the `METRIC` its
examples are scored with.
"""

from types import MappingProxyType

from mdm_circuits.tasks import ioi

TASKS = MappingProxyType({"ioi": ioi})

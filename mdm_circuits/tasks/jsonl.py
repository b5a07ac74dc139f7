"""A user's own examples, one JSON object per line:

    {"prompt": "When Mary and John went to the store, John gave a drink to",
     "corrupted_prompt": "When Anna and Paul went to the store, Mark gave a drink to",
     "answer": " Mary", "counterfactual": " John"}

Optional keys: "suffix" and "corrupted_suffix" (right-hand context, for the MDM view only) and "metric"
(a name from `metrics.METRICS`, "logit_difference" by default). The answer and the counterfactual may be
several tokens, if they have the same number; each pair is checked like the built-in tasks' (equal lengths,
known metric) and an error names the line.
"""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers

from mdm_circuits.errors import BatchError
from mdm_circuits.tasks.batch import Example
from mdm_circuits.tasks.metrics import METRICS
from mdm_circuits.tasks.text import continuation, prompt, unknown_token
from mdm_circuits.tasks.views import View

REQUIRED = ("prompt", "corrupted_prompt", "answer", "counterfactual")
OPTIONAL = ("suffix", "corrupted_suffix", "metric")


def load(path: str | Path, tokenizer: tokenizers.Tokenizer, view: View = View()) -> list[Example]:
    examples = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise BatchError(f"{where}: not JSON ({error})") from error
        missing = [key for key in REQUIRED if not isinstance(record.get(key), str)]
        unknown = sorted(set(record) - set(REQUIRED) - set(OPTIONAL))
        if missing or unknown:
            raise BatchError(f"{where}: " + "; ".join(
                ([f"missing text field(s) {missing}"] if missing else [])
                + ([f"unknown field(s) {unknown}"] if unknown else [])))
        metric = record.get("metric", "logit_difference")
        if metric not in METRICS:
            raise BatchError(f"{where}: unknown metric {metric!r}; use one of {sorted(METRICS)}")
        answer = continuation(tokenizer, record["answer"])
        counterfactual = continuation(tokenizer, record["counterfactual"])
        unknown = unknown_token(tokenizer)
        for field, tokens in (("answer", answer), ("counterfactual", counterfactual)):
            if unknown is not None and unknown in tokens and tokenizer.id_to_token(unknown) not in record[field]:
                raise BatchError(f"{where}: the {field} {record[field]!r} is not in the tokenizer's vocabulary (it "
                                 f"becomes {tokenizer.id_to_token(unknown)!r}); use words the model knows")
        if not answer or len(answer) != len(counterfactual) or answer == counterfactual:
            raise BatchError(f"{where}: the answer ({len(answer)} tokens) and the counterfactual "
                             f"({len(counterfactual)} tokens) must be different, non-empty and of equal length")
        try:
            suffix = record.get("suffix", "")
            clean, positions = view.pose(prompt(tokenizer, record["prompt"]), answer,
                                         continuation(tokenizer, suffix) if suffix else [])
            corrupted_suffix = record.get("corrupted_suffix", suffix)
            corrupted, _ = view.pose(prompt(tokenizer, record["corrupted_prompt"]), counterfactual,
                                     continuation(tokenizer, corrupted_suffix) if corrupted_suffix else [])
        except BatchError as error:
            raise BatchError(f"{where}: {error}") from error
        if len(clean) != len(corrupted):
            raise BatchError(f"{where}: clean has {len(clean)} tokens, corrupted {len(corrupted)}; they must align "
                             f"position by position")
        examples.append(Example(clean, corrupted, positions, [[t] for t in answer], [[t] for t in counterfactual],
                                metric))
    if not examples:
        raise BatchError(f"{path}: no examples")
    return examples

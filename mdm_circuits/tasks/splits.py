"""Train and test splits of each task's questions, fixed by the task (not by a seed), so that a model trained
on one split can be evaluated on questions it has never seen.

What the test split holds out is each task's way of asking for generalisation:
- IOI: whole templates (`ioi.HELD_OUT_TEMPLATES`), every word of which occurs in the training templates;
- Greater-Than: start years whose ending lies in held-out decades (`greater_than.HELD_OUT_DECADES`);
- Countdown: sets of numbers (one in five, by a hash of the set), so no test instance occurs in training;
- infilling: sentences (`infilling.held_out_cells`): a (frame, word) whose word and deciding verb meet in
  another frame is held out where they first meet, so the association is learnable but the sentence unseen.

`Split.ALL` (the default) draws from both.
"""

from __future__ import annotations

import enum

from mdm_circuits.errors import BatchError


class Split(str, enum.Enum):
    ALL = "all"
    TRAIN = "train"
    TEST = "test"

    def keeps(self, held_out: bool) -> bool:
        """Whether a question the task holds out (or not) belongs to this split."""
        return self is Split.ALL or (self is Split.TEST) == held_out


def as_split(value: str | Split) -> Split:
    try:
        return Split(value)
    except ValueError:
        raise BatchError(f"unknown split {value!r}; the splits are {', '.join(s.value for s in Split)}") from None

"""How a comparison reports its progress: one stage at a time, with a count where the stage has one. The
library says nothing by default; the command line shows the stages with rich."""

from __future__ import annotations


class Reporter:
    """Receives `begin(step, total)` and `update(done, total)` as the work goes, and `end(stage, seconds)` when a
    stage (which may have had several steps) is done."""

    def begin(self, stage: str, total: int | None = None) -> None:
        pass

    def update(self, done: int, total: int | None = None) -> None:
        pass

    def end(self, stage: str, seconds: float) -> None:
        pass

    def note(self, line: str) -> None:
        """A line worth showing between stages (a skipped stage, a pool size)."""

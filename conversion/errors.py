"""The one error conversion raises, carrying every problem found rather than the first."""

from __future__ import annotations

from typing import Iterable

from mdm_circuits.errors import Error


class ConversionError(Error, ValueError):
    """A checkpoint that cannot be converted faithfully. `problems` lists each issue on its own."""

    def __init__(self, summary: str, problems: Iterable[str] = ()):
        self.summary = summary
        self.problems = list(problems)
        message = summary
        if self.problems:
            shown = self.problems[:40]
            message += "".join(f"\n  - {problem}" for problem in shown)
            if len(self.problems) > len(shown):
                message += f"\n  ... and {len(self.problems) - len(shown)} more"
        super().__init__(message)

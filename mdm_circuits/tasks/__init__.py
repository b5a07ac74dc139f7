"""Tasks posed to ARMs and MDMs: generators of clean/corrupted example pairs checked against a tokenizer.

Each task module offers `examples(tokenizer, n, *, seed=0, view=View(), max_length=None, split="all")`, its
`NAME` and the `METRIC` its examples are scored with; the same seed gives the same questions in either view.
`split` ("train", "test" or "all") draws from the task's fixed train/test split (see `tasks.splits`).
"""

from collections.abc import Mapping
from types import ModuleType

from mdm_circuits.errors import UnknownTask
from mdm_circuits.tasks import countdown, greater_than, infilling, ioi


class _Tasks(Mapping):
    """The tasks by name; an unknown name is refused with the known ones."""

    def __init__(self, *modules: ModuleType):
        self._tasks = {task.NAME: task for task in modules}

    def __getitem__(self, name: str) -> ModuleType:
        try:
            return self._tasks[name]
        except KeyError:
            raise UnknownTask(f"unknown task {name!r}; the tasks are {', '.join(self._tasks)}") from None

    def __iter__(self):
        return iter(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)


TASKS = _Tasks(ioi, greater_than, countdown, infilling)

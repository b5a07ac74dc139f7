"""The output directory of a long job (`compare`, `find-circuit`): it records the settings that produced it,
every file is written atomically (to a temporary name, then renamed), and every finished stage is a file
stamped with the settings' fingerprint, so a job killed at any moment leaves only whole files of one set of
settings, and a rerun resumes from them.

    out/settings.json           the settings of the run this directory holds
    out/stages/NAME.json        a stage's results (JSON), and NAME.npz for its arrays

A rerun with other settings is refused, unless `fresh`, which deletes what the job writes (its `owned` files)
and nothing else.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mdm_circuits.errors import UsageError

SETTINGS = "settings.json"
STAGES = "stages"


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it there: readers see all of it or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class RunDirectory:
    """`directory` as the output of a job run with `settings` (a JSON-able dict); `owned` names what the job
    writes there besides the settings and the stages."""

    def __init__(self, directory: str | Path, settings: dict, *, owned: tuple[str, ...] = (), fresh: bool = False):
        self.directory, self.settings, self.owned = Path(directory), settings, owned
        self.fingerprint = fingerprint(settings)
        recorded = self.directory / SETTINGS
        if self.directory.exists() and not self.directory.is_dir():
            raise UsageError(f"{self.directory} is a file; give a directory for the results")
        if recorded.exists():
            try:
                earlier = json.loads(recorded.read_text())
            except ValueError as error:
                raise UsageError(f"{recorded} is not a settings file ({error}); remove it or choose another "
                                 f"output directory") from error
            if earlier != settings and not fresh:
                changed = [f"{key}: {earlier.get(key)!r} -> {settings.get(key)!r}"
                           for key in sorted(set(settings) | set(earlier)) if earlier.get(key) != settings.get(key)]
                raise UsageError(f"{self.directory} holds results of a run with other settings ("
                                 + "; ".join(changed) + "); pass --fresh to delete them and start again, or choose "
                                 "another --out")
        elif not fresh:
            unexplained = [name for name in (STAGES, *self.owned) if (self.directory / name).exists()]
            if unexplained:
                raise UsageError(f"{self.directory} holds results ({', '.join(unexplained)}) without the "
                                 f"{SETTINGS} that says which settings produced them; pass --fresh to delete "
                                 "them and start again, or choose another --out")
        if fresh:
            self.clear()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"cannot write the results in {self.directory} ({error.strerror})") from error
        write_atomically(recorded, (json.dumps(settings, indent=1) + "\n").encode())

    def clear(self) -> None:
        """Delete what a run writes here (and nothing else)."""
        for name in (SETTINGS, STAGES, *self.owned):
            path = self.directory / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def path(self, name: str) -> Path:
        return self.directory / name

    def write(self, relative: str, data: bytes | str) -> Path:
        """Write a file of the run (atomically)."""
        path = self.directory / relative
        write_atomically(path, data.encode() if isinstance(data, str) else data)
        return path

    # ---- stages ----

    def has(self, stage: str) -> bool:
        return self.load(stage) is not None

    def save(self, stage: str, data: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        """A finished stage: its arrays first, then its JSON, which marks it complete."""
        if arrays is not None:
            buffer = io.BytesIO()
            np.savez(buffer, **arrays, _settings=np.array(self.fingerprint))
            write_atomically(self.directory / STAGES / f"{stage}.npz", buffer.getvalue())
        document = {"settings": self.fingerprint, "data": data}
        write_atomically(self.directory / STAGES / f"{stage}.json", (json.dumps(document) + "\n").encode())

    def load(self, stage: str) -> dict | None:
        """A finished stage's JSON data, or None if it is not there (or was written under other settings)."""
        path = self.directory / STAGES / f"{stage}.json"
        if not path.exists():
            return None
        document = json.loads(path.read_text())
        return document["data"] if document.get("settings") == self.fingerprint else None

    def arrays(self, stage: str) -> dict[str, np.ndarray]:
        with np.load(self.directory / STAGES / f"{stage}.npz") as stored:
            if str(stored["_settings"]) != self.fingerprint:
                raise UsageError(f"{stage}.npz was written under other settings; rerun with --fresh")
            return {name: stored[name] for name in stored.files if name != "_settings"}

"""A run's output directory: every finished stage is a file stamped with the settings' fingerprint, written
atomically (to a temporary name, then renamed), so a run killed at any moment leaves only whole files of
one set of settings.

    out/settings.json           the settings of the run this directory holds
    out/stages/NAME.json        a stage's results (JSON), and NAME.npz for its arrays
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mdm_circuits.comparison.settings import Settings
from mdm_circuits.errors import UsageError

SETTINGS = "settings.json"
STAGES = "stages"
# What a run writes at the top of its directory besides the stages (removed by a fresh start).
OUTPUTS = ("report.md", "report.html", "summary.json", "timings.json", "figures", "circuits", "scores")


class Store:
    def __init__(self, directory: str | Path, settings: Settings, *, fresh: bool = False):
        self.directory = Path(directory)
        self.settings = settings
        recorded = self.directory / SETTINGS
        if recorded.exists():
            try:
                earlier = Settings.from_dict(json.loads(recorded.read_text()))
            except (ValueError, TypeError) as error:
                raise UsageError(f"{recorded} is not a comparison's settings file ({error}); remove it or choose "
                                 f"another output directory") from error
            if earlier != settings and not fresh:
                raise UsageError(f"{self.directory} holds a comparison with other settings ("
                                 + "; ".join(settings.differences(earlier)) + "); pass --fresh to delete its "
                                 "results and start again, or choose another --out")
            if fresh:
                self.clear()
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / STAGES).mkdir(exist_ok=True)
        self._write(recorded, (json.dumps(settings.to_dict(), indent=1) + "\n").encode())

    def clear(self) -> None:
        """Delete what a run writes here (and nothing else)."""
        for name in (SETTINGS, STAGES, *OUTPUTS):
            path = self.directory / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def path(self, name: str) -> Path:
        return self.directory / name

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def write(self, relative: str, data: bytes | str) -> Path:
        """Write a file of the run (atomically)."""
        path = self.directory / relative
        self._write(path, data.encode() if isinstance(data, str) else data)
        return path

    # ---- stages ----

    def has(self, stage: str) -> bool:
        return self.load(stage) is not None

    def save(self, stage: str, data: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        """A finished stage: its arrays first, then its JSON, which marks it complete."""
        if arrays is not None:
            buffer = io.BytesIO()
            np.savez(buffer, **arrays, _settings=np.array(self.settings.fingerprint))
            self._write(self.directory / STAGES / f"{stage}.npz", buffer.getvalue())
        document = {"settings": self.settings.fingerprint, "data": data}
        self._write(self.directory / STAGES / f"{stage}.json", (json.dumps(document) + "\n").encode())

    def load(self, stage: str) -> dict | None:
        """A finished stage's JSON data, or None if it is not there (or was written under other settings)."""
        path = self.directory / STAGES / f"{stage}.json"
        if not path.exists():
            return None
        document = json.loads(path.read_text())
        return document["data"] if document.get("settings") == self.settings.fingerprint else None

    def arrays(self, stage: str) -> dict[str, np.ndarray]:
        with np.load(self.directory / STAGES / f"{stage}.npz") as stored:
            if str(stored["_settings"]) != self.settings.fingerprint:
                raise UsageError(f"{stage}.npz was written under other settings; rerun with --fresh")
            return {name: stored[name] for name in stored.files if name != "_settings"}

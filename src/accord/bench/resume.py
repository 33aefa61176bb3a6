"""Resumable benchmark runs: each finished unit of work is kept in a file of its own.

A unit (one configuration of a benchmark's plan) is written atomically as soon as it is done,
to ``<folder>/<label>-<digest>.json`` where the digest is that of its key: everything that
determines its result (the plan entry, the method defaults and options, the data, the seeds).
A run that is interrupted loses at most the unit in progress; the same command run again
finds the finished units by their keys and does the rest. A change of defaults or of the plan
changes the keys of the units it affects only, which are run again (the file of the unit's
earlier key is then replaced).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accord._io import read_json, write_json
from accord.errors import ConfigError

DIGEST_LENGTH = 16


def normalised(key: Any) -> Any:
    """``key`` as JSON gives it back (tuples as lists; other objects by their repr), so that a
    key compares equal to the one read from a unit's file."""
    return json.loads(json.dumps(key, sort_keys=True, default=repr))


def digest(key: Any) -> str:
    """A short stable digest of a unit's key."""
    text = json.dumps(normalised(key), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_LENGTH]


@dataclass(frozen=True)
class UnitFiles:
    """The folder of a run's finished units."""

    folder: Path

    def path(self, label: str, key: Any) -> Path:
        return self.folder / f"{label}-{digest(key)}.json"

    def load(self, label: str, key: Any) -> dict[str, Any] | None:
        """The record of the unit ``label`` finished with ``key``; None if not done."""
        path = self.path(label, key)
        if not path.is_file():
            return None
        unit = read_json(path, ConfigError, broken="delete it to run that unit again")
        if unit.get("key") != normalised(key):
            raise ConfigError(
                f"{path} records another key than its name says; delete it to run that unit again"
            )
        return dict(unit["record"])

    def save(self, label: str, key: Any, record: dict[str, Any]) -> None:
        """Write the unit's record; the files of its earlier keys are removed."""
        path = self.path(label, key)
        write_json(path, {"label": label, "key": normalised(key), "record": record})
        for stale in self.folder.glob(f"{label}-*.json"):
            tail = stale.name[len(label) + 1 : -len(".json")]
            if stale != path and len(tail) == DIGEST_LENGTH and tail.isalnum():
                stale.unlink(missing_ok=True)


@dataclass
class Budget:
    """When a run stops starting new units: after ``minutes`` of wall time or ``units`` units
    (None: no bound)."""

    minutes: float | None = None
    units: int | None = None
    started: float = field(default_factory=time.monotonic)
    done: int = 0

    def spent(self) -> bool:
        """Whether the run should stop before its next unit."""
        if self.units is not None and self.done >= self.units:
            return True
        return self.minutes is not None and time.monotonic() - self.started >= 60 * self.minutes

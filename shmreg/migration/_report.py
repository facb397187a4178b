"""What ``migrate`` and ``validate`` return: plain dataclasses that round-trip through JSON.

A ``MigrationReport`` is also what ``rollback`` works from: ``added`` lists every entry the
migration wrote to the target exactly as it was written, so a rollback can remove each one
only while it is still that very entry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shmreg.backends._portable import StoredEntry


@dataclass
class Conflict:
    """A name the target held with another entry: what kind, and what was done about it."""

    kind: str  # "owner" (another live process), "generation", or "metadata"
    source: StoredEntry
    target: StoredEntry
    resolution: str  # "skipped", "overwritten" or "failed"

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "source": self.source.as_json(),
            "target": self.target.as_json(),
            "resolution": self.resolution,
        }


@dataclass
class Failure:
    """An entry that could not be written, and why (the error's code and message)."""

    entry: StoredEntry
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {"entry": self.entry.as_json(), "reason": self.reason}


@dataclass
class MigrationReport:
    """What one ``migrate`` did. ``copied`` counts ``added`` less the overwritten conflicts."""

    source: str
    target: str
    namespaces: list[str]
    dry_run: bool = False
    copied: int = 0
    skipped: int = 0  # already in the target, identical
    added: list[StoredEntry] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """No failure and no conflict left unresolved."""
        return not self.failed and all(c.resolution != "failed" for c in self.conflicts)

    def as_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "namespaces": self.namespaces,
            "dry_run": self.dry_run,
            "copied": self.copied,
            "skipped": self.skipped,
            "conflicts": [c.as_json() for c in self.conflicts],
            "failed": [f.as_json() for f in self.failed],
            "seconds": round(self.seconds, 6),
            "ok": self.ok,
            "added": [e.as_json() for e in self.added],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MigrationReport:
        return cls(
            source=data["source"],
            target=data["target"],
            namespaces=list(data["namespaces"]),
            dry_run=bool(data["dry_run"]),
            copied=int(data["copied"]),
            skipped=int(data["skipped"]),
            added=[StoredEntry.from_json(e) for e in data["added"]],
            conflicts=[
                Conflict(
                    c["kind"],
                    StoredEntry.from_json(c["source"]),
                    StoredEntry.from_json(c["target"]),
                    c["resolution"],
                )
                for c in data["conflicts"]
            ],
            failed=[
                Failure(StoredEntry.from_json(f["entry"]), f["reason"]) for f in data["failed"]
            ],
            seconds=float(data["seconds"]),
        )

    def save(self, path: str | Path) -> None:
        """Write the report as JSON (what ``shmreg rollback REPORT.json`` reads)."""
        Path(path).write_text(json.dumps(self.as_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> MigrationReport:
        return cls.from_json(json.loads(Path(path).read_text()))


@dataclass
class ValidationReport:
    """Source against target: names missing from the target, extra in it, or different."""

    missing: list[StoredEntry] = field(default_factory=list)
    extra: list[StoredEntry] = field(default_factory=list)
    different: list[tuple[StoredEntry, StoredEntry]] = field(default_factory=list)
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.different)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "missing": [e.as_json() for e in self.missing],
            "extra": [e.as_json() for e in self.extra],
            "different": [[s.as_json(), t.as_json()] for s, t in self.different],
        }


@dataclass
class RollbackReport:
    """What ``rollback`` removed, and what it left because it changed since the migration."""

    removed: int = 0
    kept: list[StoredEntry] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"removed": self.removed, "kept": [e.as_json() for e in self.kept]}


__all__ = ["Conflict", "Failure", "MigrationReport", "RollbackReport", "ValidationReport"]

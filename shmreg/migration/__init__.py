"""Moving a registry between backends: copy, validate, roll back, dual-write, feature flags.

See docs/migration.md for the runbook. ``migrate`` copies live entries with their owners and
fencing generations, ``validate`` compares two registries, ``rollback`` undoes a migration
where nothing changed since; ``open_location`` opens a registry from one string (a name, a
Redis URL, or a ``dual+`` dual-write location).
"""

from shmreg.backends._portable import StoredEntry
from shmreg.migration._copy import migrate, rollback, validate
from shmreg.migration._flags import (
    FLAGS_NAMESPACE,
    FeatureFlags,
    FlagState,
    bucket,
    open_by_flag,
)
from shmreg.migration._locations import location_of, open_location
from shmreg.migration._report import (
    Conflict,
    Failure,
    MigrationReport,
    RollbackReport,
    ValidationReport,
)

__all__ = [
    "FLAGS_NAMESPACE",
    "Conflict",
    "Failure",
    "FeatureFlags",
    "FlagState",
    "MigrationReport",
    "RollbackReport",
    "StoredEntry",
    "ValidationReport",
    "bucket",
    "location_of",
    "migrate",
    "open_by_flag",
    "open_location",
    "rollback",
    "validate",
]

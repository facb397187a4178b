"""shmreg's loggers: ``logging.getLogger("shmreg")`` and its children.

The library configures no output (an application decides where its logs go) and logs only
off the hot paths: repairs after a dead writer, table growth, entries removed because their
owner died, damaged records skipped by scans, and backend failover. Each line starts with the
registry's name so one handler can serve many registries. See docs/operations.md.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from shmreg._types import ProcessIdentity

root = logging.getLogger("shmreg")
# A NullHandler, as the logging HOWTO advises libraries: without any handler, Python's
# last-resort handler would print WARNING lines to stderr of programs that never asked for
# logs. Records still propagate to whatever handlers the application puts on the root.
root.addHandler(logging.NullHandler())
store = logging.getLogger("shmreg.store")  # recoveries, growth
liveness = logging.getLogger("shmreg.liveness")  # entries removed as dead
scan = logging.getLogger("shmreg.scan")  # damaged records skipped
monitoring = logging.getLogger("shmreg.monitoring")  # backend health and failover


def removed_dead(
    registry: str, removed: Mapping[ProcessIdentity, int], reasons: Mapping[ProcessIdentity, str]
) -> None:
    """One INFO line per dead owner whose entries were removed, with the verdict's reason."""
    if not liveness.isEnabledFor(logging.INFO):
        return
    for ident, count in removed.items():
        if count:
            liveness.info(
                "registry %r: removed %d entr%s of dead pid %d (%s)",
                registry,
                count,
                "y" if count == 1 else "ies",
                ident.pid,
                reasons.get(ident, "dead"),
            )

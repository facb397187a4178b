"""``shmreg upgrade NAME``: bring a registry written by an older layout to this one, in place.

A registry stamped with an older layout version is refused on attach with
``IncompatibleRegistry`` naming this command. Layouts 0 and 1 locked writers with ``flock``
on the root file; layout 2 with a robust pthread mutex in the root page. The upgrade takes
that old flock for its whole run, so no writer of an older shmreg is inside, and then:

* initialises the mutex (its bytes were unused before, and no process of this shmreg locks
  it while the stamp is old: attaching is refused);
* for layout 0, runs the same generation swap that growth uses under the new lock: every
  live entry is copied into a fresh data generation laid out by this shmreg and the root
  flips to it in one store; for layout 1 the data is already laid out right, and a begin /
  end under the new lock runs the crash recovery a writer killed inside would need;
* stamps the root with the current version, last.

A process killed midway leaves the old stamp (and, for 0, the old generation), so running
the command again is always safe: it re-initialises the mutex under the flock. Processes of
an older shmreg still attached keep locking with flock after the stamp and would no longer
exclude the new writers: they must be stopped before upgrading (docs/migration.md).
Processes of this shmreg attached before the upgrade follow the swap as they follow growth.
"""

from __future__ import annotations

import fcntl
import os
from typing import Any

from shmreg._engine import layout as L
from shmreg._engine.segment import segment_path
from shmreg._engine.store import Store
from shmreg._errors import IncompatibleRegistry


def upgrade(name: str) -> dict[str, Any]:
    """Upgrade shared-memory registry ``name``; ``{"from", "to", "upgraded", "entries"}``."""
    store = Store.open(name, create=False, capacity=None, max_metadata_bytes=None, upgrading=True)
    try:
        version = int(store.rq[L.R_VERSION])
        if version == L.LAYOUT_VERSION:
            return {"from": version, "to": version, "upgraded": False, "entries": None}
        if version not in L.UPGRADABLE_VERSIONS:  # pragma: no cover (Store.open refused it)
            raise IncompatibleRegistry(
                f"layout version {version} cannot be upgraded by this shmreg",
                setting="layout_version",
                expected=L.LAYOUT_VERSION,
                actual=version,
            )
        fd = os.open(segment_path(L.root_name(name)), os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the old writer lock: no older writer is inside
            version = int(store.rq[L.R_VERSION])  # another upgrade may have finished first
            if version == L.LAYOUT_VERSION:
                return {"from": version, "to": version, "upgraded": False, "entries": None}
            entries = _upgrade_locked(store, version)
        finally:
            os.close(fd)  # releases the flock
        return {"from": version, "to": L.LAYOUT_VERSION, "upgraded": True, "entries": entries}
    finally:
        store.close()


def _upgrade_locked(store: Store, version: int) -> int:
    store.lock.initialise()
    store.begin()  # under the new mutex; recovers if an older writer died inside
    failed = True
    try:
        table = store.rebuild(0, 0) if version == 0 else store.table
        entries = int(table.counters()[1])
        store.stamp_version()  # stamped last: the data is right by now
        failed = False
    finally:
        store.end(failed)
    return entries

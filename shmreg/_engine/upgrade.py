"""``shmreg upgrade NAME``: bring a registry written by an older layout to this one, in place.

A registry stamped with an older layout version is refused on attach with
``IncompatibleRegistry`` naming this command. The upgrade runs the same generation swap that
growth uses: under the writer lock, every live entry is copied into a fresh data generation
laid out by this shmreg, the root flips to it in one store, and only then is the root
stamped with the current version. A process killed midway leaves the old generation and the
old stamp (the next attach recovers the lock and refuses again), so running the command
again is always safe. Processes attached before the upgrade follow the swap as they follow
growth.
"""

from __future__ import annotations

from typing import Any

from shmreg._engine import layout as L
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
        store.begin()
        failed = True
        try:
            table = store.rebuild(0, 0)  # the growth swap: live entries, new generation
            store.stamp_version()  # stamped only once the data is new
            entries = int(table.counters()[1])
            failed = False
        finally:
            store.end(failed)
        return {"from": version, "to": L.LAYOUT_VERSION, "upgraded": True, "entries": entries}
    finally:
        store.close()

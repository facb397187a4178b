"""Named crash points: where tests kill a writer to prove the registry survives it.

Off unless the environment variable ``SHMREG_CRASH_AT`` is set when shmreg is imported, and
then the check at each point is one read of the module flag ``ARMED``. Its value names a
point and, optionally, which hit of it kills (``commit.published`` or
``commit.published:3``); the process then sends itself SIGKILL, which is what a crash looks
like to the registry: no ``finally`` runs, no lock is released except by the kernel.

Every point is listed in ``POINTS`` with the step it interrupts, so a test can enumerate
them and ``crash_point`` refuses a name that is not listed.
"""

from __future__ import annotations

import os
import signal

POINTS: dict[str, str] = {
    # Lock.
    "lock.owner_set": "writer lock taken, owner words written, nothing changed yet",
    # Table.commit, every write.
    "commit.staged": "record copied above arena top, not yet referenced",
    "commit.journal_valid": "redo journal written and marked valid",
    "commit.slot_odd": "slot sequence odd: readers retry",
    "commit.slot_words": "slot words written, counters not yet",
    "commit.counters": "counters written, slot still odd",
    "commit.published": "slot sequence even: the change is visible",
    "commit.event_written": "event in the ring, journal still valid",
    "commit.journal_retired": "journal retired, lock still held",
    # Store.rebuild (growth and compaction).
    "rebuild.building_marked": "root names the generation being built",
    "rebuild.segment_created": "new generation segment created and allocated",
    "rebuild.copied": "live entries copied into the new generation",
    "rebuild.flipped": "root generation flipped to the new segment",
    "rebuild.old_unlinked": "old generation unlinked",
    # Recovery itself.
    "recover.replayed": "journal replayed, not yet retired",
    "recover.tombstoned": "half-written slots tombstoned, counters not recounted",
    # Creation.
    "create.data_built": "first data generation built, root not yet published",
    "create.root_built": "root built under a temporary name, not yet linked",
}

_SPEC = os.environ.get("SHMREG_CRASH_AT", "")
ARMED = bool(_SPEC)
_TARGET, _, _NTH = _SPEC.partition(":")
_remaining = int(_NTH) if _NTH else 1


def crash_point(name: str) -> None:
    """Die here by SIGKILL if this is the armed point (call only under ``if ARMED``)."""
    global _remaining
    if name not in POINTS:
        raise ValueError(f"unknown crash point {name!r}")
    if name != _TARGET:
        return
    _remaining -= 1
    if _remaining <= 0:
        os.kill(os.getpid(), signal.SIGKILL)

"""The liveness table in the root segment, as the pure-Python engine sees it: for fsck.

The compiled path (``_speedups.c``) claims a slot per registering process and has one of
that process's threads hold the slot's robust mutex until the process ends; lookups then
read a death from the futex word instead of asking the kernel (``layout.py`` describes the
words). Python never claims or holds a slot. It only checks that every slot naming a
holder names a thread of the process the slot is for, and clears one that does not: a
damaged slot could otherwise answer "alive" for a dead process, and a cleared slot answers
"unknown", which sends readers back to ``kill(pid, 0)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from shmreg._engine import layout as L
from shmreg._engine.lock import thread_process


class LifeSlot(NamedTuple):
    slot: int
    seq: int
    pid: int
    start_ticks: int
    word: int  # the mutex's futex word: holder thread id, FUTEX_OWNER_DIED, or 0


def slots(root: memoryview) -> Iterator[LifeSlot]:
    """Every slot of the table that was ever claimed (none in an upgraded registry)."""
    q = root.cast("Q")
    try:
        n = int(q[L.R_LIFE_SLOTS])
        if n <= 0 or len(root) < L.LIFE_OFFSET + n * L.LIFE_SLOT_SIZE:
            return
        for i in range(n):
            base = L.LIFE_OFFSET + i * L.LIFE_SLOT_SIZE
            w = base // 8
            seq, pid, start = q[w + L.LIFE_SEQ], q[w + L.LIFE_PID], q[w + L.LIFE_START]
            at = base + L.LIFE_MUTEX_AT
            word = int.from_bytes(root[at : at + 4], "little")
            if seq or pid or word:
                yield LifeSlot(i, int(seq), int(pid), int(start), word)
    finally:
        q.release()


def problem(slot: LifeSlot) -> str | None:
    """Why ``slot`` cannot be trusted, or None. Only a slot that claims a live holder can
    mislead a reader; one marked dead or unknown never can."""
    if slot.seq & 1:
        return f"liveness slot {slot.slot}: half-claimed (odd sequence)"
    holder = slot.word & L.FUTEX_TID_MASK
    if not holder or slot.word & L.FUTEX_OWNER_DIED:
        return None
    if thread_process(holder) != slot.pid:
        return (
            f"liveness slot {slot.slot}: says pid {slot.pid} is alive through thread "
            f"{holder}, which is not a thread of it"
        )
    return None

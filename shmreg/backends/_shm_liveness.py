"""Liveness and events for the shared-memory backend: sweeps, dead-owner removal, health,
and reading the event ring."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from shmreg import _identity, _log
from shmreg._engine import events as _ev
from shmreg._engine import layout as L
from shmreg._engine.table import Table
from shmreg._types import Liveness, ProcessIdentity
from shmreg.backends._base import dead_reasons, event_window
from shmreg.backends._shm_base import ShmBase

# owner_counts packs an identity in one word: start ticks above the pid's bits.
_PID_BITS = 22
_START_BITS = 64 - _PID_BITS


class ShmLiveness(ShmBase):
    # ------------------------------------------------------------------ liveness

    def owner_counts(self) -> dict[ProcessIdentity, int]:
        """Entries per distinct owner identity, over all used slots."""

        def scan(table: Table) -> dict[ProcessIdentity, int]:
            cols = table.columns()
            used = L.col_state(cols) == L.USED
            pids = L.col_pid(cols, used)
            starts = L.col_start(cols, used)
            del cols, used
            if (
                pids.size
                and int(pids.max()) < 1 << _PID_BITS
                and int(starts.max()) < 1 << _START_BITS
            ):
                # One 64-bit key per identity (pids fit 22 bits, start ticks 42: over a
                # thousand years at 100 Hz) sorts far faster than unique rows.
                keys = (starts << np.uint64(_PID_BITS)) | pids
                keys, counts = np.unique(keys, return_counts=True)
                return {
                    ProcessIdentity(k & ((1 << _PID_BITS) - 1), k >> _PID_BITS): c
                    for k, c in zip(keys.tolist(), counts.tolist(), strict=True)
                }
            pairs = np.stack([pids, starts], axis=1)
            uniq, counts = np.unique(pairs, axis=0, return_counts=True)
            return {
                ProcessIdentity(p, s): c
                for (p, s), c in zip(uniq.tolist(), counts.tolist(), strict=True)
            }

        return self._read(scan)

    def _remove_dead(self, verdicts: Mapping[ProcessIdentity, Liveness], sweeping: bool) -> int:
        # One pass over the owner column finds the candidates; see BackendBase._remove_dead.
        if self._foreign_pidns:
            return 0  # verdicts from another pid namespace prove nothing here
        dead = {
            ident: _ev.REASON_CODES.get(v.value, _ev.SWEPT)
            for ident, v in verdicts.items()
            if v.is_dead
        }
        if not dead and not sweeping:
            return 0
        dead_pids = np.fromiter({ident.pid for ident in dead}, dtype=np.uint64)

        per_owner: dict[ProcessIdentity, int] = {}

        def write(table: Table) -> int:
            removed = 0
            per_owner.clear()
            if dead:
                # One pass over the owner column finds the candidates (a monitor usually
                # buries one pid: a plain comparison); states are checked per hit below.
                owners = L.col_pid(table.columns())
                if dead_pids.size == 1:
                    hits = np.flatnonzero(owners == dead_pids[0]).tolist()
                else:
                    hits = np.flatnonzero(np.isin(owners, dead_pids)).tolist()
                del owners
                for index in hits:
                    words = table.read_slot(index)
                    ident = ProcessIdentity(*L.slot_owner(words))
                    reason = dead.get(ident)
                    if reason is not None and L.slot_state(words) == L.USED:
                        table.tombstone(index, words, _ev.DIED, reason)
                        removed += 1
                        per_owner[ident] = per_owner.get(ident, 0) + 1
            if sweeping or removed:
                # Under the lock: concurrent sweepers must not lose counts. A monitor's or
                # cleanup's removal counts like a sweep's, so stats() sees every dead entry.
                self._store.count_sweep(removed)
            return removed

        removed = self._write(write)
        if removed:  # logged after the lock is released
            _log.removed_dead(self._name, per_owner, dead_reasons(verdicts))
        return removed

    def _verdicts(self, identities: Iterable[ProcessIdentity]) -> dict[ProcessIdentity, Liveness]:
        if self._foreign_pidns:  # pids of another namespace cannot be judged from here
            return {ident: Liveness.UNKNOWN for ident in identities}
        return _identity.check_many(identities)

    # ------------------------------------------------------------------ events

    def last_event_seq(self) -> int:
        """Sequence number of the newest event (0 before the first): one word read."""
        seq: int = self._store.rq[L.R_EVENT_SEQ]
        return seq

    def read_events(self, after: int, limit: int = 1024) -> tuple[list[_ev.Event], int]:
        """Events after ``after`` (at most ``limit``) and how many were lost to overwrite."""
        ring = self._store.ring
        first, stop, lost = event_window(after, self.last_event_seq(), L.RING_EVENTS, limit)
        out = []
        for seq in range(first, stop + 1):
            raw = ring.read(seq)
            if raw is None:
                # Overwritten while we read: the writers lapped us. Stop here; the next call
                # sees the newer last number and reports the gap where it is.
                break
            out.append(_ev.decode(seq, raw))
        return out, lost

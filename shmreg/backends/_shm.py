"""``SharedMemoryBackend``: the registry API over a ``Store`` (the default backend).

Reads are lock-free seqlock reads of the current generation plus one cheap liveness probe
(``kill(pid, 0)``) per returned entry; writes run under the writer lock through the table's
journaled commit. Queries over many entries first filter the slot table with numpy (state,
namespace hash, type tag, capabilities mask) and decode only the candidates.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from shmreg import _codec, _identity
from shmreg import _events as _ev
from shmreg import _layout as L
from shmreg._errors import (
    AlreadyRegistered,
    CorruptRegistry,
    NotRegistered,
    StaleGeneration,
)
from shmreg._store import Store
from shmreg._table import SlotWords, StuckSlot, Table
from shmreg._types import (
    Entry,
    HealthReport,
    Liveness,
    Metadata,
    ProcessIdentity,
    RegistryStats,
    Service,
)

T = TypeVar("T")
_crc32 = zlib.crc32
_probe_alive = _identity.probe_alive
# key bytes, key hash, namespace hash, namespace length, the service's exact type (a cached
# entry for 1 must not answer for True or 1.0, which are equal in Python)
_KeyInfo = tuple[bytes, int, int, int, type]
# key, key hash, padded record, slot words 1-5 (record offset still to add), capabilities mask
_Prepared = tuple[bytes, int, bytes, tuple[int, int, int, int, int], int]
_KEY_CACHE_LIMIT = 65_536
_GEN = L.R_GEN
_PADDING = [bytes(n) for n in range(8)]
_unpack_slot = L.SLOT.unpack_from
_USED = L.USED
_kill = os.kill
_unpack_metadata = _codec.unpack_metadata
_NAMESPACES: dict[str, tuple[bytes, int, int]] = {}  # namespace -> (prefix, crc32, length)
_LO32 = L.LO32


class SharedMemoryBackend:
    """Registry storage in one host's shared memory; see docs/concepts.md."""

    kind = "shm"

    def __init__(
        self,
        name: str,
        *,
        create: bool = True,
        capacity: int | None = None,
        max_metadata_bytes: int | None = None,
        mode: int = 0o600,
    ) -> None:
        self._store = Store.open(
            name, create=create, capacity=capacity, max_metadata_bytes=max_metadata_bytes, mode=mode
        )
        self._name = name
        self._keys: dict[tuple[str, Any], _KeyInfo] = {}
        self._sweeps = 0

    # ------------------------------------------------------------------ plumbing

    @property
    def name(self) -> str:
        return self._name

    @property
    def store(self) -> Store:
        return self._store

    @property
    def capacity(self) -> int:
        return self._store.capacity

    @property
    def max_metadata_bytes(self) -> int:
        return self._store.max_metadata_bytes

    def _key(self, namespace: str, service: Service) -> _KeyInfo:
        # Only exact str / int services are cached: a tuple key would make (1,) and (True,)
        # (equal in Python, different keys here) share one cache entry. A full cache stops
        # growing rather than being cleared: entries never go stale, and clearing made a
        # working set larger than the cache miss every time.
        kind = type(service)
        cacheable = (kind is str or kind is int) and type(namespace) is str
        if cacheable:
            cached = self._keys.get((namespace, service))
            if cached is not None:
                return cached
        ns = _NAMESPACES.get(namespace) if type(namespace) is str else None
        if ns is None:
            ns_raw = _codec.check_namespace(namespace)
            ns = (ns_raw + b"\x00", _crc32(ns_raw), len(ns_raw))
            if len(_NAMESPACES) < _KEY_CACHE_LIMIT:
                _NAMESPACES[namespace] = ns
        raw = _codec.encode_service(ns[0], service)
        info = (raw, _crc32(raw), ns[1], ns[2], kind)
        if cacheable and len(self._keys) < _KEY_CACHE_LIMIT:
            self._keys[(namespace, service)] = info
        return info

    def _table(self) -> Table:
        store = self._store
        if store.rq[_GEN] != store.gen:
            store.refresh()
        return store.table

    def _read(self, fn: Callable[[Table], T]) -> T:
        """Run a lock-free read; if a slot stays odd (dead writer), repair and retry."""
        for _ in range(3):
            try:
                return fn(self._table())
            except StuckSlot:
                # Taking the lock runs recovery if the owner died. A slot still odd while we
                # hold the lock has no writer at all (a flipped bit): recovery tombstones it.
                table = self._store.begin(timeout=30.0)
                try:
                    table.recover()
                finally:
                    self._store.end()
        return fn(self._table())

    def _write(self, fn: Callable[[Table], T]) -> T:
        store = self._store
        table = store.begin()
        failed = True
        try:
            result = fn(table)
            failed = False
            return result
        finally:
            store.end(failed)

    # ------------------------------------------------------------------ reads

    def _locate(self, namespace: str, service: Service) -> tuple[Table, SlotWords] | None:
        """The validated slot holding the key, or None: the read path every lookup shares.

        The key-cache hit, the generation check and the first probe are written out here
        (most keys sit in their home slot); collisions and busy slots take ``Table.find``.
        """
        try:
            info = self._keys.get((namespace, service))
        except TypeError:  # unhashable: let _key raise the proper InvalidKey
            info = None
        if info is None or info[4] is not type(service):
            info = self._key(namespace, service)
        store = self._store
        if store.rq[_GEN] != store.gen:
            store.refresh()
        table = store.table
        key = info[0]
        key_hash = info[1]
        w = table.slot_word0 + (key_hash % table.nslots) * 8
        q = table.q
        s1 = q[w]
        words: SlotWords = _unpack_slot(table.buf, w * 8)
        w2 = words[2]
        if (
            s1 == q[w]
            and not s1 & 1
            and w2 >> 48 == _USED
            and words[1] & _LO32 == key_hash
            and (w2 >> 32) & 0xFFFF == len(key)
        ):
            off = table.arena_off + (w2 & _LO32) * 8
            if table.buf[off : off + len(key)] == key:
                return table, words
        try:
            found = table.find(key, key_hash)[1]
        except StuckSlot:  # a writer died mid-change: repair, then look again
            table, found = self._read(lambda t: (t, t.find(key, key_hash)[1]))
        return None if found is None else (table, found)

    def lookup(self, namespace: str, service: Service) -> int | None:
        found = self._locate(namespace, service)
        if found is None:
            return None
        pid: int = found[1][4] & _LO32
        if not pid:
            return None  # never kill(0, ...): it would probe our own process group
        try:
            _kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # the pid exists, owned by another user
        except OverflowError:
            return None
        return pid

    def _entry(self, namespace: str, service: Service) -> tuple[SlotWords, Metadata] | None:
        found = self._locate(namespace, service)
        if found is None:
            return None
        table, words = found
        if not _probe_alive(words[4] & _LO32):
            return None
        _, meta = table.record_bytes(words)  # checksum-verified copy
        try:
            return words, _unpack_metadata(meta)
        except Exception as exc:
            raise self._corrupt(f"metadata of {service!r} does not decode: {exc!r}") from exc

    def lookup_with_metadata(self, namespace: str, service: Service) -> tuple[int, Metadata] | None:
        found = self._entry(namespace, service)
        if found is None:
            return None
        return found[0][4] & _LO32, found[1]

    def lookup_entry(self, namespace: str, service: Service) -> tuple[int, int, Metadata] | None:
        found = self._entry(namespace, service)
        if found is None:
            return None
        words, meta = found
        return words[4] & _LO32, words[6], meta

    def _scan(
        self, namespace: str | None, type_tag: int | None = None, caps_mask: int = 0
    ) -> list[tuple[SlotWords, bytes, bytes]]:
        """Validated (words, key, metadata bytes) of live candidates, filtered in numpy first."""

        # Validate before any view of the segment exists: an exception raised while a numpy
        # column is alive would keep the mapping pinned for as long as its traceback lives.
        prefix = b"" if namespace is None else _codec.check_namespace(namespace) + b"\x00"

        def scan(table: Table) -> list[tuple[SlotWords, bytes, bytes]]:
            cols = table.columns()
            mask = ((cols[:, L.S_REC] >> np.uint64(48)) & np.uint64(0xFF)) == L.USED
            if prefix:
                mask &= (cols[:, L.S_HASH] >> np.uint64(32)) == np.uint64(_crc32(prefix[:-1]))
            if type_tag is not None:
                tags = cols[:, L.S_META] >> np.uint64(32)
                mask &= (tags == np.uint64(type_tag)) | (tags == np.uint64(_codec.TYPE_ANY))
            if caps_mask:
                want = np.uint64(caps_mask)
                mask &= (cols[:, L.S_CAPS] & want) == want
            out: list[tuple[SlotWords, bytes, bytes]] = []
            alive: dict[int, bool] = {}
            for index in np.flatnonzero(mask).tolist():
                words = table.read_slot(index)
                if (words[2] >> 48) & 0xFF != L.USED:
                    continue
                pid = words[4] & _LO32
                ok = alive.get(pid)
                if ok is None:
                    ok = alive[pid] = _probe_alive(pid)
                if not ok:
                    continue
                key, meta = table.record_bytes(words)
                if prefix and not key.startswith(prefix):
                    continue  # namespace hash collision
                out.append((words, key, meta))
            return out

        return self._read(scan)

    def _entries(self, rows: list[tuple[SlotWords, bytes, bytes]], ns_len: int) -> list[Entry]:
        unpack = _codec.unpack_metadata
        decode = _codec.decode_service
        try:
            return [
                Entry(decode(key, ns_len), words[4] & _LO32, unpack(meta))
                for words, key, meta in rows
            ]
        except Exception as exc:  # bytes that passed their checksum but do not decode
            raise self._corrupt(f"an entry does not decode: {exc!r}") from exc

    def _corrupt(self, detail: str) -> CorruptRegistry:
        return CorruptRegistry(f"registry {self._name!r}: {detail}", name=self._name, detail=detail)

    def list_entries(self, namespace: str) -> list[Entry]:
        ns_len = len(_codec.check_namespace(namespace))
        return self._entries(self._scan(namespace), ns_len)

    def namespace_owners(self, namespace: str) -> list[tuple[Service, ProcessIdentity, int]]:
        """(service, owner identity, generation) of every live entry in ``namespace``."""
        ns_len = len(_codec.check_namespace(namespace))
        return [
            (
                _codec.decode_service(key, ns_len),
                ProcessIdentity(words[4] & _LO32, words[5]),
                words[6],
            )
            for words, key, _ in self._scan(namespace)
        ]

    def list_services(self, namespace: str) -> list[Service]:
        ns_len = len(_codec.check_namespace(namespace))
        return [_codec.decode_service(key, ns_len) for _, key, _ in self._scan(namespace)]

    def find(
        self,
        namespace: str,
        equals: Mapping[str, Any] | None = None,
        predicate: Callable[[Metadata], bool] | None = None,
    ) -> list[Entry]:
        ns_len = len(_codec.check_namespace(namespace))
        type_tag: int | None = None
        caps = 0
        if equals:
            if "type" in equals and type(equals["type"]) not in (list, dict):
                type_tag = _codec.type_tag({"type": equals["type"]})
                if type_tag == _codec.TYPE_ANY:
                    type_tag = None
            if "capabilities" in equals:
                wanted = equals["capabilities"]
                if type(wanted) is list:
                    for cap in wanted:
                        caps |= _codec.capability_bit(cap)
                elif type(wanted) is not dict:
                    caps = _codec.capability_bit(wanted)
        out = []
        for entry in self._entries(self._scan(namespace, type_tag, caps), ns_len):
            if equals and not _codec.matches(entry.metadata, equals):
                continue
            if predicate is not None and not predicate(entry.metadata):
                continue
            out.append(entry)
        return out

    def count(self, namespace: str | None = None) -> int:
        if namespace is None:

            def scan(table: Table) -> int:
                cols = table.columns()
                used = ((cols[:, L.S_REC] >> np.uint64(48)) & np.uint64(0xFF)) == L.USED
                pids = cols[used, L.S_OWNER] & np.uint64(_LO32)
                uniq, counts = np.unique(pids, return_counts=True)
                return sum(
                    int(c)
                    for p, c in zip(uniq.tolist(), counts.tolist(), strict=True)
                    if _probe_alive(p)
                )

            return self._read(scan)
        return len(self._scan(namespace))

    def dump(self) -> list[dict[str, Any]]:
        """Every used slot, dead owners included (flagged): for ``shmreg ls`` and debugging."""

        def scan(table: Table) -> list[tuple[SlotWords, bytes, bytes]]:
            rows = []
            for _, words in table.iter_used():
                key, meta = table.record_bytes(words)
                rows.append((words, key, meta))
            return rows

        out = []
        for words, key, meta in self._read(scan):
            try:
                namespace, service = _codec.decode_key(key)
            except Exception as exc:
                raise self._corrupt(f"a key does not decode: {exc!r}") from exc
            pid = words[4] & _LO32
            out.append(
                {
                    "namespace": namespace,
                    "service": service,
                    "pid": pid,
                    "alive": _probe_alive(pid),
                    "generation": words[6],
                    "metadata": _codec.unpack_metadata(meta),
                }
            )
        return out

    # ------------------------------------------------------------------ writes

    def register(
        self,
        namespace: str,
        service: Service,
        owner: ProcessIdentity,
        metadata: Mapping[str, Any] | None,
    ) -> int:
        item = self._prepare(namespace, service, owner, metadata)
        store = self._store
        table = store.begin()
        failed = True
        try:
            generation = self._register_locked(table, namespace, service, owner, item)
            failed = False
            return generation
        finally:
            store.end(failed)

    def register_many(
        self, namespace: str, items: list[tuple[Service, ProcessIdentity, Mapping[str, Any] | None]]
    ) -> list[int]:
        """Register a batch under one lock hold: each item still commits on its own."""
        prepared = [
            (service, owner, self._prepare(namespace, service, owner, metadata))
            for service, owner, metadata in items
        ]
        store = self._store
        table = store.begin()
        failed = True
        try:
            out = [
                self._register_locked(table, namespace, service, owner, item)
                for service, owner, item in prepared
            ]
            failed = False
            return out
        finally:
            store.end(failed)

    def _prepare(
        self,
        namespace: str,
        service: Service,
        owner: ProcessIdentity,
        metadata: Mapping[str, Any] | None,
    ) -> _Prepared:
        """Everything a registration needs that does not need the lock."""
        key, key_hash, ns_hash, _, _ = self._key(namespace, service)
        meta = _codec.as_metadata(metadata)
        packed = _codec.pack_metadata(meta, self._store.max_metadata_bytes)
        record = key + packed
        crc = _crc32(record)
        record += _PADDING[-len(record) & 7]
        return (
            key,
            key_hash,
            record,
            (
                key_hash | (ns_hash << 32),
                len(key) << 32 | L.USED << 48,
                len(packed) | (_codec.type_tag(meta) << 32),
                owner.pid | (crc << 32),
                owner.start_ticks,
            ),
            _codec.capability_mask(meta),
        )

    def _register_locked(
        self,
        table: Table,
        namespace: str,
        service: Service,
        owner: ProcessIdentity,
        item: _Prepared,
    ) -> int:
        key, key_hash, record, head, caps = item
        padded = len(record)
        live, tombs = table.q[6], table.q[7]
        if live + tombs + 1 > L.MAX_LOAD * table.nslots or not table.room_for(padded):
            table = self._store.rebuild(live + 1, padded)
        index, words, free = table.probe_for_write(key, key_hash)
        top, live, tombs, garbage, ops, owners = table.counters()
        if words is not None:
            kind, reason = _ev.REGISTERED, _ev.TAKEOVER
            if words[4] & _LO32 == owner.pid and words[5] == owner.start_ticks:
                generation = words[6]
                kind, reason = _ev.UPDATED, _ev.NO_REASON
            else:
                held = ProcessIdentity(words[4] & _LO32, words[5])
                if not _identity.check(held).is_dead:
                    raise AlreadyRegistered(
                        f"{namespace}/{service!r} is held by live pid {held.pid}",
                        namespace=namespace,
                        service=service,
                        pid=held.pid,
                    )
                owners += 1
                generation = owners
            garbage += _record_size(words)
        else:
            kind, reason = _ev.REGISTERED, _ev.NO_REASON
            index = free
            if table.q[table.slot_word0 + index * 8 + 2] >> 48 == L.TOMB:
                tombs -= 1
            live += 1
            owners += 1
            generation = owners
        offset = table.stage(record)
        table.commit(
            index,
            (head[0], head[1] | offset >> 3, head[2], head[3], head[4], generation, caps),
            (top + padded, live, tombs, garbage, ops + 1, owners),
            kind,
            reason,
        )
        return generation

    def _ensure_room(self, table: Table, nbytes: int, adding: bool) -> Table:
        live = table.counter(L.D_LIVE)
        tombs = table.counter(L.D_TOMBS)
        crowded = adding and live + tombs + 1 > L.MAX_LOAD * table.nslots
        if crowded or not table.room_for(nbytes):
            return self._store.rebuild(live + 1, nbytes)
        return table

    def update_metadata(
        self,
        namespace: str,
        service: Service,
        metadata: Mapping[str, Any],
        *,
        merge: bool = False,
        generation: int | None = None,
    ) -> None:
        key, key_hash, _, _, _ = self._key(namespace, service)
        update = _codec.as_metadata(metadata)
        limit = self._store.max_metadata_bytes
        packed_update = _codec.pack_metadata(update, limit) if not merge else b""
        if merge:
            _codec.pack_metadata(update, 2**62)  # validate the update itself up front

        def write(table: Table) -> None:
            for _ in range(2):
                index, words = self._held(table, namespace, service, key, key_hash, generation)
                if merge:
                    meta = _codec.unpack_metadata(table.meta_bytes(words))
                    meta.update(update)
                    packed = _codec.pack_metadata(meta, limit)
                else:
                    meta, packed = update, packed_update
                record = key + packed
                padded = L.align_record(len(record))
                if not table.room_for(padded):
                    table = self._ensure_room(table, padded, adding=False)
                    continue
                top, live, tombs, garbage, ops, owners = table.counters()
                offset = table.stage(record + b"\0" * (padded - len(record)))
                body = (
                    words[1],
                    L.pack_rec(offset, len(key), L.USED),
                    L.pack_meta(len(packed), _codec.type_tag(meta)),
                    L.pack_owner(words[4] & _LO32, _crc32(record)),
                    words[5],
                    words[6],
                    _codec.capability_mask(meta),
                )
                table.commit(
                    index,
                    body,
                    (top + padded, live, tombs, garbage + _record_size(words), ops + 1, owners),
                    _ev.UPDATED,
                )
                return

        self._write(write)

    def _held(
        self,
        table: Table,
        namespace: str,
        service: Service,
        key: bytes,
        key_hash: int,
        generation: int | None,
    ) -> tuple[int, SlotWords]:
        index, words, _ = table.probe_for_write(key, key_hash)
        if words is None or not _probe_alive(words[4] & _LO32):
            raise NotRegistered(
                f"{namespace}/{service!r} is not registered", namespace=namespace, service=service
            )
        if generation is not None and words[6] != generation:
            raise StaleGeneration(
                f"{namespace}/{service!r} is at generation {words[6]}, caller holds {generation}",
                namespace=namespace,
                service=service,
                expected=generation,
                actual=words[6],
            )
        return index, words

    def unregister(
        self, namespace: str, service: Service, *, generation: int | None = None
    ) -> bool:
        key, key_hash, _, _, _ = self._key(namespace, service)

        def write(table: Table) -> bool:
            index, words, _ = table.probe_for_write(key, key_hash)
            if words is None:
                return False
            if generation is not None and words[6] != generation:
                raise StaleGeneration(
                    f"{namespace}/{service!r} is at generation {words[6]}, caller holds "
                    f"{generation}",
                    namespace=namespace,
                    service=service,
                    expected=generation,
                    actual=words[6],
                )
            alive = _probe_alive(words[4] & _LO32)
            _tombstone(table, index, words)
            return alive

        return self._write(write)

    # ------------------------------------------------------------------ liveness

    def sweep(self) -> int:
        """Remove every entry whose owner is provably dead; return how many.

        Each distinct owner is checked once (``/proc`` read), so the cost grows with live
        processes and slots, not with entries per process.
        """
        verdicts = _identity.check_many(self.owners())
        removed = self.remove_dead(verdicts)
        rq = self._store.rq
        rq[L.R_SWEEPS] += 1
        rq[L.R_LAST_SWEEP_NS] = time.time_ns()
        rq[L.R_DEAD_FOUND] += removed
        self._sweeps += 1
        return removed

    def owner_counts(self) -> dict[ProcessIdentity, int]:
        """Entries per distinct owner identity, over all used slots."""

        def scan(table: Table) -> dict[ProcessIdentity, int]:
            cols = table.columns()
            used = ((cols[:, L.S_REC] >> np.uint64(48)) & np.uint64(0xFF)) == L.USED
            pairs = np.empty((int(np.count_nonzero(used)), 2), dtype=np.uint64)
            pairs[:, 0] = cols[used, L.S_OWNER] & np.uint64(_LO32)
            pairs[:, 1] = cols[used, L.S_START]
            del cols, used
            uniq, counts = np.unique(pairs, axis=0, return_counts=True)
            return {
                ProcessIdentity(p, s): c
                for (p, s), c in zip(uniq.tolist(), counts.tolist(), strict=True)
            }

        return self._read(scan)

    def owners(self) -> set[ProcessIdentity]:
        """The distinct owner identities of all used slots."""
        return set(self.owner_counts())

    def remove_dead(self, verdicts: Mapping[ProcessIdentity, Liveness]) -> int:
        """Tombstone the entries of every identity whose verdict is dead, with a died event.

        Safe from many processes at once: each slot is re-read under the lock, and only an
        entry still held by that very identity is removed (and reported) once.
        """
        dead = {
            ident: _ev.REASON_CODES.get(v.value, _ev.SWEPT)
            for ident, v in verdicts.items()
            if v.is_dead
        }
        if not dead:
            return 0
        dead_pids = np.fromiter({ident.pid for ident in dead}, dtype=np.uint64)

        def write(table: Table) -> int:
            cols = table.columns()
            used = np.flatnonzero(((cols[:, L.S_REC] >> np.uint64(48)) & np.uint64(0xFF)) == L.USED)
            hits = used[np.isin(cols[used, L.S_OWNER] & np.uint64(_LO32), dead_pids)].tolist()
            del cols, used
            removed = 0
            for index in hits:
                words = table.read_slot(index)
                reason = dead.get(ProcessIdentity(words[4] & _LO32, words[5]))
                if reason is not None and (words[2] >> 48) & 0xFF == L.USED:
                    _tombstone(table, index, words, _ev.DIED, reason)
                    removed += 1
            return removed

        return self._write(write)

    def health_check(self) -> HealthReport:
        counts = self.owner_counts()
        verdicts = _identity.check_many(counts)
        total = dead = unknown = 0
        for ident, n in counts.items():
            verdict = verdicts[ident]
            total += n
            if verdict.is_dead:
                dead += n
            elif verdict is Liveness.UNKNOWN:
                unknown += n
        return HealthReport(
            HealthReport.classify(total, dead),
            self.kind,
            total,
            total - dead - unknown,
            dead,
            unknown,
        )

    # ------------------------------------------------------------------ events

    def last_event_seq(self) -> int:
        """Sequence number of the newest event (0 before the first): one word read."""
        seq: int = self._store.rq[L.R_EVENT_SEQ]
        return seq

    def read_events(self, after: int, limit: int = 1024) -> tuple[list[_ev.Event], int]:
        """Events after ``after`` (at most ``limit``) and how many were lost to overwrite."""
        ring = self._store.ring
        last = self.last_event_seq()
        lost = 0
        first = after + 1
        if last - after > L.RING_EVENTS:
            first = last - L.RING_EVENTS + 1
            lost = first - after - 1
        out = []
        for seq in range(first, min(last, first + limit - 1) + 1):
            raw = ring.read(seq)
            if raw is None:  # overwritten while we read: the writer lapped us
                lost += 1
                continue
            out.append(_ev.decode(seq, raw))
        return out, lost

    # ------------------------------------------------------------------ reporting

    def stats(self) -> RegistryStats:
        table = self._table()
        info = table.describe()
        rq = self._store.rq
        cols = table.columns()
        used = ((cols[:, L.S_REC] >> np.uint64(48)) & np.uint64(0xFF)) == L.USED
        namespaces = int(np.unique(cols[used, L.S_HASH] >> np.uint64(32)).size)
        memory = L.ROOT_SIZE + table.arena_off + info["allocated"]
        last = int(rq[L.R_LAST_SWEEP_NS])
        return RegistryStats(
            backend=self.kind,
            capacity=int(table.nslots * L.MAX_LOAD),
            used=info["live"],
            tombstones=info["tombstones"],
            load_factor=(info["live"] + info["tombstones"]) / table.nslots,
            namespaces=namespaces,
            memory_bytes=memory,
            sweeps=int(rq[L.R_SWEEPS]),
            last_sweep_time=last / 1e9 if last else None,
            dead_found=int(rq[L.R_DEAD_FOUND]),
            extra={**info, **self._store.root_info()},
        )

    def statistics(self) -> dict[str, Any]:
        stats = self.stats()
        return {
            "backend": self.kind,
            "name": self._name,
            "entries": stats.used,
            "capacity": stats.capacity,
            "load_factor": stats.load_factor,
            "memory_bytes": stats.memory_bytes,
            "sweeps": stats.sweeps,
            "generation": stats.extra["generation"],
            "ops": stats.extra["ops"],
        }

    def close(self) -> None:
        self._store.close()

    def destroy(self) -> None:
        self._store.destroy()


def _record_size(words: SlotWords) -> int:
    return L.align_record(((words[2] >> 32) & 0xFFFF) + (words[3] & _LO32))


def _tombstone(
    table: Table, index: int, words: SlotWords, kind: int = _ev.UNREGISTERED, reason: int = 0
) -> None:
    top, live, tombs, garbage, ops, owners = table.counters()
    w2 = (words[2] & ~(0xFF << 48)) | (L.TOMB << 48)
    table.commit(
        index,
        (words[1], w2, *words[3:]),
        (top, live - 1, tombs + 1, garbage + _record_size(words), ops + 1, owners),
        kind,
        reason,
    )

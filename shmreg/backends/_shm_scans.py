"""Scans over many slots: listing, queries, counts and statistics.

Every scan filters the slot table with numpy first (state, namespace hash, type tag,
capabilities mask), validates the candidates' slots in bulk, and decodes all the survivors'
keys and metadata in one msgpack call each. Where the compiled path is active, find,
listings and namespace counts are answered by its scan instead (``_speedups_src/scan.c.h``:
the same filters and checks in one pass, in C), which hands back to this one whatever it would
have to skip, count and log.
"""

from __future__ import annotations

import dataclasses
import gc
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from itertools import compress, repeat
from typing import Any, NamedTuple

import msgpack
import numpy as np

from shmreg import _codec, _log
from shmreg._engine import layout as L
from shmreg._engine.table import SlotWords, Table
from shmreg._errors import CorruptRegistry
from shmreg._types import (
    Entry,
    HealthReport,
    HealthStatus,
    Metadata,
    ProcessIdentity,
    RegistryStats,
    Service,
)
from shmreg.backends._shm_base import ShmBase

_crc32 = zlib.crc32
_unpackb = msgpack.unpackb
# What the compiled scan (_speedups_src/scan.c.h) returns; a test checks the C side's values.
SCAN_ENTRIES, SCAN_SERVICES, SCAN_COUNT = 0, 1, 2


class _Rows(NamedTuple):
    """Live candidates of a scan: parallel lists, one item per entry."""

    records: list[bytes]  # key bytes + metadata bytes, checksum-verified copies
    key_lens: list[int]
    pids: list[int]
    starts: list[int]
    generations: list[int]
    damaged: int = 0  # entries skipped: record out of bounds or failing its checksum


# Entry(...) runs NamedTuple's Python-level __new__; tuple.__new__ builds the same object in C.
_new_entry = partial(tuple.__new__, Entry)


@contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic collector while decoding a large batch.

    Decoding allocates a dict, a list and strings per entry; the collector would walk the
    young generation again every few hundred allocations (half the decode time at 100k
    entries), and none of these objects can form a cycle.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _array_header(n: int) -> bytes:
    """msgpack array header for ``n`` items: lets one unpackb decode many records."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


class ShmScans(ShmBase):
    def _compiled_scan(
        self,
        ns_raw: bytes,
        what: int,
        type_tag: int | None = None,
        caps: int = 0,
        confirm: tuple[tuple[Any, Any], ...] = (),
    ) -> Any:
        """The compiled scan's answer for the checked namespace ``ns_raw``: entries (those
        whose metadata matches every ``confirm`` pair, by ``_codec.select``'s rule for values
        that are not lists), services or a count; None when this process runs pure Python or
        the compiled scan declines (a damaged or busy slot, a moved table), and the Python
        scan must answer."""
        fast = self._fast
        if fast is None:
            return None
        return fast.scan(ns_raw + b"\x00", type_tag, caps, what, Entry, confirm)

    def _scan(
        self,
        namespace: str | None,
        type_tag: int | None = None,
        caps_mask: int = 0,
        with_records: bool = True,
    ) -> _Rows:
        """Live entries among the candidates, filtered and validated in numpy first.

        The seqlock is applied to the whole candidate set at once: sequence column, a copy
        of the rows, sequence column again; rows whose sequence moved or was odd are read
        again one by one. Records are then copied out, checksum-verified and checked for
        the namespace (two namespaces may share a hash).
        """
        # Validate before any view of the segment exists: an exception raised while a numpy
        # column is alive would keep the mapping pinned for as long as its traceback lives.
        prefix = b"" if namespace is None else _codec.check_namespace(namespace) + b"\x00"

        def scan(table: Table) -> _Rows:
            cols = table.columns()

            def wanted(cols: Any) -> Any:
                mask = L.col_state(cols) == L.USED
                if prefix:
                    mask &= L.col_ns_hash(cols) == np.uint64(_crc32(prefix[:-1]))
                if type_tag is not None:
                    tags = L.col_type_tag(cols)
                    mask &= (tags == np.uint64(type_tag)) | (tags == np.uint64(_codec.TYPE_ANY))
                if caps_mask:
                    want = np.uint64(caps_mask)
                    mask &= (L.col_caps(cols) & want) == want
                return mask

            seq0 = L.col_seq(cols).copy()  # a column without a shift is a live view
            mask = wanted(cols)
            # Rows being written while the filters read them: torn, so candidates too.
            mask |= L.col_unsteady(seq0, L.col_seq(cols))
            index = np.flatnonzero(mask)
            before = L.col_seq(cols, index)
            rows = cols[index]
            after = L.col_seq(cols, index)
            del cols, mask
            # The seqlock of layout.seqlock_read, over all candidate rows at once.
            steady = ~L.col_unsteady(before, after) & (L.col_seq(rows) == before)
            if not steady.all():  # being written: read those one by one, seqlock-validated
                redo = [table.read_slot(i) for i in index[~steady].tolist()]
                rows = np.concatenate([rows[steady], np.array(redo, dtype=np.uint64)])
            rows = rows[wanted(rows)]
            pids = L.col_pid(rows)
            alive = [p for p in np.unique(pids).tolist() if self._alive(p)]
            rows = rows[np.isin(pids, alive)]
            offsets = table.arena_off + L.col_offset(rows)
            key_lens = L.col_key_len(rows)
            ends = offsets + key_lens + L.col_meta_len(rows)
            damaged = 0
            if ends.size and int(ends.max()) > table.arena_off + table.arena_size:
                # Degrade, don't die: skip (and count) the damaged entries, keep the rest.
                inside = ends <= np.uint64(table.arena_off + table.arena_size)
                damaged = int(inside.size - np.count_nonzero(inside))
                rows, offsets = rows[inside], offsets[inside]
                key_lens, ends = key_lens[inside], ends[inside]
            buf = table.buf
            if not with_records:  # counting: only the namespace check needs the key bytes
                kept = rows
                if prefix:
                    heads = [buf[a : a + len(prefix)] == prefix for a in offsets.tolist()]
                    kept = rows[np.array(heads, dtype=bool)]
                pids = L.col_pid(kept).tolist()
                return _Rows([], [], pids, [], [], damaged)
            # Written as maps and comprehensions over plain lists: this runs once per entry.
            spans = zip(offsets.tolist(), ends.tolist(), strict=True)
            records = [bytes(buf[a:b]) for a, b in spans]
            crcs = L.col_crc(rows).tolist()
            seeds = L.col_record_seed(rows).tolist()
            lens = key_lens.tolist()
            sums = list(map(_crc32, records, seeds))
            if sums != crcs:
                intact = [a == b for a, b in zip(sums, crcs, strict=True)]
                damaged += len(intact) - sum(intact)
                records = list(compress(records, intact))
                lens = list(compress(lens, intact))
                rows = rows[np.array(intact, dtype=bool)]
            kept = rows
            if prefix and sum(map(bytes.startswith, records, repeat(prefix))) != len(records):
                mine = [r.startswith(prefix) for r in records]  # namespaces sharing a hash
                records = list(compress(records, mine))
                lens = list(compress(lens, mine))
                kept = rows[np.array(mine, dtype=bool)]
            return _Rows(
                records,
                lens,
                L.col_pid(kept).tolist(),
                L.col_start(kept).tolist(),
                L.col_generation(kept).tolist(),
                damaged,
            )

        rows = self._read(scan)
        if rows.damaged:
            self._skipped(namespace, rows.damaged)
        return rows

    def _skipped(self, namespace: str | None, count: int) -> None:
        """Count and log entries a scan left out as damaged (their point reads still raise)."""
        self.damaged_skipped += count
        if self._damage_logged.get(namespace) != count:  # once per change, not per scan
            self._damage_logged[namespace] = count
            _log.scan.warning(
                "registry %r: skipped %d damaged entr%s%s; run: shmreg fsck --repair %s",
                self._name,
                count,
                "y" if count == 1 else "ies",
                "" if namespace is None else f" in namespace {namespace!r}",
                self._name,
            )

    def damaged_entries(self) -> int:
        """Entries of live owners whose record is out of bounds or fails its checksum."""
        return self._scan(None).damaged

    def _services(self, rows: _Rows, ns_len: int) -> list[Service]:
        """Every entry's service, decoded in one msgpack call."""
        start = ns_len + 1
        payload = b"".join(r[start:k] for r, k in zip(rows.records, rows.key_lens, strict=True))
        try:
            # use_list=False makes tuple services tuples again (and the outer array one too)
            services: list[Service] = list(
                _unpackb(_array_header(len(rows.records)) + payload, use_list=False, raw=False)
            )
        except Exception:  # bytes that passed their checksum but do not decode
            return self._decode_each(rows, ns_len)[0]
        return services

    def _decode_each(self, rows: _Rows, ns_len: int) -> tuple[list[Service], list[Metadata]]:
        """The slow path when a batch does not decode: record by record, undecodable ones
        skipped and counted. ``rows`` keeps only the decoded entries (pids and all)."""
        services: list[Service] = []
        metas: list[Metadata] = []
        intact: list[bool] = []
        for record, key_len in zip(rows.records, rows.key_lens, strict=True):
            try:
                service = _unpackb(record[ns_len + 1 : key_len], use_list=False, raw=False)
                meta = _unpackb(record[key_len:], raw=False, strict_map_key=True)
                ok = type(meta) is dict
            except Exception:
                ok = False
            intact.append(ok)
            if ok:
                services.append(service)
                metas.append(meta)
        columns: tuple[list[Any], ...] = rows[:-1]
        for column in columns:
            column[:] = compress(column, intact)
        self._skipped(None, len(intact) - len(services))
        return services, metas

    def _entries(self, rows: _Rows, ns_len: int) -> list[Entry]:
        """Entries with decoded services and metadata: two msgpack calls for the lot."""
        with _no_gc():
            services = self._services(rows, ns_len)
            payload = b"".join(r[k:] for r, k in zip(rows.records, rows.key_lens, strict=True))
            try:
                metas: list[Metadata] = _unpackb(
                    _array_header(len(rows.records)) + payload, raw=False, strict_map_key=True
                )
            except Exception:
                services, metas = self._decode_each(rows, ns_len)
            return list(map(_new_entry, zip(services, rows.pids, metas, strict=True)))

    def list_entries(self, namespace: str) -> list[Entry]:
        ns_raw = _codec.check_namespace(namespace)
        entries: list[Entry] | None = self._compiled_scan(ns_raw, SCAN_ENTRIES)
        if entries is not None:
            return entries
        return self._entries(self._scan(namespace), len(ns_raw))

    def namespace_owners(self, namespace: str) -> list[tuple[Service, ProcessIdentity, int]]:
        """(service, owner identity, generation) of every live entry in ``namespace``."""
        ns_len = len(_codec.check_namespace(namespace))
        rows = self._scan(namespace)
        owners = map(ProcessIdentity, rows.pids, rows.starts)
        return list(zip(self._services(rows, ns_len), owners, rows.generations, strict=True))

    def list_services(self, namespace: str) -> list[Service]:
        ns_raw = _codec.check_namespace(namespace)
        services: list[Service] | None = self._compiled_scan(ns_raw, SCAN_SERVICES)
        if services is not None:
            return services
        return self._services(self._scan(namespace), len(ns_raw))

    def find(
        self,
        namespace: str,
        equals: Mapping[str, Any] | None = None,
        predicate: Callable[[Metadata], bool] | None = None,
    ) -> list[Entry]:
        ns_raw = _codec.check_namespace(namespace)
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
        # Tags only narrow the candidates: each is confirmed against its metadata, by the
        # compiled scan as it decodes (values other than lists) or by _codec.select.
        confirm = tuple((f, w) for f, w in equals.items() if type(w) is not list) if equals else ()
        entries: list[Entry] | None = self._compiled_scan(
            ns_raw, SCAN_ENTRIES, type_tag, caps, confirm
        )
        rest = equals
        if entries is None:
            entries = self._entries(self._scan(namespace, type_tag, caps), len(ns_raw))
        elif equals:
            rest = {f: w for f, w in equals.items() if type(w) is list}
        if rest:
            entries = _codec.select(entries, rest)
        if predicate is not None:
            entries = [e for e in entries if predicate(e.metadata)]
        return entries

    def count(self, namespace: str | None = None) -> int:
        if namespace is None:

            def scan(table: Table) -> int:
                cols = table.columns()
                # The seqlock over whole columns: sequence, the two fields (copies), sequence
                # again. A slot written meanwhile may have read as empty (a writer zero-fills
                # words while its sequence is odd): those slots are read again one by one.
                seq0 = L.col_seq(cols).copy()  # a column without a shift is a live view
                states, owners = L.col_state(cols), L.col_pid(cols)
                torn = L.col_unsteady(seq0, L.col_seq(cols))
                pids = owners[(states == L.USED) & ~torn]
                if torn.any():
                    redo = np.array(
                        [table.read_slot(i) for i in np.flatnonzero(torn).tolist()],
                        dtype=np.uint64,
                    ).reshape(-1, L.SLOT_WORDS)
                    pids = np.concatenate([pids, L.col_pid(redo, L.col_state(redo) == L.USED)])
                uniq, counts = np.unique(pids, return_counts=True)
                return sum(
                    int(c)
                    for p, c in zip(uniq.tolist(), counts.tolist(), strict=True)
                    if self._alive(p)
                )

            return self._read(scan)
        counted: int | None = self._compiled_scan(_codec.check_namespace(namespace), SCAN_COUNT)
        if counted is not None:
            return counted
        return len(self._scan(namespace, with_records=False).pids)

    def namespace_counts(self) -> dict[str, int]:
        """Live entries per namespace, for metrics: one pass, no checksums, no decoding.

        The rows are copied without the seqlock: an entry being written at that instant
        may be counted under its old namespace, which a gauge scraped every few seconds
        can live with.
        """

        def scan(table: Table) -> Counter[bytes]:
            cols = table.columns()
            rows = cols[L.col_state(cols) == L.USED]
            del cols
            pids = L.col_pid(rows)
            rows = rows[np.isin(pids, [p for p in np.unique(pids).tolist() if self._alive(p)])]
            offsets = table.arena_off + L.col_offset(rows)
            key_lens = L.col_key_len(rows)
            end = table.arena_off + table.arena_size
            buf = table.buf
            spans = zip(offsets.tolist(), key_lens.tolist(), strict=True)
            return Counter(bytes(buf[a : min(a + k, end)]).partition(b"\x00")[0] for a, k in spans)

        counts = self._read(scan)
        return {ns.decode("utf-8", "replace"): n for ns, n in counts.items()}

    def dump(self) -> list[dict[str, Any]]:
        """Every used slot, dead owners included (flagged): for ``shmreg ls`` and debugging."""

        def scan(table: Table) -> list[tuple[SlotWords, bytes, bytes]]:
            rows = []
            for _, words in table.iter_used():
                try:
                    key, meta = table.record_bytes(words)
                except CorruptRegistry:
                    key, meta = b"", b""  # counted and skipped below
                rows.append((words, key, meta))
            return rows

        out = []
        for words, key, meta in self._read(scan):
            try:
                namespace, service = _codec.decode_key(key)
                metadata = _codec.unpack_metadata(meta)
            except Exception:
                self._skipped(None, 1)
                continue
            pid = L.slot_pid(words)
            out.append(
                {
                    "namespace": namespace,
                    "service": service,
                    "pid": pid,
                    "alive": self._alive(pid),
                    "generation": L.slot_generation(words),
                    "metadata": metadata,
                }
            )
        return out

    # ------------------------------------------------------------------ reporting

    def stats(self) -> RegistryStats:
        table = self._table()
        info = table.describe()
        rq = self._store.rq
        cols = table.columns()
        used = L.col_state(cols) == L.USED
        namespaces = int(np.unique(L.col_ns_hash(cols, used)).size)
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
            unknown_owners=super().health_check().unknown,
        )

    def health_check(self) -> HealthReport:
        """The dead-entry thresholds, and unhealthy whenever a record is damaged."""
        report = super().health_check()
        damaged = self.damaged_entries()
        if not damaged:
            return report
        detail = (
            f"{damaged} damaged entr{'y' if damaged == 1 else 'ies'}: "
            f"run shmreg fsck --repair {self._name}"
        )
        return dataclasses.replace(
            report, status=HealthStatus.UNHEALTHY, damaged=damaged, detail=detail
        )

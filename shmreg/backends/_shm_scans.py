"""Scans over many slots: listing, queries, counts and statistics.

Every scan filters the slot table with numpy first (state, namespace hash, type tag,
capabilities mask), then seqlock-reads and decodes only the candidates.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from shmreg import _codec
from shmreg import _layout as L
from shmreg._table import SlotWords, Table
from shmreg._types import Entry, Metadata, ProcessIdentity, RegistryStats, Service
from shmreg.backends._shm_base import LO32, ShmBase

_crc32 = zlib.crc32


class ShmScans(ShmBase):
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
                pid = words[4] & LO32
                ok = alive.get(pid)
                if ok is None:
                    ok = alive[pid] = self._alive(pid)
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
                Entry(decode(key, ns_len), words[4] & LO32, unpack(meta))
                for words, key, meta in rows
            ]
        except Exception as exc:  # bytes that passed their checksum but do not decode
            raise self._corrupt(f"an entry does not decode: {exc!r}") from exc

    def list_entries(self, namespace: str) -> list[Entry]:
        ns_len = len(_codec.check_namespace(namespace))
        return self._entries(self._scan(namespace), ns_len)

    def namespace_owners(self, namespace: str) -> list[tuple[Service, ProcessIdentity, int]]:
        """(service, owner identity, generation) of every live entry in ``namespace``."""
        ns_len = len(_codec.check_namespace(namespace))
        return [
            (
                _codec.decode_service(key, ns_len),
                ProcessIdentity(words[4] & LO32, words[5]),
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
                pids = cols[used, L.S_OWNER] & np.uint64(LO32)
                uniq, counts = np.unique(pids, return_counts=True)
                return sum(
                    int(c)
                    for p, c in zip(uniq.tolist(), counts.tolist(), strict=True)
                    if self._alive(p)
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
            pid = words[4] & LO32
            out.append(
                {
                    "namespace": namespace,
                    "service": service,
                    "pid": pid,
                    "alive": self._alive(pid),
                    "generation": words[6],
                    "metadata": _codec.unpack_metadata(meta),
                }
            )
        return out

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
            unknown_owners=self.health_check().unknown,
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

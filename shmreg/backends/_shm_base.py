"""The shared-memory backend's plumbing: opening, key encoding, read and write brackets.

``SharedMemoryBackend`` (``_shm.py``) is assembled from this base and two mixins, each one
job: point reads and writes (``_shm.py``), scans over many slots (``_shm_scans.py``) and
liveness and events (``_shm_liveness.py``).
"""

from __future__ import annotations

import weakref
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

from shmreg import _codec, _identity
from shmreg._engine import crashpoints, fastpath
from shmreg._engine import layout as L
from shmreg._engine.segment import segment_path
from shmreg._engine.store import Store
from shmreg._engine.table import StuckSlot, Table
from shmreg._errors import CorruptRegistry, IncompatibleRegistry
from shmreg._types import Service
from shmreg.backends._base import BackendBase

T = TypeVar("T")
_crc32 = zlib.crc32
# key bytes, key hash, namespace hash, namespace length, the service's exact type (a cached
# entry for 1 must not answer for True or 1.0, which are equal in Python)
KeyInfo = tuple[bytes, int, int, int, type]
# Encoded keys per process: ~250 bytes each, so at most ~64 MiB; a working set larger than
# this pays the encoding (~0.5 µs) on every call past the first 262,144 keys.
_KEY_CACHE_LIMIT = 262_144
_GEN = L.R_GEN
_NAMESPACES: dict[str, tuple[bytes, int, int]] = {}  # namespace -> (prefix, crc32, length)


def _assume_alive(pid: int) -> bool:
    return True


def compiled_path(backend: ShmBase) -> Any:
    """The compiled fast path over ``backend``'s store, bound in as its point reads; None
    when this process runs pure Python (``shmreg._engine.fastpath``).

    Its reads answer from shared memory and hand every case they do not handle (a key not
    yet encoded, a busy or damaged slot, a moved generation) to the Python methods given
    here, so both paths give the same answers and raise the same errors.
    """
    if fastpath.speedups is None:
        return None
    cls: Any = type(backend)
    fast = fastpath.speedups.Fast(
        backend._store,
        backend._store.remap_epoch,
        _codec.unpack_metadata,
        crashpoints.crash_point if crashpoints.ARMED else None,
        cls.lookup,
        cls.lookup_with_metadata,
        cls.register,
        _codec._STR_TAGS,
        _codec.type_tag,
        _codec.capability_mask,
        backend._store.max_metadata_bytes,
        _NAMESPACES,
        _identity.self_identity,
        segment_path(L.root_name(backend._name)),
        weakref.ref(backend),
        cls.register_many,
    )
    backend.lookup = fast.lookup  # type: ignore[method-assign]
    backend.lookup_with_metadata = fast.lookup_with_metadata  # type: ignore[method-assign]
    backend.register = fast.register  # type: ignore[attr-defined]
    backend.register_many = fast.register_many  # type: ignore[attr-defined]
    return fast


class ShmBase(BackendBase):
    """State and brackets shared by every part of ``SharedMemoryBackend``."""

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
        self._max_meta = self._store.max_metadata_bytes
        self._keys: dict[tuple[str, Any], KeyInfo] = {}
        # Entries scans left out as damaged (this process's count), and what was last
        # logged per namespace so a repeated scan does not log the same damage again.
        self.damaged_skipped = 0
        self._damage_logged: dict[str | None, int] = {}
        # Pids mean something only in the pid namespace that stored them. A process in
        # another one (a container sharing /dev/shm) can read, but cannot judge liveness,
        # register or remove: it would store or kill the wrong process.
        here, there = _identity.pid_namespace(), int(self._store.rq[L.R_PIDNS])
        self._foreign_pidns = bool(here and there and here != there)
        self._alive: Callable[[int], bool] = (
            _assume_alive if self._foreign_pidns else _identity.probe_alive
        )
        self._fast = None if self._foreign_pidns else compiled_path(self)

    def _refuse_if_foreign(self) -> None:
        if self._foreign_pidns:
            raise IncompatibleRegistry(
                f"registry {self._name!r} belongs to another pid namespace: pids stored here "
                "would name other processes",
                setting="pid_namespace",
                expected=_identity.pid_namespace(),
                actual=int(self._store.rq[L.R_PIDNS]),
            )

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

    def _key(self, namespace: str, service: Service) -> KeyInfo:
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

    def _corrupt(self, detail: str) -> CorruptRegistry:
        return CorruptRegistry(f"registry {self._name!r}: {detail}", name=self._name, detail=detail)

    def close(self) -> None:
        if self._fast is not None:
            self._fast.release()
        self._store.close()

    def destroy(self) -> None:
        if self._fast is not None:
            self._fast.release()
        self._store.destroy()

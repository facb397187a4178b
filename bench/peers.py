"""Adapters for every store the harness compares, behind one interface.

The plain dict, lmdb, sqlite and shmreg adapters live in ``shmreg._bench`` (the short
``shmreg bench`` needs them too); this module adds the peers that need the ``bench`` extra or
a server: UltraDict, multiprocessing.Manager, Redis and shared-memory-dict. Each is used the
way its documentation suggests, with the fastest idiomatic choices (noted per class), so the
comparison is against the peer at its best, not a straw man.

``PEERS`` maps the name used on the command line to ``(class, why_not_available)``; a peer
whose library is missing is skipped with a line saying so.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterable, Sequence
from multiprocessing.managers import MakeProxyType, SyncManager
from typing import Any

import msgpack

from bench._core import SHMREG_IMPORT_ERROR, core

Store, Rec, Item, file_bytes = core.Store, core.Rec, core.Item, core.file_bytes
DictStore, LmdbStore, SqliteStore, ShmregStore = (
    core.DictStore,
    core.LmdbStore,
    core.SqliteStore,
    core.ShmregStore,
)


def _own(rec: Rec) -> Rec:
    """A private copy of a record: the harness shares 910 record objects between entries,
    and pickle's memo would dedupe them in stores that pickle a whole dict at once."""
    return {"pid": rec["pid"], "capabilities": list(rec["capabilities"]), "type": rec["type"]}


class UltraDictStore(Store):
    """UltraDict with ``shared_lock=True`` (needs the ``atomics`` package; without it the lock
    is process-local and independent writers race). Values are the record dicts (pickled
    by UltraDict); every process keeps a full private copy and replays a change stream."""

    kind = "ultradict"

    def preload(self) -> None:
        from UltraDict import UltraDict  # patches multiprocessing's resource tracker

        self.UD = UltraDict
        self.shared_lock = importlib.util.find_spec("atomics") is not None

    def create(self) -> None:
        self.preload()
        expect = self.opts.get("expect", self.capacity)
        self.d = self.UD(
            name=self.ident,
            create=True,
            shared_lock=self.shared_lock,
            buffer_size=4 << 20,
            full_dump_size=expect * 160 + (4 << 20),
            auto_unlink=False,
        )

    def attach(self) -> None:
        self.preload()
        self.d = self.UD(name=self.ident, create=False)

    def register(self, key: str, pid: int, rec: Rec) -> bool:
        with self.d.lock:
            if key in self.d:
                return False
            self.d[key] = _own(rec)
            return True

    def register_many(self, items: Sequence[Item]) -> int:
        n = 0
        with self.d.lock:
            for k, _, r in items:
                if k not in self.d.data:
                    self.d[k] = _own(r)
                    n += 1
        return n

    def lookup(self, key: str) -> int | None:
        try:
            return int(self.d[key]["pid"])
        except KeyError:
            return None

    def lookup_with_metadata(self, key: str) -> tuple[int, Rec] | None:
        try:
            r = self.d[key]
        except KeyError:
            return None
        return r["pid"], r

    def update(self, key: str, rec: Rec) -> None:
        with self.d.lock:
            if key not in self.d:
                raise KeyError(key)
            self.d[key] = _own(rec)

    def unregister(self, key: str) -> bool:
        with self.d.lock:
            if key not in self.d:
                return False
            del self.d[key]
            return True

    def _scan(self) -> Iterable[tuple[str, Rec]]:
        self.d.apply_update()
        return list(self.d.data.items())

    def count(self) -> int:
        return len(self.d)

    def memory_bytes(self) -> int | None:
        n = self.ident
        return file_bytes(*(f"/dev/shm/{n}{s}" for s in ("", "_memory", "_full")))

    def close(self) -> None:
        self.d.close()

    def destroy(self) -> None:
        self.d.close(unlink=True)


class _Table(dict):  # type: ignore[type-arg]
    """The dict inside the Manager's server process, with an atomic insert-if-absent."""

    def put_new(self, key: str, rec: Rec) -> bool:
        return self.setdefault(key, rec) is rec  # one C call under the server's GIL

    def replace(self, key: str, rec: Rec) -> None:
        if key not in self:
            raise KeyError(key)
        self[key] = rec

    def put_many(self, items: list[tuple[str, Rec]]) -> int:
        return sum(self.setdefault(k, r) is r for k, r in items)

    def snapshot(self) -> dict[str, Rec]:
        return dict(self)


_TABLE = _Table()


def _table() -> _Table:
    return _TABLE


_TableProxy = MakeProxyType(
    "_TableProxy", ("put_new", "replace", "put_many", "snapshot", "get", "pop", "__len__")
)


class _RegManager(SyncManager):
    pass


_RegManager.register("table", callable=_table, proxytype=_TableProxy)


class ManagerStore(Store):
    """multiprocessing.Manager: one server process owns the dict, every call is a round
    trip over a Unix socket with pickled arguments. Other processes connect by address and
    authkey. The data dies with the process that started the server."""

    kind = "manager"

    def create(self) -> None:
        self.mgr = _RegManager(authkey=os.urandom(16))
        self.mgr.start()
        self.opts.update(address=self.mgr.address, authkey=bytes(self.mgr._authkey).hex())
        self.attach()
        self._rss0 = self._server_rss()

    def attach(self) -> None:
        m = _RegManager(address=self.opts["address"], authkey=bytes.fromhex(self.opts["authkey"]))
        m.connect()
        self.d: Any = m.table()  # type: ignore[attr-defined]

    def _server_rss(self) -> int:
        import psutil

        return int(psutil.Process(self.mgr._process.pid).memory_info().rss)

    def register(self, key: str, pid: int, rec: Rec) -> bool:
        return bool(self.d.put_new(key, rec))

    def register_many(self, items: Sequence[Item]) -> int:
        return int(self.d.put_many([(k, r) for k, _, r in items]))

    def lookup(self, key: str) -> int | None:
        r = self.d.get(key)
        return None if r is None else int(r["pid"])

    def lookup_with_metadata(self, key: str) -> tuple[int, Rec] | None:
        r = self.d.get(key)
        return None if r is None else (r["pid"], r)

    def update(self, key: str, rec: Rec) -> None:
        self.d.replace(key, rec)

    def unregister(self, key: str) -> bool:
        return self.d.pop(key, None) is not None

    def _scan(self) -> Iterable[tuple[str, Rec]]:
        return self.d.snapshot().items()  # type: ignore[no-any-return]

    def count(self) -> int:
        return len(self.d)

    def memory_bytes(self) -> int | None:
        return self._server_rss() - self._rss0  # RSS growth of the server: best effort

    def destroy(self) -> None:
        self.mgr.shutdown()


class RedisStore(Store):
    """A real redis-server on 127.0.0.1 (started by the harness), redis-py, one msgpack
    string per entry (``SET NX`` is the atomic register; faster than a hash per entry),
    pipelines for batches, ``SCAN`` + ``MGET`` for scans."""

    kind = "redis"
    P = b"r:"

    def preload(self) -> None:
        import redis

        self.redis = redis

    def attach(self) -> None:
        self.preload()
        self.r = self.redis.Redis(host="127.0.0.1", port=self.opts["port"])

    def create(self) -> None:
        self.attach()
        self.r.flushdb()
        self._mem0 = int(self.r.info("memory")["used_memory"])

    def register(self, key: str, pid: int, rec: Rec) -> bool:
        return bool(self.r.set(self.P + key.encode(), msgpack.packb(rec), nx=True))

    def register_many(self, items: Sequence[Item]) -> int:
        pipe = self.r.pipeline(transaction=False)
        for k, _, r in items:
            pipe.set(self.P + k.encode(), msgpack.packb(r), nx=True)
        return sum(bool(x) for x in pipe.execute())

    def lookup(self, key: str) -> int | None:
        v = self.r.get(self.P + key.encode())
        return None if v is None else int(msgpack.unpackb(v)["pid"])

    def lookup_with_metadata(self, key: str) -> tuple[int, Rec] | None:
        v = self.r.get(self.P + key.encode())
        r = None if v is None else msgpack.unpackb(v)
        return None if r is None else (r["pid"], r)

    def update(self, key: str, rec: Rec) -> None:
        if not self.r.set(self.P + key.encode(), msgpack.packb(rec), xx=True):
            raise KeyError(key)

    def unregister(self, key: str) -> bool:
        return int(self.r.delete(self.P + key.encode())) == 1

    def _scan(self) -> Iterable[tuple[str, Rec]]:
        out, batch = [], []
        for k in self.r.scan_iter(match=self.P + b"*", count=2000):
            batch.append(k)
            if len(batch) == 1000:
                out += zip(batch, self.r.mget(batch), strict=True)
                batch = []
        if batch:
            out += zip(batch, self.r.mget(batch), strict=True)
        return [(k[2:].decode(), msgpack.unpackb(v)) for k, v in out if v is not None]

    def count(self) -> int:
        return int(self.r.dbsize())

    def memory_bytes(self) -> int | None:
        return int(self.r.info("memory")["used_memory"]) - self._mem0

    def close(self) -> None:
        self.r.close()

    def destroy(self) -> None:
        self.r.flushdb()
        self.close()


class SmdStore(DictStore):
    """shared-memory-dict: the whole dict is pickled into one segment, so every operation
    unpickles (and every write re-pickles) all of it. Its lock is a ``multiprocessing.Lock``
    made at import (``SHARED_MEMORY_USE_LOCK=1``): shared only by forked children, so
    independent (spawned) writers are not excluded from each other. It is a dict to its
    user, so the plain dict's reads serve; writes store private copies (see ``_own``)."""

    kind, shared = "shared-memory-dict", True

    def preload(self) -> None:
        os.environ.setdefault("SHARED_MEMORY_USE_LOCK", "1")
        from shared_memory_dict import SharedMemoryDict

        self.SMD = SharedMemoryDict

    def attach(self) -> None:
        self.preload()
        self.d = self.SMD(
            name=self.ident, size=self.opts.get("expect", self.capacity) * 96 + (64 << 10)
        )

    create = attach

    def register(self, key: str, pid: int, rec: Rec) -> bool:
        rec = _own(rec)
        return self.d.setdefault(key, rec) is rec

    def register_many(self, items: Sequence[Item]) -> int:
        self.d.update({k: _own(r) for k, _, r in items})
        return len(items)

    def update(self, key: str, rec: Rec) -> None:
        super().update(key, _own(rec))

    def _scan(self) -> Iterable[tuple[str, Rec]]:
        return list(self.d.items())

    def count(self) -> int:
        return len(self.d)

    def memory_bytes(self) -> int | None:
        return file_bytes(f"/dev/shm/sm_{self.ident}")

    def close(self) -> None:
        try:
            self.d.cleanup()
        except BufferError:  # a view still alive; the segment is closed at exit anyway
            pass

    def destroy(self) -> None:
        try:
            self.d.shm.unlink()
        finally:
            self.close()


def _missing(*modules: str) -> str | None:
    gone = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(gone)} (pip install -e '.[bench]')" if gone else None


def _shmreg_missing() -> str | None:
    if SHMREG_IMPORT_ERROR:  # the engine is being written: say why, run the rest
        return f"import shmreg failed: {SHMREG_IMPORT_ERROR}"
    import shmreg

    return None if hasattr(shmreg, "Registry") else "shmreg has no Registry yet"


PEERS: dict[str, tuple[type[Store], Any]] = {
    "dict": (DictStore, lambda: None),
    "lmdb": (LmdbStore, lambda: _missing("lmdb")),
    "sqlite": (SqliteStore, lambda: None),
    "ultradict": (UltraDictStore, lambda: _missing("UltraDict")),
    "manager": (ManagerStore, lambda: None),
    "redis": (
        RedisStore,
        lambda: (
            _missing("redis")
            or (
                None
                if shutil.which("redis-server")
                else "redis-server not found (apt-get install redis-server)"
            )
        ),
    ),
    "shared-memory-dict": (SmdStore, lambda: _missing("shared_memory_dict")),
    "shmreg": (ShmregStore, _shmreg_missing),
    # The same adapter on the pure-Python engine path: the orchestrator starts this peer's
    # interpreter with SHMREG_PUREPYTHON=1, which its spawned workers inherit.
    "shmreg-py": (ShmregStore, _shmreg_missing),
}

PURE_PYTHON_PEERS = frozenset({"shmreg-py"})
"""Peers whose interpreter (and every process it spawns) runs shmreg's pure-Python path."""

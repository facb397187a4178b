"""The stores ``shmreg bench`` and ``bench/run.py`` measure: one adapter per peer.

Each adapter puts one store behind the same small interface (``Store``); the workloads in
``shmreg._bench`` drive them all alike. Here: the plain dict (the floor), lmdb, sqlite and
shmreg itself, through its public API only. The peers that need servers or extra packages
(UltraDict, Manager, Redis, shared-memory-dict) live in ``bench/peers.py``.
"""

from __future__ import annotations

import importlib
import os
import sqlite3
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import msgpack

NS = "bench"
Rec = dict[str, Any]
Hit = tuple[Any, int, Rec]
Item = tuple[str, int, Rec]
Spec = tuple[str, str, str, int, dict[str, Any]]
TYPES = tuple(f"t{i}" for i in range(10))


def key(prefix: str, i: int) -> str:
    return f"{prefix}{i:07d}"


def records(pid: int) -> list[Rec]:
    """910 distinct records (i % 7, i % 13, i % 10); entry i gets ``records(pid)[i % 910]``.

    ``{"pid", "capabilities": [2 str], "type"}`` packs to 41-43 bytes, as in anchors.md.
    """
    return [
        {"pid": pid, "capabilities": [f"ca{i % 7}", f"cb{i % 13}"], "type": TYPES[i % 10]}
        for i in range(910)
    ]


class Store:
    """One peer, opened by name so another process can attach; see ``make_store``."""

    kind, shared = "?", True  # shared: visible to other processes (the plain dict is not)
    # Each peer defines these; create/attach open the store, _scan yields every entry.
    create: Callable[[], None]
    attach: Callable[[], None]
    register: Callable[[str, int, Rec], bool]  # insert if absent; True = acknowledged
    lookup: Callable[[str], int | None]
    lookup_with_metadata: Callable[[str], tuple[int, Rec] | None]
    update: Callable[[str, Rec], None]
    unregister: Callable[[str], bool]
    _scan: Callable[[], Iterable[tuple[str, Rec]]]

    def __init__(self, ident: str, capacity: int, **opts: Any) -> None:
        self.ident, self.capacity, self.opts = ident, capacity, opts

    def spec(self) -> Spec:
        cls = type(self)
        return cls.__module__, cls.__qualname__, self.ident, self.capacity, self.opts

    def preload(self) -> None:
        """Import the backing library, so attach timings leave the import out."""

    def register_many(self, items: Sequence[Item]) -> int:
        return sum(self.register(k, p, r) for k, p, r in items)

    def find_by_type(self, type_: str) -> list[Hit]:
        return [(k, r["pid"], r) for k, r in self._scan() if r["type"] == type_]

    def find_by_capability(self, cap: str) -> list[Hit]:
        return [(k, r["pid"], r) for k, r in self._scan() if cap in r["capabilities"]]

    def list_all(self) -> dict[Any, Rec]:
        return dict(self._scan())

    def count(self) -> int:
        return len(self.list_all())

    def memory_bytes(self) -> int | None:
        return None

    def close(self) -> None:
        pass

    def destroy(self) -> None:
        self.close()


def make_store(spec: Spec) -> Store:
    module, cls, ident, capacity, opts = spec
    return cast(Store, getattr(importlib.import_module(module), cls)(ident, capacity, **opts))


def file_bytes(*paths: str) -> int:
    """Bytes the files really occupy (tmpfs allocates pages on first touch)."""
    return sum(os.stat(p).st_blocks * 512 for p in paths if os.path.exists(p))


def unlink(*paths: str) -> None:
    for p in paths:
        if os.path.exists(p):
            os.unlink(p)


class DictStore(Store):
    """The floor: a plain dict in this process. Not shared: no multi-process figures."""

    kind, shared = "dict", False

    def create(self) -> None:
        self.d: dict[str, Rec] = {}

    def register(self, key: str, pid: int, rec: Rec) -> bool:
        return self.d.setdefault(key, rec) is rec

    def lookup(self, key: str) -> int | None:
        r = self.d.get(key)
        return None if r is None else int(r["pid"])

    def lookup_with_metadata(self, key: str) -> tuple[int, Rec] | None:
        r = self.d.get(key)
        return None if r is None else (r["pid"], r)

    def update(self, key: str, rec: Rec) -> None:
        if key not in self.d:
            raise KeyError(key)
        self.d[key] = rec

    def unregister(self, key: str) -> bool:
        return self.d.pop(key, None) is not None

    def _scan(self) -> Iterable[tuple[str, Rec]]:
        return self.d.items()

    def memory_bytes(self) -> int | None:
        # The table, plus per entry its key and its own record dict and list (the harness
        # shares 910 records between entries; a real program would not).
        k, r = next(iter(self.d.items()), ("", {"capabilities": []}))
        each = sys.getsizeof(k) + sys.getsizeof(r) + sys.getsizeof(r["capabilities"])
        return sys.getsizeof(self.d) + each * len(self.d)


class LmdbStore(Store):
    """lmdb in /dev/shm, msgpack values, one transaction per operation."""

    kind = "lmdb"

    def preload(self) -> None:
        self.lmdb = importlib.import_module("lmdb")

    def _open(self, create: bool) -> None:
        self.preload()
        self.path = self.opts["path"]
        self.env = self.lmdb.open(
            self.path,
            map_size=max(64 << 20, self.capacity * 1024),
            subdir=False,
            create=create,
            max_readers=512,
            readahead=False,
            meminit=False,
        )

    def create(self) -> None:
        self._open(True)

    def attach(self) -> None:
        self._open(False)

    def register(self, key: str, pid: int, rec: Rec) -> bool:
        with self.env.begin(write=True) as txn:
            return bool(txn.put(key.encode(), msgpack.packb(rec), overwrite=False))

    def register_many(self, items: Sequence[Item]) -> int:
        with self.env.begin(write=True) as txn:
            return sum(
                bool(txn.put(k.encode(), msgpack.packb(r), overwrite=False)) for k, _, r in items
            )

    def lookup(self, key: str) -> int | None:
        with self.env.begin(buffers=True) as txn:
            v = txn.get(key.encode())
            return None if v is None else int(msgpack.unpackb(v)["pid"])

    def lookup_with_metadata(self, key: str) -> tuple[int, Rec] | None:
        with self.env.begin(buffers=True) as txn:
            v = txn.get(key.encode())
            r = None if v is None else msgpack.unpackb(v)
            return None if r is None else (r["pid"], r)

    def update(self, key: str, rec: Rec) -> None:
        with self.env.begin(write=True) as txn:
            if txn.replace(key.encode(), msgpack.packb(rec)) is None:
                raise KeyError(key)

    def unregister(self, key: str) -> bool:
        with self.env.begin(write=True) as txn:
            return bool(txn.delete(key.encode()))

    def _scan(self) -> Iterable[tuple[str, Rec]]:
        with self.env.begin(buffers=True) as txn:
            return [(bytes(k).decode(), msgpack.unpackb(v)) for k, v in txn.cursor()]

    def count(self) -> int:
        return int(self.env.stat()["entries"])

    def memory_bytes(self) -> int | None:
        return file_bytes(self.path)

    def close(self) -> None:
        self.env.close()

    def destroy(self) -> None:
        self.close()
        unlink(self.path, self.path + "-lock")


class SqliteStore(Store):
    """SQLite, WAL, in /dev/shm: pid and type as columns (type indexed), msgpack blob."""

    kind = "sqlite"
    _INSERT = "INSERT OR IGNORE INTO reg VALUES (?,?,?,?,?)"

    def attach(self) -> None:
        self.path = self.opts["path"]
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")

    def create(self) -> None:
        self.attach()
        self.db.execute(
            "CREATE TABLE reg (key TEXT PRIMARY KEY, pid INTEGER NOT NULL, "
            "type TEXT, caps TEXT, meta BLOB) WITHOUT ROWID"
        )
        self.db.execute("CREATE INDEX reg_type ON reg(type)")

    @staticmethod
    def _row(key: str, pid: int, rec: Rec) -> tuple[str, int, str, str, bytes]:
        caps = "," + ",".join(rec["capabilities"]) + ","
        return key, pid, rec["type"], caps, msgpack.packb(rec)

    def register(self, key: str, pid: int, rec: Rec) -> bool:
        return self.db.execute(self._INSERT, self._row(key, pid, rec)).rowcount == 1

    def register_many(self, items: Sequence[Item]) -> int:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            n = self.db.executemany(self._INSERT, [self._row(*it) for it in items]).rowcount
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return n

    def lookup(self, key: str) -> int | None:
        row = self.db.execute("SELECT pid FROM reg WHERE key=?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def lookup_with_metadata(self, key: str) -> tuple[int, Rec] | None:
        row = self.db.execute("SELECT pid, meta FROM reg WHERE key=?", (key,)).fetchone()
        return None if row is None else (row[0], msgpack.unpackb(row[1]))

    def update(self, key: str, rec: Rec) -> None:
        _, _, t, caps, blob = self._row(key, 0, rec)
        sql = "UPDATE reg SET type=?, caps=?, meta=? WHERE key=?"
        if self.db.execute(sql, (t, caps, blob, key)).rowcount != 1:
            raise KeyError(key)

    def unregister(self, key: str) -> bool:
        return self.db.execute("DELETE FROM reg WHERE key=?", (key,)).rowcount == 1

    def _query(self, where: str, arg: str) -> list[Hit]:
        rows = self.db.execute("SELECT key, pid, meta FROM reg WHERE " + where, (arg,))
        return [(k, p, msgpack.unpackb(m)) for k, p, m in rows]

    def find_by_type(self, type_: str) -> list[Hit]:
        return self._query("type=?", type_)

    def find_by_capability(self, cap: str) -> list[Hit]:
        return self._query("instr(caps, ?) > 0", f",{cap},")

    def _scan(self) -> Iterable[tuple[str, Rec]]:
        return [(k, msgpack.unpackb(m)) for k, m in self.db.execute("SELECT key, meta FROM reg")]

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM reg").fetchone()[0])

    def memory_bytes(self) -> int | None:
        return file_bytes(self.path, self.path + "-wal", self.path + "-shm")

    def close(self) -> None:
        self.db.close()

    def destroy(self) -> None:
        self.close()
        unlink(self.path, self.path + "-wal", self.path + "-shm")


class ShmregStore(Store):
    """shmreg through its public API only (api.md); the benchmark key is the service."""

    kind = "shmreg"

    def preload(self) -> None:
        self.mod = importlib.import_module("shmreg")
        self.taken: type[BaseException] = self.mod.AlreadyRegistered

    def create(self) -> None:
        self.preload()
        self.reg = self.mod.Registry.create(
            self.ident, capacity=self.capacity, max_metadata_bytes=self.opts.get("meta_bytes", 256)
        )

    def attach(self) -> None:
        self.preload()
        self.reg = self.mod.Registry.attach(self.ident)

    def register(self, key: str, pid: int, rec: Rec) -> bool:
        try:
            self.reg.register(NS, key, pid=pid, metadata=rec)
        except self.taken:
            return False
        return True

    def register_many(self, items: Sequence[Item]) -> int:
        if not hasattr(self.reg, "register_many"):  # not in api.md yet; used once it exists
            return super().register_many(items)
        done = self.reg.register_many(NS, items)
        return len(items) if done is None else done if isinstance(done, int) else len(done)

    def lookup(self, key: str) -> int | None:
        return self.reg.lookup(NS, key)  # type: ignore[no-any-return]

    def lookup_with_metadata(self, key: str) -> tuple[int, Rec] | None:
        return self.reg.lookup_with_metadata(NS, key)  # type: ignore[no-any-return]

    def update(self, key: str, rec: Rec) -> None:
        self.reg.update_metadata(NS, key, rec)

    def unregister(self, key: str) -> bool:
        return bool(self.reg.unregister(NS, key))

    def find_by_type(self, type_: str) -> list[Hit]:
        return list(self.reg.find_by_metadata(NS, type=type_))

    def find_by_capability(self, cap: str) -> list[Hit]:
        return list(self.reg.find_by_metadata(NS, capabilities=cap))

    def list_all(self) -> dict[Any, Rec]:
        return dict(self.reg.list_services_with_metadata(NS))

    def count(self) -> int:
        return int(self.reg.count(NS))

    def memory_bytes(self) -> int | None:
        return int(self.reg.stats().memory_bytes)

    def close(self) -> None:
        self.reg.close()

    def destroy(self) -> None:
        self.reg.destroy()

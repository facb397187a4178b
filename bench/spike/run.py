"""Compiled fast path spike: hand-written C vs Cython vs mypyc vs shmreg's Python path.

    python bench/spike/run.py [--entries 100000] [--rounds 15] [--batch 2000] [--rebuild]

Builds each variant in place (``setup.py build_ext --inplace`` in its folder) unless a
built module is already there, fills a registry through shmreg, checks every variant
answers (and writes) what shmreg's Python path does, then times them in interleaved rounds
with lmdb alongside for reference. See README.md beside this file.
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb
import msgpack

import shmreg
from shmreg._engine import layout as L

HERE = Path(__file__).resolve().parent
VARIANTS = {"c": "spike_c", "cython": "spike_cy", "mypyc": "spike_mypyc"}
NS = "spike"


def build(rebuild: bool) -> dict[str, Any]:
    """Import every variant, building it first when no compiled module is present."""
    modules = {}
    for folder, module in VARIANTS.items():
        where = HERE / folder
        built = list(where.glob(f"{module}.*.so"))
        if rebuild or not built:
            for stale in built:
                stale.unlink()
            shutil.rmtree(where / "build", ignore_errors=True)
            (where / "spike_cy.c").unlink(missing_ok=True)
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                cwd=where,
                check=True,
                capture_output=True,
            )
            print(f"built {folder} in {time.perf_counter() - started:.1f} s")
        sys.path.insert(0, str(where))
        mod = importlib.import_module(module)
        if not mod.__file__.endswith(".so"):
            raise SystemExit(f"{module} imported from source, not compiled: {mod.__file__}")
        modules[folder] = mod
    return modules


def meta_for(i: int) -> dict[str, Any]:
    return {"type": "worker", "host": "10.0.0.7", "port": 8000 + i, "caps": ["gpu", "batch"]}


def fast_for(mod: Any, reg: shmreg.Registry) -> Any:
    store = reg.backend.store
    return mod.Fast(store.table.buf, store.ring.buf)


def ensure_allocated(reg: shmreg.Registry, nbytes: int) -> None:
    """Fallocate arena room ahead (untimed): the spike's variants leave that branch out."""
    table = reg.backend.store.table
    table.stage(b"", table.counter(L.D_TOP) + nbytes)


# ------------------------------------------------------------------ correctness


def check_reads(fasts: dict[str, Any], reg: shmreg.Registry, services: list[str]) -> None:
    backend = reg.backend
    for svc in services:
        key, key_hash = backend._key(NS, svc)[:2]
        want = backend.lookup(NS, svc)
        want_meta = backend.lookup_with_metadata(NS, svc)
        for name, fast in fasts.items():
            got, got_meta = fast.lookup(key, key_hash), fast.lookup_meta(key, key_hash)
            assert got == want, (name, svc, got, want)
            assert got_meta == want_meta, (name, svc, got_meta, want_meta)
    print(f"reads: {len(fasts)} variants agree with shmreg on {len(services)} keys")


def _snapshot(reg: shmreg.Registry) -> dict[str, bytes]:
    """The bytes a registration writes, times (and the journal crc over them) zeroed."""
    store = reg.backend.store
    table, ring = store.table, store.ring
    data = bytearray(table.buf[: table.arena_off + table.counter(L.D_TOP)])
    journal = bytes(data[L.J_SLOT * 8 : L.J_SLOT * 8 + L.JOURNAL_BODY.size])
    assert zlib.crc32(journal) == table.q[L.J_CRC], "journal crc does not match its body"
    data[L.J_EVENT_TIME * 8 : L.J_CRC * 8 + 8] = bytes(16)
    seq = ring.q[L.R_EVENT_SEQ]
    ev = L.RING_OFFSET + (seq % L.RING_EVENTS) * L.EVENT_SIZE
    event = bytearray(ring.buf[ev : ev + L.EVENT_SIZE])
    event[24:32] = bytes(8)  # word 3: time
    return {"data": bytes(data), "event": bytes(event), "seq": seq.to_bytes(8, "little")}


def check_writes(mods: dict[str, Any], count: int = 300) -> None:
    """Register the same keys in two fresh registries, Python vs variant; compare bytes."""
    for name, mod in mods.items():
        names = [f"spike-w{os.getpid()}-{side}" for side in ("py", name)]
        regs = [shmreg.Registry.create(n, capacity=1000) for n in names]
        fast = None
        try:
            for reg in regs:
                ensure_allocated(reg, 256 * 1024)
            fast = fast_for(mod, regs[1])
            me = shmreg._identity.self_identity()
            for i in range(count):
                svc = f"w-{i}"
                items = [r.backend._prepare(NS, svc, me, meta_for(i)) for r in regs]
                assert items[0] == items[1]
                # Every 10th key is registered, unregistered and registered again: the
                # second registration reuses its tombstone.
                for again in range(2 if i % 10 == 0 else 1):
                    if again:
                        for reg in regs:
                            reg.backend.unregister(NS, svc)
                    g0 = regs[0].backend._register_locked(NS, svc, me, items[0])
                    g1 = fast.register_locked(items[1])
                    assert g0 == g1, (name, g0, g1)
                    assert _snapshot(regs[0]) == _snapshot(regs[1]), (name, svc)
        finally:
            del fast  # its buffer exports would keep the segment from closing
            for reg in regs:
                reg.destroy()
    print(f"writes: {len(mods)} variants write shmreg's bytes for {count * 11 // 10} registrations")


# ------------------------------------------------------------------ timing


def timed(fn: Callable[[], int]) -> float:
    """ns per operation of one batch, in this thread's CPU time: on a shared machine wall
    time also counts the slices other processes got, and a long batch is cut more often."""
    started = time.thread_time_ns()
    n = fn()
    return (time.thread_time_ns() - started) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=2000, help="operations per timed batch")
    ap.add_argument("--rebuild", action="store_true", help="rebuild every variant")
    args = ap.parse_args()
    mods = build(args.rebuild)
    check_writes(mods)

    writes = args.rounds * args.batch * (len(mods) + 1)
    name = f"spike-{os.getpid()}"
    reg = shmreg.Registry.create(name, capacity=args.entries + writes + 1000)
    lmdb_dir = tempfile.mkdtemp(prefix="spike-lmdb-")
    try:
        run(reg, mods, args, Path(lmdb_dir))
    finally:
        reg.destroy()
        shutil.rmtree(lmdb_dir)


def run(
    reg: shmreg.Registry, mods: dict[str, Any], args: argparse.Namespace, lmdb_dir: Path
) -> None:
    backend = reg.backend
    started = time.perf_counter()
    for lo in range(0, args.entries, 10_000):
        reg.register_many(NS, [(f"s-{i}", None, meta_for(i)) for i in range(lo, lo + 10_000)])
    print(f"filled {args.entries} entries in {time.perf_counter() - started:.1f} s")
    gen = backend.store.gen
    fasts = {n: fast_for(m, reg) for n, m in mods.items()}

    dead = subprocess.Popen(["sleep", "60"])
    reg.register(NS, "dead", dead.pid, {"type": "gone"})
    dead.kill()
    dead.wait()
    sample = random.Random(1).sample(range(args.entries), args.batch)
    services = [f"s-{i}" for i in sample]
    check_reads(fasts, reg, [*services, "dead", "missing-1", "missing-2"])

    env = lmdb.open(str(lmdb_dir), map_size=2**31, sync=False, metasync=False, writemap=True)
    with env.begin(write=True) as txn:
        for i in range(args.entries):
            txn.put(backend._key(NS, f"s-{i}")[0], msgpack.packb(meta_for(i)))

    keys = [backend._key(NS, s)[:2] for s in services]
    lkeys = [k for k, _ in keys]
    me = shmreg._identity.self_identity()
    results: dict[tuple[str, str], list[float]] = {}
    loads = [os.getloadavg()[0]]

    def py_lookup() -> int:
        lookup = backend.lookup
        for s in services:
            lookup(NS, s)
        return len(services)

    def py_meta() -> int:
        lookup = backend.lookup_with_metadata
        for s in services:
            lookup(NS, s)
        return len(services)

    pids = [backend.lookup(NS, s) or 0 for s in services]
    metas = [bytes(backend.store.table.meta_bytes(backend._locate(NS, s)[1])) for s in services]

    def kill_alone() -> int:
        kill = os.kill
        for pid in pids:
            kill(pid, 0)
        return len(pids)

    def unpackb_alone() -> int:
        unpackb = msgpack.unpackb
        for raw in metas:
            unpackb(raw, raw=False, strict_map_key=True)
        return len(metas)

    def fast_lookup(fast: Any, meta: bool) -> Callable[[], int]:
        def go() -> int:
            lookup = fast.lookup_meta if meta else fast.lookup
            for key, key_hash in keys:
                lookup(key, key_hash)
            return len(keys)

        return go

    def lmdb_get(decode: bool) -> Callable[[], int]:
        def go() -> int:
            with env.begin(buffers=False) as txn:
                get = txn.get
                if decode:
                    unpackb = msgpack.unpackb
                    for k in lkeys:
                        unpackb(get(k))
                else:
                    for k in lkeys:
                        get(k)
            return len(lkeys)

        return go

    def registrations(impl: str, rnd: int) -> Callable[[], int]:
        """A batch of new keys for ``impl``, prepared (untimed) outside the lock's work."""
        svcs = [f"r{rnd}-{impl}-{i}" for i in range(args.batch)]
        items = [backend._prepare(NS, s, me, meta_for(i)) for i, s in enumerate(svcs)]
        ensure_allocated(reg, sum(len(item[2]) for item in items))

        def python() -> int:
            locked = backend._register_locked
            for svc, item in zip(svcs, items, strict=True):
                locked(NS, svc, me, item)
            return len(items)

        def lmdb_put() -> int:
            with env.begin(write=True) as txn:
                put = txn.put
                for item in items:
                    put(item[0], item[2])
            return len(items)

        def variant() -> int:
            locked = fasts[impl].register_locked
            for item in items:
                locked(item)
            return len(items)

        return {"python": python, "lmdb put": lmdb_put}.get(impl, variant)

    for rnd in range(args.rounds):
        for impl, fn in (
            [("python", py_lookup)]
            + [(n, fast_lookup(f, False)) for n, f in fasts.items()]
            + [("lmdb get", lmdb_get(False)), ("os.kill alone", kill_alone)]
        ):
            results.setdefault(("lookup", impl), []).append(timed(fn))
        for impl, fn in (
            [("python", py_meta)]
            + [(n, fast_lookup(f, True)) for n, f in fasts.items()]
            + [("lmdb get+unpackb", lmdb_get(True)), ("unpackb alone", unpackb_alone)]
        ):
            results.setdefault(("lookup_meta", impl), []).append(timed(fn))
        for impl in ["python", *fasts, "lmdb put"]:
            results.setdefault(("register_locked", impl), []).append(
                timed(registrations(impl, rnd))
            )
        loads.append(os.getloadavg()[0])
    assert backend.store.gen == gen, "the table grew during the run: raise --entries capacity"
    env.close()
    fasts.clear()  # release the buffer exports before the registry is destroyed
    report(results, loads, args)


def report(results: dict[tuple[str, str], list[float]], loads: list[float], args: Any) -> None:
    """Medians over rounds, and the ratio to Python paired within each round: neighbours in
    one round share the machine's mood, so the paired ratio drifts less than the medians."""
    print(
        f"\n{args.entries} entries, {args.rounds} rounds x {args.batch} ops, Python "
        f"{sys.version.split()[0]}, load average {min(loads):.2f}-{max(loads):.2f}"
    )
    head = f"{'operation':<16} {'implementation':<17} {'median ns':>9} {'min ns':>7}"
    print(f"{head} {'vs python':>9} {'paired':>7}")
    for op in ("lookup", "lookup_meta", "register_locked"):
        base = results[(op, "python")]
        for (o, impl), times in results.items():
            if o == op:
                med = statistics.median(times)
                paired = statistics.median(b / t for b, t in zip(base, times, strict=True))
                print(
                    f"{op:<16} {impl:<17} {med:>9.0f} {min(times):>7.0f} "
                    f"{statistics.median(base) / med:>8.1f}x {paired:>6.1f}x"
                )


if __name__ == "__main__":
    main()

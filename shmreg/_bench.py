"""``shmreg bench``: a short side-by-side run, and the workload core of ``bench/run.py``.

Every store sits behind :class:`Store` (one adapter per peer) and one workload drives them
all in the same run: register, lookup hit / miss / with metadata, update, unregister, find by
type / capability, list, attach from a fresh process, and a 90/10 lookup/register mix across
a ``ProcessPoolExecutor`` whose workers attach by name (spawn, as independent services do).
After each multi-process run, the registrations the workers had acknowledged are looked
for: a benchmark that loses writes is not measuring a registry.

Only the standard library, msgpack, shmreg's public API and whichever peers are installed
(lmdb) are used; ``bench/`` is not installed, so it imports this module, never the reverse.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence, Sized
from concurrent.futures import ProcessPoolExecutor
from typing import Any, cast

from shmreg._bench_stores import (  # noqa: F401  (bench/ reaches them through this module)
    NS,
    TYPES,
    DictStore,
    Hit,
    Item,
    LmdbStore,
    Rec,
    ShmregStore,
    Spec,
    SqliteStore,
    Store,
    file_bytes,
    key,
    make_store,
    records,
    unlink,
)

_pc = time.perf_counter_ns


def timer_overhead_ns() -> int:
    return sorted(-(_pc() - _pc()) for _ in range(2001))[1000]


def measure(
    op: Callable[..., object],
    args: Sequence[tuple[Any, ...]],
    seconds: float,
    sample: int = 20_000,
    overhead: int = 0,
) -> dict[str, Any]:
    """Run ``op(*a)`` for each ``a`` in ``args`` until done or ``seconds`` have passed.

    One op in every ``len(args) // sample`` is timed alone (percentiles, less the timer's
    own cost); the ops in between are timed as a batch (throughput). Once one op takes over
    a millisecond every op is timed alone, so slow peers still get percentiles. Exceptions
    are counted.
    """
    stride, lat, total, done, errors, first = max(1, len(args) // max(1, sample)), [], 0, 0, 0, ""
    i, deadline = 0, _pc() + int(seconds * 1e9)
    while i < len(args):
        t0 = _pc()
        try:
            op(*args[i])
        except Exception as exc:
            errors, first = errors + 1, first or repr(exc)
        t1 = _pc()
        stride = 1 if t1 - t0 > 1_000_000 else stride
        rest = args[i + 1 : i + stride]
        t2 = _pc()
        for a in rest:
            try:
                op(*a)
            except Exception as exc:
                errors, first = errors + 1, first or repr(exc)
        t3 = _pc()
        lat.append(max(0, t1 - t0 - overhead))
        total, done, i = total + (t1 - t0) + (t3 - t2), done + 1 + len(rest), i + 1 + len(rest)
        if t3 > deadline:
            break
    lat.sort()
    q = [lat[min(len(lat) - 1, int(p * len(lat)))] / 1e3 if lat else 0.0 for p in (0.5, 0.9, 0.99)]
    return {
        "ops": done,
        "of": len(args),
        "ops_s": done / (total / 1e9) if total else 0.0,
        "mean_us": total / done / 1e3 if done else 0.0,
        "p50_us": q[0],
        "p90_us": q[1],
        "p99_us": q[2],
        "samples": len(lat),
        "errors": errors,
        "first_error": first,
    }


def run_ops(
    store: Store,
    n: int,
    pid: int,
    seconds: float,
    fill_seconds: float,
    sample: int = 20_000,
    note: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Single-process operations on a freshly created ``store``, filled with ``n`` entries.

    One-at-a-time registration runs for at most ``fill_seconds``; the rest is bulk-filled
    (``register_many``) for as long again; what is still missing is a capped size (``n_eff``).
    """
    rnd, recs, ov = random.Random(1), records(pid), timer_overhead_ns()
    keys, out = [key("s", i) for i in range(n)], cast("dict[str, Any]", {"n": n})
    note("register")
    out["register"] = measure(
        store.register, [(keys[i], pid, recs[i % 910]) for i in range(n)], fill_seconds, sample, ov
    )
    n_eff, t_end = out["register"]["ops"], time.monotonic() + fill_seconds
    while n_eff < n and time.monotonic() < t_end:
        top = min(n, n_eff + 10_000)
        store.register_many([(keys[i], pid, recs[i % 910]) for i in range(n_eff, top)])
        n_eff = top
    out.update(n_eff=n_eff, capped=n_eff < n, memory_bytes=store.memory_bytes())
    m = min(max(2 * n_eff, sample), 200_000)
    hit = [(keys[rnd.randrange(n_eff)],) for _ in range(m)]
    for name, op, args in (
        ("lookup_hit", store.lookup, hit),
        ("lookup_miss", store.lookup, [(key("x", i),) for i in range(m)]),
        ("lookup_meta", store.lookup_with_metadata, hit),
        ("update", store.update, [(k, recs[int(k[1:]) % 910]) for (k,) in hit]),
    ):
        note(name)
        out[name] = measure(op, args, seconds, sample, ov)
    wrong, t_end = 0, time.monotonic() + seconds  # read back what was written
    for i in (rnd.randrange(n_eff) for _ in range(1000)):
        got = store.lookup_with_metadata(keys[i]) or (0, {})
        wrong += (store.lookup(keys[i]) != pid) + (got[1].get("type") != TYPES[i % 10])
        if time.monotonic() > t_end:
            break
    out["wrong_reads"] = wrong
    scans: dict[str, tuple[Callable[[Any], Sized], Any, int]] = {
        "find_type": (store.find_by_type, "t3", sum(i % 10 == 3 for i in range(n_eff))),
        "find_capability": (store.find_by_capability, "ca3", sum(i % 7 == 3 for i in range(n_eff))),
        "list_all": (lambda _: store.list_all(), None, n_eff),
    }
    for name, (fn, arg, expect) in scans.items():
        note(name)
        out[name] = measure(fn, [(arg,)] * 30, seconds, 30, ov)
        out[name].update(results=len(fn(arg)), expected=expect)
    b = min(max(n_eff, 1000), 20_000)  # extra keys: batched registration, then unregister
    batches = [
        ([(key("b", j), pid, recs[j % 910]) for j in range(i, min(b, i + 1000))],)
        for i in range(0, b, 1000)
    ]
    note("register_batch")
    out["register_batch"] = res = measure(store.register_many, batches, 4 * seconds, 1000, ov)
    res["ops_s"] *= 1000  # per entry, not per call
    note("unregister")
    out["unregister"] = measure(
        store.unregister, [(key("b", j),) for j in range(b)], 4 * seconds, sample, ov
    )
    out["count_after"] = store.count()
    return out


_W: Store | None = None
_BARRIER: Any = None


def _mixed_init(spec: Spec, barrier: Any) -> None:
    global _W, _BARRIER
    _W, _BARRIER = make_store(spec), barrier
    _W.attach()


def _mixed_task(
    wid: int, tag: str, n: int, pid: int, seconds: float, max_ops: int
) -> dict[str, Any]:
    st, rnd, rec = cast(Store, _W), random.Random(wid), records(pid)[wid]
    look = [key("s", rnd.randrange(n)) for _ in range(4096)]
    _BARRIER.wait(timeout=120)
    t0 = _pc()
    acked, errors, wrong, first, i, j, deadline = [], 0, 0, "", 0, 0, t0 + int(seconds * 1e9)
    while i < max_ops:
        try:
            if i % 10 == 9:
                k, j = f"{tag}w{wid}-{j}", j + 1
                if st.register(k, pid, rec):
                    acked.append(k)
            elif st.lookup(look[i & 4095]) != pid:
                wrong += 1
        except Exception as exc:
            errors, first = errors + 1, first or repr(exc)
        i += 1
        if i & 7 == 0 and _pc() > deadline:
            break
    return {
        "ops": i,
        "t0": t0,
        "t1": _pc(),
        "acked": acked,
        "errors": errors,
        "wrong_reads": wrong,
        "first_error": first,
    }


def run_mixed(
    store: Store, procs: int, n: int, pid: int, seconds: float, max_ops: int = 400_000
) -> dict[str, Any]:
    """90 % lookups of preloaded keys and 10 % new registrations, in ``procs`` workers that
    start together (barrier); then every acknowledged registration is looked for."""
    ctx, tag, futs = mp.get_context("spawn"), f"m{procs}", []
    ex = ProcessPoolExecutor(
        procs, mp_context=ctx, initializer=_mixed_init, initargs=(store.spec(), ctx.Barrier(procs))
    )
    try:
        futs = [ex.submit(_mixed_task, w, tag, n, pid, seconds, max_ops) for w in range(procs)]
        res = [f.result(timeout=seconds + 180) for f in futs]
    finally:
        if any(not f.done() for f in futs):  # a worker hung: do not wait for it
            for p in list(getattr(ex, "_processes", {}).values()):
                p.kill()
        ex.shutdown(wait=True, cancel_futures=True)
    acked, present = [k for r in res for k in r["acked"]], store.list_all()
    ops, span = sum(r["ops"] for r in res), max(r["t1"] for r in res) - min(r["t0"] for r in res)
    return {
        "procs": procs,
        "ops": ops,
        "ops_s": ops / (span / 1e9),
        "acked": len(acked),
        "lost": sum(k not in present for k in acked),
        "base_missing": sum(key("s", i) not in present for i in range(n)),
        "errors": sum(r["errors"] for r in res),
        "wrong_reads": sum(r["wrong_reads"] for r in res),
        "first_error": next((r["first_error"] for r in res if r["first_error"]), ""),
    }


def _attach_child(spec: Spec, probe: str, q: Any) -> None:
    st = make_store(spec)
    st.preload()
    t0 = _pc()
    st.attach()
    found = st.lookup(probe) is not None
    q.put((_pc() - t0, found))
    st.close()


def run_attach(store: Store, probe: str, reps: int, timeout: float = 60) -> dict[str, Any]:
    """In a fresh spawned process: time from nothing open to attached and one lookup done."""
    ctx, ms, found = mp.get_context("spawn"), cast("list[float]", []), True
    for _ in range(reps):
        q = ctx.Queue()
        p = ctx.Process(target=_attach_child, args=(store.spec(), probe, q))
        p.start()
        try:
            ns, ok = q.get(timeout=timeout)
            ms, found = [*ms, ns / 1e6], found and ok
        finally:
            p.join(10)
            if p.is_alive():
                p.kill()
    ms.sort()
    return {"reps": len(ms), "p50_ms": ms[len(ms) // 2], "max_ms": ms[-1], "found": found}


# --- `shmreg bench` ---------------------------------------------------------------------------

PEERS: dict[str, type[Store]] = {
    "dict": DictStore,
    "lmdb": LmdbStore,
    "sqlite": SqliteStore,
    "shmreg": ShmregStore,
}
ROWS = [
    "register",
    "register_batch",
    "lookup_hit",
    "lookup_miss",
    "lookup_meta",
    "update",
    "unregister",
    "find_type",
    "find_capability",
    "list_all",
    "attach",
]


def fmt(v: float | None, unit: str) -> str:
    """``unit``: ops_s (a rate), p50_us or p50_ms (a time)."""
    if v is None:
        return "-"
    if unit == "ops_s":
        return (
            f"{v / 1e6:.2f}M/s" if v >= 1e6 else f"{v / 1e3:.1f}k/s" if v >= 1e3 else (f"{v:.0f}/s")
        )
    us = v * 1000 if unit.endswith("ms") else v
    return f"{us:.3g} us" if us < 1e3 else f"{us / 1e3:.3g} ms" if us < 1e6 else f"{us / 1e6:.3g} s"


def table(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    procs = sorted({k for r in results.values() for k in r if k.startswith("mixed_")})
    lines = ["op".ljust(16) + "".join(n.rjust(13) for n in names)]
    for row in ROWS + procs:
        unit = (
            "ops_s"
            if row.startswith(("register", "mixed"))
            else ("p50_ms" if row == "attach" else "p50_us")
        )
        lines.append(
            row.ljust(16)
            + "".join(fmt(results[n].get(row, {}).get(unit), unit).rjust(13) for n in names)
        )
    return "\n".join(
        lines
        + [
            f"{n}: lost {r['lost']}, exceptions {r['exceptions']}, wrong reads {r['wrong']}"
            for n, r in results.items()
            if r["lost"] or r["exceptions"] or r["wrong"]
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="shmreg bench",
        description="Short side-by-side run; bench/run.py in the repository is the full harness.",
    )
    ap.add_argument("--size", type=int, default=10_000, help="entries (default 10000)")
    ap.add_argument("--procs", default="1,2", help="process counts for the 90/10 mix")
    ap.add_argument("--peers", default=",".join(PEERS), help="default: " + ",".join(PEERS))
    ap.add_argument("--seconds", type=float, default=0.5, help="cap per measured operation")
    ap.add_argument("--json", action="store_true", help="print the raw results as JSON")
    a = ap.parse_args(argv)
    procs = sorted({int(x) for x in a.procs.split(",")})
    tmp = tempfile.mkdtemp(
        prefix="shmreg-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
    )
    t_start, pid, results = time.monotonic(), os.getpid(), {}
    left_out: dict[str, str] = {}  # peer -> why it has no column: said at the end, not lost

    def noter(peer: str) -> Callable[[str], None]:
        def note(msg: str) -> None:
            end = "\r" if sys.stderr.isatty() else "\n"
            sys.stderr.write(f"[{time.monotonic() - t_start:5.1f}s] {peer}: {msg:<40}{end}")

        return note

    try:
        for name in a.peers.split(","):
            cap = a.size + 20_000 + 10_000 * sum(procs) + 1000  # fill, batch, mixed writes
            if name not in PEERS:
                left_out[name] = f"unknown peer (known: {', '.join(PEERS)})"
                continue
            st = PEERS[name](f"benchq{pid}{name}", cap, path=os.path.join(tmp, name))
            try:
                st.create()
            except ImportError as exc:
                left_out[name] = f"not installed ({exc.name or exc}): pip install 'shmreg[bench]'"
                continue
            except Exception as exc:
                left_out[name] = f"could not start: {exc!r}"
                continue
            try:
                note = noter(name)
                r = results[name] = run_ops(st, a.size, pid, a.seconds, 3.0, 5000, note)
                if name == "shmreg":  # compiled or pure Python: the figures depend on it
                    from shmreg._engine import fastpath

                    r["engine"] = fastpath.describe()
                r.update(
                    wrong=r["wrong_reads"],
                    lost=0,
                    exceptions=sum(v.get("errors", 0) for v in r.values() if isinstance(v, dict)),
                )
                if st.shared:
                    note("attach")
                    r["attach"] = run_attach(st, key("s", 0), 3)
                    for p in procs:
                        note(f"mixed 90/10, {p} procs")
                        mx = r[f"mixed_{p}"] = run_mixed(st, p, r["n_eff"], pid, a.seconds, 100_000)
                        r["lost"] += mx["lost"] + mx["base_missing"]
                        r["exceptions"] += mx["errors"]
                        r["wrong"] += mx["wrong_reads"]
            except Exception as exc:
                results.pop(name, None)
                left_out[name] = f"failed while measured: {exc!r}"
            finally:
                st.destroy()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.stderr.write(f"\ndone in {time.monotonic() - t_start:.1f}s\n")
    if a.json:
        print(json.dumps(results, indent=1, default=str))
    else:
        print(f"N = {a.size}: median per operation (rate where /s); {os.cpu_count()} CPUs")
        if "shmreg" in results:
            print(f"shmreg engine: {results['shmreg']['engine']}")
        print(table(results))
    for name, why in left_out.items():
        # On stderr under --json, so the JSON on stdout stays the results alone.
        print(f"left out {name}: {why}", file=sys.stderr if a.json else sys.stdout)
    return 0 if results else 1

"""Operation metrics' overhead, measured: ``python bench/opmetrics.py`` (about half a minute).

Two handles on one registry, one instrumented (the default) and one opened with operation
metrics off, run the same batches of ``lookup`` and ``register`` (re-registering held names)
interleaved, the order flipped every round so drift and cache warmth hit both alike. The
overhead is (fastest instrumented batch / fastest plain batch) - 1, per operation: on a
shared machine other load only adds time, so the fastest batch is the least disturbed.
Times are this thread's CPU time. Bar: under 5 % for both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import shmreg
from shmreg import _opmetrics

BAR = 0.05


def batch(call: Callable[[str, str], object], keys: list[str]) -> float:
    # CPU time of this thread, not wall time: on a machine shared with other jobs the
    # wall clock also counts the time this process waited for a core.
    start = time.thread_time()
    for key in keys:
        call("bench", key)
    return time.thread_time() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--keys", type=int, default=1000)
    args = parser.parse_args()
    name = f"bench-opmetrics-{os.getpid()}"
    on = shmreg.Registry.create(name, capacity=4 * args.keys)
    _opmetrics.set_enabled(False)
    off = shmreg.Registry.attach(name)
    _opmetrics.set_enabled(True)
    try:
        keys = [f"k{i}" for i in range(args.keys)]
        meta = {"type": "worker", "port": 8080}
        for key in keys:
            off.register("bench", key, metadata=meta)
        workloads: dict[str, tuple[Callable[..., object], Callable[..., object], list[str]]] = {
            "lookup": (on.lookup, off.lookup, keys * 20),
            "register": (
                lambda ns, k: on.register(ns, k, metadata=meta),
                lambda ns, k: off.register(ns, k, metadata=meta),
                keys * 3,
            ),
        }
        failed = False
        for op, (with_metrics, plain, work) in workloads.items():
            batch(with_metrics, work)
            batch(plain, work)  # warm both
            ratios, on_ns, off_ns = [], [], []
            for r in range(args.rounds):
                if r % 2:
                    a = batch(with_metrics, work)
                    b = batch(plain, work)
                else:
                    b = batch(plain, work)
                    a = batch(with_metrics, work)
                ratios.append(a / b)
                on_ns.append(a / len(work) * 1e9)
                off_ns.append(b / len(work) * 1e9)
            # Other load only ever adds time: the fastest batch of each side is the least
            # disturbed estimate of its cost (the median of paired ratios is shown beside it).
            overhead = min(on_ns) / min(off_ns) - 1
            ok = overhead < BAR
            failed |= not ok
            print(
                f"{op:9} plain {min(off_ns):7.0f} ns/op   with metrics {min(on_ns):7.0f} ns/op"
                f"   overhead {overhead * 100:+5.1f} % (median of paired ratios "
                f"{(statistics.median(ratios) - 1) * 100:+5.1f} %)   "
                f"{'ok' if ok else 'OVER'} (bar {BAR * 100:.0f} %)"
            )
        snap = _opmetrics.snapshot(on)
        print(f"counted: {snap['lookup']['calls']} lookups, {snap['register']['calls']} registers")
        return 1 if failed else 0
    finally:
        off.close()
        on.destroy()


if __name__ == "__main__":
    sys.exit(main())

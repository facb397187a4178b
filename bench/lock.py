"""The writer lock from Python: lock+unlock pair, Store.begin+end, and one register.

``python bench/lock.py`` prints one JSON object of microseconds (best of 5 timeit repeats).
The lock is a robust pthread mutex in the root page, called through ctypes; figures and
the flock it replaced: docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import timeit
from collections.abc import Callable

import shmreg


def best_us(fn: Callable[[], object], number: int) -> float:
    return round(min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6, 3)


def main() -> None:
    reg = shmreg.Registry.create(f"bench-lock-{os.getpid()}")
    try:
        store = reg.backend.store  # type: ignore[attr-defined]
        lock = store.lock

        def pair() -> None:
            lock.acquire()
            lock.release()

        def begin_end() -> None:
            store.begin()
            store.end()

        counter = iter(range(10**9))

        def register() -> None:
            reg.register("jobs", f"k{next(counter) % 1000}", metadata={"i": 1})

        print(
            json.dumps(
                {
                    "lock_unlock_us": best_us(pair, 200_000),
                    "begin_end_us": best_us(begin_end, 50_000),
                    "register_us": best_us(register, 5_000),
                }
            )
        )
    finally:
        reg.destroy()


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Migration throughput: entries per second copied by ``shmreg.migration.migrate``.

    python bench/migration.py --entries 100000 --rounds 3

Source: a shared-memory registry of N entries (one namespace, owned by this process, small
metadata). Each round copies it into a fresh, empty target, two ways:

- ``migrate``: ``shmreg.migration.migrate(source, target)``, the whole job: export, a scan
  of the target, one atomic compare-and-swap per entry (with its event), the report.
- ``plain``: the cheapest copy the same client can make. To shared memory: ``list_entries``
  then ``register_many`` (the registry's batch path, no conflict checks, no report). To
  Redis: the source's ``list_entries`` then bare redis-py ``HSET`` of msgpack values,
  pipelined 1000 at a time (no generations, no events, no indexes: a floor, not a registry).

Targets: shared memory (shm -> shm) and a private redis-server (shm -> redis). The figure
per way is the median round; ``ratio`` is migrate's rate over plain's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402
import redis  # noqa: E402

import shmreg  # noqa: E402
from shmreg.migration import migrate  # noqa: E402
from shmreg.testing.redis import RedisServer  # noqa: E402

NS = "jobs"


def _name(tag: str) -> str:
    return f"bench-mig-{os.getpid()}-{tag}-{uuid.uuid4().hex[:6]}"


def _timed(run: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def _shm_round(source: shmreg.Registry, n: int) -> dict[str, float]:
    out = {}
    target = shmreg.Registry.create(_name("dst"))
    try:
        seconds = _timed(lambda: _check(migrate(source, target).copied, n))
        out["migrate"] = n / seconds
    finally:
        target.destroy()
    target = shmreg.Registry.create(_name("dst"))
    try:

        def plain() -> None:
            entries = source.backend.list_entries(NS)
            target.register_many(NS, [(e.service, e.pid, e.metadata) for e in entries])

        out["plain"] = n / _timed(plain)
    finally:
        target.destroy()
    return out


def _redis_round(source: shmreg.Registry, n: int, url: str) -> dict[str, float]:
    out = {}
    target = shmreg.Registry.create(_name("dst"), url=url)
    try:
        out["migrate"] = n / _timed(lambda: _check(migrate(source, target).copied, n))
    finally:
        target.destroy()
    client = redis.Redis.from_url(url)
    key = f"bench:{_name('bare')}"
    try:

        def plain() -> None:
            entries = source.backend.list_entries(NS)
            pipe = client.pipeline(transaction=False)
            for i, e in enumerate(entries, 1):
                pipe.hset(key, str(e.service), msgpack.packb([e.pid, e.metadata]))
                if i % 1000 == 0:
                    pipe.execute()
            pipe.execute()

        out["plain"] = n / _timed(plain)
    finally:
        client.delete(key)
        client.close()
    return out


def _check(copied: int, n: int) -> None:
    if copied != n:
        raise SystemExit(f"migrate copied {copied} of {n}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    n = args.entries
    source = shmreg.Registry.create(_name("src"), capacity=n)
    server = RedisServer()
    results: dict[str, Any] = {"entries": n, "rounds": args.rounds}
    try:
        source.register_many(NS, [(f"svc-{i}", None, {"i": i, "type": "w"}) for i in range(n)])
        for label, run in (
            ("shm->shm", lambda: _shm_round(source, n)),
            ("shm->redis", lambda: _redis_round(source, n, server.url)),
        ):
            rounds = [run() for _ in range(args.rounds)]
            row = {way: statistics.median(r[way] for r in rounds) for way in ("migrate", "plain")}
            row["ratio"] = row["migrate"] / row["plain"]
            results[label] = row
    finally:
        source.destroy()
        server.stop()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"entries {n}, median of {args.rounds} rounds (entries per second)")
        for label in ("shm->shm", "shm->redis"):
            row = results[label]
            print(
                f"{label:11} migrate {row['migrate']:>10,.0f}   plain {row['plain']:>10,.0f}"
                f"   ratio {row['ratio']:.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

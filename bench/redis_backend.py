#!/usr/bin/env python
"""shmreg on Redis beside bare redis-py doing the same work, on one private redis-server.

    python bench/redis_backend.py --ops 2000 --rounds 7

register: shmreg's ``Registry.register`` (one Lua script: claim-if-absent, generation,
index sets, the event, the host lease) against bare redis-py sending ``SET key value NX``
in a pipeline with the ``INCR`` of a generation counter. lookup: ``Registry.lookup`` (one
``HGET`` and a local pid probe) against a bare ``GET``. Rounds alternate the two
clients operation by operation (so drift in the machine hits both alike); each round's
figure is its median operation, and the result the median round.
``ratio`` is shmreg's throughput over the bare client's: 1.0 is "costs nothing extra".
Bars: register >= 0.8, lookup >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

import shmreg  # noqa: E402
from shmreg.testing.redis import RedisServer  # noqa: E402

BARS = {"register": 0.8, "lookup": 0.9}
_pc = time.perf_counter_ns


def _pair(shm_op: Any, bare_op: Any, n: int) -> tuple[list[int], list[int]]:
    """Run ``n`` operations of each, alternating one by one (the order flips every op), so
    whatever else the machine does hits both alike; the per-operation times, in ns."""
    shm, bare = [], []
    for i in range(n):
        if i & 1:
            t0 = _pc()
            shm_op(i)
            t1 = _pc()
            bare_op(i)
            t2 = _pc()
            shm.append(t1 - t0)
            bare.append(t2 - t1)
        else:
            t0 = _pc()
            bare_op(i)
            t1 = _pc()
            shm_op(i)
            t2 = _pc()
            bare.append(t1 - t0)
            shm.append(t2 - t1)
    return shm, bare


def run(ops: int, rounds: int) -> dict[str, Any]:
    """Start a server, run the interleaved rounds, stop the server; the figures."""
    import msgpack

    meta = {"type": "worker", "port": 8000}
    value = msgpack.packb({**meta, "pid": os.getpid()})
    times: dict[str, dict[str, list[float]]] = {op: {"shmreg": [], "bare": []} for op in BARS}
    with RedisServer() as server:
        reg = shmreg.Registry.create(f"bench-{os.getpid()}", url=server.url)
        client = redis.Redis.from_url(server.url)
        try:
            for r in range(rounds + 1):  # round 0 warms up (connections, script cache)
                tag = f"r{r}-"

                def shm_register(i: int, tag: str = tag) -> None:
                    reg.register("bench", tag + str(i), metadata=meta)

                def bare_register(i: int, tag: str = tag) -> None:
                    pipe = client.pipeline(transaction=False)
                    pipe.set("bare:" + tag + str(i), value, nx=True)
                    pipe.incr("bare:gen")
                    pipe.execute()

                def shm_lookup(i: int, tag: str = tag) -> None:
                    reg.lookup("bench", tag + str(i))

                def bare_lookup(i: int, tag: str = tag) -> None:
                    client.get("bare:" + tag + str(i))

                for op, pair in (
                    ("register", (shm_register, bare_register)),
                    ("lookup", (shm_lookup, bare_lookup)),
                ):
                    shm, bare = _pair(*pair, ops)
                    if r:
                        # The median operation: robust to the preemptions of a shared machine.
                        times[op]["shmreg"].append(statistics.median(shm))
                        times[op]["bare"].append(statistics.median(bare))
        finally:
            reg.destroy()
            client.close()
    out: dict[str, Any] = {"ops": ops, "rounds": rounds, "redis": server.binary}
    for op, by in times.items():
        shm_ns = statistics.median(by["shmreg"])
        bare_ns = statistics.median(by["bare"])
        out[op] = {
            "shmreg_us": round(shm_ns / 1000, 2),
            "bare_us": round(bare_ns / 1000, 2),
            "ratio": round(bare_ns / shm_ns, 3),
            "bar": BARS[op],
            "meets_bar": bare_ns / shm_ns >= BARS[op],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--ops", type=int, default=2000, help="operations per round and client")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    result = run(a.ops, a.rounds)
    if a.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"redis-server: {result['redis']}; {a.rounds} interleaved rounds of {a.ops} ops")
    print(f"{'op':10} {'shmreg µs':>10} {'redis-py µs':>12} {'ratio':>7} {'bar':>5}")
    for op in BARS:
        r = result[op]
        mark = "ok" if r["meets_bar"] else "BELOW"
        print(
            f"{op:10} {r['shmreg_us']:>10} {r['bare_us']:>12} {r['ratio']:>7} "
            f"{r['bar']:>5}  {mark}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

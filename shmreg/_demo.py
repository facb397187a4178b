"""``shmreg demo``: the main job, end to end, in a dozen printed lines.

A pool of worker processes attaches to one registry by name, each registers itself with
its capabilities, one worker is killed with SIGKILL, the registry stops returning it at
once and a sweep removes its entry, and a capability query finds the survivors. Then a
supervisor runs agents: one is killed and restarted, a failing one ends ``failed``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from typing import Any, TextIO

from shmreg._registry import Registry

NAMESPACE = "demo"
CAPABILITIES = [
    ["cpu", "embed"],
    ["cpu", "gpu", "train"],
    ["cpu", "gpu", "infer"],
    ["cpu", "infer"],
    ["cpu", "gpu", "embed"],
    ["cpu", "train"],
]


def _worker(reg: Registry, index: int, ready: Any) -> None:
    """One pool worker: register itself, say so, then idle until terminated (or killed).

    Workers are stopped with SIGTERM rather than a shared Event: a multiprocessing Event
    whose waiter was SIGKILLed can block ``set()`` forever, the very failure shmreg avoids.
    """
    caps = CAPABILITIES[index % len(CAPABILITIES)]
    reg.register(
        NAMESPACE,
        ("worker", index),
        metadata={"type": "worker", "capabilities": caps, "started_at": time.time()},
    )
    ready.release()
    parent = os.getppid()
    deadline = time.monotonic() + 120
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.05)


def run(workers: int = 4, out: TextIO | None = None, name: str | None = None) -> int:
    import sys

    out = out or sys.stdout
    name = name or f"demo-{os.getpid()}"
    ctx = mp.get_context("spawn")
    started = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{(time.perf_counter() - started) * 1e3:7.1f} ms] {text}", file=out, flush=True)

    reg = Registry.create(name, capacity=1024)
    procs: list[Any] = []
    try:
        say(f"registry {name!r} created in /dev/shm ({reg.stats().memory_bytes // 1024} KiB)")
        ready = ctx.Semaphore(0)
        procs = [
            ctx.Process(target=_worker, args=(reg, i, ready), daemon=True) for i in range(workers)
        ]
        for proc in procs:
            proc.start()
        for _ in procs:
            if not ready.acquire(timeout=60):
                raise RuntimeError("a demo worker did not start within 60 s")
        say(f"{workers} spawned workers attached by name and registered themselves:")
        for service, meta in sorted(reg.list_services_with_metadata(NAMESPACE).items()):
            pid = reg.lookup(NAMESPACE, service)
            print(
                f"             {service!s:16} pid {pid:<8} {', '.join(meta['capabilities'])}",
                file=out,
            )
        victim_index = 1 if workers > 1 else 0
        victim = procs[victim_index]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        say(f"worker {victim_index} (pid {victim.pid}) killed with SIGKILL")
        seen = reg.lookup(NAMESPACE, ("worker", victim_index))
        say(f"lookup of worker {victim_index} right after: {seen} (dead owners are never returned)")
        removed = reg.sweep()
        say(
            f"sweep removed {removed} dead entr{'y' if removed == 1 else 'ies'}; "
            f"{reg.count(NAMESPACE)} workers left"
        )
        gpu = reg.find_by_metadata(NAMESPACE, capabilities="gpu")
        say(
            "capability query capabilities='gpu': "
            + (", ".join(f"{svc} (pid {pid})" for svc, pid, _ in sorted(gpu)) or "none")
        )
        both = reg.find_by_metadata(NAMESPACE, capabilities=["gpu", "train"])
        say(
            "capability query ['gpu', 'train']: "
            + (", ".join(f"{svc} (pid {pid})" for svc, pid, _ in sorted(both)) or "none")
        )
        from shmreg.agents._demo import show_supervision

        show_supervision(reg, say, out)
        stats = reg.stats()
        say(
            f"stats: {stats.used} entries, {stats.tombstones} tombstones, "
            f"{stats.sweeps} sweep(s), {stats.dead_found} dead found"
        )
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(10)
        return 0
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
        reg.destroy()
        say(f"registry {name!r} destroyed")

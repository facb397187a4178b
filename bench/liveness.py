"""The liveness bars, measured: ``python bench/liveness.py`` (about a minute).

1. CPU of an idle monitor watching 1,000 processes (bar: under 1 % of a core);
2. death to removal with the monitor running, 200 SIGKILLed processes, 100k entries in the
   table: from the kill to the monitor's ``on_death`` callback (bar: p99 under 5 ms);
3. ``wait_for`` wake-up after a register (bar: p99 under 2 ms);
4. ``sweep()`` over 100k entries owned by 1,000 live processes (bar: under 50 ms).
"""

import os
import statistics
import subprocess
import threading
import time

import shmreg
from shmreg import _identity

name = f"bench-liveness-{os.getpid()}"
r = shmreg.Registry.create(name, capacity=100_000)
procs = []
try:
    # 1) idle monitor CPU with 1000 watched processes
    procs = [subprocess.Popen(["sleep", "600"]) for _ in range(1000)]
    b = r.backend
    for i, p in enumerate(procs):
        b.register("idle", i, _identity.identity_of(p.pid), {"type": "w"})
    m = r.start_monitor()
    time.sleep(3)  # let it open its pidfds
    watched = m.stats.watched
    t0 = time.process_time()
    w0 = time.monotonic()
    time.sleep(10)
    cpu = (time.process_time() - t0) / (time.monotonic() - w0) * 100
    print(f"idle monitor: {watched} watched, {cpu:.2f}% of a core over 10 s")
    r.stop_monitor()
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()
    r.sweep()
    # 2) death to removal over 200 SIGKILLed processes, 100k entries in the table
    for i in range(100_000):
        b.register("bulk", i, _identity.self_identity(), {"type": "t"})
    done = {}
    ev = threading.Event()

    def on_death(ident, verdict, removed):
        done[ident.pid] = time.perf_counter()
        ev.set()

    m = r.start_monitor(on_death=on_death)
    lat = []
    for i in range(200):
        p = subprocess.Popen(["sleep", "600"])
        b.register("victims", i, _identity.identity_of(p.pid), {"type": "v"})
        time.sleep(0.02)
        ev.clear()
        t = time.perf_counter()
        os.kill(p.pid, 9)
        ev.wait(5)
        p.wait()
        if p.pid in done:
            lat.append((done[p.pid] - t) * 1e3)
    lat.sort()
    p99 = lat[int(len(lat) * 0.99) - 1]
    print(
        f"death to removal: n={len(lat)} p50 {statistics.median(lat):.2f} ms, "
        f"p99 {p99:.2f} ms, max {lat[-1]:.2f} ms"
    )

    r.stop_monitor()
    # 3) wait_for wake-up
    wl = []

    def waiter(service: int, woke: dict[str, float]) -> None:
        r.wait_for("wf", service, timeout=5)
        woke["t"] = time.perf_counter()

    for i in range(200):
        woke: dict[str, float] = {}
        th = threading.Thread(target=waiter, args=(i, woke))
        th.start()
        time.sleep(0.005)
        t = time.perf_counter()
        r.register("wf", i)
        th.join()
        wl.append((woke["t"] - t) * 1e3)
    wl.sort()
    p99 = wl[int(len(wl) * 0.99) - 1]
    print(f"wait_for wake-up (thread): p50 {statistics.median(wl):.3f} ms, p99 {p99:.3f} ms")
    # 4) sweep 100k entries owned by 1000 processes
    r.destroy()
    r = shmreg.Registry.create(name, capacity=100_000)
    b = r.backend
    procs = [subprocess.Popen(["sleep", "600"]) for _ in range(1000)]
    ids = [_identity.identity_of(p.pid) for p in procs]
    for i in range(100_000):
        b.register("sw", i, ids[i % 1000], {"type": "t"})
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        r.sweep()
        ts.append((time.perf_counter() - t) * 1e3)
    print(f"sweep of 100k entries / 1000 live owners: median {statistics.median(ts):.1f} ms")
finally:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()
    r.destroy()

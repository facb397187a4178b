#!/usr/bin/env python
"""The peer benchmark: shmreg and every peer, same workloads, same run, same machine.

    python bench/run.py --sizes 1000,100000 --procs 1,2 --peers all --budget 60
    python bench/run.py --sizes 100000 --peers lmdb,shmreg,shmreg-py --rounds 3  # interleaved
    python bench/run.py --report bench/results/latest.json --markdown   # tables only

Each (peer, size) runs in its own interpreter (a fresh session, killed whole on timeout),
so one peer's imports, leaks or stuck locks cannot touch the next. The orchestrator starts
redis-server on 127.0.0.1 and removes every /dev/shm file whose name carries the run id,
whatever happens. Method and caveats: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import glob
import importlib.metadata
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._core import core  # noqa: E402
from bench.peers import PEERS, PURE_PYTHON_PEERS  # noqa: E402

_pc = time.perf_counter_ns
SHM = "/dev/shm"


# --- environment ---------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    def ver(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    with open("/proc/cpuinfo") as f:
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
            platform.processor(),
        )
    redis_server = None
    if shutil.which("redis-server"):
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
        redis_server = out.stdout.split()[2].removeprefix("v=") if out.stdout else None
    shm = shutil.disk_usage(SHM) if os.path.isdir(SHM) else None
    return {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "python_build": " ".join(platform.python_build()) + " " + platform.python_compiler(),
        "python_config": sysconfig.get_config_var("CONFIG_ARGS") or "",
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "machine": platform.machine(),
        "loadavg": list(os.getloadavg()),
        "mem_total_mb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20,
        "dev_shm_free_mb": shm.free >> 20 if shm else None,
        "clock": "time.perf_counter_ns (CLOCK_MONOTONIC, system-wide on Linux)",
        "versions": {
            "shmreg": ver("shmreg"),
            "msgpack": ver("msgpack"),
            "numpy": ver("numpy"),
            "lmdb": ver("lmdb"),
            "sqlite": __import__("sqlite3").sqlite_version,
            "redis-py": ver("redis"),
            "redis-server": redis_server,
            "UltraDict": ver("UltraDict"),
            "atomics": ver("atomics"),
            "shared-memory-dict": ver("shared-memory-dict"),
            "psutil": ver("psutil"),
        },
    }


def header(env: dict[str, Any]) -> str:
    v = ", ".join(f"{k} {x}" for k, x in env["versions"].items() if x)
    return (
        f"# {env['when']}  Python {env['python']} ({env['implementation']}, "
        f"{env['python_build']})\n# {env['cpu_count']} CPUs: {env['cpu']}; Linux "
        f"{env['kernel']}; load {env['loadavg'][0]:.2f}\n# {v}"
    )


# --- redis-server ----------------------------------------------------------------------------


class RedisServer:
    """A throwaway redis-server on 127.0.0.1, no persistence; stopped on exit, always."""

    def __init__(self, workdir: str) -> None:
        self.workdir, self.proc, self.port = workdir, None, 0

    def start(self) -> int:
        for _ in range(3):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            self.proc = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    self.workdir,
                    "--protected-mode",
                    "yes",
                    "--loglevel",
                    "warning",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            atexit.register(self.stop)
            for _ in range(100):  # up to 5 s
                if self.proc.poll() is not None:
                    break
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as c,
                ):
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        return self.port
                time.sleep(0.05)
            self.stop()
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def cpu_idle(seconds: float = 1.0) -> float:
    """Fraction of all CPUs idle over ``seconds`` (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # idle + iowait

    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return (i1 - i0) / max(1, t1 - t0)


def wait_quiet(max_wait: float, idle: float = 0.8) -> float:
    """On a shared machine, wait (at most ``max_wait`` s) for the CPUs to be mostly idle."""
    end, seen = time.monotonic() + max_wait, cpu_idle()
    while seen < idle and time.monotonic() < end:
        seen = cpu_idle()
    return round(seen, 2)


def remove_shm(runid: str) -> list[str]:
    gone = []
    for path in glob.glob(f"{SHM}/*{runid}*"):
        with contextlib.suppress(OSError):
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
            gone.append(path)
    return gone


# --- multi-process phases (run inside a peer's worker process) ------------------------------


def _vis_reader(spec: Any, conn: Any, timeout_s: float) -> None:
    st = core.make_store(spec)
    st.attach()
    conn.send("ready")
    while (k := conn.recv()) is not None:
        conn.send("spinning")
        seen, i, deadline = -1, 0, time.monotonic() + timeout_s
        while True:
            if st.lookup(k) is not None:
                seen = _pc()
                break
            i += 1
            if i & 15 == 0 and time.monotonic() > deadline:
                break
        conn.send(seen)
    st.close()


def run_visibility(
    store: Any, pid: int, reps: int, seconds: float, per_timeout: float = 5.0
) -> dict[str, Any]:
    """Writer (this process) registers; a reader in another process spins on lookup. The
    figure is reader-saw minus writer-called, both CLOCK_MONOTONIC (one clock per host)."""
    ctx, rec = mp.get_context("spawn"), core.records(pid)[0]
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=_vis_reader, args=(store.spec(), theirs, per_timeout))
    p.start()
    lat, write, misses = [], [], 0
    try:
        if not mine.poll(60):
            raise TimeoutError("visibility reader did not attach within 60 s")
        mine.recv()
        end = time.monotonic() + seconds
        for r in range(reps):
            if time.monotonic() > end:
                break
            k = core.key("v", r)
            mine.send(k)
            mine.recv()
            t = _pc() + 200_000  # let the reader get into its loop
            while _pc() < t:
                pass
            t0 = _pc()
            store.register(k, pid, rec)
            write.append((_pc() - t0) / 1e3)
            if not mine.poll(per_timeout + 30):
                raise TimeoutError("visibility reader stopped answering")
            seen = mine.recv()
            if seen < 0:
                misses += 1
            else:
                lat.append((seen - t0) / 1e3)
        mine.send(None)
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
    write.sort()
    return {
        **pcts(lat, "us"),
        "misses": misses,
        "register_call_p50_us": write[len(write) // 2] if write else None,
    }


def pcts(xs: list[float], unit: str) -> dict[str, Any]:
    xs = sorted(xs)
    if not xs:
        return {"reps": 0}
    at = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {
        "reps": len(xs),
        f"p50_{unit}": at(0.5),
        f"p90_{unit}": at(0.9),
        f"p99_{unit}": at(0.99),
        f"max_{unit}": xs[-1],
    }


def _kill_writer(
    spec: Any, wid: int, owner: int, flags: Any, progress: Any, max_keys: int, seconds: float
) -> None:
    st, rec = core.make_store(spec), core.records(owner)[wid]
    st.attach()
    progress[wid] = 1
    end, base = time.monotonic() + seconds, wid * max_keys
    for j in range(max_keys):
        try:
            flags[base + j] = 1 if st.register(f"k{wid}-{j:07d}", owner, rec) else 3
        except Exception:
            flags[base + j] = 2
        progress[wid] = j + 2
        if time.monotonic() > end:
            break
    st.close()


def _kill_verify(spec: Any, owner: int, flags: Any, max_keys: int, q: Any) -> None:
    try:
        st = core.make_store(spec)
        st.attach()
        present = st.list_all()
        acked = [
            f"k{w}-{j:07d}"
            for w in range(2)
            for j in range(max_keys)
            if flags[w * max_keys + j] == 1
        ]
        q.put({"acked": len(acked), "lost": sum(k not in present for k in acked)})
    except Exception as exc:
        q.put({"verify_error": repr(exc)})
        return
    try:  # can a new writer still write? (a lock left held by the dead writer says no)
        ok = st.register("after-kill", owner, core.records(owner)[0])
        q.put({"usable_after": bool(ok and st.lookup("after-kill") == owner)})
    except Exception as exc:
        q.put({"usable_after": False, "after_error": repr(exc)})


def run_kill(
    make: Any, pid: int, rounds: int, seconds: float = 1.5, max_keys: int = 200_000
) -> dict[str, Any]:
    """Two writers register unique keys, marking each acknowledged one in shared flags; one
    is SIGKILLed at a random moment. Then: is every acknowledged key there, does the
    survivor keep going, can a fresh process still write?"""
    ctx, out = mp.get_context("spawn"), []
    for r in range(rounds):
        store = make(r)
        store.create()
        flags, progress = ctx.RawArray("b", 2 * max_keys), ctx.RawArray("q", 2)
        ws = [
            ctx.Process(
                target=_kill_writer, args=(store.spec(), w, pid, flags, progress, max_keys, seconds)
            )
            for w in range(2)
        ]
        res: dict[str, Any] = {"round": r}
        try:
            for w in ws:
                w.start()
            t_end = time.monotonic() + 60
            while min(progress) < 2 and time.monotonic() < t_end:
                time.sleep(0.005)
            time.sleep(random.uniform(0.05, 0.3))
            os.kill(ws[0].pid, signal.SIGKILL)
            res["killed_after_ops"] = progress[0] - 1
            ws[0].join(10)
            last, still, t_end = progress[1], 0.0, time.monotonic() + seconds + 30
            while ws[1].is_alive() and time.monotonic() < t_end and still < 3.0:
                time.sleep(0.1)
                still = 0.0 if progress[1] != last else still + 0.1
                last = progress[1]
            res["survivor_stuck"] = ws[1].is_alive()
            q = ctx.Queue()
            v = ctx.Process(target=_kill_verify, args=(store.spec(), pid, flags, max_keys, q))
            v.start()
            try:
                res.update(q.get(timeout=30))
                res.update(q.get(timeout=10))
            except Exception:
                res.setdefault("verify", "hung")
                res.setdefault("usable_after", False)
            finally:
                v.join(1)
                if v.is_alive():
                    v.kill()
            res["errors"] = sum(1 for x in flags if x == 2)
        finally:
            for w in ws:
                if w.is_alive():
                    w.kill()
                w.join(5)
            try:
                store.destroy()
            except Exception as exc:
                res["destroy_error"] = repr(exc)
        out.append(res)
    return {
        "rounds": out,
        "lost": sum(x.get("lost", 0) for x in out),
        "acked": sum(x.get("acked", 0) for x in out),
        "stuck": sum(bool(x.get("survivor_stuck")) for x in out),
        "unusable": sum(not x.get("usable_after", False) for x in out),
        "errors": sum(x.get("errors", 0) for x in out),
    }


def run_shmreg_liveness(store: Any, n: int, seconds: float, note: Any) -> dict[str, Any]:
    """shmreg only: sweep with every owner alive, sweep that removes dead owners' entries,
    and death-to-removal with the monitor running (when the API has them)."""
    reg, out, helpers = store.reg, {}, []
    rec = core.records(os.getpid())[0]
    try:
        if not hasattr(reg, "sweep"):
            out["sweep"] = "skipped: Registry.sweep not in the API yet"
        else:
            note("sweep (all alive)")
            out["sweep_live"] = core.measure(reg.sweep, [()] * 10, seconds, 10)
            dead = min(max(n, 1000), 10_000)
            helpers = [subprocess.Popen(["sleep", "600"]) for _ in range(4)]
            store.register_many([(f"dead{j}", helpers[j % 4].pid, rec) for j in range(dead)])
            for h in helpers:
                h.kill()
                h.wait()
            note(f"sweep ({dead} dead)")
            t0 = _pc()
            removed = reg.sweep()
            out["sweep_dead"] = {"dead": dead, "removed": removed, "ms": (_pc() - t0) / 1e6}
        if not hasattr(reg, "start_monitor"):
            out["death_to_removal"] = "skipped: Registry.start_monitor not in the API yet"
            return out
        note("death to removal (monitor)")
        t_stats = _pc()
        reg.stats()
        out["stats_ms"] = (_pc() - t_stats) / 1e6
        # The monitor's on_death callback says when it removed an entry; the main thread
        # waits on an Event meanwhile, so it does not hold the GIL the monitor needs.
        removed: dict[Any, int] = {}
        event = threading.Event()

        def on_death(identity: Any, verdict: Any, count: int) -> None:
            removed[getattr(identity, "pid", identity)] = _pc()
            event.set()

        try:
            reg.start_monitor(on_death=on_death)
            via = "on_death callback"
        except TypeError:
            reg.start_monitor()
            via = f"polling stats().used (each call {out['stats_ms']:.1f} ms)"
        lat, timeouts, end = [], 0, time.monotonic() + 3 * seconds
        for r in range(50):
            if time.monotonic() > end:
                break
            h = subprocess.Popen(["sleep", "600"])
            helpers.append(h)
            store.register(f"death{r}", h.pid, rec)
            polling = via.startswith("polling")
            used0 = reg.stats().used if polling else 0
            time.sleep(0.05)  # a process lives a while after registering: let it be watched
            event.clear()
            t0 = _pc()
            h.kill()
            h.wait()
            t_end = time.monotonic() + 2
            while h.pid not in removed and time.monotonic() < t_end:
                if polling and reg.stats().used < used0:
                    removed[h.pid] = _pc()
                event.wait(0.0005)
            t1 = removed.get(h.pid)
            if t1 is None:
                timeouts += 1
            else:
                lat.append((t1 - t0) / 1e6)
        out["death_to_removal"] = {**pcts(lat, "ms"), "timeouts": timeouts, "via": via}
        if hasattr(reg, "stop_monitor"):
            reg.stop_monitor()
    finally:
        for h in helpers:
            if h.poll() is None:
                h.kill()
                h.wait()
    return out


# --- one peer at one size (in its own process) ----------------------------------------------


def worker_main(cfg: dict[str, Any]) -> int:
    peer, n, budget, runid = cfg["peer"], cfg["size"], cfg["budget"], cfg["runid"]
    cls, pid, t_start = PEERS[peer][0], os.getpid(), time.monotonic()
    res: dict[str, Any] = {"peer": peer, "size": n, "status": "running", "notes": []}
    if cfg.get("round") is not None:
        res["round"] = cfg["round"]
    if peer.startswith("shmreg"):  # which engine path this interpreter (and its workers) ran
        from shmreg._engine import fastpath

        res["engine"] = fastpath.describe()

    def save() -> None:
        res["wall_s"] = round(time.monotonic() - t_start, 2)
        tmp = cfg["out"] + ".part"
        with open(tmp, "w") as f:
            json.dump(res, f, default=str)
        os.replace(tmp, cfg["out"])

    def note(msg: str) -> None:
        sys.stderr.write(f"  [{time.monotonic() - t_start:6.1f}s] {peer} N={n}: {msg}\n")

    def ident(tag: str) -> str:
        return f"sb{runid}{tag}"

    def opts(tag: str) -> dict[str, Any]:
        return {
            "path": f"{cfg['tmpdir']}/{peer}-{n}-{tag}",
            "port": cfg.get("redis_port"),
            "expect": 2 * n + 25_000,
        }

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: save, destroy
    procs, op_s = cfg["procs"], min(2.0, budget / 30)
    store = cls(ident(f"n{n}"), int(n * 1.1) + 25_000, **opts("main"))
    try:
        store.create()
    except Exception as exc:
        res.update(status="skipped", reason=f"create failed: {exc!r}")
        save()
        return 0
    try:
        r = res["ops"] = core.run_ops(store, n, pid, op_s, 0.35 * budget, 20_000, note)
        n_eff = r["n_eff"]
        if r["capped"]:
            res["notes"].append(f"capped: {n_eff} of {n} entries within the time budget")
        mb = r["memory_bytes"]
        res["memory"] = {"bytes": mb, "per_entry": mb / n_eff if mb is not None else None}
        if peer.startswith("shmreg"):
            s = store.reg.stats()
            res["memory"].update(capacity=s.capacity, per_slot=s.memory_bytes / s.capacity)
        save()
        if store.shared:
            phases = [
                ("attach", lambda: core.run_attach(store, core.key("s", 0), 3)),
                ("visibility", lambda: run_visibility(store, pid, 300, min(4, budget / 15))),
            ]
            max_ops = 10 * max(60_000, n) // sum(procs)  # per worker; the same for every peer
            for p in procs:
                phases.append(
                    (
                        f"mixed_{p}",
                        lambda p=p: core.run_mixed(
                            store, p, n_eff, pid, cfg["mixed_seconds"], max_ops
                        ),
                    )
                )
            for name, fn in phases:
                note(name)
                try:
                    res[name] = fn()
                except Exception as exc:
                    res[name] = {"error": repr(exc)}
                    res["notes"].append(f"{name} failed: {exc!r}")
                save()
        else:
            res["notes"].append("not shared between processes: no multi-process figures")
        if peer.startswith("shmreg"):
            try:
                res["liveness"] = run_shmreg_liveness(store, n, op_s, note)
            except Exception as exc:
                res["liveness"] = {"error": repr(exc)}
                res["notes"].append(f"liveness failed: {exc!r}")
        res["status"] = "ok"
    except Exception as exc:
        res.update(status="failed", error=repr(exc), traceback=traceback.format_exc())
    finally:
        try:
            store.destroy()
        except Exception as exc:
            res["notes"].append(f"destroy failed: {exc!r}")
        save()
    if cfg.get("kill_rounds") and store.shared:
        note(f"kill -9 one of two writers, {cfg['kill_rounds']} rounds")
        try:
            res["kill"] = run_kill(
                lambda k: cls(ident(f"k{k}"), 50_000, **opts(f"k{k}")), pid, cfg["kill_rounds"]
            )
        except Exception as exc:
            res["kill"] = {"error": repr(exc)}
        save()
    return 0


# --- orchestration ----------------------------------------------------------------------------


def run_worker(cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    load = os.getloadavg()[0]  # the machine may be shared: keep the evidence with the figures
    # The engine path is chosen once, at import, from the environment: the pure-Python peer's
    # interpreter gets SHMREG_PUREPYTHON=1 (inherited by every process it spawns); every other
    # peer runs with it removed, so a stray setting cannot turn the compiled peer pure.
    env = {k: v for k, v in os.environ.items() if k != "SHMREG_PUREPYTHON"}
    if cfg["peer"] in PURE_PYTHON_PEERS:
        env["SHMREG_PUREPYTHON"] = "1"
    p = subprocess.Popen(cmd, start_new_session=True, env=env)
    status = None
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        status = f"timeout after {timeout:.0f} s (killed)"
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGTERM)  # the worker saves and destroys on SIGTERM
    finally:
        # Give the group (the worker, its resource tracker, a Manager server) time to clean
        # up after itself; a SIGKILL now would leak the segments and semaphores it holds.
        t_end = time.monotonic() + (5 if status is None else 15)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            while time.monotonic() < t_end:
                os.killpg(p.pid, 0)
                time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)  # the worker and anything it left behind
        p.wait()
    try:
        with open(cfg["out"]) as f:
            res: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        res = {"peer": cfg["peer"], "size": cfg["size"], "status": "failed", "notes": []}
        status = status or f"worker exited {p.returncode} without results"
    if status:
        res["status"], res["reason"] = "failed" if "exited" in status else "timeout", status
        if res.get("ops"):
            res["notes"].append(f"{status}: figures below are the phases that finished")
    elif res.get("status") == "running":
        res["status"] = "failed"
    res["loadavg_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    return res


def orchestrate(a: argparse.Namespace) -> int:
    env = environment()
    cpu = os.cpu_count() or 1
    sizes = [int(x) for x in a.sizes.split(",")]
    procs = sorted({cpu if x == "cpu" else int(x) for x in a.procs.split(",")})
    names = list(PEERS) if a.peers == "all" else a.peers.split(",")
    unknown = [x for x in names if x not in PEERS]
    if unknown:
        sys.exit(f"unknown peers {unknown}; known: {', '.join(PEERS)}")
    runid = f"{os.getpid():x}{random.randrange(1 << 16):04x}"
    tmpdir = f"{SHM}/shmreg-bench-{runid}"
    os.makedirs(tmpdir)
    atexit.register(remove_shm, runid)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(header(env), flush=True)
    skipped, available = {}, []
    for name in names:
        why = PEERS[name][1]()
        if why:
            skipped[name] = why
            print(f"skip {name}: {why}", flush=True)
        else:
            available.append(name)
    redis = RedisServer(tmpdir) if "redis" in available else None
    round_runs: list[dict[str, Any]] = []
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "env": env,
        "config": {
            "sizes": sizes,
            "procs": procs,
            "peers": names,
            "budget_s": a.budget,
            "mixed_seconds": a.mixed_seconds,
            "kill_rounds": a.kill_rounds,
            "runid": runid,
            "quiet_wait": a.quiet_wait,
            "rounds": a.rounds,
        },
        "skipped": skipped,
        "runs": round_runs,
    }
    try:
        if redis:
            try:
                port = redis.start()
            except Exception as exc:
                skipped["redis"] = f"redis-server failed to start: {exc}"
                print(f"skip redis: {skipped['redis']}")
                available.remove("redis")
                port = None
        # Rounds interleave the peers (a, b, c, a, b, c, ...) so a drift in the machine's
        # speed lands on every peer alike; the report takes each figure's median over rounds.
        schedule = [
            (i, n, k, name)
            for i, n in enumerate(sizes)
            for k in range(a.rounds)
            for name in available
        ]
        for i, n, k, name in schedule:
            tag = f"{name}-{n}" + (f"-r{k}" if a.rounds > 1 else "")
            print(
                f"== {name}, N = {n}" + (f", round {k + 1}/{a.rounds}" if a.rounds > 1 else ""),
                flush=True,
            )
            cfg = {
                "peer": name,
                "size": n,
                "budget": a.budget,
                "runid": runid,
                "tmpdir": tmpdir,
                "procs": procs,
                "mixed_seconds": a.mixed_seconds,
                "kill_rounds": a.kill_rounds if i == 0 and k == 0 else 0,
                "redis_port": port if name == "redis" else None,
                "out": f"{tmpdir}/{tag}.json",
                "round": k if a.rounds > 1 else None,
            }
            idle = wait_quiet(a.quiet_wait) if a.quiet_wait > 0 else None
            t0 = time.monotonic()
            res = run_worker(cfg, timeout=3 * a.budget + 240)
            res["cpu_idle_before"] = idle
            round_runs.append(res)
            print(
                f"   {res['status']} in {time.monotonic() - t0:.0f} s"
                + "".join(f"\n   note: {x}" for x in res.get("notes", []))
                + (
                    f"\n   {res.get('reason') or res.get('error')}" if res["status"] != "ok" else ""
                ),
                flush=True,
            )
            for path in glob.glob(f"{SHM}/*sb{runid}*"):  # segments named by ident
                with contextlib.suppress(OSError):
                    os.unlink(path)
    finally:
        if redis:
            redis.stop()
        left = remove_shm(runid)
        left = [x for x in left if x != tmpdir]
        if left:
            print(f"removed {len(left)} leftover /dev/shm entries: {left[:5]}")
        from bench.report import median_runs, ratios

        if a.rounds > 1:  # every round's figures stay in the file; the tables use medians
            data["round_runs"] = round_runs
            data["runs"] = median_runs(round_runs)
        data["ratios"] = ratios(data["runs"])
        path = out_dir / f"{stamp}.json"
        path.write_text(json.dumps(data, indent=1, default=str))
        (out_dir / "latest.json").write_text(json.dumps(data, indent=1, default=str))
        print(f"results: {path} (and latest.json)")
    from bench.report import render_markdown, render_text

    print(render_markdown(data) if a.markdown else render_text(data))
    if not a.no_plots:
        try:
            from bench.plot import plot

            for png in plot(data, ROOT / "docs" / "img"):
                print(f"plot: {png}")
        except ImportError as exc:
            print(f"no plots: {exc} (pip install -e '.[bench]')")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,100000,1000000")
    ap.add_argument("--procs", default="1,2,cpu", help="'cpu' = os.cpu_count()")
    ap.add_argument("--peers", default="all", help="all, or some of: " + ",".join(PEERS))
    ap.add_argument(
        "--budget",
        type=float,
        default=60,
        help="seconds per peer per size; slower peers are capped (default 60)",
    )
    ap.add_argument("--mixed-seconds", type=float, default=2.0)
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        metavar="K",
        help="run the peers K times, interleaved, at each size; tables use per-figure "
        "medians over the rounds (default 1)",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=30,
        metavar="S",
        help="before each peer, wait up to S s for 80%% idle CPUs (0: do not)",
    )
    ap.add_argument("--kill-rounds", type=int, default=3, help="at the first size; 0: none")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument(
        "--report",
        nargs="+",
        metavar="JSON",
        help="do not run: merge these result files and print their tables",
    )
    ap.add_argument(
        "--redis-backend",
        action="store_true",
        help="only shmreg on Redis beside bare redis-py (bench/redis_backend.py)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker_main(json.loads(a.worker))
    if a.redis_backend:
        from bench.redis_backend import main as redis_backend

        return redis_backend([])
    if a.report:
        from bench.report import load, render_markdown, render_text

        data = load(a.report)
        print(render_markdown(data) if a.markdown else render_text(data))
        if not a.no_plots:
            from bench.plot import plot

            for png in plot(data, ROOT / "docs" / "img"):
                print(f"plot: {png}")
        return 0
    return orchestrate(a)


if __name__ == "__main__":
    sys.exit(main())

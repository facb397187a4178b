"""Many real processes on one registry: visibility, pools, races, crashes, threads.

Every child here is a real OS process: an independent interpreter (``python -c``) or a
``multiprocessing`` child under the fork, spawn and forkserver start methods. Each test
kills and reaps its children on the way out (``helpers.children``) and destroys its
registries (the ``registry`` fixture, or ``helpers.destroying``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    DEADLINE_S,
    children,
    destroying,
    finish,
    finish_ok,
    json_lines,
    reach_minimum,
    read_line,
    run_py,
    send_line,
    test_seed,
    touch,
    wait_for_file,
    wait_zombie,
)

import shmreg

START_METHODS = ["fork", "spawn", "forkserver"]
SVC_META = {"type": "worker", "capabilities": ["a", "b"], "n": 1}
AGENT_META = {"type": "agent", "n": 2}
PARENT_META = {"role": "parent"}


def _listed(reg: shmreg.Registry, ns: str) -> set[Any]:
    return set(reg.list_services(ns))


# ----------------------------------------------------------------------------- visibility


def _visibility_child(conn: Any, reg: shmreg.Registry, ns: str) -> None:
    try:
        reg.register(ns, "svc", metadata=SVC_META)
        reg.register(ns, ("agent", "p1"), metadata=AGENT_META)
        found = reg.lookup_with_metadata(ns, "parent")
        conn.send({"pid": os.getpid(), "parent": list(found) if found else None})
        assert conn.recv() == "unregister"
        conn.send({"unregistered": reg.unregister(ns, ("agent", "p1"))})
        conn.recv()
        reg.close()
    except BaseException as exc:
        conn.send({"error": repr(exc)})
        raise


_VISIBILITY_CODE = r"""
name, ns = sys.argv[1:3]
SVC_META, AGENT_META = json.loads(sys.argv[3]), json.loads(sys.argv[4])
reg = shmreg.Registry.attach(name)
reg.register(ns, "svc", metadata=SVC_META)
reg.register(ns, ("agent", "p1"), metadata=AGENT_META)
found = reg.lookup_with_metadata(ns, "parent")
report({"pid": os.getpid(), "parent": list(found) if found else None})
assert json.loads(sys.stdin.readline()) == "unregister"
report({"unregistered": reg.unregister(ns, ("agent", "p1"))})
sys.stdin.readline()
reg.close()
"""


class _Peer:
    """One child that talks in messages, whichever way it was started."""

    def __init__(self, method: str, reg: shmreg.Registry, ns: str, kids: Any) -> None:
        import json

        self.method = method
        if method == "independent":
            self.proc: Any = kids.py(_VISIBILITY_CODE, reg.name, ns, json.dumps(SVC_META),
                                     json.dumps(AGENT_META), stdin=subprocess.PIPE)
        else:
            ctx = mp.get_context(method)
            self.conn, child_conn = ctx.Pipe()
            self.proc = kids.add(ctx.Process(target=_visibility_child,
                                             args=(child_conn, reg, ns)))
            self.proc.start()
            child_conn.close()

    def recv(self) -> Any:
        if self.method == "independent":
            return read_line(self.proc)
        if not self.conn.poll(DEADLINE_S):
            raise AssertionError(f"{self.method} child sent nothing")
        msg = self.conn.recv()
        assert "error" not in msg, msg["error"]
        return msg

    def send(self, obj: Any) -> None:
        if self.method == "independent":
            send_line(self.proc, obj)
        else:
            self.conn.send(obj)

    def finish(self) -> None:
        if self.method == "independent":
            finish_ok(self.proc)
        else:
            self.proc.join(DEADLINE_S)
            assert self.proc.exitcode == 0


@pytest.mark.parametrize("method", [*START_METHODS, "independent"])
def test_registrations_are_visible_across_processes(registry: shmreg.Registry,
                                                    method: str) -> None:
    ns = "vis"
    me = os.getpid()
    registry.register(ns, "parent", metadata=PARENT_META)
    with children() as kids:
        peer = _Peer(method, registry, ns, kids)
        hello = peer.recv()
        child = hello["pid"]
        assert child != me
        # The child sees the parent's registration ...
        assert hello["parent"] == [me, PARENT_META]
        # ... and the parent sees the child's, through every read call.
        assert registry.lookup(ns, "svc") == child
        assert registry.registered(ns, ("agent", "p1"))
        assert registry.lookup_with_metadata(ns, "svc") == (child, SVC_META)
        assert registry.lookup_with_metadata(ns, ("agent", "p1")) == (child, AGENT_META)
        assert registry.get_metadata_field(ns, "svc", "n") == 1
        assert _listed(registry, ns) == {"parent", "svc", ("agent", "p1")}
        assert registry.list_services_with_metadata(ns)[("agent", "p1")] == AGENT_META
        assert registry.find_by_metadata(ns, type="worker") == [("svc", child, SVC_META)]
        assert registry.find_by_metadata(ns, capabilities="b") == [("svc", child, SVC_META)]
        assert registry.list_by_type(ns, "agent") == [(("agent", "p1"), child, AGENT_META)]
        assert registry.count(ns) == 3

        peer.send("unregister")
        assert peer.recv() == {"unregistered": True}
        assert registry.lookup(ns, ("agent", "p1")) is None
        assert registry.lookup_with_metadata(ns, ("agent", "p1")) is None
        assert _listed(registry, ns) == {"parent", "svc"}
        assert registry.find_by_metadata(ns, type="agent") == []
        assert registry.count(ns) == 2

        peer.send("exit")
        peer.finish()
        # The child exited and was reaped: its remaining entry is gone for readers.
        assert registry.lookup(ns, "svc") is None
        assert _listed(registry, ns) == {"parent"}


# ---------------------------------------------------------------------------- pool workers


def _pool_register(reg: shmreg.Registry, ns: str, tag: str) -> tuple[int, Any, Any]:
    pid = os.getpid()
    try:
        reg.register(ns, f"worker-{pid}", metadata={"tag": tag, "pid": pid})
        found = reg.lookup_with_metadata(ns, f"worker-{pid}")
    finally:
        reg.close()  # the argument was unpickled into a fresh handle for this task
    return pid, found[0] if found else None, found[1] if found else None


_WORKER_REG: shmreg.Registry | None = None


def _pool_init(reg: shmreg.Registry, ns: str, tag: str) -> None:
    global _WORKER_REG
    _WORKER_REG = reg
    reg.register(ns, f"init-{os.getpid()}", metadata={"tag": tag, "pid": os.getpid()})


def _pool_whoami(ns: str) -> tuple[int, Any, Any]:
    assert _WORKER_REG is not None
    pid = os.getpid()
    return pid, _WORKER_REG.lookup(ns, f"init-{pid}"), _WORKER_REG.get_metadata(ns, f"init-{pid}")


def _run_pool(kind: str, method: str, tasks: int, fn: Any, args: tuple[Any, ...],
              initializer: Any = None, initargs: tuple[Any, ...] = (),
              check: Any = None) -> list[Any]:
    ctx = mp.get_context(method)
    if kind == "executor":
        with ProcessPoolExecutor(max_workers=3, mp_context=ctx, initializer=initializer,
                                 initargs=initargs) as ex:
            results = list(ex.map(fn, *[[a] * tasks for a in args]))
            check(results)  # while the workers still live
    else:
        with ctx.Pool(3, initializer=initializer, initargs=initargs) as pool:
            results = pool.starmap(fn, [args] * tasks)
            check(results)
    return results


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_pool_workers_register_with_registry_as_argument(registry: shmreg.Registry, kind: str,
                                                         method: str) -> None:
    ns, tag = "pool", f"{kind}-{method}"

    def check(results: list[tuple[int, Any, Any]]) -> None:
        pids = {pid for pid, _, _ in results}
        assert os.getpid() not in pids
        for pid, seen_pid, seen_meta in results:
            assert (seen_pid, seen_meta) == (pid, {"tag": tag, "pid": pid})
            assert registry.lookup(ns, f"worker-{pid}") == pid
        found = registry.find_by_metadata(ns, tag=tag)
        assert {pid for _, pid, _ in found} == pids
        assert all(meta == {"tag": tag, "pid": pid} for _, pid, meta in found)
        assert _listed(registry, ns) == {f"worker-{pid}" for pid in pids}

    results = _run_pool(kind, method, 12, _pool_register, (registry, ns, tag), check=check)
    # The pool is shut down and its workers reaped: their entries are invisible.
    assert all(registry.lookup(ns, f"worker-{pid}") is None for pid, _, _ in results)
    assert registry.count(ns) == 0


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_pool_initializer_attaches_and_registers(registry: shmreg.Registry, kind: str,
                                                 method: str) -> None:
    ns, tag = "init", f"{kind}-{method}"

    def check(results: list[tuple[int, Any, Any]]) -> None:
        pids = {pid for pid, _, _ in results}
        for pid, seen_pid, meta in results:
            assert seen_pid == pid
            assert meta == {"tag": tag, "pid": pid}
        # Every worker that started ran the initializer; those that ran tasks are among them.
        found = {pid for _, pid, _ in registry.find_by_metadata(ns, tag=tag)}
        assert pids <= found
        assert len(found) <= 3
        for pid in found:
            assert registry.lookup_with_metadata(ns, f"init-{pid}") == (pid, {"tag": tag,
                                                                             "pid": pid})

    _run_pool(kind, method, 9, _pool_whoami, (ns,), initializer=_pool_init,
              initargs=(registry, ns, tag), check=check)


# --------------------------------------------------------------------- the registration race


_RACE_CODE = r"""
name, ns, workdir, idx, rounds = sys.argv[1:6]
reg = shmreg.Registry.attach(name)
touch(f"{workdir}/ready-{idx}")
for r in range(int(rounds)):
    go = f"{workdir}/go-{r}"
    deadline = time.monotonic() + 60
    while not os.path.exists(go):  # spin: release everyone as close together as possible
        if time.monotonic() > deadline:
            sys.exit("no go")
        os.sched_yield()
    try:
        gen = reg.register(ns, f"leader-{r}", metadata={"idx": int(idx)})
        res = {"won": True, "gen": gen, "pid": os.getpid()}
    except shmreg.AlreadyRegistered as exc:
        res = {"won": False, "holder": exc.pid, "pid": os.getpid()}
    with open(f"{workdir}/res-{idx}-{r}.tmp", "w") as f:
        json.dump(res, f)
    os.replace(f"{workdir}/res-{idx}-{r}.tmp", f"{workdir}/res-{idx}-{r}")
wait_file(f"{workdir}/exit")
reg.close()
"""


def _check_race_round(reg: shmreg.Registry, ns: str, rnd: int, results: list[dict[str, Any]],
                      pids: set[int]) -> None:
    winners = [r for r in results if r["won"]]
    assert len(winners) == 1, f"round {rnd}: {len(winners)} winners: {results}"
    winner = winners[0]["pid"]
    assert {r["pid"] for r in results} == pids
    for r in results:
        if not r["won"]:
            assert r["holder"] == winner, f"round {rnd}: loser saw holder {r['holder']}"
    assert reg.lookup(ns, f"leader-{rnd}") == winner


def test_registration_race_independent_interpreters(registry: shmreg.Registry,
                                                    tmp_path: Path) -> None:
    import json

    ns, n, rounds = "race", 8, 6
    with children() as kids:
        # Even rounds race for a name whose holder has died: a takeover race.
        dead = kids.sleeper()
        held = {rnd: registry.register(ns, f"leader-{rnd}", pid=dead.pid)
                for rnd in range(0, rounds, 2)}
        dead.kill()
        dead.wait()
        procs = [kids.py(_RACE_CODE, registry.name, ns, str(tmp_path), str(i), str(rounds))
                 for i in range(n)]
        for i in range(n):
            wait_for_file(tmp_path / f"ready-{i}", procs=tuple(procs))
        pids = {p.pid for p in procs}
        for rnd in range(rounds):
            touch(tmp_path / f"go-{rnd}")
            results = []
            for i in range(n):
                wait_for_file(tmp_path / f"res-{i}-{rnd}", procs=tuple(procs))
                results.append(json.loads((tmp_path / f"res-{i}-{rnd}").read_text()))
            _check_race_round(registry, ns, rnd, results, pids)
            if rnd in held:
                [gen] = [r["gen"] for r in results if r["won"]]
                assert gen > held[rnd]
        touch(tmp_path / "exit")
        for p in procs:
            finish_ok(p)
        assert registry.count(ns) == 0  # every winner has exited


def _race_child(reg: shmreg.Registry, ns: str, barrier: Any, rounds: int, results: Any,
                done: Any) -> None:
    for rnd in range(rounds):
        barrier.wait(DEADLINE_S)
        try:
            gen = reg.register(ns, f"leader-{rnd}")
            results.put({"round": rnd, "won": True, "gen": gen, "pid": os.getpid()})
        except shmreg.AlreadyRegistered as exc:
            results.put({"round": rnd, "won": False, "holder": exc.pid, "pid": os.getpid()})
    done.wait(DEADLINE_S)
    reg.close()


@pytest.mark.parametrize("method", START_METHODS)
def test_registration_race_multiprocessing(registry: shmreg.Registry, method: str) -> None:
    ns, n, rounds = "race", 6, 4
    ctx = mp.get_context(method)
    barrier, results, done = ctx.Barrier(n), ctx.Queue(), ctx.Event()
    with children() as kids:
        procs = [kids.add(ctx.Process(target=_race_child,
                                      args=(registry, ns, barrier, rounds, results, done)))
                 for _ in range(n)]
        for p in procs:
            p.start()
        got = [results.get(timeout=DEADLINE_S) for _ in range(n * rounds)]
        pids = {p.pid for p in procs}
        for rnd in range(rounds):
            _check_race_round(registry, ns, rnd, [r for r in got if r["round"] == rnd], pids)
        done.set()
        for p in procs:
            p.join(DEADLINE_S)
            assert p.exitcode == 0
    results.close()
    results.join_thread()


_WRITER_CODE = r"""
name, ns, workdir, w, n = sys.argv[1:6]
w, n = int(w), int(n)
reg = shmreg.Registry.attach(name)
touch(f"{workdir}/ready-w{w}")
wait_file(f"{workdir}/go")
with open(f"{workdir}/ack-{w}", "w") as ack:
    for i in range(n):
        reg.register(ns, f"w{w}-{i}", metadata={"w": w, "i": i})
        ack.write(f"w{w}-{i}\n")
        ack.flush()
touch(f"{workdir}/done-w{w}")
wait_file(f"{workdir}/exit")
reg.close()
"""

_READER_CODE = r"""
import random
name, ns, workdir, writers = sys.argv[1:5]
writers = int(writers)
reg = shmreg.Registry.attach(name)
touch(f"{workdir}/ready-r")
wait_file(f"{workdir}/go")
pids = {}
for w in range(writers):
    wait_file(f"{workdir}/ready-w{w}")
    with open(f"{workdir}/ready-w{w}") as f:
        pids[w] = int(f.read())
known, partial, bad = [], [""] * writers, []
lookups, gens = 0, set()
files = [None] * writers

def check(key):
    global lookups
    w, i = (int(x) for x in key[1:].split("-"))
    try:
        if lookups % 2:
            got = reg.lookup_with_metadata(ns, key)
            ok = got == (pids[w], {"w": w, "i": i})
        else:
            got = reg.lookup(ns, key)
            ok = got == pids[w]
    except Exception as exc:
        got, ok = repr(exc), False
    lookups += 1
    if not ok:
        bad.append([key, repr(got)])

while True:
    finished = all(os.path.exists(f"{workdir}/done-w{w}") for w in range(writers))
    for w in range(writers):
        if files[w] is None:
            if not os.path.exists(f"{workdir}/ack-{w}"):
                continue
            files[w] = open(f"{workdir}/ack-{w}")
        text = partial[w] + files[w].read()
        lines = text.split("\n")
        partial[w] = lines.pop()  # an incomplete last line is not acknowledged yet
        known.extend(lines)
        for key in lines[-3:]:
            check(key)
    for _ in range(20):
        if known:
            check(random.choice(known))
    gens.add(reg.backend.store.gen)
    if finished:
        break
for key in known:
    check(key)
report({"lookups": lookups, "bad": bad[:20], "nbad": len(bad), "known": len(known),
        "generations": sorted(gens)})
wait_file(f"{workdir}/exit")
reg.close()
"""


def test_concurrent_distinct_registrations_across_growth(reg_name: str, tmp_path: Path) -> None:
    """4 writers x 750 names into a capacity-64 table while a reader checks acked names.

    The reader must have looked while the table grew (seen more than one generation): a
    starved reader that only ran after the writers proves nothing, so the run is repeated.
    """
    runs = iter(range(3))

    def attempt() -> int:
        run = next(runs)
        (tmp_path / f"run{run}").mkdir()
        return int(_growth_run(f"{reg_name}-{run}", tmp_path / f"run{run}") > 1)

    reach_minimum("runs whose reader saw the table grow", 1, attempt, max_attempts=3)


def _growth_run(reg_name: str, tmp_path: Path) -> int:
    """One run; returns how many table generations the reader saw."""
    ns, writers, per_writer = "bulk", 4, 750
    reg = shmreg.Registry.create(reg_name, capacity=64)
    with destroying(reg_name), children() as kids:
        procs = [kids.py(_WRITER_CODE, reg_name, ns, str(tmp_path), str(w), str(per_writer))
                 for w in range(writers)]
        reader = kids.py(_READER_CODE, reg_name, ns, str(tmp_path), str(writers))
        everyone = (*procs, reader)
        for w in range(writers):
            wait_for_file(tmp_path / f"ready-w{w}", procs=everyone)
        wait_for_file(tmp_path / "ready-r", procs=everyone)
        touch(tmp_path / "go")
        for w in range(writers):
            wait_for_file(tmp_path / f"done-w{w}", procs=everyone)
        summary = read_line(reader)
        expected = {f"w{w}-{i}" for w in range(writers) for i in range(per_writer)}
        # No lost registrations: count, listing and per-writer queries all agree.
        assert reg.count(ns) == len(expected)
        assert reg.count() == len(expected)
        assert _listed(reg, ns) == expected
        for w, proc in enumerate(procs):
            found = reg.find_by_metadata(ns, w=w)
            assert len(found) == per_writer
            assert {pid for _, pid, _ in found} == {proc.pid}
        assert reg.stats().extra["generation"] > 1
        assert reg.stats().used == len(expected)
        # The reader never missed an acknowledged entry nor hit an error, across the flips.
        assert summary["nbad"] == 0, summary["bad"]
        assert summary["known"] == len(expected)
        assert summary["lookups"] >= len(expected)
        touch(tmp_path / "exit")
        for proc in everyone:
            finish_ok(proc)
        reg.close()
    print(f"growth: the reader saw table generations {summary['generations']}")
    return len(summary["generations"])


_MERGER_CODE = r"""
name, ns, workdir, idx, m = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
reg = shmreg.Registry.attach(name)
touch(f"{workdir}/ready-{idx}")
wait_file(f"{workdir}/go")
for j in range(m):
    reg.update_metadata(ns, "shared", {f"p{idx}-{j}": j}, merge=True)
reg.close()
"""


def test_concurrent_merges_lose_no_update(registry: shmreg.Registry, tmp_path: Path) -> None:
    """update_metadata(merge=True) from several processes at once: every field lands."""
    ns, n, m = "merge", 4, 50
    registry.register(ns, "shared", metadata={"base": True})
    with children() as kids:
        procs = [kids.py(_MERGER_CODE, registry.name, ns, str(tmp_path), str(i), str(m))
                 for i in range(n)]
        for i in range(n):
            wait_for_file(tmp_path / f"ready-{i}", procs=tuple(procs))
        touch(tmp_path / "go")
        for p in procs:
            finish_ok(p)
    expected = {"base": True, **{f"p{i}-{j}": j for i in range(n) for j in range(m)}}
    assert registry.get_metadata(ns, "shared") == expected
    assert registry.lookup(ns, "shared") == os.getpid()


# ------------------------------------------------------------------ takeover after SIGKILL

_HOLDER_CODE = r"""
name, ns = sys.argv[1:3]
reg = shmreg.Registry.attach(name)
gen = reg.register(ns, "svc", metadata={"holder": True})
report({"pid": os.getpid(), "gen": gen})
sys.stdin.readline()
"""


def _holder_fork_child(conn: Any, reg: shmreg.Registry, ns: str) -> None:
    gen = reg.register(ns, "svc", metadata={"holder": True})
    conn.send({"pid": os.getpid(), "gen": gen})
    time.sleep(1e9)  # until the test kills it


@pytest.mark.parametrize("how", ["independent", "fork"])
@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_takeover_after_sigkill(registry: shmreg.Registry, how: str, reaped: bool) -> None:
    ns = "takeover"
    with children() as kids:
        if how == "independent":
            proc: Any = kids.py(_HOLDER_CODE, registry.name, ns, stdin=subprocess.PIPE)
            hello = read_line(proc)
        else:
            ctx = mp.get_context("fork")
            conn, child_conn = ctx.Pipe()
            proc = kids.add(ctx.Process(target=_holder_fork_child,
                                        args=(child_conn, registry, ns)))
            proc.start()
            assert conn.poll(DEADLINE_S)
            hello = conn.recv()
        pid, first = hello["pid"], hello["gen"]
        assert registry.lookup(ns, "svc") == pid
        with pytest.raises(shmreg.AlreadyRegistered) as info:
            registry.register(ns, "svc")
        assert info.value.pid == pid

        os.kill(pid, signal.SIGKILL)
        if reaped:
            if how == "independent":
                proc.wait(DEADLINE_S)
            else:
                proc.join(DEADLINE_S)
            code = proc.exitcode if how == "fork" else proc.returncode
            assert code == -signal.SIGKILL
            assert registry.lookup(ns, "svc") is None
            assert registry.lookup_with_metadata(ns, "svc") is None
            assert not registry.registered(ns, "svc")
            assert registry.count(ns) == 0
        else:
            wait_zombie(pid)  # killed, not reaped: still holds its pid, yet it is dead

        second = registry.register(ns, "svc", metadata={"holder": False})
        assert second > first
        assert registry.lookup_with_metadata(ns, "svc") == (os.getpid(), {"holder": False})
        assert registry.generation(ns, "svc") == second
        # A second registration by the same live owner keeps the generation.
        assert registry.register(ns, "svc", metadata={"again": 1}) == second


# --------------------------------------------------------- a writer SIGKILLed mid-stream

_LOOP_WRITER_CODE = r"""
name, ns, helper, prefix, ackpath = sys.argv[1:6]
helper = int(helper)
reg = shmreg.Registry.attach(name)
with open(ackpath, "w") as ack:
    i = 0
    while True:
        key = f"{prefix}k{i}"
        reg.register(ns, key, pid=helper, metadata={"i": i})
        if i % 3 == 0:
            reg.update_metadata(ns, key, {"i": i, "tmp": True})
            reg.update_metadata(ns, key, {"i": i})
        if i % 5 == 0:
            reg.register(ns, f"{prefix}s{i}", pid=helper, metadata={"scratch": i})
            reg.unregister(ns, f"{prefix}s{i}")
        ack.write(key + "\n")
        ack.flush()
        i += 1
"""

_VERIFY_CODE = r"""
name, ns, helper, tag = sys.argv[1:5]
reg = shmreg.Registry.attach(name)
reg.register(ns, tag, pid=int(helper), metadata={"verifier": True})
listed = {k: m for k, m in reg.list_services_with_metadata(ns).items()}
lookups = {k: reg.lookup_with_metadata(ns, k) for k in listed}
report({"listed": listed, "count": reg.count(ns), "services": len(reg.list_services(ns)),
        "lookups_ok": all(v is not None and v[1] == listed[k] for k, v in lookups.items()),
        "recoveries": reg.stats().extra["recoveries"],
        "notes": reg.backend.store.last_recovery,
        "generation": reg.stats().extra["generation"]})
reg.close()
"""


def _acked(path: Path) -> list[str]:
    if not path.exists():
        return []
    text = path.read_text()
    return text.split("\n")[:-1]  # the part after the last newline was not acknowledged


def _wait_acks(path: Path, proc: subprocess.Popen[str], want: int) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while len(_acked(path)) < want:
        if proc.poll() is not None:
            raise AssertionError(f"writer exited {proc.returncode}: {proc.stderr.read()}")  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            raise AssertionError("writer made no progress")
        time.sleep(0.001)


def _kill_loop(reg_name: str, tmp_path: Path, iterations: int, seed: int) -> None:
    rng = random.Random(seed)
    ns = "crash"
    reg = shmreg.Registry.create(reg_name, capacity=64)
    acked: dict[str, int] = {}  # name -> i, everything acknowledged so far
    inflight: set[str] = set()  # per round: the one name that may have landed unacknowledged
    scratch_prefixes: list[str] = []
    recoveries = 0
    notes: list[str] = []
    with destroying(reg_name), children() as kids:
        helper = kids.sleeper()
        for it in range(iterations):
            prefix = f"r{it}-"
            ack = tmp_path / f"ack-{it}"
            writer = kids.py(_LOOP_WRITER_CODE, reg_name, ns, str(helper.pid), prefix, str(ack))
            _wait_acks(ack, writer, rng.randint(1, 300))
            time.sleep(rng.random() * 0.004)  # not a timing assert: a random kill point
            os.kill(writer.pid, signal.SIGKILL)
            writer.communicate(timeout=DEADLINE_S)
            assert writer.returncode == -signal.SIGKILL
            done = _acked(ack)
            for name in done:
                acked[name] = int(name.rsplit("k", 1)[1])
            inflight.add(f"{prefix}k{len(done)}")
            scratch_prefixes.append(f"{prefix}s")

            verifier = kids.py(_VERIFY_CODE, reg_name, ns, str(helper.pid), f"verifier-{it}")
            [result] = finish_ok(verifier)
            listed: dict[str, Any] = result["listed"]
            for name, i in acked.items():
                assert listed.get(name) == {"i": i}, f"iteration {it}: acked {name} -> " \
                                                     f"{listed.get(name)!r}"
            for name, meta in listed.items():
                if name in acked or name.startswith("verifier-"):
                    continue
                if any(name.startswith(p) for p in scratch_prefixes):
                    assert meta == {"scratch": int(name.rsplit("s", 1)[1])}
                    continue
                assert name in inflight, f"iteration {it}: unexpected entry {name}"
                i = int(name.rsplit("k", 1)[1])
                assert meta in ({"i": i}, {"i": i, "tmp": True})
            assert result["count"] == len(listed) == result["services"]
            assert result["lookups_ok"]
            recoveries = result["recoveries"]
            notes.extend(result["notes"])
        # One last look from this process: same picture, nothing to sweep (owner alive).
        assert reg.count(ns) == len(reg.list_services(ns))
        assert all(reg.get_metadata(ns, name) == {"i": i} for name, i in acked.items())
        assert reg.sweep() == 0
        reg.close()
    print(f"{iterations} kills, {len(acked)} acknowledged entries, {recoveries} recoveries:",
          sorted(set(n.split(" slot")[0] for n in notes)))


def test_writer_sigkilled_in_a_loop(reg_name: str, tmp_path: Path) -> None:
    _kill_loop(reg_name, tmp_path, iterations=20, seed=test_seed("kill loop"))


@pytest.mark.slow
def test_writer_sigkilled_in_a_loop_long(reg_name: str, tmp_path: Path) -> None:
    _kill_loop(reg_name, tmp_path, iterations=80, seed=test_seed("kill loop"))


# ------------------------------------------------------------- the writer lock across fork


def _fork_writer(conn: Any, reg: shmreg.Registry, ns: str) -> None:
    conn.send(("started", os.getpid()))
    conn.send(("registered", reg.register(ns, "from-fork")))
    reg.close()


def test_forked_child_does_not_inherit_the_writer_lock(registry: shmreg.Registry) -> None:
    """A child forked while the parent holds the writer lock must wait for it (flock is per
    open file description: an inherited fd would let the child in, and its unlock would
    release the parent's lock)."""
    ns = "forklock"
    ctx = mp.get_context("fork")
    conn, child_conn = ctx.Pipe()
    store = registry.backend.store  # type: ignore[attr-defined]
    with children() as kids:
        store.begin()
        try:
            proc = kids.add(ctx.Process(target=_fork_writer, args=(child_conn, registry, ns)))
            proc.start()
            assert conn.poll(DEADLINE_S) and conn.recv()[0] == "started"
            # The child must be stuck on the lock while we hold it. (A pass is never
            # flaky: a wrongly shared lock lets the child finish well within this wait.)
            assert not conn.poll(0.5), "the forked child wrote while the parent held the lock"
            assert registry.lookup(ns, "from-fork") is None
        finally:
            store.end()
        assert conn.poll(DEADLINE_S)
        kind, gen = conn.recv()
        assert kind == "registered" and gen > 0
        proc.join(DEADLINE_S)
        assert proc.exitcode == 0
        # The parent's own lock still works after the child released its copy.
        assert registry.register(ns, "parent-after") > 0
        assert registry.count(ns) == 1  # the child has exited; its entry is dead


# ------------------------------------------------------------------------------- threads


def _thread_workout(regs: list[shmreg.Registry], writers: int, readers: int, per_writer: int,
                    ns: str = "thr") -> list[str]:
    """Writer threads register distinct names and read back acknowledged ones; reader threads
    look up acknowledged names until the writers are done. Thread ``t`` uses
    ``regs[t % len(regs)]``. Returns every error seen (a miss, a wrong value, an exception).
    """
    errors: list[str] = []
    acked: list[tuple[str, int]] = []
    start = threading.Barrier(writers + readers)
    writing = threading.Event()
    writing.set()
    me = os.getpid()

    def check(reg: shmreg.Registry, rng: random.Random) -> None:
        if not acked:
            return
        name, j = acked[rng.randrange(len(acked))]
        got = reg.lookup_with_metadata(ns, name)
        if got is None or got[0] != me or got[1]["i"] != j:
            errors.append(f"{name}: {got!r}")
        if reg.lookup(ns, name) != me:
            errors.append(f"{name}: lookup missed")

    def write(t: int) -> None:
        reg = regs[t % len(regs)]
        rng = random.Random(t)
        try:
            start.wait(DEADLINE_S)
            for i in range(per_writer):
                key = f"t{t}-{i}"
                reg.register(ns, key, metadata={"t": t, "i": i})
                acked.append((key, i))
                check(reg, rng)
        except Exception as exc:
            errors.append(f"writer {t}: {exc!r}")

    def read(t: int) -> None:
        reg = regs[t % len(regs)]
        rng = random.Random(t)
        try:
            start.wait(DEADLINE_S)
            while writing.is_set():
                check(reg, rng)
        except Exception as exc:
            errors.append(f"reader {t}: {exc!r}")

    wthreads = [threading.Thread(target=write, args=(t,)) for t in range(writers)]
    rthreads = [threading.Thread(target=read, args=(t,))
                for t in range(writers, writers + readers)]
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the threads as finely as the GIL allows
    try:
        for th in wthreads + rthreads:
            th.start()
        for th in wthreads:
            th.join(DEADLINE_S)
    finally:
        writing.clear()
        for th in rthreads:
            th.join(DEADLINE_S)
        sys.setswitchinterval(old)
    assert not any(th.is_alive() for th in wthreads + rthreads)
    return errors


@pytest.mark.parametrize("objects", [1, 2], ids=["one-object", "two-objects"])
def test_threads_share_registry_objects(reg_name: str, objects: int) -> None:
    threads, per_thread = 4, 400
    regs = [shmreg.Registry.create(reg_name, capacity=10_000) for _ in range(objects)]
    with destroying(reg_name):
        errors = _thread_workout(regs, threads, 2, per_thread)
        assert errors == []
        expected = {f"t{t}-{i}" for t in range(threads) for i in range(per_thread)}
        for reg in regs:
            assert reg.count("thr") == len(expected)
            assert _listed(reg, "thr") == expected
        for reg in regs:
            reg.close()


def test_threads_with_own_objects_across_growth(reg_name: str) -> None:
    """One Registry object per thread, all on one small table that grows while they work."""
    threads, per_thread = 4, 400
    regs = [shmreg.Registry.create(reg_name, capacity=16) for _ in range(threads + 2)]
    with destroying(reg_name):
        errors = _thread_workout(regs, threads, 2, per_thread)
        assert errors == []
        expected = {f"t{t}-{i}" for t in range(threads) for i in range(per_thread)}
        assert regs[0].count("thr") == len(expected)
        assert _listed(regs[-1], "thr") == expected
        assert regs[0].stats().extra["generation"] > 1
        for reg in regs:
            reg.close()


_SHARED_OBJECT_CODE = r"""
from test_multiprocess import _thread_workout
name, per_writer = sys.argv[1], int(sys.argv[2])
reg = shmreg.Registry.attach(name)
errors = _thread_workout([reg], 1, 3, per_writer)
listed = set(reg.list_services("thr"))
report({"errors": errors[:10], "nerrors": len(errors),
        "complete": listed == {f"t0-{i}" for i in range(per_writer)}})
"""


def test_threads_share_one_object_across_growth(reg_name: str) -> None:
    """One writer thread grows the table while three reader threads use the same object.

    Run in a child interpreter, so that a failure there (half-released mappings whose
    finalizers print) stays out of this session.
    """
    per_writer = 2000
    shmreg.Registry.create(reg_name, capacity=16).close()
    with destroying(reg_name), children() as kids:
        proc = kids.py(_SHARED_OBJECT_CODE, reg_name, str(per_writer))
        out, err = finish(proc)
        assert proc.returncode == 0, err
        [result] = json_lines(out)
        assert result["nerrors"] == 0, result["errors"]
        assert result["complete"]


_CONCURRENT_REFRESH_CODE = r"""
import gc, threading
from shmreg._engine import store as _store
name, ns = sys.argv[1:3]

def fds():
    return len(os.listdir("/proc/self/fd"))

base = fds()
reg = shmreg.Registry.attach(name)
reg.lookup(ns, "g0")
with shmreg.Registry.attach(name) as other:  # grows the table: reg's mapping goes stale
    for i in range(200):
        other.register(ns, f"g{i}")
    grown = other.stats().extra["generation"] > 1
original = _store.Store._attach_data

barrier = threading.Barrier(2)
def attach(self):
    try:
        barrier.wait(1.0)  # both threads inside refresh() at the same moment
    except threading.BrokenBarrierError:
        pass  # refresh is serialised: the other thread never got here
    return original(self)

_store.Store._attach_data = attach
found = []
threads = [threading.Thread(target=lambda: found.append(reg.lookup(ns, "g1")))
           for _ in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
_store.Store._attach_data = original
reg.close()
del reg, threads
gc.collect()
report({"found": found, "leaked_fds": fds() - base, "grown": grown})
"""


def test_threads_refreshing_one_object_at_once(reg_name: str) -> None:
    """Deterministic form of a rare interleaving: two threads of one handle follow the same
    growth at the same moment (forced with a barrier inside the attach step)."""
    shmreg.Registry.create(reg_name, capacity=16).close()
    with destroying(reg_name), children() as kids:
        proc = kids.py(_CONCURRENT_REFRESH_CODE, reg_name, "thr")
        out, err = finish(proc)
        assert proc.returncode == 0, err
        [result] = json_lines(out)
    assert result["grown"]
    assert result["found"] == [proc.pid, proc.pid]  # g1 was registered by the child
    assert result["leaked_fds"] == 0, result
    assert err == "", err


_UPDATER = r"""
import threading
reg = shmreg.Registry.attach(sys.argv[1])
reg.register("ns", "x", metadata={"type": "worker", "capabilities": ["gpu"], "n": 0})
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
report({"ready": True})
n = 0
while not stop.is_set():
    n += 1
    reg.update_metadata("ns", "x", {"type": "worker", "capabilities": ["gpu"], "n": n})
reg.close()
report({"updates": n})
"""


def test_scans_never_miss_an_entry_whose_metadata_is_being_rewritten(
    registry: shmreg.Registry,
) -> None:
    # A writer zero-fills a slot's words while its sequence is odd: a scan that filtered on
    # those words before checking the sequence skipped the entry as if it were not there.
    for i in range(50):
        registry.register("ns", f"other-{i}", metadata={"type": "worker"})
    child = run_py(_UPDATER, registry.name, stdin=subprocess.PIPE)
    try:
        assert read_line(child)["ready"]
        missed: list[str] = []
        for _ in range(1500):  # ~0.5 % of these missed before the scans checked sequences
            if not any(e.service == "x" for e in registry.backend.list_entries("ns")):
                missed.append("list_entries")
            if registry.count("ns") != 51:
                missed.append("count(ns)")
            if registry.count() != 51:
                missed.append("count()")
            found = registry.find_by_metadata("ns", type="worker", capabilities="gpu")
            if not any(e.service == "x" for e in found):
                missed.append("find")
        assert child.stdin is not None
        child.stdin.close()
        assert read_line(child)["updates"] > 0  # the writer really wrote throughout
        assert missed == []
    finally:
        child.kill()
        child.wait(timeout=DEADLINE_S)
        for pipe in (child.stdin, child.stdout, child.stderr):
            if pipe is not None:
                pipe.close()

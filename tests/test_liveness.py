"""Proof of death against real processes: reused pids, zombies, unknown owners, sweeps.

What is proven here, each with real processes unless stated:

- a stored identity whose pid now belongs to another process is dead (``reused``): with a
  forged identity (live pid, other start ticks), and, as root, with a real pid wrap inside a
  private pid namespace (``ns_last_pid``);
- an unreaped child is dead (``zombie``), a reaped one ``gone``; every read path hides a gone
  owner, and ``sweep()`` removes each provably dead entry once, with one ``died`` event;
- an owner whose ``/proc`` entry cannot be read is kept and counted as unknown;
- the generation is a fencing token (``StaleGeneration``), ``register_self`` unregisters on
  exit but never the next owner's entry, ``cleanup_namespace`` terminates the live owners and
  never signals the caller;
- three processes sweeping the same 200 dead entries at once remove (and report) each once.

Every child is SIGKILLed and reaped on the way out (``helpers.children``); every registry is
destroyed. Nothing here asserts a timing; waits are bounded by generous deadlines.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import DEADLINE_S, child_env, children, read_line, touch, wait_for_file, wait_zombie

import shmreg
from shmreg import _identity
from shmreg._engine.events import Event
from shmreg._identity import UNREADABLE, identity_of, self_identity
from shmreg._liveness import signal_identity
from shmreg._types import HealthStatus, Liveness, ProcessIdentity
from shmreg.testing import FakeClock

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")

#: Upper bound for anything these tests wait on; reached only when something is broken.
DEADLINE = DEADLINE_S

#: A child that attaches, registers itself under each service named, reports, and sleeps.
REGISTRANT = r"""
name, ns = sys.argv[1], sys.argv[2]
reg = shmreg.Registry.attach(name)
gens = {s: reg.register(ns, s, metadata={"by": os.getpid()}) for s in sys.argv[3:]}
me = shmreg._identity.self_identity()
report({"pid": os.getpid(), "start": me.start_ticks, "gens": gens})
time.sleep(1e9)  # until the test kills it
"""


def drain(reg: shmreg.Registry, since: int) -> list[Event]:
    """Every event after ``since`` that is in the ring now (``timeout=0``: never waits)."""
    return list(reg.watch(since=since, timeout=0))


def died(events: list[Event]) -> list[Event]:
    return [e for e in events if e.kind == "died"]


def used_keys(reg: shmreg.Registry) -> set[tuple[str, Any]]:
    """(namespace, service) of every used slot, dead owners included."""
    return {(row["namespace"], row["service"]) for row in reg.backend.dump()}  # type: ignore[attr-defined]


def sleeper(kids: Any) -> tuple[subprocess.Popen[bytes], ProcessIdentity]:
    proc = kids.sleeper()
    return proc, identity_of(proc.pid)


def kill_and_reap(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def registrant(kids: Any, name: str, ns: str, *services: str) -> tuple[subprocess.Popen[str], Any]:
    proc = kids.py(REGISTRANT, name, ns, *services)
    return proc, read_line(proc)


@functools.lru_cache(maxsize=1)
def private_pid_namespaces() -> str | None:
    """None if ``unshare --pid --fork --mount-proc`` works here, else why it does not."""
    if os.geteuid() != 0:
        return "needs root (unshare --pid and ns_last_pid)"
    if shutil.which("unshare") is None:
        return "no unshare(1) on PATH"
    try:
        done = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", "true"],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if done.returncode != 0:
        return f"unshare --pid refused: {done.stderr.strip()}"
    return None


def run_in_private_pid_namespace(script: str, *args: str) -> dict[str, Any]:
    """Run ``script`` as pid 1 of a new pid namespace (with its own /proc); its JSON line."""
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE * 2,
        env=child_env(),
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"namespace script failed ({done.returncode}):\n{done.stderr}"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines, f"namespace script printed nothing:\n{done.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def destroy_by_name(name: str) -> None:
    from shmreg._engine.store import destroy_by_name as destroy

    destroy(name)


# ---------------------------------------------------------------------- pid reuse


def test_forged_reused_identity_is_removed_with_reason_reused(registry: shmreg.Registry) -> None:
    with children() as kids:
        proc, real = sleeper(kids)
        forged = ProcessIdentity(real.pid, real.start_ticks + 1)
        assert _identity.check(forged) is Liveness.REUSED
        registry.backend.register("ns", "old-owner", forged, {"v": 1})
        registry.register("ns", "real-owner", pid=proc.pid)
        seq = registry.backend.last_event_seq()  # type: ignore[attr-defined]
        # The per-read probe only knows "the pid is taken": it may show the entry until a
        # sweep proves otherwise. The sweep does, and removes only the stranger's entry.
        assert registry.sweep() == 1
        assert registry.lookup("ns", "old-owner") is None
        assert registry.lookup("ns", "real-owner") == proc.pid
        assert used_keys(registry) == {("ns", "real-owner")}
        events = drain(registry, seq)
        assert [(e.kind, e.service, e.pid, e.reason) for e in events] == [
            ("died", "old-owner", real.pid, "reused")
        ]
        assert events[0].start_ticks == forged.start_ticks
        assert registry.sweep() == 0  # once proven and removed, never reported again


def test_name_held_by_a_reused_pid_is_taken_over(registry: shmreg.Registry) -> None:
    with children() as kids:
        proc, real = sleeper(kids)
        old_gen = registry.backend.register(
            "ns", "svc", ProcessIdentity(real.pid, real.start_ticks + 7), None
        )
        seq = registry.backend.last_event_seq()  # type: ignore[attr-defined]
        # The pid's current holder is another process: it may take the name.
        new_gen = registry.register("ns", "svc", pid=proc.pid, metadata={"new": True})
        assert new_gen > old_gen
        assert registry.lookup_with_metadata("ns", "svc") == (proc.pid, {"new": True})
        assert [(e.kind, e.reason, e.generation) for e in drain(registry, seq)] == [
            ("registered", "takeover", new_gen)
        ]
        with pytest.raises(shmreg.StaleGeneration):
            registry.unregister("ns", "svc", generation=old_gen)


#: Runs as pid 1 of a private pid namespace: a registered child dies, its pid is handed to
#: a new process (``ns_last_pid``), and the old entry must read as reused, not as the newcomer.
PID_WRAP = r"""
import json, os, subprocess, sys
import shmreg
from shmreg import _identity

REGISTER = '''
import json, os, sys, time
import shmreg
reg = shmreg.Registry.attach(sys.argv[1])
gens = [reg.register("ns", "svc"), reg.register("ns", "svc2")]
start = shmreg._identity.self_identity().start_ticks
print(json.dumps({"pid": os.getpid(), "start": start, "gens": gens}), flush=True)
time.sleep(1e9)  # until the test kills it
'''

name = sys.argv[1]
out = {"ns_pid": os.getpid()}
procs = []
reg = shmreg.Registry.create(name)
try:
    child = subprocess.Popen([sys.executable, "-c", REGISTER, name], stdout=subprocess.PIPE,
                             text=True)
    procs.append(child)
    old = json.loads(child.stdout.readline())
    out["old"] = old
    child.kill()
    child.wait()
    try:
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(old["pid"] - 1))
    except OSError as exc:
        out["skip"] = f"cannot write /proc/sys/kernel/ns_last_pid: {exc}"
    else:
        new = subprocess.Popen(["sleep", "infinity"])
        procs.append(new)
        out["new_pid"] = new.pid
        if new.pid != old["pid"]:
            out["skip"] = f"the new process got pid {new.pid}, not {old['pid']}"
        else:
            seq = reg.backend.last_event_seq()
            old_ident = shmreg.ProcessIdentity(old["pid"], old["start"])
            out["verdict"] = _identity.check(old_ident).value
            out["new_start"] = _identity.identity_of(new.pid).start_ticks
            out["probe_lookup"] = reg.lookup("ns", "svc")
            out["takeover_gen"] = reg.register("ns", "svc2", pid=new.pid)
            out["removed"] = reg.sweep()
            out["lookup_after"] = reg.lookup("ns", "svc")
            out["svc2_after"] = reg.lookup("ns", "svc2")
            out["events"] = [[e.kind, e.service, e.pid, e.reason, e.generation]
                             for e in reg.watch(since=seq, timeout=0)]
finally:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    reg.destroy()
print(json.dumps(out))
"""


def test_real_pid_wrap_in_a_private_pid_namespace(reg_name: str) -> None:
    why_not = private_pid_namespaces()
    if why_not:
        pytest.skip(why_not)
    try:
        out = run_in_private_pid_namespace(PID_WRAP, reg_name)
    finally:
        destroy_by_name(reg_name)
    if "skip" in out:
        pytest.skip(out["skip"])
    old = out["old"]
    assert out["ns_pid"] == 1
    assert out["new_pid"] == old["pid"]  # a real wrap: same pid, another process
    assert out["new_start"] != old["start"]
    assert out["verdict"] == "reused"
    # The newcomer is not the old owner: it can take the old owner's other name at once...
    assert out["takeover_gen"] > max(old["gens"])
    assert out["svc2_after"] == old["pid"]
    # ...and the sweep removes the old owner's remaining entry as reused.
    assert out["removed"] == 1
    assert out["lookup_after"] is None
    assert out["events"] == [
        ["registered", "svc2", old["pid"], "takeover", out["takeover_gen"]],
        ["died", "svc", old["pid"], "reused", old["gens"][0]],
    ]


# ---------------------------------------------------------------------- zombies, gone


def test_unreaped_child_is_removed_with_reason_zombie(
    registry: shmreg.Registry, reg_name: str
) -> None:
    with children() as kids:
        proc, info = registrant(kids, reg_name, "ns", "a", "b")
        proc.kill()  # and not reaped: Popen waits only when asked
        wait_zombie(proc.pid)
        assert _identity.check(ProcessIdentity(info["pid"], info["start"])) is Liveness.ZOMBIE
        seq = registry.backend.last_event_seq()  # type: ignore[attr-defined]
        assert registry.sweep() == 2
        assert used_keys(registry) == set()
        assert registry.lookup("ns", "a") is None
        events = drain(registry, seq)
        assert sorted((e.kind, e.service, e.pid, e.reason) for e in events) == [
            ("died", "a", proc.pid, "zombie"),
            ("died", "b", proc.pid, "zombie"),
        ]
        assert {e.generation for e in events} == set(info["gens"].values())
        assert proc_is_zombie(proc.pid)  # the sweep judged it; reaping is the parent's job


def proc_is_zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return chr(data[data.rfind(b")") + 2]) == "Z"


def test_reaped_child_is_removed_with_reason_gone(registry: shmreg.Registry, reg_name: str) -> None:
    with children() as kids:
        proc, _ = registrant(kids, reg_name, "ns", "a")
        kill_and_reap(proc)
        seq = registry.backend.last_event_seq()  # type: ignore[attr-defined]
        assert ("ns", "a") in used_keys(registry)  # nothing removed it yet
        assert registry.sweep() == 1
        assert [(e.kind, e.reason) for e in drain(registry, seq)] == [("died", "gone")]


def test_every_read_path_hides_an_owner_known_dead(
    registry: shmreg.Registry, reg_name: str
) -> None:
    md = {"type": "worker", "capabilities": ["x"], "k": 1}
    with children() as kids:
        proc = kids.sleeper()
        registry.register("ns", "dead", pid=proc.pid, metadata=md)
        registry.register("ns", "alive", metadata=md)
        kill_and_reap(proc)  # no sweep, no monitor: only the per-read probe knows
        assert registry.lookup("ns", "dead") is None
        assert registry.lookup_with_metadata("ns", "dead") is None
        assert not registry.registered("ns", "dead")
        assert registry.generation("ns", "dead") is None
        with pytest.raises(shmreg.NotRegistered):
            registry.get_metadata("ns", "dead")
        with pytest.raises(shmreg.NotRegistered):
            registry.get_metadata_field("ns", "dead", "k")
        with pytest.raises(shmreg.NotRegistered):
            registry.update_metadata("ns", "dead", {"k": 2})
        assert registry.list_services("ns") == ["alive"]
        assert list(registry.list_services_with_metadata("ns")) == ["alive"]
        assert [s for s, _, _ in registry.find_by_metadata("ns", k=1)] == ["alive"]
        assert [s for s, _, _ in registry.find_by_metadata("ns", capabilities="x")] == ["alive"]
        assert [s for s, _, _ in registry.find_services_by_metadata("ns", bool)] == ["alive"]
        assert [s for s, _, _ in registry.list_by_type("ns", "worker")] == ["alive"]
        assert registry.count("ns") == 1
        assert registry.count() == 1
        with pytest.raises(shmreg.RegistryTimeout):
            registry.wait_for("ns", "dead", timeout=0)
        assert registry.unregister("ns", "dead") is False  # it was not "there" for any read


def test_after_a_sweep_no_read_returns_a_zombie_or_reused_owner(
    registry: shmreg.Registry, reg_name: str
) -> None:
    with children() as kids:
        zombie, _ = registrant(kids, reg_name, "ns", "zombie")
        _live, real = sleeper(kids)
        registry.backend.register(
            "ns", "reused", ProcessIdentity(real.pid, real.start_ticks - 1), {"type": "t"}
        )
        zombie.kill()
        wait_zombie(zombie.pid)
        registry.sweep()
        for service in ("zombie", "reused"):
            assert registry.lookup("ns", service) is None
            assert registry.lookup_with_metadata("ns", service) is None
        assert registry.list_services("ns") == []
        assert registry.list_by_type("ns", "t") == []
        assert registry.count() == 0


# ---------------------------------------------------------------------- sweep


def test_sweep_removes_every_provably_dead_entry_and_keeps_the_live(
    registry: shmreg.Registry, reg_name: str
) -> None:
    with children() as kids:
        gone, _ = registrant(kids, reg_name, "ns", "g1", "g2", "g3")
        zombie, _ = registrant(kids, reg_name, "other", "z1", "z2")
        live, real = sleeper(kids)
        registry.register("ns", "live1", pid=live.pid)
        registry.register("other", "live2")
        for i in range(2):
            registry.backend.register(
                "ns", f"r{i}", ProcessIdentity(real.pid, real.start_ticks + 1), None
            )
        kill_and_reap(gone)
        zombie.kill()
        wait_zombie(zombie.pid)
        before = registry.stats()
        seq = registry.backend.last_event_seq()  # type: ignore[attr-defined]
        assert registry.sweep() == 7
        assert used_keys(registry) == {("ns", "live1"), ("other", "live2")}
        reasons = collections.Counter((e.kind, e.reason) for e in drain(registry, seq))
        assert reasons == {("died", "gone"): 3, ("died", "zombie"): 2, ("died", "reused"): 2}
        after = registry.stats()
        assert after.sweeps == before.sweeps + 1
        assert after.dead_found == before.dead_found + 7
        assert after.last_sweep_time is not None
        assert registry.sweep() == 0
        assert registry.health_check().status is HealthStatus.HEALTHY


def test_sweep_reads_each_distinct_pid_once(
    registry: shmreg.Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    me = self_identity()
    with children() as kids:
        _, other = sleeper(kids)
        for i in range(5):
            registry.register("ns", f"me{i}")
            registry.register("ns", f"other{i}", pid=other.pid)
            # Two more identities on our pid (as after reuse): still one /proc read for it.
            for k in (1, 2):
                registry.backend.register(
                    "ns", f"forged{k}-{i}", ProcessIdentity(me.pid, me.start_ticks + k), None
                )
        reads: collections.Counter[int] = collections.Counter()
        real_read = _identity._read_stat

        def counting(pid: int) -> tuple[str, int] | None:
            reads[pid] += 1
            return real_read(pid)

        monkeypatch.setattr(_identity, "_read_stat", counting)
        assert registry.sweep() == 10
        assert reads == {me.pid: 1, other.pid: 1}


#: Sweeps once when the start file appears; reports how many it removed.
SWEEPER = r"""
name, ready, go = sys.argv[1], sys.argv[2], sys.argv[3]
reg = shmreg.Registry.attach(name)
touch(ready)
wait_file(go)
removed = reg.sweep()
reg.close()
report({"removed": removed})
"""


def test_concurrent_sweepers_remove_and_report_each_dead_entry_once(
    reg_name: str, tmp_path: Path
) -> None:
    reg = shmreg.Registry.create(reg_name, capacity=1024)
    try:
        with children() as kids:
            owners = [kids.sleeper() for _ in range(40)]
            for n, proc in enumerate(owners):
                for i in range(5):
                    reg.register("ns", f"s{n}-{i}", pid=proc.pid, metadata={"n": n})
            for i in range(10):
                reg.register("ns", f"live{i}")
            for proc in owners:
                kill_and_reap(proc)
            seq = reg.backend.last_event_seq()  # type: ignore[attr-defined]
            go = str(tmp_path / "go")
            sweepers = []
            for k in range(3):
                ready = str(tmp_path / f"ready{k}")
                sweepers.append((kids.py(SWEEPER, reg_name, ready, go), ready))
            for proc, ready in sweepers:
                wait_for_file(ready, procs=(proc,))
            touch(go)
            removed = [read_line(proc)["removed"] for proc, _ in sweepers]
            assert sum(removed) == 200, removed
            events = died(drain(reg, seq))
            assert len(events) == 200
            assert len({e.service for e in events}) == 200
            assert {e.reason for e in events} <= {"gone", "reused"}  # a freed pid may be reused
            assert reg.count("ns") == 10
            assert used_keys(reg) == {("ns", f"live{i}") for i in range(10)}
    finally:
        reg.destroy()


# ---------------------------------------------------------------------- unknown owners


def test_unknown_owner_is_kept_and_reported(
    registry: shmreg.Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    with children() as kids:
        hidden = kids.sleeper()
        dead = kids.sleeper()
        registry.register("ns", "hidden-1", pid=hidden.pid)
        registry.register("ns", "hidden-2", pid=hidden.pid)
        registry.register("ns", "dead", pid=dead.pid)
        registry.register("ns", "me")
        kill_and_reap(dead)
        real_read = _identity._read_stat
        # As /proc mounted with hidepid shows another user's process: it exists, unreadable.
        monkeypatch.setattr(
            _identity, "_read_stat", lambda pid: UNREADABLE if pid == hidden.pid else real_read(pid)
        )
        assert _identity.check(ProcessIdentity(hidden.pid, 1)) is Liveness.UNKNOWN
        health = registry.health_check()
        assert (health.total, health.alive, health.dead, health.unknown) == (4, 1, 1, 2)
        assert health.status is HealthStatus.DEGRADED  # 25 % dead
        assert registry.sweep() == 1  # only the provably dead one
        assert used_keys(registry) == {("ns", "hidden-1"), ("ns", "hidden-2"), ("ns", "me")}
        health = registry.health_check()
        assert (health.total, health.alive, health.dead, health.unknown) == (3, 1, 0, 2)
        assert health.status is HealthStatus.HEALTHY
        assert registry.lookup("ns", "hidden-1") == hidden.pid
        # Even once it really exits, "cannot tell" is not proof: the entry is kept.
        kill_and_reap(hidden)
        assert registry.sweep() == 0
        assert ("ns", "hidden-1") in used_keys(registry)
        assert registry.health_check().unknown == 2


#: Attaches from inside a private pid namespace (own /proc) and judges the host's entries.
FOREIGN_SWEEP = r"""
import json, os, sys
import shmreg
import time
reg = shmreg.Registry.attach(sys.argv[1])
try:
    with reg.monitor() as monitor:  # a monitor in there must not bury the host's owners
        time.sleep(0.3)
    health = reg.health_check()
    out = {"ns_pid": os.getpid(), "removed": reg.sweep() + monitor.stats.removed,
           "health": [health.total, health.alive, health.dead, health.unknown]}
finally:
    reg.close()
print(json.dumps(out))
"""


def test_owner_in_another_pid_namespace_is_unknown_and_kept(
    registry: shmreg.Registry, reg_name: str
) -> None:
    why_not = private_pid_namespaces()
    if why_not:
        pytest.skip(why_not)
    with children() as kids:
        live = kids.sleeper()
        registry.register("ns", "host-owner", pid=live.pid)
        out = run_in_private_pid_namespace(FOREIGN_SWEEP, reg_name)
        assert out["ns_pid"] == 1
        # From in there the host's pid means nothing: no proof of death, so keep it.
        assert registry.lookup("ns", "host-owner") == live.pid
        assert out["removed"] == 0
        assert out["health"] == [1, 0, 0, 1]


# ---------------------------------------------------------------------- health_check


@pytest.mark.parametrize(
    ("dead", "status"),
    [
        (0, HealthStatus.HEALTHY),
        (1, HealthStatus.HEALTHY),  # 5 %
        (2, HealthStatus.DEGRADED),  # 10 %: degraded from here
        (5, HealthStatus.DEGRADED),  # 25 %
        (6, HealthStatus.UNHEALTHY),  # 30 %: unhealthy from here
        (20, HealthStatus.UNHEALTHY),
    ],
)
def test_health_check_thresholds_and_counts(
    any_registry: shmreg.Registry, dead: int, status: HealthStatus
) -> None:
    me = self_identity()
    forged = ProcessIdentity(me.pid, me.start_ticks + 1)  # our pid, another start: reused
    for i in range(20):
        owner = forged if i < dead else me
        any_registry.backend.register("ns", f"s{i}", owner, None)
    health = any_registry.health_check()
    assert health.status is status
    assert (health.total, health.alive, health.dead, health.unknown) == (20, 20 - dead, dead, 0)
    assert health.backend == any_registry.backend.kind  # type: ignore[attr-defined]
    assert any_registry.sweep() == dead
    assert any_registry.health_check().status is HealthStatus.HEALTHY


def test_health_check_of_an_empty_registry_is_healthy(any_registry: shmreg.Registry) -> None:
    health = any_registry.health_check()
    assert health.status is HealthStatus.HEALTHY
    assert (health.total, health.alive, health.dead, health.unknown) == (0, 0, 0, 0)


# ---------------------------------------------------------------------- fencing tokens


def _takeover(reg: shmreg.Registry, kids: Any) -> tuple[int, int, subprocess.Popen[bytes]]:
    """``svc`` registered to a process that then dies, taken over by a live one."""
    first = kids.sleeper()
    old = reg.register("ns", "svc", pid=first.pid, metadata={"owner": "first"})
    kill_and_reap(first)
    second = kids.sleeper()
    new = reg.register("ns", "svc", pid=second.pid, metadata={"owner": "second"})
    return old, new, second


def _snapshot(reg: shmreg.Registry) -> Any:
    return (
        reg.lookup_with_metadata("ns", "svc"),
        reg.generation("ns", "svc"),
        reg.backend.last_event_seq(),  # type: ignore[attr-defined]
        reg.stats().used,
    )


def test_stale_generation_refused_after_takeover(any_registry: shmreg.Registry) -> None:
    reg = any_registry
    with children() as kids:
        old, new, second = _takeover(reg, kids)
        assert new > old
        before = _snapshot(reg)
        assert before[0] == (second.pid, {"owner": "second"})
        with pytest.raises(shmreg.StaleGeneration) as err:
            reg.unregister("ns", "svc", generation=old)
        assert (err.value.expected, err.value.actual) == (old, new)
        with pytest.raises(shmreg.StaleGeneration):
            reg.update_metadata("ns", "svc", {"owner": "first again"}, generation=old)
        with pytest.raises(shmreg.StaleGeneration):
            reg.update_metadata("ns", "svc", {"x": 1}, merge=True, generation=old)
        assert _snapshot(reg) == before  # nothing changed, not even an event
        # The current token works.
        reg.update_metadata("ns", "svc", {"x": 1}, merge=True, generation=new)
        assert reg.get_metadata("ns", "svc") == {"owner": "second", "x": 1}
        assert reg.unregister("ns", "svc", generation=new) is True
        assert reg.lookup("ns", "svc") is None


def test_generation_changes_when_the_name_is_released_and_taken_again(
    any_registry: shmreg.Registry,
) -> None:
    reg = any_registry
    first = reg.register("ns", "svc", metadata={"v": 1})
    assert reg.register("ns", "svc", metadata={"v": 2}) == first  # same owner: same token
    reg.update_metadata("ns", "svc", {"v": 3}, generation=first)
    assert reg.unregister("ns", "svc", generation=first)
    second = reg.register("ns", "svc")  # same process, but a new holding of the name
    assert second != first
    with pytest.raises(shmreg.StaleGeneration):
        reg.update_metadata("ns", "svc", {"v": 4}, generation=first)
    with pytest.raises(shmreg.StaleGeneration):
        reg.unregister("ns", "svc", generation=first)
    assert reg.generation("ns", "svc") == second


def test_generation_of_an_absent_name(any_registry: shmreg.Registry) -> None:
    assert any_registry.unregister("ns", "nobody", generation=1) is False
    with pytest.raises(shmreg.NotRegistered):
        any_registry.update_metadata("ns", "nobody", {}, generation=1)


# ---------------------------------------------------------------------- register_self


def test_register_self_registers_for_the_block(registry: shmreg.Registry) -> None:
    seq = registry.backend.last_event_seq()  # type: ignore[attr-defined]
    with registry.register_self("ns", "me", {"role": "worker"}) as generation:
        assert registry.lookup_with_metadata("ns", "me") == (os.getpid(), {"role": "worker"})
        assert registry.generation("ns", "me") == generation
    assert registry.lookup("ns", "me") is None
    assert used_keys(registry) == set()
    assert [e.kind for e in drain(registry, seq)] == ["registered", "unregistered"]


def test_register_self_unregisters_when_the_block_raises(registry: shmreg.Registry) -> None:
    with pytest.raises(KeyError), registry.register_self("ns", "me"):
        assert registry.lookup("ns", "me") == os.getpid()
        raise KeyError("boom")
    assert registry.lookup("ns", "me") is None


def test_register_self_leaves_a_new_owner_alone(registry: shmreg.Registry) -> None:
    with children() as kids:
        other = kids.sleeper()
        with registry.register_self("ns", "me") as generation:
            # Taken over meanwhile (as if this process had been presumed dead).
            registry.unregister("ns", "me", generation=generation)
            taken = registry.register("ns", "me", pid=other.pid, metadata={"new": 1})
        assert registry.lookup_with_metadata("ns", "me") == (other.pid, {"new": 1})
        assert registry.generation("ns", "me") == taken


def test_register_self_after_the_entry_vanished(registry: shmreg.Registry) -> None:
    with registry.register_self("ns", "me"):
        registry.unregister("ns", "me")
    assert registry.lookup("ns", "me") is None


def test_register_self_refuses_a_name_held_by_a_live_process(registry: shmreg.Registry) -> None:
    with children() as kids:
        other = kids.sleeper()
        registry.register("ns", "taken", pid=other.pid)
        with pytest.raises(shmreg.AlreadyRegistered), registry.register_self("ns", "taken"):
            pytest.fail("the block must not run")
        assert registry.lookup("ns", "taken") == other.pid


# ---------------------------------------------------------------------- cleanup_namespace


#: Registers itself; with "1" it ignores SIGTERM first (a process that will not stop politely).
CLEANUP_CHILD = r"""
import signal
name, ns, service, stubborn = sys.argv[1:5]
if stubborn == "1":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
reg = shmreg.Registry.attach(name)
reg.register(ns, service)
report({"pid": os.getpid()})
time.sleep(1e9)  # until the test kills it
"""


class _SignalSpy:
    """Records SIGTERM / SIGINT sent to this process while installed (restores on exit)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _SignalSpy:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._old[signum] = signal.signal(signum, lambda s, _f: self.received.append(s))
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._old.items():
            signal.signal(signum, handler)


def test_cleanup_namespace_terminates_kills_and_removes(
    registry: shmreg.Registry, reg_name: str
) -> None:
    with children() as kids, _SignalSpy() as spy:
        procs = {}
        for service, stubborn in (("polite-1", "0"), ("polite-2", "0"), ("stubborn", "1")):
            proc = kids.py(CLEANUP_CHILD, reg_name, "job", service, stubborn)
            procs[service] = proc
        pids = {service: read_line(proc)["pid"] for service, proc in procs.items()}
        registry.register("job", "caller")
        registry.register("elsewhere", "caller-keeps-this")
        seq = registry.backend.last_event_seq()  # type: ignore[attr-defined]
        # The grace is what the polite ones get to die of their SIGTERM before a SIGKILL:
        # seconds, not a fraction of one, or a loaded machine that has not yet run a polite
        # child gets it SIGKILLed too. (The stubborn one makes the call last the whole grace.)
        report = registry.cleanup_namespace("job", grace=5.0)
        assert report.namespace == "job"
        assert report.terminated == tuple(sorted(pids.values()))
        assert report.killed == (pids["stubborn"],)
        assert report.skipped == (os.getpid(),)
        assert report.removed == 4  # three owners' entries and the caller's own
        assert registry.list_services("job") == []
        assert ("job", "caller") not in used_keys(registry)
        for proc in procs.values():
            assert proc.wait(timeout=DEADLINE) in (-signal.SIGTERM, -signal.SIGKILL)
        assert procs["stubborn"].returncode == -signal.SIGKILL
        assert procs["polite-1"].returncode == -signal.SIGTERM
        assert spy.received == []  # the caller was never signalled
        assert registry.lookup("elsewhere", "caller-keeps-this") == os.getpid()
        removed_job = {e.service for e in drain(registry, seq) if e.namespace == "job"}
        assert removed_job == {"polite-1", "polite-2", "stubborn", "caller"}


def test_cleanup_report_counts_entries_of_owners_already_reaped(
    registry: shmreg.Registry,
) -> None:
    with children() as kids:
        owners = [kids.sleeper() for _ in range(3)]
        # Each owner's parent reaps it the moment it exits (as a supervisor does).
        reapers = [threading.Thread(target=proc.wait, daemon=True) for proc in owners]
        for thread in reapers:
            thread.start()
        for n, proc in enumerate(owners):
            registry.register("job", f"w{n}", pid=proc.pid)
        registry.register("job", "caller")
        report = registry.cleanup_namespace("job", grace=5.0)
        for thread in reapers:
            thread.join(DEADLINE)
        assert report.terminated == tuple(sorted(p.pid for p in owners))
        assert used_keys(registry) == set()  # all four entries were removed...
        assert report.removed == 4  # ...and the report should say so


def test_cleanup_namespace_grace_runs_on_the_injected_clock(
    registry: shmreg.Registry, reg_name: str
) -> None:
    clock = FakeClock()
    with children() as kids:
        proc = kids.py(CLEANUP_CHILD, reg_name, "job", "stubborn", "1")
        pid = read_line(proc)["pid"]
        report = registry.cleanup_namespace("job", grace=120.0, clock=clock)
        assert clock.monotonic() >= 120.0  # the whole grace period went by, on the fake clock
        assert report.terminated == (pid,)
        assert report.killed == (pid,)
        assert proc.wait(timeout=DEADLINE) == -signal.SIGKILL
        assert registry.list_services("job") == []


def test_cleanup_namespace_with_only_the_caller(registry: shmreg.Registry) -> None:
    with _SignalSpy() as spy:
        registry.register("job", "me")
        report = registry.cleanup_namespace("job", grace=0, clock=FakeClock())
        assert (report.terminated, report.killed, report.skipped) == ((), (), (os.getpid(),))
        assert report.removed == 1
        assert spy.received == []
    assert registry.lookup("job", "me") is None


def test_cleanup_namespace_of_an_empty_namespace(registry: shmreg.Registry) -> None:
    report = registry.cleanup_namespace("nothing-here", grace=0)
    assert (report.terminated, report.killed, report.skipped, report.removed) == ((), (), (), 0)


def test_cleanup_never_signals_a_later_holder_of_a_dead_owners_pid(
    registry: shmreg.Registry,
) -> None:
    with children() as kids:
        bystander, real = sleeper(kids)
        # The entry's owner is gone; its pid now belongs to the bystander.
        registry.backend.register(
            "job", "old", ProcessIdentity(real.pid, real.start_ticks + 1), None
        )
        report = registry.cleanup_namespace("job", grace=0.2)
        assert report.terminated == () and report.killed == ()
        assert bystander.poll() is None  # not signalled
        assert _identity.check(real) is Liveness.SAME
        assert used_keys(registry) == set()


def test_signal_identity_only_signals_that_very_process() -> None:
    with children() as kids:
        proc, real = sleeper(kids)
        assert not signal_identity(ProcessIdentity(real.pid, real.start_ticks + 1), signal.SIGTERM)
        assert proc.poll() is None
        assert signal_identity(real, signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE) == -signal.SIGTERM
        assert not signal_identity(real, signal.SIGTERM)  # gone: nothing to signal


def test_cleanup_namespace_rejects_a_bad_grace(registry: shmreg.Registry) -> None:
    for bad in (-1, float("nan"), float("inf"), "5"):
        with pytest.raises(shmreg.InvalidArgument):
            registry.cleanup_namespace("job", grace=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- bounded counters


#: Sweeps ``n`` times from the moment the start file appears.
SWEEP_LOOP = r"""
name, ready, go, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
reg = shmreg.Registry.attach(name)
touch(ready)
wait_file(go)
for _ in range(n):
    reg.sweep()
reg.close()
report({"done": n})
"""


@pytest.mark.slow
def test_concurrent_sweeps_are_all_counted(
    registry: shmreg.Registry, reg_name: str, tmp_path: Path
) -> None:
    registry.register("ns", "me")
    before = registry.stats().sweeps
    per_process = 10_000
    with children() as kids:
        go = str(tmp_path / "go")
        procs = []
        for k in range(3):
            ready = str(tmp_path / f"ready{k}")
            procs.append(kids.py(SWEEP_LOOP, reg_name, ready, go, str(per_process)))
            wait_for_file(ready, procs=(procs[-1],))
        touch(go)
        for proc in procs:
            assert read_line(proc) == {"done": per_process}
    assert registry.stats().sweeps - before == 3 * per_process

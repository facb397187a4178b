"""The death monitor: in this process, in other processes, several at once, and as a command.

Proven here with real, independent interpreters that register themselves and are then
SIGKILLed: a monitor (``reg.start_monitor()`` / ``with reg.monitor()``, a monitor in another
process, or ``shmreg monitor NAME``) removes every entry of a dead owner, whether the owner
registered before or after the monitor started; two monitors in two processes report each
death exactly once; a forged (reused) identity is buried as ``reused``; an owner whose
``/proc`` entry is unreadable is kept; without pidfds the monitor falls back to sweeps on its
injected clock. ``shmreg watch NAME`` prints the events live.

Nothing asserts a timing: removals are awaited with a generous deadline. The monitor's
death-to-removal latency (kill to ``died`` event) is recorded as a junit property and printed.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from helpers import DEADLINE_S, REPO, child_env, children, read_line, wait_zombie

import shmreg
from shmreg import _identity
from shmreg._engine.events import Event
from shmreg._identity import UNREADABLE, identity_of
from shmreg._liveness import Monitor
from shmreg._types import Liveness, ProcessIdentity
from shmreg.testing import FakeClock

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")

#: How long a removal may take before the test calls it missing. The monitor needs
#: milliseconds; this only guards against a hang, so it is the suite's deadline (a loaded
#: machine can starve the monitor's thread for seconds).
REMOVAL_DEADLINE = DEADLINE_S
DEADLINE = DEADLINE_S

#: Attaches, registers itself under each service named, reports, and sleeps until killed.
REGISTRANT = r"""
name, ns = sys.argv[1], sys.argv[2]
reg = shmreg.Registry.attach(name)
gens = {s: reg.register(ns, s) for s in sys.argv[3:]}
report({"pid": os.getpid(), "gens": gens})
time.sleep(1e9)  # until the test kills it
"""

#: A monitor in its own process: attaches, starts the monitor thread, reports, sleeps.
MONITOR_PROCESS = r"""
reg = shmreg.Registry.attach(sys.argv[1])
monitor = reg.start_monitor()
report({"pid": os.getpid(), "running": monitor.running})
time.sleep(1e9)  # until the test kills it
"""


def last_seq(reg: shmreg.Registry) -> int:
    seq: int = reg.backend.last_event_seq()  # type: ignore[attr-defined]
    return seq


def drain(reg: shmreg.Registry, since: int) -> list[Event]:
    return list(reg.watch(since=since, timeout=0))


def used_keys(reg: shmreg.Registry, namespace: str | None = None) -> set[tuple[str, Any]]:
    """(namespace, service) of every used slot, dead owners included."""
    rows = reg.backend.dump()  # type: ignore[attr-defined]
    return {
        (r["namespace"], r["service"])
        for r in rows
        if namespace is None or r["namespace"] == namespace
    }


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = REMOVAL_DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.001)


def registrants(
    kids: Any, name: str, ns: str, count: int, per_process: int = 2
) -> dict[int, tuple[subprocess.Popen[str], list[str]]]:
    """Start ``count`` registrant interpreters at once; pid -> (process, its services)."""
    started = []
    for n in range(count):
        services = [f"p{n}-s{i}" for i in range(per_process)]
        started.append((kids.py(REGISTRANT, name, ns, *services), services))
    out = {}
    for proc, services in started:
        info = read_line(proc)
        assert info["pid"] == proc.pid
        out[proc.pid] = (proc, services)
    return out


def kill_all(procs: dict[int, tuple[subprocess.Popen[str], list[str]]]) -> dict[int, float]:
    """SIGKILL every process (not reaped: that is left to ``children``); pid -> kill time."""
    when = {}
    for pid, (proc, _) in procs.items():
        when[pid] = time.time()
        proc.kill()
    return when


def died_once_each(events: list[Event], expected: set[tuple[str, Any]]) -> list[Event]:
    """The died events, asserting exactly one per expected (namespace, service)."""
    deaths = [e for e in events if e.kind == "died"]
    keys = [(e.namespace, e.service) for e in deaths]
    assert sorted(keys, key=repr) == sorted(expected, key=repr), "not one died event per entry"
    return deaths


def report_latency(
    record_property: Any, label: str, deaths: list[Event], killed_at: dict[int, float]
) -> None:
    lat = sorted((e.time - killed_at[e.pid]) * 1000 for e in deaths)
    record_property(f"{label}_death_to_removal_ms", [round(x, 3) for x in lat])
    print(
        f"\n{label}: death-to-removal (kill to died event) ms: median "
        f"{statistics.median(lat):.3f}, max {max(lat):.3f}, n={len(lat)}"
    )


# ---------------------------------------------------------------------- control


def test_start_monitor_is_idempotent_and_stops(registry: shmreg.Registry) -> None:
    monitor = registry.start_monitor()
    try:
        assert monitor.running
        assert registry.start_monitor() is monitor
    finally:
        registry.stop_monitor()
    assert not monitor.running
    registry.stop_monitor()  # twice: harmless
    again = registry.start_monitor()
    try:
        assert again is not monitor and again.running
    finally:
        registry.stop_monitor()


def test_monitor_context_manager(registry: shmreg.Registry) -> None:
    with registry.monitor(poll_interval=0.005) as monitor:
        assert monitor.running
    assert not monitor.running


def test_close_and_destroy_stop_the_monitor(reg_name: str) -> None:
    reg = shmreg.Registry.create(reg_name)
    try:
        monitor = reg.start_monitor()
        reg.close()
        assert not monitor.running
        reg = shmreg.Registry.attach(reg_name)
        monitor = reg.start_monitor()
    finally:
        reg.destroy()
    assert not monitor.running
    assert monitor.stats.errors == []


# ---------------------------------------------------------------------- in this process


def test_monitor_removes_owners_sigkilled_after_it_started(
    registry: shmreg.Registry, reg_name: str, record_property: Any
) -> None:
    with registry.monitor() as monitor, children() as kids:
        procs = registrants(kids, reg_name, "ns", 4)
        wait_until(lambda: monitor.stats.watched >= 4, "the monitor to watch the newcomers")
        expected = {("ns", s) for _, services in procs.values() for s in services}
        assert used_keys(registry) == expected
        seq = last_seq(registry)
        killed_at = kill_all(procs)
        wait_until(lambda: not used_keys(registry), "the monitor to remove every entry")
        deaths = died_once_each(drain(registry, seq), expected)
        assert {e.reason for e in deaths} <= {"zombie", "gone"}
        assert {e.pid for e in deaths} == set(procs)
        # A removal is visible when it commits, a moment before the monitor's thread counts it.
        wait_until(lambda: monitor.stats.removed >= len(expected), "the monitor's count")
        assert monitor.stats.removed == len(expected)
        assert monitor.stats.errors == []
        report_latency(record_property, "in_process_monitor", deaths, killed_at)


@pytest.mark.parametrize("backend", ["shm", "memory"])
def test_entries_the_monitor_removes_count_in_stats(reg_name: str, backend: str) -> None:
    """stats() counts every dead entry removed, by a sweep or by the monitor alike."""
    reg = shmreg.Registry.create(reg_name, backend=backend)
    try:
        with children() as kids:
            owners = [kids.sleeper() for _ in range(2)]
            for n, proc in enumerate(owners):
                reg.register("ns", f"a{n}", pid=proc.pid)
                reg.register("ns", f"b{n}", pid=proc.pid)
            before = reg.stats()
            with reg.monitor() as monitor:
                wait_until(lambda: monitor.stats.watched >= 2, "both owners watched")
                for proc in owners:
                    proc.kill()
                    proc.wait()
                # count() already hides a dead owner's entries: wait for the removals.
                wait_until(lambda: monitor.stats.removed >= 4, "the monitor's removals")
            after = reg.stats()
        assert monitor.stats.removed == 4
        assert after.dead_found - before.dead_found == 4
        assert 1 <= after.sweeps - before.sweeps <= 2  # one removal pass per death at most
        assert after.last_sweep_time is not None
        assert reg.statistics()["sweeps"] == after.sweeps
    finally:
        reg.destroy()


def test_monitor_removes_owners_registered_before_it_started(
    registry: shmreg.Registry, reg_name: str
) -> None:
    with children() as kids:
        procs = registrants(kids, reg_name, "ns", 3)
        registry.register("ns", "me")
        with registry.monitor() as monitor:
            wait_until(lambda: monitor.stats.watched >= 4, "the monitor to watch every owner")
            seq = last_seq(registry)
            kill_all(procs)
            wait_until(lambda: used_keys(registry) == {("ns", "me")}, "the dead owners' removal")
            died_once_each(
                drain(registry, seq), {("ns", s) for _, ss in procs.values() for s in ss}
            )
        assert registry.lookup("ns", "me") == os.getpid()


def test_monitor_buries_owners_dead_before_it_started(
    registry: shmreg.Registry, reg_name: str
) -> None:
    with children() as kids:
        procs = registrants(kids, reg_name, "ns", 2)
        for pid, (proc, _) in procs.items():
            proc.kill()
            if pid == min(procs):
                proc.wait()  # one reaped (gone), one left a zombie
            else:
                wait_zombie(pid)
        seq = last_seq(registry)
        with registry.monitor():
            wait_until(lambda: not used_keys(registry), "the dead owners' removal")
        reasons = sorted(e.reason for e in drain(registry, seq) if e.kind == "died")
        assert reasons == ["gone", "gone", "zombie", "zombie"]


def test_monitor_buries_a_reused_identity_as_reused(registry: shmreg.Registry) -> None:
    with children() as kids, registry.monitor():
        proc = kids.sleeper()
        real = identity_of(proc.pid)
        seq = last_seq(registry)
        registry.register("ns", "real", pid=proc.pid)
        registry.backend.register(
            "ns", "stranger", ProcessIdentity(real.pid, real.start_ticks + 1), None
        )
        wait_until(lambda: ("ns", "stranger") not in used_keys(registry), "the reused entry gone")
        assert [(e.kind, e.service, e.reason) for e in drain(registry, seq)] == [
            ("registered", "real", None),
            ("registered", "stranger", None),
            ("died", "stranger", "reused"),
        ]
        assert registry.lookup("ns", "real") == proc.pid
        assert proc.poll() is None


def test_monitor_keeps_an_unknown_owner(
    registry: shmreg.Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    with children() as kids:
        hidden, sentinel = kids.sleeper(), kids.sleeper()
        registry.register("ns", "hidden", pid=hidden.pid)
        registry.register("ns", "sentinel", pid=sentinel.pid)
        real_read = _identity._read_stat
        monkeypatch.setattr(
            _identity, "_read_stat", lambda pid: UNREADABLE if pid == hidden.pid else real_read(pid)
        )
        with registry.monitor() as monitor:
            wait_until(lambda: monitor.stats.watched >= 2, "both owners watched")
            hidden.kill()
            wait_zombie(hidden.pid)
            sentinel.kill()  # its removal shows the monitor has handled the earlier death too
            wait_until(lambda: ("ns", "sentinel") not in used_keys(registry), "sentinel removed")
            assert ("ns", "hidden") in used_keys(registry)  # "cannot tell" is no proof
            assert registry.health_check().unknown == 1


def test_on_death_is_called_once_per_dead_owner(registry: shmreg.Registry, reg_name: str) -> None:
    calls: list[tuple[ProcessIdentity, Liveness, int]] = []
    with children() as kids, registry.monitor(on_death=lambda *a: calls.append(a)) as monitor:
        procs = registrants(kids, reg_name, "ns", 2, per_process=3)
        wait_until(lambda: monitor.stats.watched >= 2, "owners watched")
        kill_all(procs)
        wait_until(lambda: not used_keys(registry), "removal")
        wait_until(lambda: len(calls) >= 2, "the callbacks")
    assert sorted((ident.pid, removed) for ident, _, removed in calls) == sorted(
        (pid, 3) for pid in procs
    )
    assert {verdict for _, verdict, _ in calls} <= {Liveness.ZOMBIE, Liveness.GONE}


def test_death_notices_reach_every_subscriber(registry: shmreg.Registry, reg_name: str) -> None:
    """A second ``start_monitor(on_death=...)`` and ``Monitor.subscribe`` add subscribers to
    the running monitor; a failing one is recorded and starves no other; an unsubscribed one
    hears nothing more."""
    first: list[int] = []
    second: list[int] = []
    third: list[int] = []

    def broken(*_: object) -> None:
        raise RuntimeError("subscriber bug")

    with children() as kids, registry.monitor(on_death=lambda i, v, r: first.append(i.pid)) as m:
        assert registry.start_monitor(on_death=lambda i, v, r: second.append(i.pid)) is m
        m.subscribe(broken)
        stop_third = m.subscribe(lambda i, v, r: third.append(i.pid))
        procs = registrants(kids, reg_name, "ns", 1, per_process=1)
        wait_until(lambda: m.stats.watched >= 1, "owner watched")
        kill_all(procs)
        wait_until(lambda: len(first) >= 1 and len(second) >= 1 and len(third) >= 1, "notices")
        assert first == second == third == list(procs)
        assert any("subscriber bug" in e for e in m.stats.errors)
        stop_third()
        stop_third()  # idempotent
        more = registrants(kids, reg_name, "ns2", 1, per_process=1)
        wait_until(lambda: m.stats.watched >= 1, "second owner watched")
        kill_all(more)
        wait_until(lambda: len(first) >= 2 and len(second) >= 2, "second notices")
    assert third == list(procs)


def test_monitor_follows_owners_after_the_ring_was_lapped(registry: shmreg.Registry) -> None:
    """A burst of more events than the ring holds between two looks: the newcomer at its
    end is still found (the monitor rescans the owners when it was lapped)."""
    registry.register("ns", "me")
    with children() as kids, registry.monitor(poll_interval=0.5) as monitor:
        wait_until(lambda: monitor.stats.watched >= 1, "the monitor to settle")
        time.sleep(0.05)  # let it enter its half-second wait
        for i in range(4200):
            if i % 2:
                registry.unregister("churn", "x")
            else:
                registry.register("churn", "x")
        proc = kids.sleeper()
        registry.register("ns", "late", pid=proc.pid)
        wait_until(lambda: monitor.stats.watched >= 2, "the newcomer watched")
        proc.kill()
        wait_until(lambda: ("ns", "late") not in used_keys(registry), "the newcomer removed")
        assert monitor.stats.errors == []


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def test_idle_monitor_costs_next_to_nothing(
    registry: shmreg.Registry, record_property: Any
) -> None:
    with children() as kids:
        for n in range(20):
            registry.register("ns", f"s{n}", pid=kids.sleeper().pid)
        with registry.monitor(sweep_interval=0.2) as monitor:
            wait_until(lambda: monitor.stats.watched >= 20, "every owner watched")
            cpu0, wall0 = _cpu_seconds(), time.monotonic()
            time.sleep(1.0)
            share = (_cpu_seconds() - cpu0) / (time.monotonic() - wall0)
            stats = monitor.stats
        record_property("idle_monitor_cpu_share", round(share, 4))
        print(f"\nidle monitor with 20 watched owners: {share * 100:.2f} % of a core")
        assert stats.sweeps == 0  # every owner has a pidfd: nothing to sweep for
        assert stats.deaths == 0 and stats.removed == 0
        assert share < 0.5  # not a timing: a busy loop would use a whole core


# ---------------------------------------------------------------------- without pidfds


def test_monitor_without_pidfds_sweeps_on_its_injected_clock(
    registry: shmreg.Registry,
) -> None:
    clock = FakeClock()
    monitor = Monitor(
        registry.backend,
        use_pidfd=False,
        poll_interval=0.002,
        sweep_interval=60.0,
        rescan_interval=3600.0,
        clock=clock,
    )
    with children() as kids:
        proc = kids.sleeper()
        registry.register("ns", "svc", pid=proc.pid)
        monitor.start()
        try:
            proc.kill()
            proc.wait()
            time.sleep(0.1)  # many idle rounds, but no sweep is due on the fake clock
            assert monitor.stats.sweeps == 0
            assert ("ns", "svc") in used_keys(registry)
            clock.advance(61)
            wait_until(lambda: ("ns", "svc") not in used_keys(registry), "the sweep's removal")
            wait_until(lambda: monitor.stats.removed >= 1 and monitor.stats.sweeps >= 1,
                       "the monitor's count of it")
            assert monitor.stats.sweeps >= 1
            assert monitor.stats.removed == 1
        finally:
            monitor.stop()
    assert not monitor.running and monitor.stats.errors == []


#: A monitor without pidfds run in the main thread with no pause between polls, stopped by a
#: SIGTERM handler: nearly all its idle time is spent in the pause a stop request must end.
STOPPED_BY_SIGNAL = r"""
import signal, threading
from shmreg._liveness import Monitor
reg = shmreg.Registry.attach(sys.argv[1])
reg.register("ns", f"owner-{os.getpid()}")
monitor = Monitor(reg.backend, use_pidfd=False, poll_interval=0.0)
signal.signal(signal.SIGTERM, lambda signum, frame: monitor.request_stop())

def ready():  # the loop runs once it has read the owners: only then is the signal sent
    while monitor.stats.watched < 1:
        time.sleep(0.001)
    report({"ready": os.getpid()})

threading.Thread(target=ready, daemon=True).start()
monitor.run_forever()
report({"stopped": monitor.stats.errors})
"""


def test_request_stop_from_a_signal_handler_ends_run_forever(
    registry: shmreg.Registry, reg_name: str
) -> None:
    with children() as kids:
        for attempt in range(8):  # each attempt lands the signal at another point of the loop
            proc = kids.py(STOPPED_BY_SIGNAL, reg_name)
            read_line(proc)
            proc.send_signal(signal.SIGTERM)
            assert read_line(proc) == {"stopped": []}, f"attempt {attempt}"
            assert proc.wait(DEADLINE_S) == 0


# ---------------------------------------------------------------------- in other processes


def test_monitor_in_another_process_removes_sigkilled_owners(
    registry: shmreg.Registry, reg_name: str, record_property: Any
) -> None:
    with children() as kids:
        monitor = kids.py(MONITOR_PROCESS, reg_name)
        assert read_line(monitor)["running"] is True
        procs = registrants(kids, reg_name, "ns", 4)
        expected = {("ns", s) for _, ss in procs.values() for s in ss}
        assert used_keys(registry) == expected
        seq = last_seq(registry)
        killed_at = kill_all(procs)
        wait_until(lambda: not used_keys(registry), "the other process's monitor to remove all")
        deaths = died_once_each(drain(registry, seq), expected)
        assert monitor.poll() is None
        report_latency(record_property, "other_process_monitor", deaths, killed_at)


def test_two_monitor_processes_report_each_death_once(
    registry: shmreg.Registry, reg_name: str
) -> None:
    with children() as kids:
        monitors = [kids.py(MONITOR_PROCESS, reg_name) for _ in range(2)]
        for proc in monitors:
            assert read_line(proc)["running"] is True
        for round_ in range(2):  # twice, so both have followed registrations live
            procs = registrants(kids, reg_name, f"ns{round_}", 5)
            expected = {(f"ns{round_}", s) for _, ss in procs.values() for s in ss}
            seq = last_seq(registry)
            kill_all(procs)
            wait_until(lambda: not used_keys(registry), "both monitors to finish")
            time.sleep(0.2)  # a late double report would show up in this window
            died_once_each(drain(registry, seq), expected)
        assert all(proc.poll() is None for proc in monitors)


def test_monitors_in_this_and_another_process_do_not_fight(
    registry: shmreg.Registry, reg_name: str
) -> None:
    with children() as kids, registry.monitor() as mine:
        other = kids.py(MONITOR_PROCESS, reg_name)
        read_line(other)
        procs = registrants(kids, reg_name, "ns", 5, per_process=3)
        expected = {("ns", s) for _, ss in procs.values() for s in ss}
        seq = last_seq(registry)
        wait_until(lambda: mine.stats.watched >= 5, "owners watched here")
        kill_all(procs)
        wait_until(lambda: not used_keys(registry), "removal")
        time.sleep(0.2)
        died_once_each(drain(registry, seq), expected)
        assert mine.stats.errors == []
        assert mine.stats.removed <= len(expected)


@pytest.mark.slow
def test_monitor_watches_hundreds_of_processes(registry: shmreg.Registry) -> None:
    count = 300
    with children() as kids:
        sleepers = [kids.sleeper() for _ in range(count)]
        with registry.monitor() as monitor:
            for n, proc in enumerate(sleepers):
                registry.backend.register("many", f"s{n}", identity_of(proc.pid), {"n": n})
            wait_until(
                lambda: monitor.stats.watched >= count, f"{count} owners watched", timeout=DEADLINE
            )
            assert monitor.stats.watched == count
            seq = last_seq(registry)
            for proc in sleepers:
                proc.kill()
            wait_until(lambda: not used_keys(registry), "all removed", timeout=DEADLINE)
            died_once_each(drain(registry, seq), {("many", f"s{n}") for n in range(count)})
            wait_until(lambda: monitor.stats.removed >= count, "the monitor's count")
            assert monitor.stats.removed == count
            assert monitor.stats.errors == []
            assert monitor.stats.sweeps == 0  # all were followed by pidfd


# ---------------------------------------------------------------------- the commands


def shmreg_command(*args: str) -> subprocess.Popen[str]:
    """``python -m shmreg ARGS`` in its own session, output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "shmreg", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
        cwd=str(REPO),
        text=True,
        start_new_session=True,
    )


class LineReader:
    """Collects a child's stdout lines on a thread, so a test can wait with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout

        def pump() -> None:
            for line in stdout:
                self.lines.put(line)

        self.thread = threading.Thread(target=pump, daemon=True)
        self.thread.start()

    def next(self, timeout: float = REMOVAL_DEADLINE) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output line within {timeout} s") from None


def stop_command(proc: subprocess.Popen[str], signum: int) -> tuple[int, str]:
    """Send ``signum``; return (exit code, stderr). Fails if it does not exit in time."""
    proc.send_signal(signum)
    try:
        code = proc.wait(timeout=REMOVAL_DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"no exit within {REMOVAL_DEADLINE} s of signal {signum}") from None
    assert proc.stderr is not None
    return code, proc.stderr.read()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_monitor_command_removes_dead_owners_and_exits_cleanly(
    registry: shmreg.Registry, reg_name: str, signum: int
) -> None:
    with children() as kids:
        command = kids.add(shmreg_command("monitor", reg_name))
        procs = registrants(kids, reg_name, "ns", 2)
        expected = {("ns", s) for _, ss in procs.values() for s in ss}
        seq = last_seq(registry)
        kill_all(procs)
        wait_until(lambda: not used_keys(registry), "the monitor command to remove the entries")
        assert command.poll() is None  # still running
        died_once_each(drain(registry, seq), expected)
        code, err = stop_command(command, signum)
        assert code == 0, err
        assert "Traceback" not in err


def test_monitor_command_on_a_missing_registry_fails_cleanly(reg_name: str) -> None:
    with children() as kids:
        command = kids.add(shmreg_command("monitor", reg_name))
        _, err = command.communicate(timeout=DEADLINE)
    assert command.returncode != 0
    assert "Traceback" not in err


def test_watch_command_prints_one_json_object_per_event(
    registry: shmreg.Registry, reg_name: str
) -> None:
    with children() as kids:
        start = last_seq(registry)
        command = kids.add(shmreg_command("watch", reg_name, "--json", "--since", str(start)))
        lines = LineReader(command)
        dead = kids.sleeper()
        gen = registry.register("ns", "x", metadata={"v": 1})
        registry.update_metadata("ns", "x", {"v": 2})
        assert registry.unregister("ns", "x")
        dgen = registry.register("ns", ("agent", 1), pid=dead.pid)
        dead.kill()
        dead.wait()
        assert registry.sweep() == 1
        got = [json.loads(lines.next()) for _ in range(5)]
        assert command.poll() is None
        code, err = stop_command(command, signal.SIGTERM)
        assert code == 0, err
    for obj in got:
        assert {"seq", "kind", "namespace", "service", "pid", "generation", "reason"} <= set(obj)
    assert [o["seq"] for o in got] == list(range(start + 1, start + 6))
    me = os.getpid()
    assert [
        (o["kind"], o["namespace"], o["service"], o["pid"], o["generation"], o["reason"])
        for o in got
    ] == [
        ("registered", "ns", "x", me, gen, None),
        ("updated", "ns", "x", me, gen, None),
        ("unregistered", "ns", "x", me, gen, None),
        ("registered", "ns", ["agent", 1], dead.pid, dgen, None),
        ("died", "ns", ["agent", 1], dead.pid, dgen, "gone"),
    ]


def test_watch_command_prints_one_line_per_event_live(
    registry: shmreg.Registry, reg_name: str
) -> None:
    with children() as kids:
        start = last_seq(registry)
        command = kids.add(shmreg_command("watch", reg_name, "--since", str(start)))
        lines = LineReader(command)
        registry.register("ns", "a")
        first = lines.next()  # printed while the command runs, not at its exit
        registry.unregister("ns", "a")
        second = lines.next()
        code, err = stop_command(command, signal.SIGINT)
        assert code == 0, err
    first_fields, second_fields = first.rstrip("\n").split("\t"), second.rstrip("\n").split("\t")
    assert first_fields[:4] == [str(start + 1), "registered", "ns", "'a'"]
    assert second_fields[:4] == [str(start + 2), "unregistered", "ns", "'a'"]
    assert f"pid {os.getpid()}" in first_fields


def test_watch_command_reports_lost_events(registry: shmreg.Registry, reg_name: str) -> None:
    from shmreg._engine.layout import RING_EVENTS

    start = last_seq(registry)
    for i in range(RING_EVENTS + 3):
        if i % 2:
            registry.unregister("churn", "x")
        else:
            registry.register("churn", "x")
    with children() as kids:
        command = kids.add(shmreg_command("watch", reg_name, "--json", "--since", str(start)))
        lines = LineReader(command)
        first = json.loads(lines.next())
        code, err = stop_command(command, signal.SIGTERM)
        assert code == 0, err
    assert (first["kind"], first["lost"]) == ("lost", 3)

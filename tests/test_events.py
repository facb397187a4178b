"""The event ring, ``watch`` and ``wait_for``, and the ``FakeClock`` their timeouts run on.

Proven here: events come in order with consecutive sequence numbers and every field set;
a consumer resumes after any sequence number; one that fell behind the ring gets a ``lost``
event with the exact count, never a silent gap; ``wait_for`` returns the pid of a live owner
as soon as the name is registered (by a thread or another process) and raises
``RegistryTimeout`` when the (injected) clock runs out, so no test sleeps for a timeout.

The one real-time test (another process registers ~50 ms after ``wait_for`` starts) records
the wake-up latency and the CPU used while waiting as junit properties; it asserts no timing.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import DEADLINE_S, children, read_line, touch

import shmreg
from shmreg._engine.events import KEY_ROOM, Event
from shmreg._engine.layout import RING_EVENTS
from shmreg._identity import identity_of, self_identity
from shmreg._types import ProcessIdentity
from shmreg.backends import MemoryBackend
from shmreg.testing import FakeClock

#: Upper bound for anything these tests wait on; reached only when something is broken.
DEADLINE = DEADLINE_S


def drain(reg: shmreg.Registry, since: int, namespace: str | None = None) -> list[Event]:
    """Every event after ``since`` in the ring now; ``timeout=0`` returns when it runs dry."""
    return list(reg.watch(namespace, since=since, timeout=0))


def last_seq(reg: shmreg.Registry) -> int:
    seq: int = reg.backend.last_event_seq()  # type: ignore[attr-defined]
    return seq


def kill_and_reap(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


# ---------------------------------------------------------------------- FakeClock


def test_fake_clock_is_exported_for_users() -> None:
    import shmreg.testing

    assert "FakeClock" in shmreg.testing.__all__
    assert shmreg.testing.FakeClock is FakeClock


def test_fake_clock_moves_only_when_slept_on_or_advanced() -> None:
    clock = FakeClock()
    assert clock.monotonic() == 0.0
    assert clock.monotonic() == 0.0
    clock.sleep(1.5)
    assert clock.monotonic() == 1.5
    clock.sleep(0)
    clock.advance(10)
    assert clock.monotonic() == 11.5
    assert (clock.slept, clock.sleeps) == (1.5, 2)  # advance() is not a sleep
    assert FakeClock(100).monotonic() == 100.0
    clock.sleep(365 * 24 * 3600)  # returns at once: a year on the fake clock
    assert clock.monotonic() > 365 * 24 * 3600
    assert "FakeClock" in repr(clock)


@pytest.mark.parametrize("bad", [-1, -0.001, float("nan"), float("inf")])
def test_fake_clock_refuses_impossible_sleeps(bad: float) -> None:
    clock = FakeClock()
    with pytest.raises(ValueError):
        clock.sleep(bad)
    with pytest.raises(ValueError):
        clock.advance(bad)
    assert clock.monotonic() == 0.0


@pytest.mark.parametrize("bad", ["1", None, True, [1]])
def test_fake_clock_refuses_non_numbers(bad: Any) -> None:
    with pytest.raises(TypeError):
        FakeClock().sleep(bad)
    with pytest.raises(TypeError):
        FakeClock(bad)


def test_fake_clock_is_thread_safe() -> None:
    clock = FakeClock()
    threads, sleeps = 8, 5000
    seen_backwards = []
    barrier = threading.Barrier(threads)

    def work() -> None:
        barrier.wait()
        last = clock.monotonic()
        for _ in range(sleeps):
            clock.sleep(0.25)  # exact in binary: the sum is exact too
            now = clock.monotonic()
            if now < last:
                seen_backwards.append((last, now))
            last = now

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(DEADLINE)
    assert clock.monotonic() == threads * sleeps * 0.25  # no advance lost
    assert clock.sleeps == threads * sleeps
    assert seen_backwards == []


# ---------------------------------------------------------------------- wait_for


def test_wait_for_returns_a_registered_pid_at_once(any_registry: shmreg.Registry) -> None:
    any_registry.register("ns", "svc")
    clock = FakeClock()
    assert any_registry.wait_for("ns", "svc", clock=clock) == os.getpid()
    assert any_registry.wait_for("ns", "svc", timeout=0, clock=clock) == os.getpid()
    assert clock.sleeps == 0


@pytest.mark.parametrize("timeout", [0, 0.25, 30])
def test_wait_for_times_out_on_the_injected_clock(
    any_registry: shmreg.Registry, timeout: float
) -> None:
    clock = FakeClock(start=1000.0)
    with pytest.raises(shmreg.RegistryTimeout) as err:
        any_registry.wait_for("ns", "absent", timeout=timeout, clock=clock)
    assert err.value.timeout == timeout
    assert clock.monotonic() >= 1000.0 + timeout
    assert clock.monotonic() < 1000.0 + timeout + 1.0  # gave up promptly once it was over
    assert isinstance(err.value, TimeoutError)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "1", True])
def test_wait_for_rejects_bad_timeouts(registry: shmreg.Registry, bad: Any) -> None:
    with pytest.raises(shmreg.InvalidArgument):
        registry.wait_for("ns", "svc", timeout=bad, clock=FakeClock())


def test_wait_for_does_not_return_a_dead_holder(any_registry: shmreg.Registry) -> None:
    with children() as kids:
        proc = kids.sleeper()
        any_registry.register("ns", "svc", pid=proc.pid)
        kill_and_reap(proc)
        with pytest.raises(shmreg.RegistryTimeout):
            any_registry.wait_for("ns", "svc", timeout=5, clock=FakeClock())


def test_wait_for_keeps_waiting_through_other_names(any_registry: shmreg.Registry) -> None:
    """Events about other names wake the waiter, which looks again and keeps waiting."""
    with children() as kids:
        owner = kids.sleeper()
        done = threading.Event()

        def writer() -> None:
            for i in range(50):
                any_registry.register("ns", f"other-{i}")
                any_registry.register("other-ns", "svc")
                any_registry.unregister("other-ns", "svc")
            time.sleep(0.02)
            any_registry.register("ns", "svc", pid=owner.pid)
            done.set()

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            assert any_registry.wait_for("ns", "svc", timeout=DEADLINE) == owner.pid
        finally:
            thread.join(DEADLINE)
        assert done.is_set()


def test_wait_for_wakes_when_a_thread_registers(any_registry: shmreg.Registry) -> None:
    with children() as kids:
        owner = kids.sleeper()
        timer = threading.Timer(0.05, any_registry.register, ("ns", "svc", owner.pid))
        timer.start()
        try:
            assert any_registry.wait_for("ns", "svc", timeout=DEADLINE) == owner.pid
        finally:
            timer.join(DEADLINE)


def test_wait_for_wakes_on_a_takeover(any_registry: shmreg.Registry) -> None:
    with children() as kids:
        dead, successor = kids.sleeper(), kids.sleeper()
        any_registry.register("ns", "svc", pid=dead.pid)
        kill_and_reap(dead)
        timer = threading.Timer(0.05, any_registry.register, ("ns", "svc", successor.pid))
        timer.start()
        try:
            assert any_registry.wait_for("ns", "svc", timeout=DEADLINE) == successor.pid
        finally:
            timer.join(DEADLINE)


#: Attaches, says it is ready, and registers itself ~50 ms after the start file appears.
LATE_REGISTRANT = r"""
name, go = sys.argv[1], sys.argv[2]
reg = shmreg.Registry.attach(name)
report({"ready": os.getpid()})
wait_file(go)
time.sleep(0.05)
reg.register("ns", "late")
time.sleep(1e9)  # until the test kills it
"""


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def test_wait_for_wakes_when_another_process_registers(
    registry: shmreg.Registry,
    reg_name: str,
    tmp_path: Path,
    record_property: Any,
) -> None:
    """Real time: measures wake-up (registration event to return) and CPU while waiting."""
    wakeups, cpu_shares = [], []
    for round_ in range(3):
        with children() as kids:
            go = str(tmp_path / f"go{round_}")
            proc = kids.py(LATE_REGISTRANT, reg_name, go)
            pid = read_line(proc)["ready"]
            seq = last_seq(registry)
            touch(go)
            cpu0, wall0 = _cpu_seconds(), time.monotonic()
            assert registry.wait_for("ns", "late", timeout=DEADLINE) == pid
            returned = time.time()
            cpu, wall = _cpu_seconds() - cpu0, time.monotonic() - wall0
            [event] = [e for e in drain(registry, seq) if e.service == "late"]
            assert event.kind == "registered" and event.pid == pid
            wakeups.append(returned - event.time)
            cpu_shares.append(cpu / wall)
            kill_and_reap(proc)
            registry.sweep()
    record_property("wait_for_wakeup_ms", [round(w * 1000, 3) for w in wakeups])
    record_property("wait_for_cpu_share", [round(c, 3) for c in cpu_shares])
    print(
        f"\nwait_for wake-up after registration (ms): {[round(w * 1e3, 3) for w in wakeups]}; "
        f"median {statistics.median(wakeups) * 1e3:.3f}; CPU share while waiting: "
        f"{[round(c, 3) for c in cpu_shares]}"
    )
    # Not a timing: a busy loop would use a whole core (share ~1.0) for the ~50+ ms wait.
    assert statistics.median(cpu_shares) < 0.5


# ---------------------------------------------------------------------- watch: order, fields


def test_watch_reports_every_kind_in_order(any_registry: shmreg.Registry) -> None:
    reg = any_registry
    me = os.getpid()
    with children() as kids:
        doomed = kids.sleeper()
        start = last_seq(reg)
        g_a = reg.register("ns", "a", metadata={"v": 1})
        reg.register("ns", "a", metadata={"v": 2})  # same owner again: an update
        reg.update_metadata("ns", "a", {"v": 3}, merge=True)
        g_b = reg.register("ns", ("agent", 7), pid=doomed.pid)
        assert reg.unregister("ns", "a")
        kill_and_reap(doomed)
        assert reg.sweep() == 1
        g_c = reg.register("ns", ("agent", 7))  # the dead owner's name, fresh
        events = drain(reg, start)
    assert [(e.kind, e.namespace, e.service, e.pid, e.generation, e.reason) for e in events] == [
        ("registered", "ns", "a", me, g_a, None),
        ("updated", "ns", "a", me, g_a, None),
        ("updated", "ns", "a", me, g_a, None),
        ("registered", "ns", ("agent", 7), doomed.pid, g_b, None),
        ("unregistered", "ns", "a", me, g_a, None),
        ("died", "ns", ("agent", 7), doomed.pid, g_b, "gone"),
        ("registered", "ns", ("agent", 7), me, g_c, None),
    ]
    assert [e.seq for e in events] == list(range(start + 1, start + 8))
    assert last_seq(reg) == start + 7
    assert {e.lost for e in events} == {0}
    assert events[0].start_ticks == self_identity().start_ticks


def test_takeover_is_a_registration_with_a_reason(any_registry: shmreg.Registry) -> None:
    with children() as kids:
        dead = kids.sleeper()
        g1 = any_registry.register("ns", "svc", pid=dead.pid)
        kill_and_reap(dead)
        start = last_seq(any_registry)
        g2 = any_registry.register("ns", "svc")
        [event] = drain(any_registry, start)
    assert (event.kind, event.reason, event.pid, event.generation) == (
        "registered",
        "takeover",
        os.getpid(),
        g2,
    )
    assert g2 > g1


def test_event_time_is_the_wall_clock(registry: shmreg.Registry) -> None:
    start = last_seq(registry)
    before = time.time()
    registry.register("ns", "svc")
    after = time.time()
    [event] = drain(registry, start)
    assert before <= event.time <= after


@pytest.mark.parametrize(
    "service", ["plain", 0, -(2**63), 2**63 - 1, ("agent", "planner-1"), (1, "x", 2), "ü" * 50]
)
def test_events_name_services_of_every_shape(any_registry: shmreg.Registry, service: Any) -> None:
    start = last_seq(any_registry)
    any_registry.register("ns:with:colons", service)
    any_registry.unregister("ns:with:colons", service)
    events = drain(any_registry, start)
    assert [(e.namespace, e.service) for e in events] == [("ns:with:colons", service)] * 2
    assert type(events[0].service) is type(service)


def test_event_of_a_key_longer_than_the_ring_keeps(registry: shmreg.Registry) -> None:
    long = "s" * (KEY_ROOM + 10)
    start = last_seq(registry)
    registry.register("ns", long)
    [event] = drain(registry, start)
    assert event.kind == "registered"
    assert event.namespace == "ns"
    assert event.service is None  # cut off in the ring; documented
    assert event.pid == os.getpid()


def test_sequence_numbers_run_on_across_table_growth(reg_name: str) -> None:
    reg = shmreg.Registry.create(reg_name, capacity=8)
    try:
        start = last_seq(reg)
        generation = reg.stats().extra["generation"]
        for i in range(300):
            reg.register("ns", f"s{i}", metadata={"pad": "x" * (i % 50)})
        assert reg.stats().extra["generation"] > generation  # the table did grow
        events = drain(reg, start)
        assert [e.seq for e in events] == list(range(start + 1, start + 301))
        assert [e.service for e in events] == [f"s{i}" for i in range(300)]
    finally:
        reg.destroy()


# ---------------------------------------------------------------------- watch: where it starts


def test_watch_since_none_starts_with_the_next_event(any_registry: shmreg.Registry) -> None:
    any_registry.register("ns", "before")
    watcher = any_registry.watch(timeout=DEADLINE)
    stop = threading.Event()

    def writer() -> None:  # keeps registering until the watcher has seen something
        n = 0
        while not stop.wait(0.01):
            n += 1
            any_registry.register("ns", f"after-{n}")

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        first = next(watcher)
    finally:
        stop.set()
        thread.join(DEADLINE)
        watcher.close()
    assert first.kind == "registered"
    assert str(first.service).startswith("after-")  # never the earlier "before"


def test_watch_starts_where_it_was_called(any_registry: shmreg.Registry) -> None:
    watcher = any_registry.watch(timeout=0)  # "from the next event on", as of now
    any_registry.register("ns", "right-after")
    events = list(watcher)
    assert [(e.kind, e.service) for e in events] == [("registered", "right-after")]


def test_watch_resumes_after_any_sequence_number(any_registry: shmreg.Registry) -> None:
    start = last_seq(any_registry)
    for i in range(10):
        any_registry.register("ns", f"s{i}")
    everything = drain(any_registry, start)
    assert len(everything) == 10
    for cut in (0, 3, 9, 10):
        resumed = drain(any_registry, everything[cut - 1].seq if cut else start)
        assert resumed == everything[cut:]
    assert drain(any_registry, 0)[-10:] == everything  # since=0: the ring from its start


def test_watch_filters_by_namespace(any_registry: shmreg.Registry) -> None:
    start = last_seq(any_registry)
    for i in range(5):
        any_registry.register("a", f"s{i}")
        any_registry.register("b", f"s{i}")
    only_a = drain(any_registry, start, namespace="a")
    assert [e.service for e in only_a] == [f"s{i}" for i in range(5)]
    assert {e.namespace for e in only_a} == {"a"}
    assert [e.seq for e in only_a] == list(range(start + 1, start + 11, 2))
    assert drain(any_registry, start, namespace="c") == []


@pytest.mark.parametrize("timeout", [0, 0.5, 60])
def test_watch_timeout_runs_on_the_injected_clock(
    any_registry: shmreg.Registry, timeout: float
) -> None:
    clock = FakeClock()
    assert list(any_registry.watch(timeout=timeout, clock=clock)) == []
    assert timeout <= clock.monotonic() < timeout + 1.0


def test_watch_timeout_is_idle_time_not_total_time(any_registry: shmreg.Registry) -> None:
    """Each event restarts the idle timer: a steady stream is never cut off."""
    clock = FakeClock()
    reg = any_registry

    class Ticking:
        """A clock on which every sleep also produces one event, until 20 were made."""

        made = 0

        def monotonic(self) -> float:
            return clock.monotonic()

        def sleep(self, seconds: float) -> None:
            clock.sleep(seconds)
            if Ticking.made < 20:
                Ticking.made += 1
                reg.register("ns", f"s{Ticking.made}")

    events = list(reg.watch(timeout=0.0015, clock=Ticking(), poll_interval=0.001))
    assert [e.service for e in events] == [f"s{i}" for i in range(1, 21)]
    assert clock.monotonic() >= 0.001 * 20  # longer than the timeout, in total


@pytest.mark.parametrize("since", [-1, "3", 1.5, True])
def test_watch_rejects_bad_since(any_registry: shmreg.Registry, since: Any) -> None:
    with pytest.raises(shmreg.InvalidArgument):
        next(any_registry.watch(since=since, timeout=0))


def test_watch_rejects_bad_timeout(any_registry: shmreg.Registry) -> None:
    with pytest.raises(shmreg.InvalidArgument):
        next(any_registry.watch(timeout=-1))


def test_watch_sees_another_process_live(
    registry: shmreg.Registry, reg_name: str, tmp_path: Path
) -> None:
    code = r"""
reg = shmreg.Registry.attach(sys.argv[1])
wait_file(sys.argv[2])
gen = reg.register("ns", "remote", metadata={"v": 1})
reg.update_metadata("ns", "remote", {"v": 2})
reg.unregister("ns", "remote")
report({"pid": os.getpid(), "gen": gen})
time.sleep(1e9)  # until the test kills it
"""
    with children() as kids:
        go = str(tmp_path / "go")
        proc = kids.py(code, reg_name, go)
        watcher = registry.watch(since=last_seq(registry), timeout=DEADLINE)
        touch(go)
        got = [next(watcher) for _ in range(3)]
        watcher.close()
        info = read_line(proc)
    assert [(e.kind, e.service, e.pid, e.generation) for e in got] == [
        ("registered", "remote", info["pid"], info["gen"]),
        ("updated", "remote", info["pid"], info["gen"]),
        ("unregistered", "remote", info["pid"], info["gen"]),
    ]


# ---------------------------------------------------------------------- the ring overflows


def _churn(reg: shmreg.Registry, events: int) -> None:
    """Append exactly ``events`` events (register / unregister of one name)."""
    for i in range(events):
        if i % 2 == 0:
            reg.register("churn", "x")
        else:
            reg.unregister("churn", "x")


def ring_size(reg: shmreg.Registry) -> int:
    return int(getattr(reg.backend, "ring_events", RING_EVENTS))


@pytest.fixture(params=["shm", "memory-small-ring"])
def ring_registry(request: pytest.FixtureRequest, reg_name: str) -> Iterator[shmreg.Registry]:
    if request.param == "shm":
        reg = shmreg.Registry.create(reg_name, capacity=64)
    else:
        reg = shmreg.Registry(reg_name, backend=MemoryBackend(reg_name, ring_events=16))
    try:
        yield reg
    finally:
        reg.destroy()


def test_a_reader_behind_the_ring_is_told_how_many_it_lost(
    ring_registry: shmreg.Registry,
) -> None:
    reg = ring_registry
    ring = ring_size(reg)
    start = last_seq(reg)
    _churn(reg, ring + 37)
    events = drain(reg, start)
    lost, rest = events[0], events[1:]
    assert lost.kind == "lost"
    assert lost.lost == 37
    assert lost.seq == start + 37  # the number of the last event it will never see
    assert [e.seq for e in rest] == list(range(start + 38, start + ring + 38))
    assert {e.kind for e in rest} == {"registered", "unregistered"}
    assert sum(e.lost for e in events) == 37


def test_a_reader_exactly_one_ring_behind_loses_nothing(ring_registry: shmreg.Registry) -> None:
    reg = ring_registry
    ring = ring_size(reg)
    start = last_seq(reg)
    _churn(reg, ring)
    events = drain(reg, start)
    assert [e.kind for e in events if e.kind == "lost"] == []
    assert [e.seq for e in events] == list(range(start + 1, start + ring + 1))
    _churn(reg, 1)
    events = drain(reg, start)
    assert (events[0].kind, events[0].lost) == ("lost", 1)
    assert len(events) == ring + 1


def test_a_consumer_that_falls_behind_resumes_with_a_lost_event(
    ring_registry: shmreg.Registry,
) -> None:
    reg = ring_registry
    ring = ring_size(reg)
    start = last_seq(reg)
    _churn(reg, 10)
    first = drain(reg, start)
    position = first[4].seq  # consumed five, then stopped
    _churn(reg, ring + 100)
    resumed = drain(reg, position)
    assert resumed[0].kind == "lost"
    assert resumed[0].lost == (start + 10 + ring + 100) - ring - position
    assert resumed[1].seq == resumed[0].seq + 1  # no gap after the lost report
    assert resumed[-1].seq == last_seq(reg)
    # Resuming after the lost event itself continues without another report.
    again = drain(reg, resumed[0].seq)
    assert again == resumed[1:]


def test_a_live_watcher_overtaken_mid_stream_reports_the_gap(
    ring_registry: shmreg.Registry,
) -> None:
    reg = ring_registry
    ring = ring_size(reg)
    clock = FakeClock()
    watcher = reg.watch(since=last_seq(reg), timeout=0, clock=clock)
    _churn(reg, 3)
    got = [next(watcher) for _ in range(3)]
    assert [e.kind for e in got] == ["registered", "unregistered", "registered"]
    _churn(reg, ring + 5)  # the watcher is suspended meanwhile
    rest = list(watcher)
    assert rest[0].kind == "lost" and rest[0].lost == 5
    assert len(rest) == 1 + ring
    seqs = [e.seq for e in got + rest[1:]]
    assert seqs == sorted(seqs)


def test_an_event_overwritten_while_being_read_is_reported_in_place(
    registry: shmreg.Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process overwrites the reader's next-but-few event while it reads a batch.

    Simulated deterministically: the ring read of one chosen event first lets "the other
    writer" append enough events to overwrite exactly that one.
    """
    start = last_seq(registry)
    _churn(registry, 20)
    ring = registry.backend.store.ring  # type: ignore[attr-defined]
    real_read = ring.read
    victim = start + 6
    fired = []

    def read(seq: int) -> Any:
        if seq == victim and not fired:
            fired.append(seq)
            # The writer races ahead: victim + RING_EVENTS overwrites the victim's slot.
            _churn_to(registry, victim + RING_EVENTS)
        return real_read(seq)

    monkeypatch.setattr(ring, "read", read)
    stream = []
    for event in registry.watch(since=start, timeout=0):
        stream.append(event)
        if event.kind != "lost" and event.seq >= start + 20:
            break
    assert fired
    seqs = [e.seq for e in stream]
    assert seqs == sorted(set(seqs)), f"numbers out of order or repeated: {seqs[:12]}"
    # The five read before the overwrite come first, then the loss, where it happened.
    assert [(e.kind, e.seq, e.lost) for e in stream[:6]] == [
        *[
            ("registered" if (s - start) % 2 else "unregistered", s, 0)
            for s in range(start + 1, victim)
        ],
        ("lost", victim, 1),
    ]


def _churn_to(reg: shmreg.Registry, seq: int) -> None:
    """Append events until the newest is number ``seq``."""
    while last_seq(reg) < seq:
        if reg.lookup("churn", "x") is None:
            reg.register("churn", "x")
        else:
            reg.unregister("churn", "x")


@pytest.mark.slow
def test_ring_overflow_under_a_concurrent_writer(registry: shmreg.Registry, reg_name: str) -> None:
    """A writer in another process laps a slow reader many times: every event is accounted
    for, either delivered (in order, no duplicates) or counted as lost."""
    code = r"""
reg = shmreg.Registry.attach(sys.argv[1])
for i in range(int(sys.argv[2])):
    reg.register("churn", "x") if i % 2 == 0 else reg.unregister("churn", "x")
report({"done": True})
"""
    total = RING_EVENTS * 6
    with children() as kids:
        start = last_seq(registry)
        proc = kids.py(code, reg_name, str(total))
        seen = lost = 0
        delivered = start
        watcher = registry.watch(since=start, timeout=DEADLINE)
        for event in watcher:
            if event.kind == "lost":
                lost += event.lost
                continue
            assert event.seq > delivered  # in order, no duplicates
            delivered = event.seq
            seen += 1
            if seen % 512 == 0:
                time.sleep(0.005)  # a slow consumer
            if delivered >= start + total:
                break
        watcher.close()
        assert read_line(proc) == {"done": True}
    assert seen + lost == total


def test_events_carry_the_owner_identity(registry: shmreg.Registry) -> None:
    with children() as kids:
        proc = kids.sleeper()
        ident = identity_of(proc.pid)
        start = last_seq(registry)
        registry.register("ns", "svc", pid=proc.pid)
        registry.backend.register(
            "ns", "forged", ProcessIdentity(proc.pid, ident.start_ticks + 3), None
        )
        events = drain(registry, start)
    assert [(e.pid, e.start_ticks) for e in events] == [
        (proc.pid, ident.start_ticks),
        (proc.pid, ident.start_ticks + 3),
    ]

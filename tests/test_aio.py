"""``shmreg.aio`` under a real event loop (``asyncio.run``): waits that never block the
loop, and cancellation that leaves no thread, descriptor or task behind.

"Never blocks the loop" is proven without timing: the name or event awaited is produced by
another coroutine on the same loop, which could never run if the wait blocked it (the test
would then end in RegistryTimeout, not hang: every wait has a generous bound).
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest
from helpers import DEADLINE_S, children, wait_zombie

import shmreg
from shmreg import _known_pids, aio


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _threads() -> set[int]:
    return {t.ident for t in threading.enumerate() if t.ident is not None}


def _leftovers(before: tuple[set[str], set[int]]) -> tuple[set[str], set[int]]:
    fds, threads = before
    # The pidfds that vouch for remembered identities of registered children are the
    # identity cache's, held on purpose (shmreg._known_pids); what must not outlive the
    # monitor is its own.
    _known_pids.clear()
    return _fds() - fds, _threads() - threads


def test_wait_for_yields_to_the_loop_until_another_coroutine_registers(
    any_registry: shmreg.Registry,
) -> None:
    async def main() -> int:
        async def later() -> None:
            for i in range(20):  # events about other names wake the waiter, who waits on
                any_registry.register("ns", f"other-{i}")
                await asyncio.sleep(0)
            any_registry.register("ns", "svc")

        task = asyncio.create_task(later())
        pid = await aio.wait_for(any_registry, "ns", "svc", timeout=DEADLINE_S)
        await task
        return pid

    assert asyncio.run(main()) == os.getpid()


def test_wait_for_times_out_and_checks_its_arguments(any_registry: shmreg.Registry) -> None:
    with pytest.raises(shmreg.RegistryTimeout):
        asyncio.run(aio.wait_for(any_registry, "ns", "never", timeout=0))
    with pytest.raises(shmreg.InvalidArgument):
        asyncio.run(aio.wait_for(any_registry, "ns", "never", timeout=-1))


def test_watch_delivers_events_made_on_the_same_loop(any_registry: shmreg.Registry) -> None:
    async def main() -> list[tuple[str, Any]]:
        seen: list[tuple[str, Any]] = []
        events = aio.watch(any_registry, "ns", timeout=DEADLINE_S)

        async def produce() -> None:
            await asyncio.sleep(0)
            any_registry.register("ns", "a")
            any_registry.register("elsewhere", "b")  # filtered out by namespace
            any_registry.update_metadata("ns", "a", {"x": 1})
            any_registry.unregister("ns", "a")

        task = asyncio.create_task(produce())
        async for event in events:
            seen.append((event.kind, event.service))
            if event.kind == "unregistered":
                break
        await events.aclose()
        await task
        return seen

    assert asyncio.run(main()) == [("registered", "a"), ("updated", "a"), ("unregistered", "a")]


def test_watch_since_and_timeout(any_registry: shmreg.Registry) -> None:
    any_registry.register("ns", "a")
    any_registry.unregister("ns", "a")

    async def main() -> list[str]:
        return [e.kind async for e in aio.watch(any_registry, since=0, timeout=0)]

    assert asyncio.run(main()) == ["registered", "unregistered"]

    async def bad() -> None:
        async for _ in aio.watch(any_registry, since=-1):
            pass

    with pytest.raises(shmreg.InvalidArgument):
        asyncio.run(bad())


@pytest.mark.parametrize("what", ["wait_for", "watch", "deaths"])
def test_cancelling_leaves_nothing_behind(any_registry: shmreg.Registry, what: str) -> None:
    async def main() -> set[asyncio.Task[Any]]:
        async def consume() -> None:
            if what == "wait_for":
                await aio.wait_for(any_registry, "ns", "never")
            elif what == "watch":
                async for _ in aio.watch(any_registry):
                    pass
            else:
                async for _ in aio.deaths(any_registry):
                    pass

        task = asyncio.create_task(consume())
        for _ in range(5):
            await asyncio.sleep(0.001)  # let it poll a few times
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]

    before = (_fds(), _threads())
    assert asyncio.run(main()) == set()
    assert _leftovers(before) == (set(), set())


def test_monitor_hands_deaths_to_the_loop_and_stops_on_exit(registry: shmreg.Registry) -> None:
    before = (_fds(), _threads())

    async def main() -> list[tuple[int, str, int]]:
        got = []
        with children() as kids:
            owners = [kids.sleeper() for _ in range(2)]
            for n, proc in enumerate(owners):
                registry.register("ns", f"s{n}", pid=proc.pid)
                registry.register("ns", f"t{n}", pid=proc.pid)
            async with aio.monitor(registry) as notices:
                for proc in owners:
                    proc.kill()
                    wait_zombie(proc.pid)
                for _ in owners:
                    notice = await asyncio.wait_for(notices.get(), DEADLINE_S)
                    got.append((notice.identity.pid, notice.verdict.value, notice.removed))
            assert [n async for n in notices] == []  # ended with the block
        return sorted(got)

    got = asyncio.run(main())
    assert [(pid, removed) for pid, _, removed in got] == sorted(
        (pid, 2) for pid, _, _ in got
    )
    assert {verdict for _, verdict, _ in got} <= {"gone", "zombie"}
    assert registry.count("ns") == 0
    assert _leftovers(before) == (set(), set())


def test_cancelling_inside_the_monitor_block_stops_its_thread(registry: shmreg.Registry) -> None:
    before = (_fds(), _threads())

    async def main() -> None:
        started = asyncio.Event()

        async def follow() -> None:
            async with aio.monitor(registry) as notices:
                started.set()
                async for _ in notices:
                    pass

        task = asyncio.create_task(follow())
        await asyncio.wait_for(started.wait(), DEADLINE_S)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert _leftovers(before) == (set(), set())

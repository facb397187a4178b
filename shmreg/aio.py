"""asyncio: ``wait_for``, ``watch`` and death notices that never block the event loop.

    import asyncio, shmreg
    from shmreg import aio

    async def main() -> None:
        reg = shmreg.Registry("jobs")
        pid = await aio.wait_for(reg, "production", "db", timeout=5)
        async for event in aio.watch(reg, "production"):
            ...
        async with aio.monitor(reg) as notices:   # the death monitor, its news on the loop
            async for notice in notices:
                print(notice.identity.pid, notice.verdict, notice.removed)

How it stays off the loop's back: between looks, ``wait_for`` and ``watch`` read one word
(the newest event number) and otherwise ``await asyncio.sleep``: no thread, no executor,
no file descriptor, so cancelling them leaves nothing behind. ``monitor`` runs the death
monitor's thread (it waits on pidfds, which the loop cannot) and hands each death to the
loop with ``call_soon_threadsafe``; leaving the block, normally or by cancellation, stops
that thread and closes its descriptors before the block is left.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shmreg._clock import check_timeout
from shmreg._engine.events import Event
from shmreg._errors import RegistryTimeout
from shmreg._follow import next_events, watch_start
from shmreg._liveness import Monitor
from shmreg._types import Liveness, ProcessIdentity, Service

if TYPE_CHECKING:
    from shmreg._registry import Registry

__all__ = ["DeathNotice", "DeathNotices", "deaths", "monitor", "wait_for", "watch"]


async def wait_for(
    reg: Registry,
    namespace: str,
    service: Service,
    timeout: float | None = None,
    *,
    poll_interval: float = 0.001,
) -> int:
    """Wait, without blocking the loop, until the name has a live owner; its pid.

    ``RegistryTimeout`` after ``timeout`` seconds (None: wait for ever). Cancellable at
    every poll; nothing is left running when it is cancelled.
    """
    timeout = check_timeout(timeout)
    interval = check_timeout(poll_interval, "poll_interval") or 0.0
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    backend = reg.backend
    last_seen: Callable[[], int] = getattr(backend, "last_event_seq", lambda: -1)
    while True:
        seq = last_seen()
        pid = backend.lookup(namespace, service)
        if pid is not None:
            return pid
        # Look the name up again only when the event number moved (or there is none).
        while True:
            if deadline is not None and loop.time() >= deadline:
                raise RegistryTimeout(
                    f"{namespace}/{service!r} not registered within {timeout} s",
                    timeout=timeout,
                )
            await asyncio.sleep(interval)
            if seq == -1 or last_seen() != seq:
                break


async def watch(
    reg: Registry,
    namespace: str | None = None,
    since: int | None = None,
    *,
    timeout: float | None = None,
    poll_interval: float = 0.001,
) -> AsyncIterator[Event]:
    """``Registry.watch`` for asyncio: ``async for event in aio.watch(reg): ...``.

    Same events, same ``since`` and ``lost`` rules; ends after ``timeout`` seconds without
    an event (None: never). The arguments are checked when the first event is awaited.
    """
    timeout, position = watch_start(reg.backend, namespace, since, timeout)
    interval = check_timeout(poll_interval, "poll_interval") or 0.0
    loop = asyncio.get_running_loop()
    idle_since = loop.time()
    while True:
        events, position, moved = next_events(reg.backend, namespace, position)
        for event in events:
            yield event
        if moved:
            idle_since = loop.time()
            continue
        if timeout is not None and loop.time() - idle_since >= timeout:
            return
        await asyncio.sleep(interval)


async def deaths(
    reg: Registry, namespace: str | None = None, *, timeout: float | None = None
) -> AsyncIterator[Event]:
    """The ``died`` events of the registry as they happen, whoever removed the entries
    (a monitor in any process, a sweep): the death notices of a registry, no monitor needed
    here. Ends after ``timeout`` idle seconds (None: never)."""
    async for event in watch(reg, namespace, timeout=timeout):
        if event.kind == "died":
            yield event


@dataclass(frozen=True)
class DeathNotice:
    """One death the monitor acted on: who, the verdict, and how many entries went."""

    identity: ProcessIdentity
    verdict: Liveness
    removed: int


class DeathNotices:
    """The notices of a running ``monitor``, in the order the deaths were found.

    ``async for notice in notices`` ends when the ``monitor`` block is left;
    ``await notices.get()`` takes one.
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[DeathNotice | None] = asyncio.Queue()
        self.monitor: Monitor | None = None  # the thread's Monitor, for its stats

    async def get(self) -> DeathNotice:
        """The next notice; waits on the loop, never on a lock."""
        notice = await self._queue.get()
        if notice is None:
            self._queue.put_nowait(None)  # keep the end visible to every reader
            raise StopAsyncIteration
        return notice

    def __aiter__(self) -> DeathNotices:
        return self

    async def __anext__(self) -> DeathNotice:
        return await self.get()


@contextlib.asynccontextmanager
async def monitor(
    reg: Registry,
    *,
    poll_interval: float = 0.01,
    sweep_interval: float = 1.0,
    stop_timeout: float = 30.0,
) -> AsyncIterator[DeathNotices]:
    """Run the death monitor for the block; its notices arrive on this loop.

    The monitor thread removes dead owners' entries as ``Registry.monitor`` does; each
    death is also queued for the loop. On the way out (cancellation included) the thread
    is asked to stop and awaited without blocking the loop, then its descriptors closed.
    """
    loop = asyncio.get_running_loop()
    notices = DeathNotices()

    def on_death(identity: Any, verdict: Any, removed: int) -> None:
        # On the monitor's thread: the queue belongs to the loop, so hand it over.
        notice = DeathNotice(identity, verdict, removed)
        with contextlib.suppress(RuntimeError):  # the loop closed under us: nobody listens
            loop.call_soon_threadsafe(notices._queue.put_nowait, notice)

    running = Monitor(
        reg.backend, poll_interval=poll_interval, sweep_interval=sweep_interval,
        on_death=on_death,
    ).start()
    notices.monitor = running
    try:
        yield notices
    finally:
        running.request_stop()
        thread = running._thread
        try:
            deadline = loop.time() + stop_timeout
            while thread is not None and thread.is_alive() and loop.time() < deadline:
                await asyncio.sleep(0.005)  # the thread leaves within one poll interval
        finally:
            # Joins a thread that has ended (or gives up after stop_timeout) and closes the
            # wake-up pipe: runs even if the wait above was cancelled too.
            running.stop(timeout=0)
            notices._queue.put_nowait(None)

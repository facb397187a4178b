"""Following the event ring: the steps ``Registry.watch`` and ``shmreg.aio.watch`` share.

Both loops are the same apart from how they wait between looks (``clock.sleep`` in a
thread, ``asyncio.sleep`` on an event loop), so the looking lives here once.
"""

from __future__ import annotations

from typing import Any

from shmreg._clock import check_timeout
from shmreg._codec import check_namespace
from shmreg._engine.events import Event
from shmreg._errors import InvalidArgument


def watch_start(
    backend: Any, namespace: str | None, since: int | None, timeout: float | None
) -> tuple[float | None, int]:
    """The checked arguments of a watch: its timeout and the event number it starts after.

    The start is fixed at the call, not at the first iteration: events between the two
    belong to the watch.
    """
    timeout = check_timeout(timeout)
    if since is not None and (type(since) is not int or since < 0):
        shown = repr(since)[:80]
        raise InvalidArgument(
            f"since must be an event number >= 0, got {shown}", argument="since", value=shown
        )
    if namespace is not None:
        check_namespace(namespace)  # a bad one would never match: say so now
    return timeout, backend.last_event_seq() if since is None else since


def next_events(
    backend: Any, namespace: str | None, position: int
) -> tuple[list[Event], int, bool]:
    """One look at the ring after ``position``: the events to hand out (a ``lost`` one
    first if the reader fell behind), the new position, and whether anything moved."""
    events, lost = backend.read_events(position)
    out = []
    if lost:
        # The gap sits right after ``position``: the lost event is numbered as the last one
        # missed, so resuming from it skips nothing that was delivered.
        position += lost
        out.append(Event(seq=position, kind="lost", lost=lost))
    for event in events:
        position = event.seq
        if namespace is None or event.namespace == namespace:
            out.append(event)
    return out, position, bool(events or lost)

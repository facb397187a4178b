"""What every conformance check shares: the registry of checks, owners, and assertions.

Checks raise ``AssertionError`` explicitly (not with ``assert``), so they still check under
``python -O``. Owners are real ``ProcessIdentity`` values: this process, and child
interpreters started by ``_children``, which kills and reaps each of them on the way out
whatever the check did. A dead owner is a child that was killed *and reaped*; if the kernel
hands its pid to a new process within the check's few milliseconds, that check can fail
spuriously.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from shmreg import _identity
from shmreg._engine.events import Event
from shmreg._engine.layout import RING_EVENTS
from shmreg._types import Liveness, ProcessIdentity
from shmreg.backends._protocol import Backend

Check = Callable[[Backend], None]

NS = "conformance"
OTHER = "conformance:other"
_METADATA_LIMIT = 16 * 1024 * 1024  # the largest max_metadata_bytes any registry accepts


def collector(into: list[tuple[str, Check]]) -> Callable[[Check], Check]:
    """A decorator that appends each check it marks to ``into``, as ``(name, check)``."""

    def mark(fn: Check) -> Check:
        into.append((fn.__name__, fn))
        return fn

    return mark


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)


def _equal(actual: object, expected: object, what: str) -> None:
    if actual != expected:
        raise AssertionError(f"{what}: expected {_short(expected)}, got {_short(actual)}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def _raises(kind: type[Exception], call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call and return the raised ``kind`` error; anything else fails the check."""
    what = f"{getattr(call, '__name__', 'call')}{_short(args)[:100]}"
    try:
        result = call(*args, **kwargs)
    except kind as exc:
        # The traceback's frames reach back to the caller, which keeps the error: a cycle
        # that would pin the backend's frames (and any view into shared memory they hold)
        # until the garbage collector runs, long after the backend was destroyed.
        link: BaseException | None = exc
        while link is not None:
            link.__traceback__ = None
            link = link.__cause__ or link.__context__
        return exc
    except Exception as exc:
        raise AssertionError(
            f"{what}: expected {kind.__name__}, got {type(exc).__name__}: {exc}"
        ) from exc
    raise AssertionError(f"{what}: expected {kind.__name__}, returned {_short(result)}")


def _canon(value: object) -> object:
    """A form equal only for values of the same types: True != 1, 1.0 != 1, (1,) != [1]."""
    if type(value) is dict:
        return ("dict", tuple(sorted((str(k), _canon(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_canon(v) for v in value))
    return (type(value).__name__, repr(value))


def _me() -> ProcessIdentity:
    return _identity.self_identity()


def _reused(identity: ProcessIdentity) -> ProcessIdentity:
    """The identity a registry would hold if ``identity``'s pid now belonged to a newcomer."""
    return ProcessIdentity(identity.pid, identity.start_ticks + 1)


@contextmanager
def _children(count: int = 1) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Sleeping child interpreters; whatever happens, each is killed and reaped on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-S", "-c", "import time; time.sleep(300)"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _owner(proc: subprocess.Popen[bytes]) -> ProcessIdentity:
    return _identity.identity_of(proc.pid)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


def _zombie(proc: subprocess.Popen[bytes], owner: ProcessIdentity) -> None:
    """Kill without reaping, and wait until the kernel shows the zombie."""
    proc.kill()
    # Microseconds normally; the bound only catches a hang, so it is generous: a loaded
    # machine (a CI runner, the checks run beside other tests) can delay an exit for seconds.
    deadline = time.monotonic() + 60
    while _identity.check(owner) is not Liveness.ZOMBIE:
        _expect(time.monotonic() < deadline, f"pid {proc.pid} never became a zombie")
        time.sleep(0.001)


def _snapshot(backend: Backend, namespaces: tuple[str, ...] = (NS, OTHER)) -> object:
    """Everything a caller can observe, in a comparable form."""
    seen: list[object] = [backend.count(), backend.stats().used]
    for ns in namespaces:
        rows = []
        for entry in backend.list_entries(ns):
            found = backend.lookup_entry(ns, entry.service)
            rows.append(
                (repr(entry.service), entry.pid, found and found[1], _canon(entry.metadata))
            )
        seen.append(sorted(rows, key=repr))
    return seen


def _services(backend: Backend, namespace: str) -> set[str]:
    return {repr(s) for s in backend.list_services(namespace)}


def _found(entries: list[Any]) -> set[str]:
    return {repr(e.service) for e in entries}


def _limit(backend: Backend) -> int:
    limit = getattr(backend, "max_metadata_bytes", None)
    return limit if type(limit) is int else _METADATA_LIMIT


def _nest(levels: int, wrap: Callable[[object], object], seed: object = 1) -> object:
    value = seed
    for _ in range(levels):
        value = wrap(value)
    return value


def _ring_size(backend: Backend) -> int:
    """How many events the backend's ring keeps: its ``ring_events``, else the shared ring's."""
    size = getattr(backend, "ring_events", None)
    return size if type(size) is int else RING_EVENTS


def _read_all(backend: Backend, after: int) -> tuple[list[Event], int]:
    """Every event after ``after`` up to the newest, in as many reads as it takes; and the
    total reported lost. Checks on the way that each read starts where the last one ended."""
    out: list[Event] = []
    lost_total = 0
    for _ in range(100_000):
        events, lost = backend.read_events(after)
        _expect(type(lost) is int and lost >= 0, f"read_events({after}) lost {lost!r}")
        lost_total += lost
        after += lost
        if not events:
            return out, lost_total
        _equal(
            [e.seq for e in events],
            list(range(after + 1, after + 1 + len(events))),
            f"numbers of the events read after {after}",
        )
        out += events
        after = events[-1].seq
    raise AssertionError(f"read_events never caught up (at {after})")


#: What ``_row`` keeps of an event: everything but the time.
Row = tuple[int, str, str | None, str, int, int, str | None, int]


def _row(event: Event) -> Row:
    """An event in a comparable form (the service by ``repr``: 1, True and (1,) differ)."""
    return (
        event.seq,
        event.kind,
        event.namespace,
        repr(event.service),
        event.pid,
        event.generation,
        event.reason,
        event.start_ticks,
    )


def _want(
    seq: int,
    kind: str,
    namespace: str,
    service: object,
    owner: ProcessIdentity,
    generation: int,
    reason: str | None = None,
) -> Row:
    """The ``_row`` of the event a check expects."""
    return (seq, kind, namespace, repr(service), owner.pid, generation, reason, owner.start_ticks)


def _in_threads(calls: list[Callable[[], object]]) -> list[object]:
    """Run each call in its own thread, all released at once; results (or ``repr`` of errors)."""
    barrier = threading.Barrier(len(calls), timeout=60)
    results: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:  # reported by the caller, not lost in the thread
            results[i] = repr(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results

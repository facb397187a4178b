"""``DualWriteBackend``: every write goes to a primary, then is mirrored to a secondary.

The primary is the truth: a call succeeds or fails as the primary says, and its result is
the primary's. After it, the name's new state on the primary (entry with owner and
generation, or its absence) is copied to the secondary with ``swap_entry``, so the secondary
keeps the primary's fencing generations. A secondary that fails (down, full, anything) never
fails the acknowledged primary write: the failure is counted (``stats().extra["dual"]``),
logged on the ``shmreg.migration`` logger, and the name is remembered for ``reconcile()``,
which copies it again (``reconcile(full=True)`` compares every namespace).

Two processes mirroring the same name can interleave; each mirror re-reads the primary after
copying and copies again if the name moved meanwhile, so the secondary ends where the primary
is.

Failover (``BackendMonitor`` does it, or a caller): ``fail_over()`` makes the secondary
serve reads and acknowledged writes while the primary is down; the primary is then not
written, the names written meanwhile are remembered. ``fail_back()`` resyncs the primary
from the secondary (a full ``reconcile``, then the names written during it, with writes held
for that last step only) and makes it serve again, so no acknowledged registration is lost.
Writes in flight finish before a switch; the side that serves is the "front" below.

Reads ask the primary and fall back to the secondary on a miss or a failing primary; lists
are the union, the primary winning a name both hold. Events and ``wait_events`` are the
primary's. Open one as ``Registry("jobs", backend=DualWriteBackend(a, b))`` or by URL,
``Registry("jobs", url="dual+shm://jobs?secondary=redis://db1:6379/0")``.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Concatenate, ParamSpec, TypeVar

from shmreg import _codec
from shmreg._engine.events import Event
from shmreg._error_base import ShmregError
from shmreg._errors import BackendUnavailable
from shmreg._types import (
    Entry,
    HealthReport,
    Liveness,
    Metadata,
    ProcessIdentity,
    RegistryStats,
    Service,
)
from shmreg.backends._base import BackendBase
from shmreg.backends._portable import StoredEntry, read_entry, same_entry
from shmreg.backends._protocol import Backend
from shmreg.backends._switchgate import SwitchGate

log = logging.getLogger("shmreg.migration")
T = TypeVar("T")
P = ParamSpec("P")
_ROUNDS = 5  # mirror attempts while the name keeps moving under us
PRIMARY, SECONDARY = "primary", "secondary"


def _gated(
    method: Callable[Concatenate[DualWriteBackend, P], T],
) -> Callable[Concatenate[DualWriteBackend, P], T]:
    """Run a write with the gate shared, so no switch happens in its middle."""

    def call(self: DualWriteBackend, /, *args: P.args, **kwargs: P.kwargs) -> T:
        with self._gate.shared():
            return method(self, *args, **kwargs)

    functools.update_wrapper(call, method)
    return call


class DualWriteBackend(BackendBase):
    """Writes to ``primary`` and mirrors them to ``secondary``; see the module docstring."""

    kind = "dual"

    def __init__(self, primary: Backend, secondary: Backend) -> None:
        self.primary = primary
        self.secondary = secondary
        self.failures = 0  # secondary writes that failed, ever
        self.reconciled = 0  # names copied again by reconcile()
        # Names whose mirror failed, by key bytes: reads do not fall back to the secondary for
        # them (it may still hold what the primary has since removed or changed).
        self._pending: dict[bytes, tuple[str, Service]] = {}
        self._lock = threading.Lock()
        self._front, self._back = primary, secondary  # the side that serves, the mirrored one
        self._deferred = False  # failed over: the back (primary) is not written until resynced
        self._gate = SwitchGate()

    @property
    def serving(self) -> str:
        """``"primary"``, or ``"secondary"`` after ``fail_over()`` until ``fail_back()``."""
        return PRIMARY if self._front is self.primary else SECONDARY

    def fail_over(self) -> None:
        """Serve reads and writes from the secondary; the primary is resynced by ``fail_back``.

        Waits for writes in flight. While failed over the primary is neither written nor read.
        """
        with self._gate.exclusive():
            if self._front is self.primary:
                self._front, self._back = self.secondary, self.primary
                self._deferred = True

    def fail_back(self) -> int:
        """Copy the secondary's state to the primary, then serve from the primary again.

        Writes go on during the full copy (mirrored to the primary from then on); they are held
        only while the names written meanwhile are copied and the sides swap. Returns the names
        written to the primary. Raises ``BackendUnavailable`` (still serving from the
        secondary) if the primary cannot be brought up to date.
        """
        if self._front is self.primary:
            return 0
        with self._gate.shared():
            self._deferred = False
            try:
                copied = self._reconcile(full=True)
            except Exception:
                self._deferred = True
                raise
        with self._gate.exclusive():
            copied += self._reconcile()
            if self._pending:
                self._deferred = True
                raise BackendUnavailable(
                    f"primary {self.primary.name!r} still misses {len(self._pending)} names; "
                    "serving from the secondary",
                    backend=getattr(self.primary, "kind", None),
                )
            self._front, self._back = self.primary, self.secondary
        return copied

    @property
    def name(self) -> str:
        return self.primary.name

    @property
    def capacity(self) -> int | None:
        """The primary's capacity (its figures are the ones ``stats()`` reports)."""
        capacity: int | None = getattr(self.primary, "capacity", None)
        return capacity

    @property
    def max_metadata_bytes(self) -> int | None:
        """The primary's limit (it is the one that refuses)."""
        limit: int | None = getattr(self.primary, "max_metadata_bytes", None)
        return limit

    @property
    def ring_events(self) -> int | None:
        """The primary's event ring size: events are the primary's."""
        size: int | None = getattr(self.primary, "ring_events", None)
        return size

    @property
    def location(self) -> str:
        """``dual+PRIMARY?secondary=SECONDARY`` (``shmreg.migration.open_location`` opens it)."""
        from shmreg.migration._locations import location_of

        return f"dual+{location_of(self.primary)}?secondary={location_of(self.secondary)}"

    @property
    def url(self) -> str:
        """The location, as ``Registry(name, url=...)`` takes it (pickles reopen by it)."""
        return self.location

    @property
    def pending(self) -> int:
        """Names whose mirror failed and that ``reconcile()`` has not copied yet."""
        return len(self._pending)

    # ------------------------------------------------------------------ mirroring

    def _mirror(self, namespace: str, service: Service, known: StoredEntry | None = None) -> None:
        """Copy the name's primary state to the secondary; a failure is counted, never raised."""
        key = _codec.encode_key(namespace, service)
        if self._deferred:  # failed over: fail_back() copies it
            with self._lock:
                self._pending[key] = (namespace, service)
            return
        try:
            self._copy(namespace, service, known)
        except Exception as exc:
            with self._lock:
                self.failures += 1
                self._pending[key] = (namespace, service)
            log.warning(
                "dual-write: secondary %r failed for %s/%r (%s); kept for reconcile()",
                self._back.name,
                namespace,
                service,
                exc,
            )
            return
        if self._pending:  # mirrored now: reads may fall back to the secondary again
            with self._lock:
                self._pending.pop(key, None)

    def _copy(self, namespace: str, service: Service, known: StoredEntry | None = None) -> bool:
        """Make the secondary hold what the primary holds; True if it had to write."""
        wrote = False
        want = known if known is not None else read_entry(self._front, namespace, service)
        # What the secondary holds: a fresh name is the common case, so an entry to copy is
        # first tried over "absent"; a refused swap answers with what is really there.
        held = None if want is not None else read_entry(self._back, namespace, service)
        for _ in range(_ROUNDS):
            if not same_entry(held, want):
                ok, found = self._back.swap_entry(namespace, service, held, want)
                held = found
                if not ok:
                    continue
                wrote = True
            now = read_entry(self._front, namespace, service)
            if same_entry(now, want):
                return wrote
            want = now
        raise RuntimeError(f"{namespace}/{service!r} kept changing while it was mirrored")

    def reconcile(self, *, full: bool = False) -> int:
        """Copy again every name whose mirror failed (``full``: compare every namespace).

        Returns how many names were written to the secondary (to the primary after a
        failover: then it does nothing until ``fail_back``). A name that fails again stays
        pending; nothing is raised unless the serving side itself fails.
        """
        if self._deferred:
            return 0
        with self._gate.shared():
            return self._reconcile(full=full)

    def _reconcile(self, *, full: bool = False) -> int:
        with self._lock:
            names = dict(self._pending)
        if full:
            for ns in sorted(set(self._front.namespaces()) | set(self._back.namespaces())):
                exported = self._front.export_entries(ns)
                ours = {_codec.encode_key(ns, e.service): e for e in exported}
                for e in self._back.export_entries(ns):
                    mine = ours.get(_codec.encode_key(ns, e.service))
                    if not same_entry(mine, e):
                        names[_codec.encode_key(ns, e.service)] = (ns, e.service)
                names.update({key: (ns, e.service) for key, e in ours.items()})
        fixed = 0
        for key, (namespace, service) in names.items():
            try:
                fixed += self._copy(namespace, service)
            except Exception as exc:  # the secondary still failing: stays pending
                log.warning("reconcile: %s/%r still fails (%s)", namespace, service, exc)
                continue
            with self._lock:
                self._pending.pop(key, None)
        with self._lock:
            self.reconciled += fixed
        return fixed

    def _read(
        self, namespace: str, service: Service, call: Callable[[Backend], T | None]
    ) -> T | None:
        """The primary's answer, or the secondary's on a miss or a failing primary."""
        if self._deferred:
            return call(self._front)
        try:
            found = call(self._front)
        except ShmregError:
            return call(self._back)
        if found is not None or _codec.encode_key(namespace, service) in self._pending:
            return found
        try:
            return call(self._back)
        except ShmregError:
            return None

    # ------------------------------------------------------------------ writes

    @_gated
    def register(
        self,
        namespace: str,
        service: Service,
        owner: ProcessIdentity,
        metadata: Mapping[str, Any] | None,
    ) -> int:
        generation = self._front.register(namespace, service, owner, metadata)
        known = StoredEntry(namespace, service, owner, generation, _codec.as_metadata(metadata))
        self._mirror(namespace, service, known)
        return generation

    @_gated
    def register_many(
        self,
        namespace: str,
        items: list[tuple[Service, ProcessIdentity, Mapping[str, Any] | None]],
    ) -> list[int]:
        try:
            generations = self._front.register_many(namespace, items)
        except ShmregError:
            # The items before the refused one stay registered: mirror those that did.
            for service, _, _ in items:
                self._mirror(namespace, service)
            raise
        for (service, owner, metadata), generation in zip(items, generations, strict=True):
            meta = _codec.as_metadata(metadata)
            known = StoredEntry(namespace, service, owner, generation, meta)
            self._mirror(namespace, service, known)
        return generations

    @_gated
    def update_metadata(
        self,
        namespace: str,
        service: Service,
        metadata: Mapping[str, Any],
        *,
        merge: bool = False,
        generation: int | None = None,
    ) -> None:
        self._front.update_metadata(
            namespace, service, metadata, merge=merge, generation=generation
        )
        self._mirror(namespace, service)

    @_gated
    def unregister(
        self, namespace: str, service: Service, *, generation: int | None = None
    ) -> bool:
        removed = self._front.unregister(namespace, service, generation=generation)
        self._mirror(namespace, service)
        return removed

    @_gated
    def swap_entry(
        self,
        namespace: str,
        service: Service,
        expect: StoredEntry | None,
        new: StoredEntry | None,
    ) -> tuple[bool, StoredEntry | None]:
        done = self._front.swap_entry(namespace, service, expect, new)
        if done[0] and not same_entry(expect, new):
            self._mirror(namespace, service, done[1])
        return done

    # ------------------------------------------------------------------ reads

    def lookup(self, namespace: str, service: Service) -> int | None:
        return self._read(namespace, service, lambda b: b.lookup(namespace, service))

    def lookup_with_metadata(self, namespace: str, service: Service) -> tuple[int, Metadata] | None:
        return self._read(namespace, service, lambda b: b.lookup_with_metadata(namespace, service))

    def lookup_entry(self, namespace: str, service: Service) -> tuple[int, int, Metadata] | None:
        return self._read(namespace, service, lambda b: b.lookup_entry(namespace, service))

    def _union(self, call: Callable[[Backend], list[T]], key: Callable[[T], bytes]) -> list[T]:
        if self._deferred:
            return call(self._front)
        try:
            ours = call(self._front)
        except ShmregError:
            return call(self._back)
        try:
            theirs = call(self._back)
        except ShmregError:
            return ours
        seen = {key(item) for item in ours}
        seen.update(self._pending)
        return ours + [item for item in theirs if key(item) not in seen]

    def export_entries(self, namespace: str) -> list[StoredEntry]:
        return self._union(
            lambda b: b.export_entries(namespace),
            lambda e: _codec.encode_key(namespace, e.service),
        )

    def list_entries(self, namespace: str) -> list[Entry]:
        return self._union(
            lambda b: b.list_entries(namespace), lambda e: _codec.encode_key(namespace, e.service)
        )

    def list_services(self, namespace: str) -> list[Service]:
        return [e.service for e in self.list_entries(namespace)]

    def namespace_owners(self, namespace: str) -> list[tuple[Service, ProcessIdentity, int]]:
        return self._union(
            lambda b: b.namespace_owners(namespace), lambda o: _codec.encode_key(namespace, o[0])
        )

    def namespaces(self) -> list[str]:
        return sorted(set(self._union(lambda b: b.namespaces(), lambda ns: ns.encode())))

    def count(self, namespace: str | None = None) -> int:
        spaces = self.namespaces() if namespace is None else [namespace]
        return sum(len(self.list_entries(ns)) for ns in spaces)

    # ------------------------------------------------------------------ liveness and events

    def owner_counts(self) -> dict[ProcessIdentity, int]:
        return self._front.owner_counts()

    @_gated
    def remove_dead(self, verdicts: Mapping[ProcessIdentity, Liveness]) -> int:
        removed = self._front.remove_dead(verdicts)
        if self._deferred:
            return removed
        try:
            self._back.remove_dead(verdicts)
        except Exception as exc:
            log.warning("dual-write: secondary %r remove_dead failed (%s)", self._back, exc)
        return removed

    @_gated
    def sweep(self) -> int:
        removed = self._front.sweep()
        if self._deferred:
            return removed
        try:
            self._back.sweep()
        except Exception as exc:
            log.warning("dual-write: secondary %r sweep failed (%s)", self._back, exc)
        return removed

    def health_check(self) -> HealthReport:
        return self._front.health_check()

    def last_event_seq(self) -> int:
        return self._front.last_event_seq()

    def read_events(self, after: int, limit: int = 1024) -> tuple[list[Event], int]:
        return self._front.read_events(after, limit)

    def wait_events(self, after: int, timeout: float) -> bool:
        """The primary's blocking wait when it has one (Redis), else one check."""
        wait: Callable[[int, float], bool] | None = getattr(self._front, "wait_events", None)
        if wait is not None:
            return wait(after, timeout)
        return self._front.last_event_seq() > after

    def stats(self) -> RegistryStats:
        stats = self._front.stats()
        extra = dict(stats.extra)
        extra["dual"] = {
            "secondary": self.secondary.name,
            "secondary_failures": self.failures,
            "pending": self.pending,
            "reconciled": self.reconciled,
            "serving": self.serving,
        }
        return RegistryStats(**{**stats.__dict__, "backend": self.kind, "extra": extra})

    def close(self) -> None:
        try:
            self.primary.close()
        finally:
            self.secondary.close()

    def destroy(self) -> None:
        """Destroy both registries."""
        try:
            self.primary.destroy()
        finally:
            self.secondary.destroy()

    def __repr__(self) -> str:
        return f"<shmreg.backends.DualWriteBackend {self.primary!r} -> {self.secondary!r}>"

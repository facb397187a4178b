"""``Registry``: the public face. It resolves owners, picks a backend and delegates.

Everything a backend needs is resolved here once: ``pid=None`` becomes the calling
process, a pid becomes a full ``ProcessIdentity`` (or ``ProcessNotAlive``), and the name is
checked. The hot read calls (``lookup``, ``lookup_with_metadata``) are bound straight to
the backend's methods when the registry opens, so the facade adds no call on those paths.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

from shmreg import _identity
from shmreg._clock import SYSTEM, Clock, check_timeout
from shmreg._codec import check_namespace
from shmreg._errors import (
    InvalidArgument,
    InvalidBackendConfig,
    InvalidRegistryName,
    NotRegistered,
    RegistryTimeout,
    StaleGeneration,
)
from shmreg._events import Event
from shmreg._liveness import CleanupReport, Monitor, terminate_owners
from shmreg._store import MAX_CAPACITY, MAX_METADATA_LIMIT
from shmreg._types import Entry, HealthReport, Metadata, ProcessIdentity, RegistryStats, Service
from shmreg.backends._protocol import Backend

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_:@-]{0,99}")
_MISSING = object()


def check_name(name: object) -> str:
    """Registry names become segment names: letters, digits, ``_ : @ -``; at most 100."""
    if type(name) is not str or not _NAME.fullmatch(name):
        raise InvalidRegistryName(
            f"invalid registry name {name!r}: use 1-100 of A-Z a-z 0-9 _ : @ - "
            "(no '/', '.', NUL or spaces), not starting with a punctuation mark",
            name=repr(name),
        )
    return name


def _open_backend(
    name: str,
    backend: object,
    create: bool,
    capacity: int | None,
    max_metadata_bytes: int | None,
    mode: int,
) -> Backend:
    if backend is not None and not isinstance(backend, str):
        if not isinstance(backend, Backend):
            raise InvalidBackendConfig(f"{backend!r} does not implement shmreg.backends.Backend")
        return backend
    kind = backend or os.environ.get("SHMREG_BACKEND", "shm")
    if kind in ("shm", "shared_memory", "sharedmemory"):
        from shmreg.backends._shm import SharedMemoryBackend

        return SharedMemoryBackend(
            name, create=create, capacity=capacity, max_metadata_bytes=max_metadata_bytes, mode=mode
        )
    if kind == "memory":
        from shmreg.backends._memory import MemoryBackend

        return MemoryBackend.named(
            name, create=create, capacity=capacity, max_metadata_bytes=max_metadata_bytes
        )
    raise InvalidBackendConfig(
        f"unknown backend {kind!r} (from SHMREG_BACKEND or backend=): use 'shm' or 'memory'"
    )


def _bad_argument(argument: str, value: object, expected: str) -> InvalidArgument:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return InvalidArgument(
        f"{argument} must be {expected}, got {shown}", argument=argument, value=shown
    )


def _reopen(name: str, kind: str) -> Registry:
    # Attach, never create: a task that outlives the registry's destroy() must fail, not
    # quietly bring up an empty registry of the same name that nobody will remove.
    return Registry(name, backend=kind, create=False)


class Registry:
    """A named process registry shared by every process on this machine that opens it.

    >>> import shmreg
    >>> with shmreg.Registry("doc-example") as reg:
    ...     reg.register("production", "db", metadata={"type": "postgres"}) > 0
    ...     reg.lookup("production", "db") == __import__("os").getpid()
    ...     reg.destroy()
    True
    True
    """

    def __init__(
        self,
        name: str,
        *,
        backend: object = None,
        capacity: int | None = None,
        max_metadata_bytes: int | None = None,
        mode: int = 0o600,
        create: bool = True,
    ) -> None:
        self._name = check_name(name)
        for setting, value, most in (
            ("capacity", capacity, MAX_CAPACITY),
            ("max_metadata_bytes", max_metadata_bytes, MAX_METADATA_LIMIT),
        ):
            if value is not None and (type(value) is not int or not 1 <= value <= most):
                raise InvalidBackendConfig(
                    f"{setting} must be an int from 1 to {most}, got {value!r}"
                )
        if type(mode) is not int or not 0 <= mode <= 0o777:
            raise InvalidBackendConfig(f"mode must be file permission bits, got {mode!r}")
        self._backend = _open_backend(
            self._name, backend, create, capacity, max_metadata_bytes, mode
        )
        self._monitor: Monitor | None = None
        # Hot paths go straight to the backend (see the module docstring).
        self.lookup = self._backend.lookup  # type: ignore[method-assign]
        self.lookup_with_metadata = self._backend.lookup_with_metadata  # type: ignore[method-assign]

    @classmethod
    def create(
        cls,
        name: str,
        *,
        capacity: int | None = None,
        max_metadata_bytes: int | None = None,
        mode: int = 0o600,
        backend: object = None,
    ) -> Registry:
        """Create ``name``, or attach if it exists with the same settings."""
        return cls(
            name,
            backend=backend,
            capacity=capacity,
            max_metadata_bytes=max_metadata_bytes,
            mode=mode,
            create=True,
        )

    @classmethod
    def attach(
        cls,
        name: str,
        *,
        capacity: int | None = None,
        max_metadata_bytes: int | None = None,
        backend: object = None,
    ) -> Registry:
        """Attach to an existing registry; ``RegistryNotFound`` if there is none."""
        return cls(
            name,
            backend=backend,
            capacity=capacity,
            max_metadata_bytes=max_metadata_bytes,
            create=False,
        )

    # ------------------------------------------------------------------ lifecycle

    @property
    def name(self) -> str:
        return self._name

    @property
    def backend(self) -> Backend:
        return self._backend

    def close(self) -> None:
        """Detach this process; the registry stays for everyone else."""
        self.stop_monitor()
        self._backend.close()

    def destroy(self) -> None:
        """Remove the registry for every process (their next call raises RegistryDestroyed)."""
        self.stop_monitor()
        self._backend.destroy()

    def __enter__(self) -> Registry:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __reduce__(self) -> tuple[Callable[[str, str], Registry], tuple[str, str]]:
        # A registry travels by name: the receiving process attaches to the same segments.
        return _reopen, (self._name, getattr(self._backend, "kind", "shm"))

    def __repr__(self) -> str:
        return f"<shmreg.Registry {self._name!r} backend={getattr(self._backend, 'kind', '?')}>"

    # ------------------------------------------------------------------ registration

    def register(
        self,
        namespace: str,
        service: Service,
        pid: int | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> int:
        """Register ``pid`` (default: this process); return the name's generation."""
        return self._backend.register(namespace, service, self._owner(pid), metadata)

    def register_many(
        self, namespace: str, items: Iterable[tuple[Service, int | None, Mapping[str, Any] | None]]
    ) -> list[int]:
        """Register several ``(service, pid, metadata)``; one generation per item."""
        try:
            batch = list(items)
        except TypeError as exc:
            raise _bad_argument("items", items, "an iterable of (service, pid, metadata)") from exc
        for item in batch:
            if type(item) not in (tuple, list) or len(item) != 3:
                raise _bad_argument("items", item, "(service, pid, metadata) triples")
        resolved = [(service, self._owner(pid), metadata) for service, pid, metadata in batch]
        return self._backend.register_many(namespace, resolved)

    @staticmethod
    def _owner(pid: int | None) -> ProcessIdentity:
        me = _identity.self_identity()
        if pid is None or (pid == me.pid and type(pid) is int):
            return me  # our own identity is cached: no /proc read
        return _identity.identity_of(pid)

    def lookup(self, namespace: str, service: Service) -> int | None:
        """The live owner's pid, or ``None``."""
        return self._backend.lookup(namespace, service)

    def lookup_with_metadata(self, namespace: str, service: Service) -> tuple[int, Metadata] | None:
        return self._backend.lookup_with_metadata(namespace, service)

    def get_metadata(self, namespace: str, service: Service) -> Metadata:
        found = self._backend.lookup_with_metadata(namespace, service)
        if found is None:
            raise NotRegistered(
                f"{namespace}/{service!r} is not registered", namespace=namespace, service=service
            )
        return found[1]

    def get_metadata_field(
        self, namespace: str, service: Service, field: str, default: Any = None
    ) -> Any:
        if type(field) is not str:
            raise _bad_argument("field", field, "a str (metadata keys are str)")
        return self.get_metadata(namespace, service).get(field, default)

    def generation(self, namespace: str, service: Service) -> int | None:
        """The name's current generation (fencing token), or ``None`` if not registered."""
        found = self._backend.lookup_entry(namespace, service)
        return None if found is None else found[1]

    def update_metadata(
        self,
        namespace: str,
        service: Service,
        metadata: Mapping[str, Any],
        *,
        merge: bool = False,
        generation: int | None = None,
    ) -> None:
        self._backend.update_metadata(
            namespace, service, metadata, merge=merge, generation=generation
        )

    def unregister(
        self, namespace: str, service: Service, *, generation: int | None = None
    ) -> bool:
        return self._backend.unregister(namespace, service, generation=generation)

    def registered(self, namespace: str, service: Service) -> bool:
        return self._backend.lookup(namespace, service) is not None

    # ------------------------------------------------------------------ queries

    def list_services(self, namespace: str) -> list[Service]:
        return self._backend.list_services(namespace)

    def list_services_with_metadata(self, namespace: str) -> dict[Service, Metadata]:
        return {e.service: e.metadata for e in self._backend.list_entries(namespace)}

    def find_services_by_metadata(
        self, namespace: str, predicate: Callable[[Metadata], bool]
    ) -> list[Entry]:
        """Entries whose metadata satisfies ``predicate``: ``(service, pid, metadata)``."""
        if predicate is not None and not callable(predicate):
            raise _bad_argument("predicate", predicate, "a callable taking the metadata dict")
        return list(self._backend.find(namespace, predicate=predicate))

    def find_by_metadata(self, namespace: str, **equals: Any) -> list[Entry]:
        """Entries whose fields equal ``equals``; a list field matches by membership (AND).

        Each is an ``Entry``, a named ``(service, pid, metadata)`` tuple."""
        return list(self._backend.find(namespace, equals=equals))

    def list_by_type(self, namespace: str, type: Any) -> list[Entry]:
        return list(self._backend.find(namespace, equals={"type": type}))

    def count(self, namespace: str | None = None) -> int:
        return self._backend.count(namespace)

    def stats(self) -> RegistryStats:
        return self._backend.stats()

    def health_check(self) -> HealthReport:
        return self._backend.health_check()

    def statistics(self) -> dict[str, Any]:
        return self._backend.statistics()

    def sweep(self) -> int:
        """Remove every entry whose owner is provably dead; return how many were removed."""
        return self._backend.sweep()

    # ------------------------------------------------------------------ liveness

    def start_monitor(
        self,
        *,
        poll_interval: float = 0.01,
        sweep_interval: float = 1.0,
        on_death: Callable[[Any, Any, int], None] | None = None,
    ) -> Monitor:
        """Start this process's death monitor (a daemon thread); idempotent.

        It removes an entry within milliseconds of its owner dying, whoever registered it.
        Several monitors, in one process or many, do not fight: each removal is re-checked
        under the writer lock and reported once. A second caller's ``on_death`` is added to
        the running monitor's subscribers (``Monitor.subscribe``), not ignored.
        """
        if self._monitor is None or not self._monitor.running:
            self._monitor = Monitor(
                self._backend,
                poll_interval=poll_interval,
                sweep_interval=sweep_interval,
                on_death=on_death,
            ).start()
        elif on_death is not None:
            self._monitor.subscribe(on_death)
        return self._monitor

    def stop_monitor(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.stop()

    @contextlib.contextmanager
    def monitor(self, **options: Any) -> Iterator[Monitor]:
        """``with reg.monitor(): ...`` runs the death monitor for the block."""
        started = self.start_monitor(**options)
        try:
            yield started
        finally:
            self.stop_monitor()

    def wait_for(
        self,
        namespace: str,
        service: Service,
        timeout: float | None = None,
        *,
        clock: Clock = SYSTEM,
        poll_interval: float = 0.0005,
    ) -> int:
        """Block until ``(namespace, service)`` is registered to a live process; its pid.

        Between checks it reads one word (the newest event number) every ``poll_interval``
        seconds and looks the name up again only when that moved: waking within a
        millisecond or so of the registration without keeping a core busy.
        """
        timeout = check_timeout(timeout)
        deadline = None if timeout is None else clock.monotonic() + timeout
        last_seen = getattr(self._backend, "last_event_seq", lambda: -1)
        while True:
            seq = last_seen()
            pid = self._backend.lookup(namespace, service)
            if pid is not None:
                return pid
            while last_seen() == seq:
                if deadline is not None and clock.monotonic() >= deadline:
                    raise RegistryTimeout(
                        f"{namespace}/{service!r} not registered within {timeout} s",
                        timeout=timeout,
                    )
                clock.sleep(poll_interval)
                if seq == -1:
                    break  # no event counter on this backend: poll the name itself

    def watch(
        self,
        namespace: str | None = None,
        since: int | None = None,
        *,
        timeout: float | None = None,
        clock: Clock = SYSTEM,
        poll_interval: float = 0.001,
    ) -> Iterator[Event]:
        """Events (registered, updated, unregistered, died), oldest first, as they happen.

        ``since=None`` starts with the next event; ``since=N`` resumes after event N. A
        reader that fell behind the ring first gets an event of kind ``lost`` saying how
        many it missed. Stops after ``timeout`` seconds without an event (None: never).
        """
        timeout = check_timeout(timeout)
        if since is not None and (type(since) is not int or since < 0):
            raise _bad_argument("since", since, "an event number >= 0")
        if namespace is not None:
            check_namespace(namespace)  # a bad one would never match: say so now
        # The start is fixed now, not at the first next(): events between this call and the
        # first iteration belong to the watch.
        start = self._backend.last_event_seq() if since is None else since
        return self._follow_events(namespace, start, timeout, clock, poll_interval)

    def _follow_events(
        self,
        namespace: str | None,
        position: int,
        timeout: float | None,
        clock: Clock,
        poll_interval: float,
    ) -> Iterator[Event]:
        idle_since = clock.monotonic()
        while True:
            events, lost = self._backend.read_events(position)
            if lost:
                # The gap sits right after ``position``: the lost event is numbered as the
                # last one missed, so resuming from it skips nothing that was delivered.
                position += lost
                yield Event(seq=position, kind="lost", lost=lost)
            for event in events:
                position = event.seq
                if namespace is None or event.namespace == namespace:
                    yield event
            if events or lost:
                idle_since = clock.monotonic()
                continue
            if timeout is not None and clock.monotonic() - idle_since >= timeout:
                return
            clock.sleep(poll_interval)

    @contextlib.contextmanager
    def register_self(
        self, namespace: str, service: Service, metadata: Mapping[str, Any] | None = None
    ) -> Iterator[int]:
        """Register the calling process for the block; unregister on the way out.

        The exit is fenced by the generation: if the name changed hands meanwhile (this
        process was presumed dead and taken over), the new owner's entry is left alone.
        """
        generation = self.register(namespace, service, metadata=metadata)
        try:
            yield generation
        finally:
            try:
                self.unregister(namespace, service, generation=generation)
            except StaleGeneration:
                pass

    def cleanup_namespace(
        self, namespace: str, *, grace: float = 5.0, clock: Clock = SYSTEM
    ) -> CleanupReport:
        """SIGTERM every live owner in ``namespace``, SIGKILL survivors after ``grace``
        seconds, and remove the entries. The calling process is never signalled (its own
        entries are removed)."""
        grace_s = check_timeout(grace, "grace") or 0.0
        owned = self._backend.namespace_owners(namespace)
        owners = {ident for _, ident, _ in owned}
        terminated, killed, skipped = terminate_owners(owners, grace_s, clock)
        # The signalled owners are dead now: remove their entries (in every namespace, with
        # died events); then unregister what is left of ours (the caller's, survivors').
        self._backend.remove_dead(_identity.check_many(owners))
        for service, _, generation in owned:
            try:
                self._backend.unregister(namespace, service, generation=generation)
            except (StaleGeneration, NotRegistered):
                pass  # taken over meanwhile: the new owner's entry is not ours to remove
        still = {(s, g) for s, _, g in self._backend.namespace_owners(namespace)}
        removed = sum((s, g) not in still for s, _, g in owned)
        return CleanupReport(namespace, terminated, killed, removed, skipped)

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

from shmreg import _identity, _opmetrics
from shmreg._clock import SYSTEM, Clock, check_timeout
from shmreg._engine.events import Event
from shmreg._errors import (
    InvalidArgument,
    InvalidBackendConfig,
    InvalidRegistryName,
    NotRegistered,
    RegistryTimeout,
    StaleGeneration,
)
from shmreg._follow import next_events, watch_start
from shmreg._limits import MAX_CAPACITY, MAX_METADATA_LIMIT
from shmreg._liveness import CleanupReport, Monitor, terminate_owners
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
    url: str | None = None,
) -> Backend:
    if backend is not None and not isinstance(backend, str):
        if not isinstance(backend, Backend):
            raise InvalidBackendConfig(f"{backend!r} does not implement shmreg.backends.Backend")
        return backend
    # A URL (given, or $SHMREG_URL when no backend is named either way) means Redis, or
    # dual-write when it starts with ``dual+`` (docs/migration.md).
    named = backend or os.environ.get("SHMREG_BACKEND")
    url = url or (None if named else os.environ.get("SHMREG_URL"))
    if url is not None and url.startswith("dual+"):
        from shmreg.migration._locations import open_location

        return open_location(url, name, create=create)
    if url is not None or named == "redis":
        from shmreg.backends._redis import RedisBackend

        return RedisBackend(
            name, url, create=create, capacity=capacity, max_metadata_bytes=max_metadata_bytes
        )
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


def _waiter(backend: Backend, clock: Clock) -> Callable[[int, float], bool] | None:
    # A backend that can block until the next event (Redis: XREAD BLOCK) waits there instead
    # of polling; a test's fake clock keeps the polling loop it drives.
    waiter: Callable[[int, float], bool] | None = getattr(backend, "wait_events", None)
    return waiter if clock is SYSTEM else None


def _bad_argument(argument: str, value: object, expected: str) -> InvalidArgument:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return InvalidArgument(
        f"{argument} must be {expected}, got {shown}", argument=argument, value=shown
    )


def _reopen(name: str, kind: str, url: str | None = None) -> Registry:
    # Attach, never create: a task that outlives the registry's destroy() must fail, not
    # quietly bring up an empty registry of the same name that nobody will remove.
    return Registry(name, backend=kind, create=False, url=url)


class Registry:
    """A named process registry shared by every process on this machine that opens it.

    >>> import shmreg
    >>> with shmreg.Registry("doc-example") as reg:
    ...     reg.register("production", "db", metadata={"type": "postgres"}) > 0
    ...     reg.lookup("production", "db") == __import__("os").getpid()
    ...     reg.destroy()
    True
    True

    ``url="redis://host:6379/0"`` (or ``$SHMREG_URL``) puts it on a Redis server instead,
    shared by processes on many hosts (docs/redis.md); ``backend=`` picks ``"shm"``,
    ``"memory"`` or ``"redis"``, or takes a backend object.
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
        url: str | None = None,
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
            self._name, backend, create, capacity, max_metadata_bytes, mode, url
        )
        self._monitor: Monitor | None = None
        # Hot paths go straight to the backend (see the module docstring).
        self.lookup = self._backend.lookup  # type: ignore[method-assign]
        self.lookup_with_metadata = self._backend.lookup_with_metadata  # type: ignore[method-assign]
        if _opmetrics.enabled():
            _opmetrics.instrument(self)  # calls, errors and latency per operation

    @classmethod
    def create(
        cls,
        name: str,
        *,
        capacity: int | None = None,
        max_metadata_bytes: int | None = None,
        mode: int = 0o600,
        backend: object = None,
        url: str | None = None,
    ) -> Registry:
        """Create ``name``, or attach if it exists with the same settings."""
        return cls(
            name,
            backend=backend,
            url=url,
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
        url: str | None = None,
    ) -> Registry:
        """Attach to an existing registry; ``RegistryNotFound`` if there is none."""
        return cls(
            name,
            backend=backend,
            url=url,
            capacity=capacity,
            max_metadata_bytes=max_metadata_bytes,
            create=False,
        )

    # ------------------------------------------------------------------ lifecycle

    @property
    def name(self) -> str:
        """The registry's name, as passed to the constructor."""
        return self._name

    @property
    def backend(self) -> Backend:
        """The storage backend behind this registry (``shmreg.backends``)."""
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

    def __reduce__(
        self,
    ) -> tuple[Callable[[str, str, str | None], Registry], tuple[str, str, str | None]]:
        # A registry travels by name (and URL, for a server): the receiver attaches to it.
        kind = getattr(self._backend, "kind", "shm")
        return _reopen, (self._name, kind, getattr(self._backend, "url", None))

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
        me = _identity.self_identity()  # once: each lookup of it is a getpid() call
        resolved = [
            (
                service,
                me if pid is None or (pid == me.pid and type(pid) is int) else self._owner(pid),
                metadata,
            )
            for service, pid, metadata in batch
        ]
        return self._backend.register_many(namespace, resolved)

    @staticmethod
    def _owner(pid: int | None) -> ProcessIdentity:
        me = _identity.self_identity()
        if pid is None or (pid == me.pid and type(pid) is int):
            return me  # our own identity is cached: no /proc read
        if type(pid) is not int or pid < 1:
            # A caller's bug (a pid read from a file and never converted, say), not a
            # process that died: say which argument is wrong rather than ProcessNotAlive.
            raise _bad_argument("pid", pid, "a process id (an int >= 1) or None")
        return _identity.identity_of(pid)

    def lookup(self, namespace: str, service: Service) -> int | None:
        """The live owner's pid, or ``None``."""
        return self._backend.lookup(namespace, service)

    def lookup_with_metadata(self, namespace: str, service: Service) -> tuple[int, Metadata] | None:
        """``(pid, metadata)`` of the live owner, or ``None``; one consistent read."""
        return self._backend.lookup_with_metadata(namespace, service)

    def get_metadata(self, namespace: str, service: Service) -> Metadata:
        """The live entry's metadata; ``NotRegistered`` if there is none."""
        found = self._backend.lookup_with_metadata(namespace, service)
        if found is None:
            raise NotRegistered(
                f"{namespace}/{service!r} is not registered", namespace=namespace, service=service
            )
        return found[1]

    def get_metadata_field(
        self, namespace: str, service: Service, field: str, default: Any = None
    ) -> Any:
        """One metadata field (``default`` if the entry lacks it); ``NotRegistered`` if the
        name has no live entry."""
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
        """Replace the entry's metadata, or with ``merge=True`` update its top-level keys.

        ``NotRegistered`` if there is no live entry; with ``generation``, ``StaleGeneration``
        if the name changed hands since that generation was issued.
        """
        self._backend.update_metadata(
            namespace, service, metadata, merge=merge, generation=generation
        )

    def unregister(
        self, namespace: str, service: Service, *, generation: int | None = None
    ) -> bool:
        """Remove the entry; ``True`` if there was one, ``False`` if not.

        With ``generation``, ``StaleGeneration`` if the name changed hands since (the new
        owner's entry is left alone). Any process may unregister any name.
        """
        return self._backend.unregister(namespace, service, generation=generation)

    def registered(self, namespace: str, service: Service) -> bool:
        """Whether the name has a live owner (``lookup(...) is not None``)."""
        return self._backend.lookup(namespace, service) is not None

    # ------------------------------------------------------------------ queries

    def list_services(self, namespace: str) -> list[Service]:
        """The services in ``namespace`` whose owners are alive, in no particular order."""
        return self._backend.list_services(namespace)

    def list_services_with_metadata(self, namespace: str) -> dict[Service, Metadata]:
        """``{service: metadata}`` for the live entries of ``namespace``."""
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
        """Entries whose metadata ``"type"`` equals ``type`` (``find_by_metadata(type=...)``)."""
        return list(self._backend.find(namespace, equals={"type": type}))

    def count(self, namespace: str | None = None) -> int:
        """Live entries in ``namespace``, or in the whole registry when it is ``None``."""
        return self._backend.count(namespace)

    def stats(self) -> RegistryStats:
        """Everything measured about the registry, typed: a ``RegistryStats`` snapshot.

        Sizes (capacity, used, tombstones, load factor, memory), removal counters (sweeps,
        last sweep time, dead entries found by sweeps and the monitor alike) and the
        backend's own figures in ``extra``. ``statistics()`` is its flat summary.
        """
        return self._backend.stats()

    def health_check(self) -> HealthReport:
        """Owners judged now: how many entries are alive, dead (awaiting removal), unknown."""
        return self._backend.health_check()

    def statistics(self) -> dict[str, Any]:
        """The few headline figures of ``stats()`` as a flat, JSON-ready dict, the same
        keys on every backend: for logs and metrics. Exactly
        ``stats().summary(name)``; use ``stats()`` for everything else."""
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
        """Stop this process's death monitor, if it runs (its thread and fds are released)."""
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.stop()

    @contextlib.contextmanager
    def monitor(
        self,
        *,
        poll_interval: float = 0.01,
        sweep_interval: float = 1.0,
        on_death: Callable[[Any, Any, int], None] | None = None,
    ) -> Iterator[Monitor]:
        """``with reg.monitor(): ...`` runs the death monitor for the block (see
        ``start_monitor`` for the options)."""
        started = self.start_monitor(
            poll_interval=poll_interval, sweep_interval=sweep_interval, on_death=on_death
        )
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
        waiter = _waiter(self._backend, clock)
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
                if waiter is not None:
                    waiter(seq, 1.0 if deadline is None else deadline - clock.monotonic())
                    continue
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
        timeout, start = watch_start(self._backend, namespace, since, timeout)
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
        waiter = _waiter(self._backend, clock)
        while True:
            events, position, moved = next_events(self._backend, namespace, position)
            yield from events
            if moved:
                idle_since = clock.monotonic()
                continue
            if timeout is not None and clock.monotonic() - idle_since >= timeout:
                return
            if waiter is not None:
                left = 1.0 if timeout is None else timeout - (clock.monotonic() - idle_since)
                waiter(position, left)
                continue
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

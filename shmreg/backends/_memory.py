"""``MemoryBackend``: the registry API over a plain dict, in one process.

Two jobs. It is the readable reference: every rule ``SharedMemoryBackend`` implements with
slots, seqlocks and numpy filters is written here as a few lines over a dict, so when the two
disagree this one is the easier to believe (``shmreg.testing.check_backend`` holds both to the
same checks). And it is a test double: ``Registry(name, backend="memory")`` needs no
``/dev/shm`` and leaves nothing behind.

Metadata is stored packed, as msgpack bytes, exactly as the shared-memory backend stores it:
a caller who mutates a dict after registering it, or mutates a dict a read returned, cannot
reach the stored value, and validation, size limits and errors come from the same
``shmreg._codec`` calls.

Handles and state: ``MemoryBackend.named(name)`` returns a new *handle* on state shared per
name in this process, the way every ``SharedMemoryBackend("x")`` is a handle on one segment.
So ``close()`` detaches only that handle (another ``Registry("x", backend="memory")`` in the
same process keeps working), and ``destroy()`` ends the state for every handle.

Events: each change appends an ``Event`` to a ``deque`` of ``RING_EVENTS`` (the shared ring's
size), under the same lock as the change, so the order of events is the order of changes and
a refused call appends nothing. A reader that falls behind is told how many events it lost,
by the same arithmetic as the shared ring.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any, NamedTuple

from shmreg import _codec, _identity, _log
from shmreg._engine.events import Event
from shmreg._errors import (
    NotRegistered,
    RegistryClosed,
    RegistryDestroyed,
    RegistryNotFound,
)
from shmreg._limits import (
    DEFAULT_CAPACITY,
    DEFAULT_MAX_METADATA_BYTES,
    MAX_METADATA_LIMIT,
    RING_EVENTS,
)
from shmreg._types import (
    Entry,
    Liveness,
    Metadata,
    ProcessIdentity,
    RegistryStats,
    Service,
)
from shmreg.backends._base import (
    BackendBase,
    check_generation,
    check_settings,
    dead_reasons,
    event_window,
    held_by,
    setting,
)
from shmreg.backends._portable import (
    StoredEntry,
    imported_generation,
    local_owner,
    require_local,
    same_entry,
)

# What one stored entry costs beyond its key and metadata bytes (a tuple, a dict slot, the
# identity): measured with sys.getsizeof and rounded, good enough for an estimate.
_ENTRY_OVERHEAD = 200


class _Record(NamedTuple):
    service: Service  # decoded from the key bytes once: str, int and tuples are immutable
    owner: ProcessIdentity
    generation: int
    packed: bytes  # msgpack metadata, never a live dict (see the module docstring)


class _State:
    """What every handle on one name shares."""

    def __init__(self, name: str, capacity: int, max_metadata_bytes: int, ring_events: int) -> None:
        self.name = name
        self.capacity = capacity
        self.max_metadata_bytes = max_metadata_bytes
        self.ring_events = ring_events
        self.lock = threading.Lock()
        # namespace bytes -> key bytes -> record. Keyed by the canonical bytes, not the Python
        # values, for the reason _codec gives: 1 and True, or (1,) and (True,), are equal in
        # Python but are different names.
        self.spaces: dict[bytes, dict[bytes, _Record]] = {}
        self.owner_changes = 0  # the generation counter: grows on every change of owner
        self.events: deque[Event] = deque(maxlen=ring_events)  # the newest, oldest first
        self.event_seq = 0  # number of the newest event; the ring holds the last len(events)
        self.ops = 0
        self.sweeps = 0
        self.last_sweep: float | None = None
        self.dead_found = 0
        self.destroyed = False
        _ALL.add(self)


_NAMED: dict[str, _State] = {}
_NAMED_LOCK = threading.Lock()
_ALL: weakref.WeakSet[_State] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A forked child gets a copy of every registry (from then on its own, this is process
    # memory) and of every lock, possibly held by a parent thread that does not exist in the
    # child: such a lock would never be released. Fresh locks, same data.
    global _NAMED_LOCK
    _NAMED_LOCK = threading.Lock()
    for state in list(_ALL):
        state.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class MemoryBackend(BackendBase):
    """Registry storage in this process's memory; same semantics as ``SharedMemoryBackend``.

    >>> from shmreg._identity import self_identity
    >>> backend = MemoryBackend()
    >>> backend.register("production", "db", self_identity(), {"type": "postgres"}) > 0
    True
    >>> backend.lookup_with_metadata("production", "db")[1]
    {'type': 'postgres'}
    >>> backend.destroy()
    """

    kind = "memory"

    def __init__(
        self,
        name: str = "memory",
        *,
        capacity: int | None = None,
        max_metadata_bytes: int | None = None,
        ring_events: int | None = None,
    ) -> None:
        """A private registry no other handle can reach; ``named()`` shares one by name.

        ``ring_events`` sizes the event ring (default: the shared ring's ``RING_EVENTS``); a
        small ring lets a test make a reader fall behind with a few writes.
        """
        self._state = _State(
            name,
            setting("capacity", capacity, DEFAULT_CAPACITY, 2**62),
            setting(
                "max_metadata_bytes",
                max_metadata_bytes,
                DEFAULT_MAX_METADATA_BYTES,
                MAX_METADATA_LIMIT,
            ),
            setting("ring_events", ring_events, RING_EVENTS, 2**24),
        )
        self._closed = False

    @classmethod
    def named(
        cls,
        name: str,
        *,
        create: bool = True,
        capacity: int | None = None,
        max_metadata_bytes: int | None = None,
        ring_events: int | None = None,
    ) -> MemoryBackend:
        """A handle on this process's registry ``name``, created with the settings if absent.

        ``RegistryNotFound`` if it is absent and ``create`` is false; ``IncompatibleRegistry``
        if it exists and an explicit setting disagrees, like attaching to a shared segment.
        """
        with _NAMED_LOCK:
            state = _NAMED.get(name)
            if state is None:
                if not create:
                    raise RegistryNotFound(
                        f"no memory registry named {name!r} in this process", name=name
                    )
                handle = cls(
                    name,
                    capacity=capacity,
                    max_metadata_bytes=max_metadata_bytes,
                    ring_events=ring_events,
                )
                _NAMED[name] = handle._state
                return handle
        check_settings(
            name,
            {
                "capacity": capacity,
                "max_metadata_bytes": max_metadata_bytes,
                "ring_events": ring_events,
            },
            {
                "capacity": state.capacity,
                "max_metadata_bytes": state.max_metadata_bytes,
                "ring_events": state.ring_events,
            },
        )
        return cls._on(state)

    @classmethod
    def _on(cls, state: _State) -> MemoryBackend:
        handle = cls.__new__(cls)
        handle._state = state
        handle._closed = False
        return handle

    # ------------------------------------------------------------------ plumbing

    @property
    def name(self) -> str:
        return self._state.name

    @property
    def capacity(self) -> int:
        return self._state.capacity

    @property
    def max_metadata_bytes(self) -> int:
        return self._state.max_metadata_bytes

    @property
    def ring_events(self) -> int:
        """How many events the ring keeps (``shmreg.testing`` reads it; shm: ``RING_EVENTS``)."""
        return self._state.ring_events

    def _open(self) -> _State:
        state = self._state
        # Destroyed wins over closed: it is the reason the handle can never work again.
        if state.destroyed:
            raise RegistryDestroyed(f"registry {state.name!r} was destroyed", name=state.name)
        if self._closed:
            raise RegistryClosed(
                f"registry {state.name!r} is closed in this handle", name=state.name
            )
        return state

    def _find(self, namespace: str, service: Service) -> tuple[_State, bytes, bytes]:
        key = _codec.encode_key(namespace, service)
        return self._open(), key[: key.index(b"\x00")], key

    def _live(self, namespace: str, service: Service) -> _Record | None:
        state, ns, key = self._find(namespace, service)
        with state.lock:
            record = state.spaces.get(ns, {}).get(key)
        # The per-read probe: an owner that exited and was reaped is gone at once, sweep or
        # no sweep. A zombie or a reused pid passes it; sweeps catch those.
        if record is None or not _identity.probe_alive(record.owner.pid):
            return None
        return record

    def _space(self, namespace: str) -> list[_Record]:
        """Live records of one namespace, a snapshot taken under the lock."""
        ns = _codec.check_namespace(namespace)
        state = self._open()
        with state.lock:
            records = list(state.spaces.get(ns, {}).values())
        alive: dict[int, bool] = {}
        out = []
        for record in records:
            pid = record.owner.pid
            if pid not in alive:
                alive[pid] = _identity.probe_alive(pid)
            if alive[pid]:
                out.append(record)
        return out

    # ------------------------------------------------------------------ reads

    def lookup(self, namespace: str, service: Service) -> int | None:
        record = self._live(namespace, service)
        return None if record is None else record.owner.pid

    def lookup_with_metadata(self, namespace: str, service: Service) -> tuple[int, Metadata] | None:
        record = self._live(namespace, service)
        if record is None:
            return None
        return record.owner.pid, _codec.unpack_metadata(record.packed)

    def lookup_entry(self, namespace: str, service: Service) -> tuple[int, int, Metadata] | None:
        record = self._live(namespace, service)
        if record is None:
            return None
        return record.owner.pid, record.generation, _codec.unpack_metadata(record.packed)

    def list_entries(self, namespace: str) -> list[Entry]:
        return [
            Entry(r.service, r.owner.pid, _codec.unpack_metadata(r.packed))
            for r in self._space(namespace)
        ]

    def list_services(self, namespace: str) -> list[Service]:
        return [r.service for r in self._space(namespace)]

    def namespace_owners(self, namespace: str) -> list[tuple[Service, ProcessIdentity, int]]:
        """``(service, owner identity, generation)`` of every live entry in ``namespace``."""
        return [(r.service, r.owner, r.generation) for r in self._space(namespace)]

    def count(self, namespace: str | None = None) -> int:
        if namespace is not None:
            return len(self._space(namespace))
        state = self._open()
        with state.lock:
            pids = [r.owner.pid for space in state.spaces.values() for r in space.values()]
        alive: dict[int, bool] = {}
        for pid in pids:
            if pid not in alive:
                alive[pid] = _identity.probe_alive(pid)
        return sum(1 for pid in pids if alive[pid])

    def namespace_counts(self) -> dict[str, int]:
        """Live entries per namespace, empty ones left out (the metrics collector's figures)."""
        state = self._open()
        with state.lock:
            names = [ns.decode("utf-8", "replace") for ns in state.spaces]
        return {ns: n for ns in names if (n := self.count(ns))}

    # ------------------------------------------------------------------ writes

    def register(
        self,
        namespace: str,
        service: Service,
        owner: ProcessIdentity,
        metadata: Mapping[str, Any] | None,
    ) -> int:
        state, ns, key = self._find(namespace, service)
        # Validate everything before touching state: a refused call changes nothing.
        packed = _codec.pack_metadata(_codec.as_metadata(metadata), state.max_metadata_bytes)
        with state.lock:
            self._open()  # destroyed by another handle while we validated?
            return self._register_locked(state, namespace, service, ns, key, owner, packed)

    def register_many(
        self,
        namespace: str,
        items: Iterable[tuple[Service, ProcessIdentity, Mapping[str, Any] | None]],
    ) -> list[int]:
        """Register a batch under one lock hold; one generation (and one event) per item.

        Every item is validated before the first is stored, so a bad key or bad metadata
        stores none of them. A name held by a live process raises ``AlreadyRegistered`` in the
        middle: the items before it stay registered, as with ``SharedMemoryBackend``.
        """
        state = self._open()
        prepared = []
        for service, owner, metadata in items:
            _, ns, key = self._find(namespace, service)
            packed = _codec.pack_metadata(_codec.as_metadata(metadata), state.max_metadata_bytes)
            prepared.append((service, ns, key, owner, packed))
        with state.lock:
            self._open()
            return [
                self._register_locked(state, namespace, service, ns, key, owner, packed)
                for service, ns, key, owner, packed in prepared
            ]

    def _register_locked(
        self,
        state: _State,
        namespace: str,
        service: Service,
        ns: bytes,
        key: bytes,
        owner: ProcessIdentity,
        packed: bytes,
    ) -> int:
        space = state.spaces.get(ns, {})
        held = space.get(key)
        kind, reason = "registered", None
        if held is not None and held.owner == owner:
            generation = held.generation
            kind = "updated"
        else:
            # Taken over only on proof of death (gone, zombie, pid reused): a holder we
            # cannot judge (UNKNOWN) keeps its name.
            if held is not None and not _identity.check(held.owner).is_dead:
                raise held_by(namespace, service, held.owner.pid)
            if held is not None:
                reason = "takeover"
            state.owner_changes += 1
            generation = state.owner_changes
        value = held.service if held is not None else _codec.decode_service(key, len(ns))
        record = _Record(value, owner, generation, packed)
        state.spaces.setdefault(ns, space)[key] = record
        state.ops += 1
        _emit(state, kind, ns, record, reason)
        return generation

    def update_metadata(
        self,
        namespace: str,
        service: Service,
        metadata: Mapping[str, Any],
        *,
        merge: bool = False,
        generation: int | None = None,
    ) -> None:
        state, ns, key = self._find(namespace, service)
        update = _codec.as_metadata(metadata)
        limit = state.max_metadata_bytes
        # A merge's update is checked for validity up front but sized only once merged.
        packed = _codec.pack_metadata(update, 2**62 if merge else limit)
        with state.lock:
            self._open()
            record = state.spaces.get(ns, {}).get(key)
            if record is None or not _identity.probe_alive(record.owner.pid):
                raise NotRegistered(
                    f"{namespace}/{service!r} is not registered",
                    namespace=namespace,
                    service=service,
                )
            check_generation(namespace, service, record.generation, generation)
            if merge:
                merged = _codec.unpack_metadata(record.packed)
                merged.update(update)  # shallow, as documented: nested dicts are replaced
                packed = _codec.pack_metadata(merged, limit)
            state.spaces[ns][key] = record._replace(packed=packed)
            state.ops += 1
            _emit(state, "updated", ns, record)

    def unregister(
        self, namespace: str, service: Service, *, generation: int | None = None
    ) -> bool:
        state, ns, key = self._find(namespace, service)
        with state.lock:
            self._open()
            space = state.spaces.get(ns)
            record = None if space is None else space.get(key)
            if space is None or record is None:
                return False
            check_generation(namespace, service, record.generation, generation)
            del space[key]
            if not space:
                del state.spaces[ns]
            state.ops += 1
            _emit(state, "unregistered", ns, record)
        # A dead owner's entry is removed all the same, but it was not "there" for any read,
        # so the answer agrees with what lookup said a moment ago.
        return _identity.probe_alive(record.owner.pid)

    # ------------------------------------------------------------------ migration

    def namespaces(self) -> list[str]:
        state = self._open()
        with state.lock:
            return sorted(ns.decode() for ns, space in state.spaces.items() if space)

    def export_entries(self, namespace: str) -> list[StoredEntry]:
        return [
            StoredEntry(
                namespace, r.service, r.owner, r.generation, _codec.unpack_metadata(r.packed)
            )
            for r in self._space(namespace)
        ]

    def swap_entry(
        self,
        namespace: str,
        service: Service,
        expect: StoredEntry | None,
        new: StoredEntry | None,
    ) -> tuple[bool, StoredEntry | None]:
        state, ns, key = self._find(namespace, service)
        packed = b""
        if new is not None:
            require_local(new.owner, "the memory backend")
            meta = _codec.as_metadata(new.metadata)
            packed = _codec.pack_metadata(meta, state.max_metadata_bytes)
        with state.lock:
            self._open()
            space = state.spaces.get(ns, {})
            held = space.get(key)
            current = None
            if held is not None and _identity.probe_alive(held.owner.pid):
                current = StoredEntry(
                    namespace,
                    held.service,
                    held.owner,
                    held.generation,
                    _codec.unpack_metadata(held.packed),
                )
            if not same_entry(current, expect):
                return False, current
            if new is None:
                if held is not None:
                    del space[key]
                    if not space:
                        del state.spaces[ns]
                    state.ops += 1
                    _emit(state, "unregistered", ns, held)
                return True, None
            owner = local_owner(new.owner)
            same = held is not None and held.owner == owner
            generation, state.owner_changes = imported_generation(
                new.generation,
                None if held is None else held.generation,
                state.owner_changes,
                same_owner=same,
            )
            value = held.service if held is not None else _codec.decode_service(key, len(ns))
            record = _Record(value, owner, generation, packed)
            state.spaces.setdefault(ns, space)[key] = record
            state.ops += 1
            _emit(state, "updated" if same else "registered", ns, record)
        return True, new._replace(service=value, owner=owner, generation=generation)

    # ------------------------------------------------------------------ liveness

    def owner_counts(self) -> dict[ProcessIdentity, int]:
        """Entries per distinct owner identity, dead owners not yet removed included."""
        state = self._open()
        with state.lock:
            return dict(Counter(r.owner for space in state.spaces.values() for r in space.values()))

    def _remove_dead(self, verdicts: Mapping[ProcessIdentity, Liveness], sweeping: bool) -> int:
        reasons = dead_reasons(verdicts)
        state = self._open()
        if not reasons and not sweeping:
            return 0
        removed = 0
        per_owner: dict[ProcessIdentity, int] = {}
        with state.lock:
            self._open()
            for ns, space in list(state.spaces.items()):
                for key, record in list(space.items()):
                    reason = reasons.get(record.owner)
                    if reason is not None:
                        del space[key]
                        _emit(state, "died", ns, record, reason)
                        removed += 1
                        per_owner[record.owner] = per_owner.get(record.owner, 0) + 1
                if not space:
                    del state.spaces[ns]
            state.ops += removed
            if sweeping or removed:
                # Whoever removed them (a sweep, the monitor, cleanup_namespace), dead
                # owners' entries are counted the same way: stats() tells the whole story.
                state.sweeps += 1
                state.last_sweep = time.time()
                state.dead_found += removed
        _log.removed_dead(self.name, per_owner, reasons)
        return removed

    # ------------------------------------------------------------------ events

    def last_event_seq(self) -> int:
        """Number of the newest event; 0 before the first."""
        return self._open().event_seq

    def read_events(self, after: int, limit: int = 1024) -> tuple[list[Event], int]:
        """Up to ``limit`` events after ``after`` (>= 0), and how many were lost to overwrite.

        The arithmetic of ``SharedMemoryBackend.read_events``: a reader more than the ring
        behind starts at the oldest kept event and is told how many it skipped.
        """
        state = self._open()
        with state.lock:
            last = state.event_seq
            first, stop, lost = event_window(after, last, state.ring_events, limit)
            oldest = last - len(state.events) + 1  # the number of state.events[0]
            if stop < first:
                return [], lost
            return list(islice(state.events, first - oldest, stop - oldest + 1)), lost

    # ------------------------------------------------------------------ reporting

    def stats(self) -> RegistryStats:
        unknown = self.health_check().unknown
        state = self._open()
        with state.lock:
            used = sum(len(space) for space in state.spaces.values())
            namespaces = len(state.spaces)
            memory = sum(
                len(key) + len(r.packed) + _ENTRY_OVERHEAD
                for space in state.spaces.values()
                for key, r in space.items()
            )
            # Like the shared table, it grows instead of refusing: capacity is a floor.
            capacity = max(state.capacity, used)
            return RegistryStats(
                backend=self.kind,
                capacity=capacity,
                used=used,
                tombstones=0,
                load_factor=used / capacity,
                namespaces=namespaces,
                memory_bytes=memory,
                sweeps=state.sweeps,
                last_sweep_time=state.last_sweep,
                dead_found=state.dead_found,
                extra={
                    "name": state.name,
                    "capacity_setting": state.capacity,
                    "max_metadata_bytes": state.max_metadata_bytes,
                    "ops": state.ops,
                    "owner_changes": state.owner_changes,
                },
                unknown_owners=unknown,
            )

    def close(self) -> None:
        """Detach this handle; the registry stays for other handles. Idempotent."""
        self._closed = True

    def destroy(self) -> None:
        """End the registry for every handle (their next call raises RegistryDestroyed)."""
        state = self._state
        with _NAMED_LOCK:
            if _NAMED.get(state.name) is state:
                del _NAMED[state.name]
        with state.lock:
            state.destroyed = True
            state.spaces.clear()
            state.events.clear()
        self._closed = True

    def __repr__(self) -> str:
        return f"<shmreg.backends.MemoryBackend {self.name!r}>"


def _emit(state: _State, kind: str, ns: bytes, record: _Record, reason: str | None = None) -> None:
    """Append one event about ``record``; the caller holds ``state.lock``."""
    state.event_seq += 1
    state.events.append(
        Event(
            state.event_seq,
            kind,
            ns.decode(),
            record.service,
            record.owner.pid,
            record.generation,
            time.time(),
            reason,
            start_ticks=record.owner.start_ticks,
        )
    )

"""The seam between the ``Registry`` facade and a storage engine.

The facade validates nothing that a backend cannot also be handed directly, so every backend
validates keys and metadata through ``shmreg._codec`` and raises the same ``shmreg`` errors;
``shmreg.testing.check_backend`` holds each of them to this contract.

What the facade resolves before calling in: ``owner`` is a live ``ProcessIdentity`` (the facade
turned ``pid=None`` into the calling process and refused dead pids with ``ProcessNotAlive``).

Liveness and events: ``Monitor`` (``shmreg._liveness``) and the facade's ``wait_for``, ``watch``,
``register_self`` and ``cleanup_namespace`` drive a backend through ``owners``,
``remove_dead``, ``last_event_seq``, ``read_events`` and ``namespace_owners``. Every committed
change appends one ``Event`` to a bounded ring, numbered from 1 without gaps:

=============================================  ============  ==========================
operation                                      kind          reason
=============================================  ============  ==========================
``register`` of a free name                    registered    None
``register`` over a provably dead holder       registered    ``"takeover"``
``register`` by the holder again               updated       None
``update_metadata``                            updated       None
``unregister`` that removed an entry           unregistered  None
``remove_dead`` (and so ``sweep``)             died          gone / reused / zombie
=============================================  ============  ==========================

A refused call (any error) changes nothing and appends nothing.

A new backend need not write all of this: ``shmreg.backends.BackendBase`` supplies the policy
(``owners``, ``sweep``, ``health_check``, ``find``, ``statistics``, the fencing check and the
lost-event arithmetic), leaving storage primitives to the backend.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from shmreg._engine.events import Event
from shmreg._types import (
    Entry,
    HealthReport,
    Liveness,
    Metadata,
    ProcessIdentity,
    RegistryStats,
    Service,
)
from shmreg.backends._portable import StoredEntry

Predicate = Callable[[Metadata], bool]


@runtime_checkable
class Backend(Protocol):
    """Storage for ``(namespace, service) -> (owner, metadata)`` with liveness built in.

    Every read leaves out entries whose owner is known to be dead.
    """

    @property
    def name(self) -> str: ...

    def register(
        self,
        namespace: str,
        service: Service,
        owner: ProcessIdentity,
        metadata: Mapping[str, Any] | None,
    ) -> int:
        """Claim the name for ``owner``; return its generation (fencing token).

        Same live owner again: metadata replaced, generation unchanged. Held by another live
        process: ``AlreadyRegistered`` (with ``.pid``). Held by a dead process: taken over.
        """
        ...

    def register_many(
        self,
        namespace: str,
        items: list[tuple[Service, ProcessIdentity, Mapping[str, Any] | None]],
    ) -> list[int]:
        """``register`` each ``(service, owner, metadata)``; their generations, in order.

        Every item is validated before the first is stored (bad input stores none); a name
        held by a live process raises ``AlreadyRegistered``, and the items before it stay.
        """
        ...

    def lookup(self, namespace: str, service: Service) -> int | None: ...

    def lookup_with_metadata(
        self, namespace: str, service: Service
    ) -> tuple[int, Metadata] | None: ...

    def lookup_entry(self, namespace: str, service: Service) -> tuple[int, int, Metadata] | None:
        """``(pid, generation, metadata)`` or ``None``."""
        ...

    def update_metadata(
        self,
        namespace: str,
        service: Service,
        metadata: Mapping[str, Any],
        *,
        merge: bool = False,
        generation: int | None = None,
    ) -> None: ...

    def unregister(
        self, namespace: str, service: Service, *, generation: int | None = None
    ) -> bool: ...

    def list_entries(self, namespace: str) -> list[Entry]: ...

    def list_services(self, namespace: str) -> list[Service]: ...

    def find(
        self,
        namespace: str,
        equals: Mapping[str, Any] | None = None,
        predicate: Predicate | None = None,
    ) -> list[Entry]:
        """Entries matching every ``equals`` field (list fields by membership) and the predicate."""
        ...

    def count(self, namespace: str | None = None) -> int: ...

    def namespace_owners(self, namespace: str) -> list[tuple[Service, ProcessIdentity, int]]:
        """``(service, owner identity, generation)`` of every live entry in ``namespace``.

        What ``cleanup_namespace`` needs: whom to signal, and the generation that fences the
        unregister afterwards (a name taken over meanwhile is left to its new owner).
        """
        ...

    # ------------------------------------------------------------------ migration

    def namespaces(self) -> list[str]:
        """The namespaces that hold at least one stored entry, sorted."""
        ...

    def export_entries(self, namespace: str) -> list[StoredEntry]:
        """Every live entry of ``namespace``: owner identity (with host), generation, metadata."""
        ...

    def swap_entry(
        self,
        namespace: str,
        service: Service,
        expect: StoredEntry | None,
        new: StoredEntry | None,
    ) -> tuple[bool, StoredEntry | None]:
        """Atomically replace the live entry ``expect`` (None: none) by ``new`` (None: remove).

        ``(True, what is stored now)`` or ``(False, the live entry found)``, changing nothing.
        An imported generation is kept unless the name was stored at it or above already
        (then a fresh one); the generation counter never goes below what was written.
        """
        ...

    # ------------------------------------------------------------------ liveness

    def sweep(self) -> int:
        """Check every owner (``_identity.check_many``) and ``remove_dead`` the dead; how many.

        Counted in ``stats()`` (sweeps, last sweep time, dead found).
        """
        ...

    def owner_counts(self) -> dict[ProcessIdentity, int]:
        """Entries per distinct owner identity, over every stored entry.

        Owners that died but were not removed yet are included: the monitor and sweeps
        find them here.
        """
        ...

    def owners(self) -> set[ProcessIdentity]:
        """The distinct owner identities of every stored entry (``owner_counts()``'s keys)."""
        ...

    def remove_dead(self, verdicts: Mapping[ProcessIdentity, Liveness]) -> int:
        """Remove the entries of every identity whose verdict ``.is_dead``; how many.

        Each entry is re-checked under the backend's lock to be still held by that very
        identity (a name taken over since, or a pid now owned by a newcomer, is left alone),
        so callers racing on the same verdicts remove, and report, each entry once. Appends
        one ``died`` event per removed entry, its reason the verdict: ``gone``, ``reused``
        or ``zombie``. Verdicts that are not dead are ignored. A call that removed at least
        one entry counts in ``stats()`` like a sweep (``sweeps``, ``last_sweep_time``,
        ``dead_found``), so entries the monitor removes are counted too.
        """
        ...

    # ------------------------------------------------------------------ events

    def last_event_seq(self) -> int:
        """Sequence number of the newest event; 0 before the first. Cheap: pollers call it."""
        ...

    def read_events(self, after: int, limit: int = 1024) -> tuple[list[Event], int]:
        """Up to ``limit`` events numbered after ``after``, oldest first, and how many were lost.

        The ring keeps the newest N events. A reader more than N behind gets the oldest
        kept events and ``lost``, the number of events after ``after`` it will never see:
        with ``last`` the newest number, ``lost = last - N - after`` when positive. The next
        call resumes after the last event returned.
        """
        ...

    def stats(self) -> RegistryStats: ...

    def health_check(self) -> HealthReport: ...

    def statistics(self) -> dict[str, Any]: ...

    def close(self) -> None: ...

    def destroy(self) -> None: ...

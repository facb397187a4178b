"""The seam between the ``Registry`` facade and a storage engine.

The facade validates nothing that a backend cannot also be handed directly, so every backend
validates keys and metadata through ``shmreg._codec`` and raises the same ``shmreg`` errors;
``shmreg.testing.check_backend`` holds each of them to this contract.

What the facade resolves before calling in: ``owner`` is a live ``ProcessIdentity`` (the facade
turned ``pid=None`` into the calling process and refused dead pids with ``ProcessNotAlive``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from shmreg._types import Entry, HealthReport, Metadata, ProcessIdentity, RegistryStats, Service

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

    def sweep(self) -> int: ...

    def stats(self) -> RegistryStats: ...

    def health_check(self) -> HealthReport: ...

    def statistics(self) -> dict[str, Any]: ...

    def close(self) -> None: ...

    def destroy(self) -> None: ...

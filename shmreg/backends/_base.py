"""``BackendBase``: the policy every backend shares, so a backend is storage and little else.

A backend supplies storage primitives (point reads and writes, ``owner_counts``,
``remove_dead``, the event log). The rules that are the same whatever the storage live here
once: the fencing check on generations, the arithmetic that tells a reader how many events it
lost, settings validation, how dead verdicts become event reasons, health thresholds, the
sweep as "judge owners, remove the dead", and queries as a filter over a namespace's
entries. A backend overrides one of these only to do the same thing faster (the shared-memory
backend narrows ``find`` with its tag columns first).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from shmreg import _codec, _identity
from shmreg._engine.events import REASON_CODES, REASON_NAMES, SWEPT
from shmreg._errors import (
    AlreadyRegistered,
    IncompatibleRegistry,
    InvalidBackendConfig,
    StaleGeneration,
)
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


def setting(name: str, value: int | None, default: int, limit: int) -> int:
    """A size setting: ``default`` when not given, else an int in ``1..limit``."""
    if value is None:
        return default
    if type(value) is not int or not 1 <= value <= limit:
        raise InvalidBackendConfig(f"{name} must be an int in 1..{limit}, got {value!r}")
    return value


def check_settings(name: str, asked: Mapping[str, int | None], actual: Mapping[str, int]) -> None:
    """Attaching: every setting the caller gave must be the one the registry has."""
    for option, value in asked.items():
        if value is not None and value != actual[option]:
            raise IncompatibleRegistry(
                f"{option}: registry {name!r} has {actual[option]}, caller asked for {value}",
                setting=option,
                expected=value,
                actual=actual[option],
            )


def held_by(namespace: str, service: Service, pid: int) -> AlreadyRegistered:
    """The error for a name a live process holds."""
    return AlreadyRegistered(
        f"{namespace}/{service!r} is held by live pid {pid}",
        namespace=namespace,
        service=service,
        pid=pid,
    )


def check_generation(namespace: str, service: Service, actual: int, expected: int | None) -> None:
    """Fencing: a caller holding ``expected`` may change the entry only at that generation."""
    if expected is not None and actual != expected:
        raise StaleGeneration(
            f"{namespace}/{service!r} is at generation {actual}, caller holds {expected}",
            namespace=namespace,
            service=service,
            expected=expected,
            actual=actual,
        )


def event_window(after: int, last: int, kept: int, limit: int) -> tuple[int, int, int]:
    """``(first, stop, lost)``: the event numbers to read after ``after``, and the gap.

    A log that keeps the newest ``kept`` events serves a reader more than ``kept`` behind
    from its oldest kept event, and tells it how many it will never see:
    ``lost = last - kept - after`` when positive. ``stop < first`` means nothing to read.
    """
    after = max(after, 0)  # events are numbered from 1
    first, lost = after + 1, 0
    if last - after > kept:
        first = last - kept + 1
        lost = first - after - 1
    return first, min(last, first + limit - 1), lost


def dead_reasons(verdicts: Mapping[ProcessIdentity, Liveness]) -> dict[ProcessIdentity, str]:
    """The ``died`` event reason of every identity whose verdict is dead; the rest left out."""
    return {
        ident: REASON_NAMES[REASON_CODES.get(verdict.value, SWEPT)] or "dead"
        for ident, verdict in verdicts.items()
        if verdict.is_dead
    }


class BackendBase:
    """Shared policy; subclasses provide storage (see the module docstring).

    The storage primitives a backend writes: ``name``, ``register``, ``register_many``,
    ``lookup_entry``, ``update_metadata``, ``unregister``, ``list_entries``,
    ``namespace_owners``, ``count``, ``owner_counts``, ``remove_dead``, ``last_event_seq``,
    ``read_events``, ``stats``, ``close`` and ``destroy``. The rest of the ``Backend``
    protocol comes from here, built on them.
    """

    kind = "base"

    # ------------------------------------------------------------------ primitives

    @property
    def name(self) -> str:
        raise NotImplementedError

    def lookup_entry(self, namespace: str, service: Service) -> tuple[int, int, Metadata] | None:
        raise NotImplementedError

    def list_entries(self, namespace: str) -> list[Entry]:
        raise NotImplementedError

    def owner_counts(self) -> dict[ProcessIdentity, int]:
        raise NotImplementedError

    def _remove_dead(self, verdicts: Mapping[ProcessIdentity, Liveness], sweeping: bool) -> int:
        """Remove the entries of every identity whose verdict is dead, each with a died event.

        Matched by the whole identity under the backend's lock (or in one script): an entry
        taken over since the verdict is not touched, and of two callers with the same
        verdicts only the first removes (and reports) each entry. Counts a sweep in
        ``stats()`` when ``sweeping``, or when anything was removed.
        """
        raise NotImplementedError

    def stats(self) -> RegistryStats:
        raise NotImplementedError

    # Migration's primitives (shmreg.backends._portable says what they promise).

    def namespaces(self) -> list[str]:
        """The namespaces that hold at least one stored entry, sorted."""
        raise NotImplementedError

    def export_entries(self, namespace: str) -> list[StoredEntry]:
        """Every live entry of ``namespace`` with owner identity, generation and metadata."""
        raise NotImplementedError

    def swap_entry(
        self,
        namespace: str,
        service: Service,
        expect: StoredEntry | None,
        new: StoredEntry | None,
    ) -> tuple[bool, StoredEntry | None]:
        """Atomically replace the live entry ``expect`` (``None``: no live entry) by ``new``.

        ``new`` ``None`` removes the entry. Returns ``(True, what is stored now)`` (``new``
        with the generation it got, see ``imported_generation``), or ``(False, the live entry
        found)`` when it was not ``expect``, changing nothing. ``new``'s metadata is validated
        as a registration's is; bad input changes nothing.
        """
        raise NotImplementedError

    def import_entries(self, entries: list[StoredEntry]) -> list[tuple[bool, StoredEntry | None]]:
        """``swap_entry(e.namespace, e.service, None, e)`` for each entry, in order.

        A backend overrides it only to do the same in fewer round trips (Redis pipelines
        it). An error may leave some of the entries imported: a caller retries them one by
        one, where an entry already there, the same, is found unchanged.
        """
        return [self.swap_entry(e.namespace, e.service, None, e) for e in entries]

    # ------------------------------------------------------------------ policy

    def lookup(self, namespace: str, service: Service) -> int | None:
        """The live owner's pid, or None (backends with a cheaper path override it)."""
        found = self.lookup_entry(namespace, service)
        return None if found is None else found[0]

    def lookup_with_metadata(self, namespace: str, service: Service) -> tuple[int, Metadata] | None:
        """``(pid, metadata)`` of a live entry, or None."""
        found = self.lookup_entry(namespace, service)
        return None if found is None else (found[0], found[2])

    def list_services(self, namespace: str) -> list[Service]:
        """The services of a namespace's live entries."""
        return [entry.service for entry in self.list_entries(namespace)]

    def _verdicts(self, identities: Iterable[ProcessIdentity]) -> dict[ProcessIdentity, Liveness]:
        """How this backend judges owners; a backend that cannot judge some says UNKNOWN."""
        return _identity.check_many(identities)

    def owners(self) -> set[ProcessIdentity]:
        """The distinct owner identities of every stored entry (``owner_counts()``'s keys)."""
        return set(self.owner_counts())

    def sweep(self) -> int:
        """Remove every entry whose owner is provably dead; return how many.

        Each distinct owner is judged once, outside any lock; the removal re-checks that each
        entry is still held by that identity.
        """
        return self._remove_dead(self._verdicts(self.owners()), sweeping=True)

    def remove_dead(self, verdicts: Mapping[ProcessIdentity, Liveness]) -> int:
        """Remove the entries of the identities judged dead in ``verdicts``; how many.

        Whoever removes them (the monitor, ``cleanup_namespace``), a removal counts as a
        sweep in ``stats()``, so ``dead_found`` tells the whole story.
        """
        return self._remove_dead(verdicts, sweeping=False)

    def health_check(self) -> HealthReport:
        """Healthy below 10 % dead entries, degraded below 30 %, else unhealthy."""
        counts = self.owner_counts()
        return HealthReport.summarise(self.kind, counts, self._verdicts(counts))

    def find(
        self,
        namespace: str,
        equals: Mapping[str, Any] | None = None,
        predicate: Callable[[Metadata], bool] | None = None,
    ) -> list[Entry]:
        """Entries matching every ``equals`` field (list fields by membership) and the predicate.

        The predicate runs with no lock held: it is the caller's code and may call back in.
        """
        entries = self.list_entries(namespace)
        if equals:
            entries = _codec.select(entries, equals)
        if predicate is not None:
            entries = [e for e in entries if predicate(e.metadata)]
        return entries

    def statistics(self) -> dict[str, Any]:
        """The flat summary of ``stats()``."""
        return self.stats().summary(self.name)

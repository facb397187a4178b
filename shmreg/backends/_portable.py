"""Entries as they move between backends: ``StoredEntry`` and the rules every backend applies.

Migration needs three storage primitives a backend otherwise has no reason to offer: the
namespaces it holds (``namespaces``), its live entries with everything that identifies them
(``export_entries``: owner identity with host, generation, metadata), and one atomic
compare-and-swap of a single name (``swap_entry``), which is how an entry is imported, how a
conflicting one is overwritten and how a rollback removes only what is unchanged.

The rules written once here:

- **Sameness** (``same_entry``): two entries are the same when owner, generation and
  metadata are equal; an owner's host ``""`` and this machine's ``host_id()`` are one host.
- **Generations** (``imported_generation``): an imported entry keeps its generation (a
  process's fencing token stays valid on the target) unless the target already stored that
  name at that generation or above, in which case it gets a fresh one from the target's
  counter. Either way the target's counter is raised to at least the generation written, so
  a name's generation on the target never goes down and later owners get higher ones.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from shmreg import _identity
from shmreg._errors import InvalidArgument
from shmreg._types import Metadata, ProcessIdentity, Service


class StoredEntry(NamedTuple):
    """One registration with everything a copy must preserve."""

    namespace: str
    service: Service
    owner: ProcessIdentity
    generation: int
    metadata: Metadata

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists; ``from_json`` restores them)."""
        return {
            "namespace": self.namespace,
            "service": _to_json(self.service),
            "owner": [self.owner.pid, self.owner.start_ticks, self.owner.host],
            "generation": self.generation,
            "metadata": self.metadata,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoredEntry:
        """The entry ``as_json`` described."""
        pid, start, host = data["owner"]
        return cls(
            data["namespace"],
            _from_json(data["service"]),
            ProcessIdentity(int(pid), int(start), str(host)),
            int(data["generation"]),
            dict(data["metadata"]),
        )


def _to_json(service: Service) -> Any:
    # A tuple service is written as {"t": [...]}: JSON has no tuples, and a list is no key.
    if isinstance(service, tuple):
        return {"t": [_to_json(part) for part in service]}
    return service


def _from_json(value: Any) -> Service:
    if isinstance(value, dict):
        return tuple(_from_json(part) for part in value["t"])
    return value  # type: ignore[no-any-return]


def local_owner(owner: ProcessIdentity) -> ProcessIdentity:
    """``owner`` with its host written ``""`` when it is this machine (one spelling per host)."""
    if owner.host and _identity.is_local(owner):
        return ProcessIdentity(owner.pid, owner.start_ticks)
    return owner


def require_local(owner: ProcessIdentity, backend: str) -> None:
    """Refuse an owner on another host where ``backend`` can hold only this host's processes."""
    if owner.host and not _identity.is_local(owner):
        raise InvalidArgument(
            f"owner pid {owner.pid} lives on host {owner.host!r}; {backend} holds only this "
            "host's processes",
            argument="owner",
            value=repr(owner),
        )


def same_entry(a: StoredEntry | None, b: StoredEntry | None) -> bool:
    """Whether two entries (or two absences) are the same registration, unchanged."""
    if a is None or b is None:
        return a is b
    return (
        local_owner(a.owner) == local_owner(b.owner)
        and a.generation == b.generation
        and a.metadata == b.metadata
    )


def imported_generation(
    wanted: int, stored: int | None, counter: int, *, same_owner: bool = False
) -> tuple[int, int]:
    """``(generation to write, new counter)`` for importing ``wanted`` over ``stored``.

    ``stored`` is the generation of whatever record the target holds for the name (a dead
    owner's included), ``counter`` the target's generation counter. ``same_owner``: the
    stored record is the same owner at ``wanted`` already (only its metadata changes).
    """
    generation = wanted
    if same_owner and stored == wanted:
        return generation, max(counter, generation)
    if wanted < 1 or (stored is not None and stored >= wanted):
        generation = counter + 1
    return generation, max(counter, generation)


def read_entry(backend: Any, namespace: str, service: Service) -> StoredEntry | None:
    """The live entry of one name with its owner and generation, or None; changes nothing.

    A swap that expects an entry no backend can hold (pid 0, generation 0) never matches and
    answers with what is there: one read-only round trip on every backend.
    """
    never = StoredEntry(namespace, service, ProcessIdentity(0, 0), 0, {})
    found: StoredEntry | None = backend.swap_entry(namespace, service, never, None)[1]
    return found

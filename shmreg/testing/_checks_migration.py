"""Conformance checks: the primitives migration copies, validates and rolls back with.

``namespaces`` and ``export_entries`` show what reads show, with owner and generation;
``swap_entry`` is one atomic compare-and-swap that keeps an imported generation (and raises
the counter past it), never lowers a name's generation, refuses a stale expectation without
a trace, and removes only the very entry expected.
"""

from __future__ import annotations

from shmreg._errors import MetadataTooLarge
from shmreg.backends._portable import StoredEntry
from shmreg.backends._protocol import Backend
from shmreg.testing._checks_common import (
    NS,
    OTHER,
    Check,
    _children,
    _equal,
    _expect,
    _limit,
    _me,
    _owner,
    _raises,
    collector,
)

CHECKS: list[tuple[str, Check]] = []
check = collector(CHECKS)


@check
def export_shows_owner_generation_and_metadata(backend: Backend) -> None:
    with _children(1) as procs:
        child = _owner(procs[0])
        g1 = backend.register(NS, "a", _me(), {"v": 1})
        g2 = backend.register(OTHER, ("t", 2), child, {"tags": ["x"]})
        _equal(backend.namespaces(), sorted([NS, OTHER]), "namespaces()")
        _equal(
            backend.export_entries(NS), [StoredEntry(NS, "a", _me(), g1, {"v": 1})], "export NS"
        )
        _equal(
            backend.export_entries(OTHER),
            [StoredEntry(OTHER, ("t", 2), child, g2, {"tags": ["x"]})],
            "export OTHER",
        )
        procs[0].kill()
        procs[0].wait()
        _equal(backend.export_entries(OTHER), [], "export after the owner died")


@check
def swap_imports_keeping_the_generation(backend: Backend) -> None:
    entry = StoredEntry(NS, "imported", _me(), 1000, {"k": "v"})
    ok, stored = backend.swap_entry(NS, "imported", None, entry)
    _equal((ok, stored), (True, entry), "swap into an empty name")
    _equal(backend.lookup_entry(NS, "imported"), (_me().pid, 1000, {"k": "v"}), "lookup_entry")
    later = backend.register(NS, "later", _me(), None)
    _expect(later > 1000, f"a later registration got generation {later}, not above 1000")
    backend.update_metadata(NS, "imported", {"k": 2}, generation=1000)  # the token still works


@check
def swap_never_lowers_a_generation(backend: Backend) -> None:
    with _children(1) as procs:
        backend.register(NS, "x", _owner(procs[0]), {"a": 1})
        newest = backend.register(NS, "y", _me(), None)
        current = backend.export_entries(NS)
        first = next(e for e in current if e.service == "x")
        low = StoredEntry(NS, "x", _me(), 1, {"b": 2})
        ok, stored = backend.swap_entry(NS, "x", first, low)
        _expect(ok and stored is not None, "overwrite of the expected entry refused")
        assert stored is not None
        _expect(
            stored.generation > newest,
            f"overwrite got generation {stored.generation}, not above {newest}",
        )
        _equal(backend.lookup_entry(NS, "x"), (_me().pid, stored.generation, {"b": 2}), "lookup")


@check
def swap_refuses_a_stale_expectation(backend: Backend) -> None:
    gen = backend.register(NS, "s", _me(), {"v": 1})
    seq = backend.last_event_seq()
    current = StoredEntry(NS, "s", _me(), gen, {"v": 1})
    stale = current._replace(metadata={"v": 0})
    _equal(
        backend.swap_entry(NS, "s", stale, None), (False, current), "swap on stale expectation"
    )
    _equal(backend.swap_entry(NS, "s", None, stale), (False, current), "swap expecting absence")
    _equal(backend.last_event_seq(), seq, "events after refused swaps")
    big = StoredEntry(NS, "s", _me(), gen, {"x": "y" * (_limit(backend) + 1)})
    _raises(MetadataTooLarge, backend.swap_entry, NS, "s", current, big)
    _equal(backend.lookup_entry(NS, "s"), (_me().pid, gen, {"v": 1}), "after refused swaps")
    ok, _ = backend.swap_entry(NS, "s", current, None)
    _expect(ok, "removal of the expected entry refused")
    _equal(backend.lookup(NS, "s"), None, "lookup after the swap removed it")
    _equal(backend.namespaces(), [], "namespaces() once empty")


@check
def swap_updates_metadata_of_the_same_owner(backend: Backend) -> None:
    gen = backend.register(NS, "m", _me(), {"v": 1})
    current = StoredEntry(NS, "m", _me(), gen, {"v": 1})
    ok, stored = backend.swap_entry(NS, "m", current, current._replace(metadata={"v": 2}))
    _equal((ok, stored), (True, current._replace(metadata={"v": 2})), "same-owner swap")
    _equal(backend.read_events(backend.last_event_seq() - 1)[0][0].kind, "updated", "event")


@check
def import_entries_matches_one_swap_each(backend: Backend) -> None:
    importer = getattr(backend, "import_entries", None)
    if importer is None:
        return  # optional: migration falls back to swap_entry one by one
    taken = backend.register(NS, "taken", _me(), {"mine": 1})
    entries = [
        StoredEntry(NS, "new-1", _me(), 500, {"a": 1}),
        StoredEntry(NS, "taken", _me(), 501, {"b": 2}),
        StoredEntry(OTHER, ("t", 3), _me(), 502, {}),
    ]
    results = importer(entries)
    _equal(
        results,
        [
            (True, entries[0]),
            (False, StoredEntry(NS, "taken", _me(), taken, {"mine": 1})),
            (True, entries[2]),
        ],
        "import_entries results",
    )
    _equal(backend.lookup_entry(OTHER, ("t", 3)), (_me().pid, 502, {}), "imported entry")

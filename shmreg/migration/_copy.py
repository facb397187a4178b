"""``migrate``, ``validate`` and ``rollback``: copying entries between any two backends.

Every write is one ``swap_entry`` (an atomic compare-and-swap on the target), so a copy never
overwrites what it did not expect. ``migrate`` is idempotent: an entry already in the target
unchanged is skipped, so a second run after a crash finishes the job with nothing written
twice. With a ``journal`` file it also remembers, across that crash, which entries it wrote
(an intent line is flushed before each write), so the final report's ``added`` (what
``rollback`` removes) covers both runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from shmreg import _codec
from shmreg._error_base import ShmregError
from shmreg._errors import InvalidArgument, RegistryNotFound
from shmreg.backends._memory import MemoryBackend
from shmreg.backends._portable import StoredEntry, _to_json, local_owner, same_entry
from shmreg.backends._protocol import Backend
from shmreg.migration._locations import location_of, open_location
from shmreg.migration._report import (
    Conflict,
    Failure,
    MigrationReport,
    RollbackReport,
    ValidationReport,
)

#: Namespaces that belong to shmreg itself and are not copied unless named.
RESERVED_PREFIX = "shmreg."
CONFLICT_POLICIES = ("skip", "overwrite", "fail")
Progress = Callable[[int, int], None]
_BATCH = 1000  # entries imported per round trip where the target can batch (Redis)


def as_backend(where: object, *, create: bool) -> tuple[Backend, bool]:
    """``(backend, opened here)`` for a location string, a ``Registry`` or a backend."""
    if isinstance(where, str):
        return open_location(where, create=create), True
    inner = getattr(where, "backend", None)
    if isinstance(inner, Backend):
        return inner, False
    if isinstance(where, Backend):
        return where, False
    raise InvalidArgument(
        f"{where!r} is no registry: give a Registry, a backend or a location string",
        argument="registry",
        value=repr(where),
    )


def _key(entry: StoredEntry) -> bytes:
    return _codec.encode_key(entry.namespace, entry.service)


def _journal_key(entry: StoredEntry) -> str:
    return json.dumps([entry.namespace, _to_json(entry.service)])


def _equivalent(a: StoredEntry, b: StoredEntry) -> bool:
    # A copy of ours that had to take a fresh generation (the target had used the source's)
    # is still our copy: owner and metadata decide.
    return local_owner(a.owner) == local_owner(b.owner) and a.metadata == b.metadata


def _conflict_kind(source: StoredEntry, target: StoredEntry) -> str:
    if local_owner(source.owner) != local_owner(target.owner):
        return "owner"
    return "generation" if source.generation != target.generation else "metadata"


def _spaces(backends: Iterable[Backend], namespaces: Iterable[str] | None) -> list[str]:
    if namespaces is not None:
        return sorted(set(namespaces))
    found: set[str] = set()
    for backend in backends:
        found.update(backend.namespaces())
    return sorted(ns for ns in found if not ns.startswith(RESERVED_PREFIX))


class _Copier:
    """One migration's state: the report being filled and the journal being written."""

    def __init__(
        self, target: Backend, report: MigrationReport, policy: str, journal: Path | None
    ) -> None:
        self.target = target
        self.report = report
        self.policy = policy
        self.written: set[str] = set()
        self.out: IO[str] | None = None
        if journal is not None:
            if journal.exists():
                self.written = {line.strip() for line in journal.read_text().splitlines()}
            self.out = journal.open("a")

    def close(self) -> None:
        if self.out is not None:
            self.out.close()

    def _intend(self, entry: StoredEntry) -> None:
        if self.out is not None:
            key = _journal_key(entry)
            if key not in self.written:
                self.out.write(key + "\n")
                self.out.flush()  # in the kernel before the write: survives a SIGKILL
                self.written.add(key)

    def copy_new(self, entries: list[StoredEntry]) -> bool:
        """Copy entries whose names the target did not hold when scanned: in one batch."""
        if self.report.dry_run or not entries:
            return all([self.copy(e, None) for e in entries])
        if self.out is not None:
            fresh = [k for k in map(_journal_key, entries) if k not in self.written]
            self.out.write("".join(k + "\n" for k in fresh))
            self.out.flush()  # in the kernel before the writes: survives a SIGKILL
            self.written.update(fresh)
        many = getattr(self.target, "import_entries", None)
        try:
            results = many(entries) if many is not None else None
        except ShmregError:
            # Some of the batch may be in already: one by one, those are found there
            # unchanged, and must count as this migration's (rollback removes them).
            self.written.update(map(_journal_key, entries))
            results = None
        if results is None:
            return all([self.copy(e, None) for e in entries])
        go_on = True
        for entry, (ok, stored) in zip(entries, results, strict=True):
            if ok and stored is not None:
                self.report.added.append(stored)
                self.report.copied += 1
            elif go_on:
                go_on = self.copy(entry, stored)
        return go_on

    def _count(self, entry: StoredEntry, current: StoredEntry | None) -> None:
        """Count one entry written (or, in a dry run, that would be) over ``current``."""
        if current is None:
            self.report.copied += 1
        else:
            kind = _conflict_kind(entry, current)
            self.report.conflicts.append(Conflict(kind, entry, current, "overwritten"))

    def copy(self, entry: StoredEntry, current: StoredEntry | None) -> bool:
        """Copy one entry; False when the policy says stop (``on_conflict="fail"``)."""
        report = self.report
        for _ in range(3):  # the target may change under us: judge again, a few times
            ours = _journal_key(entry) in self.written
            if current is not None and (
                same_entry(entry, current) or (ours and _equivalent(entry, current))
            ):
                if ours:
                    report.added.append(current)  # a run before this one wrote it
                    report.copied += 1
                else:
                    report.skipped += 1
                return True
            if current is not None and self.policy != "overwrite":
                resolution = "failed" if self.policy == "fail" else "skipped"
                kind = _conflict_kind(entry, current)
                report.conflicts.append(Conflict(kind, entry, current, resolution))
                return self.policy != "fail"
            if report.dry_run:
                self._count(entry, current)
                return True
            self._intend(entry)
            try:
                ok, stored = self.target.swap_entry(entry.namespace, entry.service, current, entry)
            except ShmregError as exc:
                report.failed.append(Failure(entry, f"{exc.code} {type(exc).__name__}: {exc}"))
                return True
            if ok:
                assert stored is not None
                report.added.append(stored)
                self._count(entry, current)
                return True
            current = stored
        report.failed.append(Failure(entry, "the target entry kept changing while copying"))
        return True


def migrate(
    source: object,
    target: object,
    *,
    namespaces: Iterable[str] | None = None,
    dry_run: bool = False,
    on_conflict: str = "skip",
    journal: str | Path | None = None,
    progress: Progress | None = None,
) -> MigrationReport:
    """Copy every live entry of ``source`` into ``target``; see the module docstring.

    ``source`` and ``target`` are ``Registry`` objects, backends or location strings
    (``shmreg.migration.open_location``). ``namespaces`` defaults to every namespace of the
    source except shmreg's own (``shmreg.*``). A name the target holds with another entry is
    a conflict: ``skip`` leaves it (and reports it), ``overwrite`` replaces it, ``fail``
    stops the migration there (``report.ok`` is false). ``progress(done, total)`` is called
    after each namespace and every 1000 entries.
    """
    if on_conflict not in CONFLICT_POLICIES:
        raise InvalidArgument(
            f"on_conflict must be one of {CONFLICT_POLICIES}, got {on_conflict!r}",
            argument="on_conflict",
            value=repr(on_conflict),
        )
    started = time.perf_counter()
    with _both(source, target, dry_run) as (src, tgt):
        spaces = _spaces([src], namespaces)
        where = target if isinstance(target, str) else location_of(tgt)
        report = MigrationReport(location_of(src), where, spaces, dry_run=dry_run)
        copier = _Copier(tgt, report, on_conflict, None if journal is None else Path(journal))
        try:
            _run(src, tgt, spaces, copier, progress)
        finally:
            copier.close()
        report.seconds = time.perf_counter() - started
        return report


@contextmanager
def _both(
    source: object, target: object, dry_run: bool | None
) -> Iterator[tuple[Backend, Backend]]:
    """Source and target opened (from locations) for one call, and closed after if opened.

    ``dry_run`` (migrate): a target that does not exist is not created but stood in for.
    """
    src, close_src = as_backend(source, create=False)
    try:
        tgt, close_tgt = _target(target, dry_run)
    except BaseException:
        if close_src:
            src.close()
        raise
    try:
        yield src, tgt
    finally:
        if close_src:
            src.close()
        if close_tgt:
            tgt.close()


def _target(target: object, dry_run: bool | None) -> tuple[Backend, bool]:
    """The target: created for a copy (``dry_run`` false), opened only for a check (None);
    for a dry run of a target that does not exist yet, an empty stand-in."""
    try:
        return as_backend(target, create=dry_run is False)
    except RegistryNotFound:
        if not dry_run:
            raise
        return MemoryBackend(), True


def _run(
    src: Backend,
    tgt: Backend,
    spaces: list[str],
    copier: _Copier,
    progress: Progress | None,
) -> None:
    exported = {ns: src.export_entries(ns) for ns in spaces}
    total = sum(len(entries) for entries in exported.values())
    done = 0
    for ns in spaces:
        present = {_key(e): e for e in tgt.export_entries(ns)}
        batch: list[StoredEntry] = []
        for i, entry in enumerate(exported[ns], 1):
            current = present.get(_key(entry))
            if current is None:
                batch.append(entry)
            elif not copier.copy(entry, current):
                return
            if len(batch) == _BATCH or i == len(exported[ns]):
                if not copier.copy_new(batch):
                    return
                batch = []
            done += 1
            if progress is not None and done % 1000 == 0:
                progress(done, total)
        if progress is not None:
            progress(done, total)


def validate(
    source: object, target: object, namespaces: Iterable[str] | None = None
) -> ValidationReport:
    """Compare the live entries of both sides: missing from the target, extra, different."""
    with _both(source, target, None) as (src, tgt):
        report = ValidationReport()
        for ns in _spaces([src, tgt], namespaces):
            ours = {_key(e): e for e in src.export_entries(ns)}
            theirs = {_key(e): e for e in tgt.export_entries(ns)}
            report.checked += len(ours)
            for key, entry in ours.items():
                other = theirs.get(key)
                if other is None:
                    report.missing.append(entry)
                elif not same_entry(entry, other):
                    report.different.append((entry, other))
            report.extra += [e for key, e in theirs.items() if key not in ours]
        return report


def rollback(report: MigrationReport | str | Path, target: object = None) -> RollbackReport:
    """Remove from the target what the migration added and nobody changed since.

    ``report`` is a ``MigrationReport`` or the path of one saved as JSON; the target is the
    one it names unless ``target`` is given. An entry re-registered, updated or taken over
    since is kept (and listed in the result): a rollback touches nothing else.
    """
    if not isinstance(report, MigrationReport):
        report = MigrationReport.load(report)
    tgt, close_tgt = as_backend(report.target if target is None else target, create=False)
    try:
        result = RollbackReport()
        for entry in report.added:
            ok, _ = tgt.swap_entry(entry.namespace, entry.service, entry, None)
            if ok:
                result.removed += 1
            else:
                result.kept.append(entry)
        return result
    finally:
        if close_tgt:
            tgt.close()

"""migrate / validate / rollback between real backends (shared memory, memory, Redis).

Owners are real processes: this one and sleeping children, killed and reaped in ``finally``.
The SIGKILL test kills a real migrating process at a random point of its copy and runs the
migration again.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shmreg
from shmreg import _identity
from shmreg.migration import MigrationReport, StoredEntry, migrate, rollback, validate
from shmreg.testing.redis import RedisServer


def _redis_name() -> str:
    return f"t-{os.getpid()}-mig-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [
        subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(600)"])
        for _ in range(3)
    ]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.fixture
def source(reg_name: str) -> Iterator[shmreg.Registry]:
    reg = shmreg.Registry.create(reg_name + "-src", capacity=1024)
    try:
        yield reg
    finally:
        reg.destroy()


@pytest.fixture(params=["shm", "memory", "redis"])
def target(request: pytest.FixtureRequest, reg_name: str) -> Iterator[shmreg.Registry]:
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        reg = shmreg.Registry.create(_redis_name(), url=server.url)
    else:
        reg = shmreg.Registry.create(reg_name + "-dst", backend=request.param, capacity=1024)
    try:
        yield reg
    finally:
        reg.destroy()


def _fill(reg: shmreg.Registry, procs: list[subprocess.Popen[bytes]], n: int = 30) -> None:
    for i in range(n):
        reg.register("jobs", f"w{i}", metadata={"i": i, "tags": ["a"]}, pid=procs[i % 3].pid)
    reg.register("other", ("tuple", 1), metadata={"x": None})


def test_migrate_copies_owners_generations_and_metadata(
    source: shmreg.Registry, target: shmreg.Registry, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    _fill(source, sleepers)
    report = migrate(source, target)
    assert report.ok and report.copied == 31 and report.skipped == 0 and not report.conflicts
    for i in range(30):
        n = f"w{i}"
        assert target.backend.lookup_entry("jobs", n) == source.backend.lookup_entry("jobs", n)
    assert target.get_metadata("other", ("tuple", 1)) == {"x": None}
    check = validate(source, target)
    assert check.ok and check.checked == 31
    again = migrate(source, target)  # idempotent: nothing written twice
    assert again.copied == 0 and again.skipped == 31 and again.ok
    # A generation the target hands out later is above every imported one.
    top = max(e.generation for e in source.backend.export_entries("jobs"))
    assert target.register("jobs", "new-one") > top


def test_dry_run_changes_nothing(
    source: shmreg.Registry, target: shmreg.Registry, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    _fill(source, sleepers)
    seq = target.backend.last_event_seq()
    report = migrate(source, target, dry_run=True)
    assert report.copied == 31 and report.dry_run and not report.added
    assert target.backend.last_event_seq() == seq and target.backend.namespaces() == []


def test_validate_names_missing_extra_and_different(
    source: shmreg.Registry, target: shmreg.Registry, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    _fill(source, sleepers, 3)
    migrate(source, target)
    target.unregister("jobs", "w0")
    target.update_metadata("jobs", "w1", {"changed": True})
    target.register("jobs", "only-here")
    check = validate(source, target)
    assert not check.ok
    assert [e.service for e in check.missing] == ["w0"]
    assert [e.service for e in check.extra] == ["only-here"]
    assert [(s.service, t.metadata) for s, t in check.different] == [("w1", {"changed": True})]


@pytest.mark.parametrize("policy", ["skip", "overwrite", "fail"])
def test_conflicts_of_each_kind(
    policy: str,
    source: shmreg.Registry,
    target: shmreg.Registry,
    sleepers: list[subprocess.Popen[bytes]],
) -> None:
    a, b = sleepers[0].pid, sleepers[1].pid
    source.register("c", "owner", metadata={"v": 1}, pid=a)
    source.register("c", "generation", metadata={"v": 1}, pid=a)
    source.register("c", "metadata", metadata={"v": 1}, pid=a)
    source.register("c", "free", metadata={"v": 1}, pid=a)
    target.register("c", "owner", metadata={"v": 1}, pid=b)  # another live process holds it
    for _ in range(3):  # the same owner, at another generation
        target.register("c", "burn", pid=b)
        target.unregister("c", "burn")
    target.register("c", "generation", metadata={"v": 1}, pid=a)
    src_meta = source.backend.export_entries("c")
    gen = {e.service: e.generation for e in src_meta}["metadata"]
    ok, _ = target.backend.swap_entry(
        "c", "metadata", None, StoredEntry("c", "metadata", _identity.identity_of(a), gen, {"v": 2})
    )
    assert ok
    report = migrate(source, target, on_conflict=policy)
    kinds = {c.source.service: c.kind for c in report.conflicts}
    if policy == "fail":
        assert not report.ok and len(report.conflicts) == 1
        assert report.conflicts[0].resolution == "failed"
        return
    assert kinds == {"owner": "owner", "generation": "generation", "metadata": "metadata"}
    assert report.ok and report.copied == 1
    owner_now = target.lookup("c", "owner")
    if policy == "skip":
        assert owner_now == b and target.get_metadata("c", "metadata") == {"v": 2}
        assert {c.resolution for c in report.conflicts} == {"skipped"}
    else:
        assert owner_now == a and target.get_metadata("c", "metadata") == {"v": 1}
        assert {c.resolution for c in report.conflicts} == {"overwritten"}
        assert validate(source, target, ["c"]).missing == []


def test_rollback_removes_only_what_is_unchanged(
    source: shmreg.Registry,
    target: shmreg.Registry,
    sleepers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    _fill(source, sleepers, 6)
    target.register("jobs", "before", metadata={"mine": True})
    report = migrate(source, target)
    report.save(tmp_path / "report.json")
    target.update_metadata("jobs", "w1", {"edited": 1})  # changed since: kept
    target.unregister("jobs", "w2")
    target.register("jobs", "w2", metadata={"again": 1}, pid=sleepers[2].pid)  # re-registered: kept
    target.register("jobs", "after")  # not the migration's: kept
    done = rollback(tmp_path / "report.json", target)
    assert done.removed == 5 and sorted(str(e.service) for e in done.kept) == ["w1", "w2"]
    left = sorted(str(s) for s in target.list_services("jobs"))
    assert left == ["after", "before", "w1", "w2"]
    assert target.list_services("other") == []


def test_migrate_rejects_a_bad_policy(source: shmreg.Registry) -> None:
    with pytest.raises(shmreg.InvalidArgument):
        migrate(source, source, on_conflict="merge")


def test_report_round_trips_through_json(
    source: shmreg.Registry, target: shmreg.Registry, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    _fill(source, sleepers, 2)
    report = migrate(source, target)
    again = MigrationReport.from_json(report.as_json())
    assert again.added == report.added and again.copied == report.copied


_MIGRATOR = textwrap.dedent(
    """
    import sys
    from shmreg.migration import migrate
    migrate(sys.argv[1], sys.argv[2], journal=sys.argv[3])
    print("done", flush=True)
    """
)


_COMMIT_POINTS = [
    "commit.staged",
    "commit.journal_valid",
    "commit.slot_words",
    "commit.published",
    "commit.event_written",
    "commit.journal_retired",
]


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_sigkill_midway_then_rerun_finishes_the_job(
    seed: int, reg_name: str, sleepers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    # The migrating process SIGKILLs itself at a random step of a random write (shmreg's
    # crash points), then a second run with the same journal must finish the job.
    rng = random.Random(seed)
    src = shmreg.Registry.create(reg_name + "-src", capacity=4096)
    dst_name = reg_name + "-dst"
    journal = tmp_path / "journal"
    point = f"{rng.choice(_COMMIT_POINTS)}:{rng.randrange(1, 2000)}"
    try:
        src.register_many("jobs", [(f"k{i}", sleepers[0].pid, {"i": i}) for i in range(2000)])
        env = {**os.environ, "SHMREG_CRASH_AT": point}
        proc = subprocess.run(
            [sys.executable, "-c", _MIGRATOR, src.name, dst_name, str(journal)],
            env=env,
            capture_output=True,
            timeout=300,
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
        report = migrate(src, dst_name, journal=journal)
        assert report.ok and report.copied == 2000 and len(report.added) == 2000, point
        assert report.skipped == 0 and validate(src, dst_name).ok
        assert rollback(report).removed == 2000
        assert len(validate(src, dst_name).missing) == 2000
    finally:
        src.destroy()
        try:
            shmreg.Registry.attach(dst_name).destroy()
        except shmreg.RegistryNotFound:
            pass


def test_sigkill_of_a_copy_to_redis_then_rerun(
    redis_server: RedisServer,
    reg_name: str,
    sleepers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    src = shmreg.Registry.create(reg_name + "-src", capacity=8192)
    dst = f"{redis_server.url}#{_redis_name()}"
    journal = tmp_path / "journal"
    stop_at = random.Random(7).randrange(100, 3000)
    try:
        src.register_many("jobs", [(f"k{i}", sleepers[1].pid, {"i": i}) for i in range(4000)])
        proc = subprocess.Popen(
            [sys.executable, "-c", _MIGRATOR, src.name, dst, str(journal)],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                if journal.exists() and journal.read_bytes().count(b"\n") >= stop_at:
                    break
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        report = migrate(src, dst, journal=journal)
        assert report.ok and report.copied == 4000 and report.skipped == 0
        assert validate(src, dst).ok
    finally:
        src.destroy()
        shmreg.migration.open_location(dst).destroy()


_LIVE_WRITER = textwrap.dedent(
    """
    import os, sys, shmreg
    reg = shmreg.Registry(sys.argv[1], url=sys.argv[2])
    me, die = sys.argv[3], sys.argv[4] == "die"
    for i in range(150):
        reg.register("jobs", f"{me}-{i % 40}", metadata={"i": i})
        reg.update_metadata("jobs", f"{me}-{i % 40}", {"seen": i}, merge=True)
        if i % 9 == 0:
            reg.unregister("jobs", f"{me}-{(i * 7) % 40}")
        if die and i == 90:
            os._exit(0)  # dies holding its names: both sides must drop them alike
    print("done", flush=True)
    sys.stdin.read()
    """
)


def test_migration_under_live_load_misses_nothing(
    reg_name: str, redis_server: RedisServer, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    # Old-only entries are backfilled by migrate while writers on dual-write register,
    # update, unregister and die; afterwards the two sides agree, entry for entry.
    old = shmreg.Registry.create(reg_name, capacity=2048)
    new = f"{redis_server.url}#{_redis_name()}"
    dual = f"dual+shm://{reg_name}?secondary={new}"
    procs: list[subprocess.Popen[str]] = []
    try:
        old.register_many("jobs", [(f"old-{i}", sleepers[i % 3].pid, {"i": i}) for i in range(600)])
        for n in range(4):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        _LIVE_WRITER,
                        reg_name,
                        dual,
                        f"w{n}",
                        "die" if n % 2 else "live",
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        report = migrate(old, new)
        assert report.ok and not report.failed
        for n, proc in enumerate(procs):
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if n % 2:
                proc.wait(timeout=300)
            else:
                assert line.strip() == "done"
        check = validate(old, new)
        assert check.missing == [] and check.different == [] and check.extra == []
        assert check.checked >= 600 + 2 * 30
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        old.destroy()
        shmreg.migration.open_location(new).destroy()


def test_an_entry_of_another_host_cannot_move_into_shared_memory(
    redis_server: RedisServer, reg_name: str
) -> None:
    src = shmreg.Registry.create(_redis_name(), url=redis_server.url)
    dst = shmreg.Registry.create(reg_name + "-dst")
    try:
        me = _identity.self_identity()
        src.backend.heartbeat()  # type: ignore[attr-defined]
        src.register("jobs", "here")
        remote = type(me)(me.pid, me.start_ticks, "another-host")
        backend: Any = src.backend
        backend._lease_ms = 600_000  # keep the other host's lease alive for the test
        backend.register("jobs", "there", remote, {"far": True})
        assert {e.service for e in src.backend.export_entries("jobs")} == {"here", "there"}
        report = migrate(src, dst)
        assert report.copied == 1 and [f.entry.service for f in report.failed] == ["there"]
        assert "another-host" in report.failed[0].reason and not report.ok
        assert dst.lookup("jobs", "here") == os.getpid() and dst.lookup("jobs", "there") is None
    finally:
        src.destroy()
        dst.destroy()

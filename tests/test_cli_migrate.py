"""``shmreg migrate``, ``shmreg rollback`` and ``shmreg flags`` run as real commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import shmreg
import shmreg.migration
from shmreg.testing.redis import RedisServer


def _shmreg(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmreg", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_migrate_validate_and_rollback_to_redis(
    registry: shmreg.Registry, redis_server: RedisServer, tmp_path: Path
) -> None:
    registry.register_many("jobs", [(f"j{i}", None, {"i": i}) for i in range(1500)])
    target = f"{redis_server.url}#t-{os.getpid()}-cli-{registry.name[-8:]}"
    try:
        dry = _shmreg("migrate", registry.name, target, "--dry-run", "--json", cwd=tmp_path)
        assert dry.returncode == 0, dry.stdout + dry.stderr
        assert json.loads(dry.stdout)["copied"] == 1500
        done = _shmreg("migrate", registry.name, target, "--validate", "--json", cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        out = json.loads(done.stdout)
        assert out["copied"] == 1500 and out["validation"]["ok"]
        assert "1500/1500 entries" in done.stderr  # progress on a long copy
        report = Path(tmp_path / out["report"])
        again = _shmreg("migrate", registry.name, target, "--json", "-q", cwd=tmp_path)
        assert json.loads(again.stdout)["skipped"] == 1500 and again.stderr == ""
        undo = _shmreg("rollback", str(report), "--json", cwd=tmp_path)
        assert undo.returncode == 0, undo.stderr
        assert json.loads(undo.stdout) == {"removed": 1500, "kept": []}
        check = _shmreg("migrate", registry.name, target, "--dry-run", cwd=tmp_path)
        assert check.stdout.startswith("would copy 1500")
    finally:
        shmreg.migration.open_location(target).destroy()


def test_migrate_reports_a_failed_conflict_with_exit_1(
    registry: shmreg.Registry, tmp_path: Path
) -> None:
    registry.register("jobs", "a", metadata={"v": 1})
    other = shmreg.Registry.create(registry.name + "-b", backend="shm")
    try:
        other.register("jobs", "a", metadata={"v": 2})
        done = _shmreg("migrate", registry.name, other.name, "--on-conflict", "fail", cwd=tmp_path)
        assert done.returncode == 1
        assert "conflict (metadata, failed): jobs/'a'" in done.stdout
    finally:
        other.destroy()


def test_flags_set_and_show(registry: shmreg.Registry, tmp_path: Path) -> None:
    assert _shmreg("flags", registry.name, cwd=tmp_path).stdout.strip() == "(no flags)"
    done = _shmreg("flags", registry.name, "set", "unified", "25", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "unified\t25 %"
    shown = _shmreg("flags", registry.name, "--json", cwd=tmp_path)
    assert json.loads(shown.stdout) == {"unified": {"percent": 25, "cutover": False}}
    bad = _shmreg("flags", registry.name, "set", "unified", "120", cwd=tmp_path)
    assert bad.returncode == 2 and "InvalidArgument" in bad.stderr


def test_a_second_migration_in_the_same_second_keeps_the_first_report(
    registry: shmreg.Registry, tmp_path: Path
) -> None:
    """Default report names carry the time to the second: a later run must not overwrite an
    earlier report (its rollback would then find nothing to remove)."""
    registry.register("jobs", "a", metadata={"v": 1})
    now = int(time.time())
    earlier = {  # stand-ins for reports saved by runs moments ago, in this second or later
        tmp_path / f"shmreg-migration-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(t))}.json"
        for t in range(now - 1, now + 120)
    }
    for path in earlier:
        path.write_text("earlier\n")
    other = shmreg.Registry.create(registry.name + "-b", backend="shm")
    try:
        done = _shmreg("migrate", registry.name, other.name, "--json", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        saved = tmp_path / json.loads(done.stdout)["report"]
        assert saved not in earlier
        assert [p for p in earlier if p.read_text() != "earlier\n"] == []
        assert shmreg.migration.rollback(saved).removed == 1
    finally:
        other.destroy()

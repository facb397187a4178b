"""The ``shmreg`` command: every subcommand on a real registry, text and --json."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import shmreg
from shmreg._segment import list_segments


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "shmreg", *args], capture_output=True,
                          text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def filled(registry: shmreg.Registry) -> shmreg.Registry:
    registry.register("prod", "db", metadata={"type": "postgres", "capabilities": ["write"]})
    registry.register("prod", ("agent", 1), metadata={"type": "agent"})
    registry.register("test", 7, metadata={})
    return registry


def test_ls_lists_registries(filled: shmreg.Registry) -> None:
    assert filled.name in run("ls").stdout.split()
    assert filled.name in json.loads(run("ls", "--json").stdout)


def test_ls_entries_text_and_json(filled: shmreg.Registry) -> None:
    text = run("ls", filled.name).stdout
    assert "prod\t'db'" in text and "postgres" in text
    rows = json.loads(run("ls", filled.name, "--json").stdout)
    assert {(r["namespace"], json.dumps(r["service"])) for r in rows} == {
        ("prod", '"db"'), ("prod", '["agent", 1]'), ("test", "7")}
    only = json.loads(run("ls", filled.name, "--namespace", "test", "--json").stdout)
    assert [r["service"] for r in only] == [7]


def test_info_json(filled: shmreg.Registry) -> None:
    info = json.loads(run("info", filled.name, "--json").stdout)
    assert info["entries"] == 3 and info["namespaces"] == 2
    assert info["health"]["status"] == "healthy"
    assert info["engine"]["layout_version"] == 1


def test_sweep_removes_dead(filled: shmreg.Registry) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1e9)"])
    try:
        filled.register("prod", "doomed", pid=child.pid)
    finally:
        child.kill()
        child.wait()
    assert json.loads(run("sweep", filled.name, "--json").stdout) == {"removed": 1}
    assert "removed 0 dead entries" in run("sweep", filled.name).stdout


def test_fsck_ok_and_json(filled: shmreg.Registry) -> None:
    assert "ok" in run("fsck", filled.name).stdout
    report = json.loads(run("fsck", filled.name, "--json").stdout)
    assert report["ok"] is True and report["entries"] == 3


def test_destroy_removes_every_segment(reg_name: str) -> None:
    shmreg.Registry.create(reg_name).close()
    assert json.loads(run("destroy", reg_name, "--json").stdout)["destroyed"] is True
    assert list_segments(f"shmreg-{reg_name}") == []
    missing = run("destroy", reg_name, check=False)
    assert missing.returncode == 1 and "no registry" in missing.stderr


def test_errors_are_reported_with_their_code(reg_name: str) -> None:
    proc = run("info", reg_name, check=False)
    assert proc.returncode == 2
    assert "RegistryNotFound [2001]" in proc.stderr
    data = json.loads(run("info", reg_name, "--json", check=False).stdout)
    assert data["error"]["code"] == 2001


def test_watch_prints_events_and_stops_on_timeout(filled: shmreg.Registry) -> None:
    lines = run("watch", filled.name, "--since", "0", "--timeout", "0.2", "--json").stdout
    kinds = [json.loads(line)["kind"] for line in lines.splitlines()]
    assert kinds == ["registered"] * 3


def test_demo_runs_the_main_job() -> None:
    out = run("demo", "--workers", "3").stdout
    assert "3 spawned workers attached by name and registered themselves" in out
    assert "killed with SIGKILL" in out
    assert "sweep removed 1 dead entry; 2 workers left" in out
    assert "capability query" in out and "destroyed" in out


def test_bench_short_run_reports_shmreg_with_no_errors() -> None:
    data = json.loads(run("bench", "--size", "300", "--procs", "1", "--json").stdout)
    shm = data["shmreg"]
    assert shm["lookup_hit"]["errors"] == 0 and shm["register"]["ops"] == 300
    assert "dict" in data

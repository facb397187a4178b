"""The ``shmreg`` command: every subcommand on a real registry, text and --json."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

import shmreg
from shmreg._cli import build_parser
from shmreg._engine.layout import LAYOUT_VERSION
from shmreg._engine.segment import list_segments


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
    assert info["engine"]["layout_version"] == LAYOUT_VERSION


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
    assert missing.returncode == 2 and "RegistryNotFound [2001]" in missing.stderr


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


# ------------------------------------------------------------- one exit-code table, one error


@pytest.mark.parametrize(
    "argv",
    [["ls", "{name}"], ["info", "{name}"], ["sweep", "{name}"], ["fsck", "{name}"],
     ["fsck", "{name}", "--repair"], ["destroy", "{name}"], ["watch", "{name}", "--timeout", "0"],
     ["monitor", "{name}"]],
    ids=lambda a: "-".join(a).replace("{name}", "NAME"),
)
def test_a_missing_registry_is_the_same_error_everywhere(reg_name: str, argv: list[str]) -> None:
    argv = [a.replace("{name}", reg_name) for a in argv]
    text = run(*argv, check=False)
    assert text.returncode == 2 and "RegistryNotFound [2001]" in text.stderr, text
    assert text.stdout == ""
    data = run(*argv, "--json", check=False)
    assert data.returncode == 2
    error = json.loads(data.stdout)["error"]
    assert error["code"] == 2001 and error["name"] == "RegistryNotFound"
    assert set(error) >= {"code", "name", "message", "severity", "retry_strategy", "context"}


@pytest.mark.parametrize("argv", [["nosuch"], ["ls", "--bogus"], ["watch", "x", "--since", "a"],
                                  []])
def test_usage_mistakes_exit_64_with_the_same_error_shape(argv: list[str]) -> None:
    proc = run(*argv, check=False)
    assert proc.returncode == 64 and "InvalidArgument [3008]" in proc.stderr
    data = run(*argv, "--json", check=False)
    assert data.returncode == 64
    assert json.loads(data.stdout)["error"]["code"] == 3008


def test_fsck_exit_1_only_for_problems_found(filled: shmreg.Registry) -> None:
    assert run("fsck", filled.name).returncode == 0


def test_version() -> None:
    from shmreg._engine import fastpath

    expected = f"shmreg {shmreg.__version__}; engine: {fastpath.describe()}"
    assert run("--version").stdout.strip() == expected


def test_every_option_has_help() -> None:
    def parsers(parser: Any) -> list[Any]:
        found = [parser]
        for action in parser._actions:
            if action.choices and isinstance(action.choices, dict):
                for sub in action.choices.values():
                    found += parsers(sub)
        return found

    missing = [
        f"{p.prog} {a.dest}"
        for p in parsers(build_parser())
        for a in p._actions
        if not a.help
    ]
    assert missing == []


def test_ls_says_when_dead_entries_are_hidden(filled: shmreg.Registry) -> None:
    child = subprocess.Popen(["sleep", "infinity"])
    try:
        filled.register("prod", "doomed", pid=child.pid)
    finally:
        child.kill()
        child.wait()
    hidden = run("ls", filled.name)
    assert "doomed" not in hidden.stdout and "1 entry of dead processes hidden" in hidden.stderr
    shown = run("ls", filled.name, "--all")
    assert "doomed" in shown.stdout and "[dead]" in shown.stdout and shown.stderr == ""


def test_info_text_is_a_table_not_reprs(filled: shmreg.Registry) -> None:
    text = run("info", filled.name).stdout
    assert "{" not in text and "}" not in text
    rows = dict(line.split(None, 1) for line in text.splitlines())
    assert rows["health.status"] == "healthy" and rows["entries"] == "3"
    assert rows["engine.layout_version"] == str(LAYOUT_VERSION)


def test_bench_says_which_peers_it_left_out_and_why() -> None:
    out = run("bench", "--size", "200", "--procs", "1", "--seconds", "0.05",
              "--peers", "dict,nosuch").stdout
    assert "left out nosuch: unknown peer" in out

"""A user who follows the README (``pip install -e .``) gets the types: ``mypy --strict`` on
their own script finds shmreg and its annotations, in a fresh virtual environment."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

USER_SCRIPT = """
import asyncio

import shmreg
from shmreg import aio


def on_death(ident: shmreg.ProcessIdentity, verdict: shmreg.Liveness, removed: int) -> None:
    print(ident.pid, verdict.value, removed)


def main() -> None:
    reg: shmreg.Registry = shmreg.Registry("typed-user")
    gen: int = reg.register("ns", ("worker", 1), metadata={"type": "w"})
    pid: int | None = reg.lookup("ns", ("worker", 1))
    entries: list[shmreg.Entry] = reg.find_by_metadata("ns", type="w")
    stats: shmreg.RegistryStats = reg.stats()
    with reg.monitor(poll_interval=0.05, on_death=on_death) as monitor:
        seen: shmreg.MonitorStats = monitor.stats
    events: list[shmreg.Event] = list(reg.watch(since=0, timeout=0))
    report: shmreg.CleanupReport = reg.cleanup_namespace("other", grace=0.1)
    woke: int = asyncio.run(aio.wait_for(reg, "ns", ("worker", 1), timeout=1))
    print(gen, pid, entries, stats, seen, events, report, woke)
    reg.destroy()
"""


@pytest.mark.slow
def test_mypy_strict_sees_the_editable_install(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    # --no-deps: the dependencies do not change how the package is found, and mypy does
    # not report on installed packages' imports.
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "-e",
         str(REPO)],
        capture_output=True, text=True, timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    script = tmp_path / "user.py"
    script.write_text(textwrap.dedent(USER_SCRIPT))
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         "--python-executable", str(venv / "bin" / "python"), str(script)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

"""A user who follows the README (``pip install -e .``) gets the types: ``mypy --strict`` on
their own script finds shmreg and its annotations, in a fresh virtual environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
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


_IGNORED = shutil.ignore_patterns(
    ".git", ".venv", ".venvs", ".tox", "build", "*.so", "__pycache__", "*.egg-info",
    ".mypy_cache", ".ruff_cache", ".hypothesis", "results",
)
_PURE_SESSION = """
import os, shmreg
from shmreg._engine import fastpath
reg = shmreg.Registry.create(f"t-{os.getpid()}-nocc")
reg.register("a", "b", metadata={"x": 1})
print(fastpath.ACTIVE, reg.lookup_with_metadata("a", "b") == (os.getpid(), {"x": 1}))
reg.destroy()
"""


def _install_without_compiler(
    tmp_path: Path, **env: str
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=_IGNORED)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    build_env = {k: v for k, v in os.environ.items() if not k.startswith("SHMREG_")}
    build_env.update(CC="/bin/false", **env)  # every compile fails at once
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(source)],
        capture_output=True, text=True, timeout=900, env=build_env,
    )
    return venv, install


@pytest.mark.slow
def test_without_a_compiler_pip_install_succeeds_and_runs_pure_python(tmp_path: Path) -> None:
    venv, install = _install_without_compiler(tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]
    # The dependencies come from this test run's environment (no download needed); shmreg
    # itself only from the new venv, imported from outside the source tree.
    deps = sysconfig.get_paths()["purelib"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHMREG_")}
    env["PYTHONPATH"] = deps
    ran = subprocess.run(
        [str(venv / "bin" / "python"), "-c", _PURE_SESSION],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.split() == ["False", "True"]
    version = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "shmreg", "--version"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert "engine: pure Python (compiled path not built" in version.stdout


@pytest.mark.slow
def test_required_speedups_make_a_failed_build_fatal(tmp_path: Path) -> None:
    _, install = _install_without_compiler(tmp_path, SHMREG_REQUIRE_SPEEDUPS="1")
    assert install.returncode != 0

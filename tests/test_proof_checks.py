"""The test suite's own checks can fail: each is fed a broken input and must say so.

A check that cannot fail proves nothing. Here the helpers and checkers the proofs rely on
(bounded child reads, replayable seeds, the skip rule for refused namespaces) are run
against a hung child, a fixed seed and doctored stderr, and must report the problem.
The kill storm's model, the fuzz judge, the concurrency minimums and the conformance
checks have their own meta-tests next to the tests they guard.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import uuid
from typing import Any

import pytest
from helpers import (
    DEADLINE_S,
    SEED_ENV,
    children,
    reach_minimum,
    read_line,
    refused_by_the_machine,
    test_seed,
)

import shmreg
from shmreg.testing import CHECKS

HUNG = r"""
import sys, time
sys.stdout.write('{"half": ')
sys.stdout.flush()
sys.stderr.write("stuck in the middle\n")
sys.stderr.flush()
time.sleep(600)
"""


def test_read_line_fails_on_a_hung_child_with_what_it_printed() -> None:
    with children() as kids:
        proc = kids.py(HUNG, prelude=False)
        with pytest.raises(AssertionError) as info:
            read_line(proc, timeout=0.5)  # the child sleeps 600 s: no race with the bound
        message = str(info.value)
        assert "printed no line" in message
        assert '{"half": ' in message and "stuck in the middle" in message
        assert proc.returncode == -9  # killed, so the run does not wait for it


def test_read_line_reads_a_line_and_reports_an_early_exit() -> None:
    with children() as kids:
        proc = kids.py('report({"ok": 1})\nsys.exit(3)')
        assert read_line(proc) == {"ok": 1}
        with pytest.raises(AssertionError, match=r"exited \(3\) without a reply"):
            read_line(proc)


def test_seed_comes_from_the_environment_and_is_printed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(SEED_ENV, "4242")
    assert test_seed("storm") == 4242
    assert f"storm: seed 4242 (replay with {SEED_ENV}=4242)" in capsys.readouterr().out
    monkeypatch.delenv(SEED_ENV)
    seed = test_seed("storm")
    assert f"seed {seed} " in capsys.readouterr().out


@pytest.mark.parametrize(
    "stderr",
    [
        "unshare: unshare failed: Operation not permitted\n",
        "unshare: cannot change root filesystem propagation: Permission denied",
        "unshare: unshare failed: Invalid argument",
        "mount: /dev/shm: permission denied.\n",
    ],
)
def test_only_a_refusal_is_a_skip(stderr: str) -> None:
    assert refused_by_the_machine(1, stderr) == stderr.strip()


@pytest.mark.parametrize(
    "stderr",
    [
        # The old rule skipped these because they mention "mount" or "unshare".
        'Traceback (most recent call last):\n  File "<string>", line 9\n'
        "AssertionError: unshare left /dev/shm mounted",
        "Traceback ...\nshmreg.RegistryFull: [2003] /dev/shm is full (mount a bigger tmpfs)",
        "unshare: failed to execute python3: No such file or directory",
        "Fatal Python error: Bus error (after mount)",
        "",
    ],
)
def test_any_other_failure_is_not_a_skip(stderr: str) -> None:
    assert refused_by_the_machine(1, stderr) is None


def test_success_is_never_a_skip() -> None:
    assert refused_by_the_machine(0, "unshare: unshare failed: Operation not permitted") is None


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None or shutil.which("unshare") is None,
    reason="needs root, setpriv and unshare to provoke a real refusal",
)
@pytest.mark.parametrize("flags", [["--mount", "--propagation", "private"],
                                   ["--pid", "--fork", "--mount-proc"]])
def test_the_pattern_matches_a_real_refusal(flags: list[str]) -> None:
    """An unprivileged user's unshare is refused; its real message must count as a refusal."""
    proc = subprocess.run(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
         "unshare", *flags, "true"],
        capture_output=True, text=True, check=False, timeout=DEADLINE_S,
    )
    assert proc.returncode != 0, "an unprivileged unshare was allowed here"
    assert refused_by_the_machine(proc.returncode, proc.stderr) is not None, proc.stderr


# ------------------------------------------- the statistics check refuses made-up figures


def _doctored(**change: Any) -> Any:
    """A memory backend whose ``stats()`` / ``statistics()`` lie as ``change`` says."""
    from shmreg.backends._memory import MemoryBackend

    class Lying(MemoryBackend):
        def stats(self) -> shmreg.RegistryStats:
            real = super().stats()
            return dataclasses.replace(real, **change.get("stats", {}))

        def statistics(self) -> dict[str, Any]:
            if "statistics" in change:
                return dict(change["statistics"])
            return {**super().statistics(), **change.get("summary", {})}

    return Lying.named(f"t-{os.getpid()}-lying-{uuid.uuid4().hex[:8]}", capacity=16)


STATS_CHECK = dict(CHECKS)["stats_and_statistics"]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"statistics": {}}, id="empty-statistics"),
        pytest.param({"stats": {"capacity": 10**9}}, id="made-up-capacity"),
        pytest.param({"stats": {"capacity": 2}}, id="capacity-below-contents"),
        pytest.param({"stats": {"memory_bytes": 1}}, id="memory-below-contents"),
        pytest.param({"stats": {"memory_bytes": 2**50}}, id="memory-beyond-any-need"),
        pytest.param({"stats": {"load_factor": 0.9}}, id="made-up-load-factor"),
        pytest.param({"summary": {"capacity": 17}}, id="summary-disagrees"),
        pytest.param({"summary": {"entries": 0}}, id="summary-entries"),
        pytest.param({"summary": {"ops": 0}}, id="summary-ops"),
    ],
)
def test_statistics_check_refuses_made_up_figures(change: dict[str, Any]) -> None:
    backend = _doctored(**change)
    try:
        with pytest.raises(AssertionError):
            STATS_CHECK(backend)
    finally:
        backend.destroy()


def test_statistics_check_passes_an_honest_backend() -> None:
    backend = _doctored()
    try:
        STATS_CHECK(backend)
    finally:
        backend.destroy()


# -------------------------------------------------- minimums of real concurrency


def test_reach_minimum_fails_loudly_when_the_machine_produces_no_overlap() -> None:
    calls = []

    def serial_machine() -> int:
        calls.append(1)
        return 0  # every round ran alone: nothing overlapped

    with pytest.raises(AssertionError, match="only 0 overlapping pairs in 4 attempts, 300"):
        reach_minimum("overlapping pairs", 300, serial_machine, 4)
    assert len(calls) == 4


def test_reach_minimum_retries_a_slow_machine_until_it_gets_there() -> None:
    produced = iter([100, 0, 250, 999])
    assert reach_minimum("pairs", 300, lambda: next(produced), 4) == 350

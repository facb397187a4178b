"""Agent records are owned by pid 1 so that no liveness check reclaims them: on both
backends a sweep keeps them, and ``cleanup_namespace`` never signals pid 1."""

from __future__ import annotations

import shmreg


def test_a_record_owned_by_pid_1_survives_sweeps_and_cleanup(
    any_registry: shmreg.Registry,
) -> None:
    reg = any_registry
    reg.register("agents:records", "a", pid=1, metadata={"status": "stopped"})
    assert reg.sweep() == 0
    assert reg.lookup_with_metadata("agents:records", "a") == (1, {"status": "stopped"})
    report = reg.cleanup_namespace("agents:records", grace=0.0)
    assert report.terminated == () and report.killed == () and 1 in report.skipped

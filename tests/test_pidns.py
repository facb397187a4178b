"""A registry seen from another pid namespace: readable, but never judged or written.

Needs root and ``unshare`` (util-linux); skipped elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from helpers import refused_by_the_machine

import shmreg

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
)

_INSIDE = """
import json, os, sys
import shmreg
reg = shmreg.Registry.attach(sys.argv[1])
out = {"pid": os.getpid(), "lookup": reg.lookup("ns", "host"),
       "unknown": reg.health_check().unknown, "swept": reg.sweep()}
try:
    reg.register("ns", "inside")
except shmreg.IncompatibleRegistry as exc:
    out["refused"] = exc.setting
reg.close()
print(json.dumps(out))
"""


def test_foreign_pid_namespace_reads_but_does_not_judge_or_write(reg_name: str) -> None:
    reg = shmreg.Registry.create(reg_name)
    keeper = subprocess.Popen(["sleep", "infinity"])  # lives until killed below
    try:
        reg.register("ns", "host", pid=keeper.pid)
        proc = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", _INSIDE,
             reg_name],
            capture_output=True, text=True, timeout=60,
        )
        refusal = refused_by_the_machine(proc.returncode, proc.stderr)
        if refusal is not None:
            pytest.skip(f"unshare refused here: {refusal}")
        assert proc.returncode == 0, proc.stderr
        import json

        out = json.loads(proc.stdout)
        assert out["pid"] == 1  # really inside a new pid namespace
        assert out["lookup"] == keeper.pid  # stored pids are reported as stored
        assert out["unknown"] == 1 and out["swept"] == 0  # never judged from there
        assert out["refused"] == "pid_namespace"
        assert reg.lookup("ns", "host") == keeper.pid
        assert reg.count("ns") == 1
    finally:
        keeper.kill()
        keeper.wait()
        reg.destroy()

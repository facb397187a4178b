"""A full /dev/shm gives RegistryFull, never SIGBUS: at creation, at growth, in the arena.

Runs inside a private mount namespace with a 4 MiB tmpfs on /dev/shm (root and unshare
needed; skipped elsewhere), so the machine's own /dev/shm is never filled.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import refused_by_the_machine

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
)

_SCRIPT = r"""
import json, os, subprocess, sys
mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", "/dev/shm"],
                         capture_output=True, text=True)
if mounted.returncode != 0:
    sys.exit(mounted.stderr.strip() or f"mount exited {mounted.returncode}")
import shmreg
out = {}
try:
    shmreg.Registry.create("big", capacity=200_000)
except shmreg.RegistryFull as exc:
    out["create"] = [exc.code, str(exc)]
reg = shmreg.Registry.create("small", capacity=64)
acked = 0
try:
    for i in range(200_000):
        reg.register("ns", i, metadata={"pad": "x" * 200})
        acked += 1
except shmreg.RegistryFull as exc:
    out["grow"] = [exc.code, str(exc)]
out["acked"] = acked
out["present"] = reg.count("ns")
out["still_reads"] = reg.lookup("ns", 0) == os.getpid()
reg.unregister("ns", 0)
out["still_writes"] = not reg.registered("ns", 0)
reg.destroy()
out["left"] = sorted(os.listdir("/dev/shm"))
print(json.dumps(out))
"""


def test_full_dev_shm_is_a_clean_error() -> None:
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", _SCRIPT],
        capture_output=True, text=True, timeout=300,
    )
    refusal = refused_by_the_machine(proc.returncode, proc.stderr)
    if refusal is not None:
        pytest.skip(f"cannot make a private tmpfs here: {refusal}")
    assert proc.returncode == 0, proc.stderr  # a SIGBUS would be returncode -7
    out = json.loads(proc.stdout)
    assert out["create"][0] == 2003 and "/dev/shm" in out["create"][1]
    assert out["grow"][0] == 2003
    assert out["acked"] > 64 and out["present"] == out["acked"]  # nothing acknowledged lost
    assert out["still_reads"] and out["still_writes"]
    assert out["left"] == []

"""A registry shared between users (mode 0o666) and forks taken at awkward moments.

/dev/shm is sticky: only a segment's creator (or root) may remove it, and each new
generation belongs to whichever user grew the table. Needs root to switch users.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from helpers import DEADLINE_S

import shmreg
from shmreg._engine.segment import list_segments

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")

_AS_USER = """
import os, sys
uid = int(sys.argv[2])
import shmreg  # imported before dropping privileges (the checkout may be unreadable)
os.setgid(uid); os.setuid(uid)
crash = sys.argv[3]
if crash:
    os.environ["SHMREG_CRASH_AT"] = crash
reg = shmreg.Registry.attach(sys.argv[1])
for i in range(int(sys.argv[4])):
    reg.register("ns", f"{uid}-{i}", pid=int(sys.argv[5]))
print("done", flush=True)
"""


def _as_user(name: str, uid: int, count: int, owner: int, crash: str = "") -> int:
    env = dict(os.environ, SHMREG_CRASH_AT=crash) if crash else None
    proc = subprocess.run(
        [sys.executable, "-c", _AS_USER, name, str(uid), crash, str(count), str(owner)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    return proc.returncode


@needs_root
def test_growth_by_another_user_leaves_the_registry_writable(reg_name: str) -> None:
    keeper = subprocess.Popen(["sleep", "infinity"])
    reg = shmreg.Registry.create(reg_name, capacity=16, mode=0o666)
    try:
        assert _as_user(reg_name, 65534, 200, keeper.pid) == 0  # grows it, as nobody
        for i in range(200):  # and grows it again, as root: old generations are nobody's
            reg.register("ns", f"root-{i}", pid=keeper.pid)
        assert reg.count("ns") == 400
    finally:
        keeper.kill()
        keeper.wait()
        reg.destroy()
    assert list_segments(f"shmreg-{reg_name}") == []


@needs_root
def test_a_half_built_generation_of_another_user_does_not_wedge_writers(
    reg_name: str,
) -> None:
    keeper = subprocess.Popen(["sleep", "infinity"])
    shmreg.Registry.create(reg_name, capacity=16, mode=0o666).close()
    try:
        # uid 65533 dies half-way through a growth: its half-built segment is its own.
        assert _as_user(reg_name, 65533, 200, keeper.pid, "rebuild.copied") == -9
        # uid 65534 cannot remove that segment; recovery must go on without it.
        assert _as_user(reg_name, 65534, 50, keeper.pid) == 0
        with shmreg.Registry.attach(reg_name) as reg:
            reg.register("ns", "creator", pid=keeper.pid)
            assert reg.registered("ns", "creator")
            assert reg.count("ns") >= 51
    finally:
        keeper.kill()
        keeper.wait()
        from shmreg._engine.store import destroy_by_name

        destroy_by_name(reg_name)


@needs_root
def test_only_the_creator_may_destroy(reg_name: str) -> None:
    reg = shmreg.Registry.create(reg_name, mode=0o666)
    try:
        code = (
            "import os, sys, shmreg\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "try:\n"
            "    shmreg.Registry.attach(sys.argv[1]).destroy()\n"
            "except shmreg.RegistryPermissionError:\n"
            "    print('refused')\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, reg_name], capture_output=True, text=True, timeout=60
        )
        assert out.stdout.strip() == "refused", out.stderr
        reg.register("ns", "still-here")  # not marked destroyed
        assert reg.registered("ns", "still-here")
    finally:
        reg.destroy()


def test_a_fork_while_another_thread_remaps_does_not_hang_the_child(reg_name: str) -> None:
    reg = shmreg.Registry.create(reg_name, capacity=16)
    store = reg.backend.store  # type: ignore[attr-defined]
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store._swap_lock:  # a thread re-mapping at the moment of the fork
            held.set()
            release.wait(DEADLINE_S)

    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(DEADLINE_S), "the remapping thread never took the lock"
    try:
        pid = os.fork()
        if pid == 0:  # the child: grow the table (a new generation), then read through it
            code = 1
            try:
                signal_alarm = __import__("signal")
                signal_alarm.alarm(int(DEADLINE_S))  # a hang fails the child, never the run
                for i in range(100):
                    reg.register("ns", i)
                code = 0 if reg.lookup("ns", 99) == os.getpid() else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        thread.join()
        reg.destroy()

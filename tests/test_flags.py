"""Feature flags in the registry, stable bucketing, and a live rollout 0 -> 25 -> 100 -> 0 %."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import shmreg
from shmreg.migration import FeatureFlags, FlagState, bucket, open_by_flag, open_location
from shmreg.testing.redis import RedisServer


def test_flags_are_shared_and_validated(registry: shmreg.Registry) -> None:
    flags = FeatureFlags(registry)
    assert flags.get("unified") == FlagState(0, False)
    flags.set("unified", 25)
    assert FeatureFlags(f"shm://{registry.name}").get("unified") == FlagState(25, False)
    for bad in (-1, 101, 2.5, "50", True):
        with pytest.raises(shmreg.InvalidArgument):
            flags.set("unified", bad)  # type: ignore[arg-type]
    with pytest.raises(shmreg.InvalidArgument):
        flags.set("unified", 50, cutover=True)
    assert flags.all() == {"unified": FlagState(25, False)}
    # Held by pid 1, the flag outlives this process; it is no entry of the user's namespaces.
    assert registry.lookup("shmreg.flags", "unified") == 1


def test_bucketing_is_stable_and_spread() -> None:
    assert bucket("f", "key-1") == bucket("f", "key-1")
    buckets = [bucket("f", f"key-{i}") for i in range(2000)]
    assert all(0 <= b < 100 for b in buckets)
    below = sum(b < 25 for b in buckets)
    assert 350 < below < 650  # about a quarter: the hash spreads keys


def test_per_key_rollout_follows_the_percentage(registry: shmreg.Registry) -> None:
    flags = FeatureFlags(registry)
    keys = [f"k{i}" for i in range(400)]
    flags.set("f", 0)
    assert not any(flags.enabled("f", k) for k in keys)
    flags.set("f", 30)
    at_30 = {k for k in keys if flags.enabled("f", k)}
    flags.set("f", 60)
    at_60 = {k for k in keys if flags.enabled("f", k)}
    assert at_30 < at_60  # a key in at 30 % stays in as the percentage grows
    flags.set("f", 100)
    assert all(flags.enabled("f", k) for k in keys)


_WRITER = textwrap.dedent(
    """
    import json, os, sys
    from shmreg.migration import FeatureFlags, open_by_flag
    flag, old, new, stop = sys.argv[1:5]
    i = 0
    while not os.path.exists(stop):
        with FeatureFlags(old) as flags:
            mode = flags.mode(flag)
        reg = open_by_flag(flag, old, new)
        try:
            for _ in range(5):
                name = f"{os.getpid()}-{i}"
                reg.register("jobs", name, metadata={"i": i})
                print(json.dumps([name, mode, reg.backend.kind]), flush=True)
                i += 1
        finally:
            reg.close()
    print(json.dumps(["stopped"]), flush=True)
    sys.stdin.read()  # stay alive: a dead writer's entries would rightly vanish
    """
)


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 180
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_rollout_and_rollback_with_live_writers_lose_nothing(
    reg_name: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    old = f"shm://{reg_name}"
    new = f"{redis_server.url}#t-{os.getpid()}-flags-{uuid.uuid4().hex[:8]}"
    stop = tmp_path / "stop"
    flags = FeatureFlags(old)
    flags.set("unified", 0)
    acked: list[list[list[Any]]] = [[] for _ in range(3)]
    procs: list[subprocess.Popen[str]] = []
    try:
        for n in range(3):
            proc = subprocess.Popen(
                [sys.executable, "-c", _WRITER, "unified", old, new, str(stop)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(proc)

            def read(proc: subprocess.Popen[str] = proc, into: list[Any] = acked[n]) -> None:
                assert proc.stdout is not None
                for line in proc.stdout:
                    into.append(json.loads(line))

            threading.Thread(target=read, daemon=True).start()

        def progressed(since: list[int]) -> bool:
            return all(len(a) >= s + 15 for a, s in zip(acked, since, strict=True))

        for percent in (25, 100, 0):
            since = [len(a) for a in acked]
            _until(lambda since=since: progressed(since), f"writers before {percent} %")
            flags.set("unified", percent)
        since = [len(a) for a in acked]
        _until(lambda: progressed(since), "writers after the rollback")
        stop.touch()
        _until(lambda: all(a and a[-1] == ["stopped"] for a in acked), "writers to stop")

        modes = {line[1] for a in acked for line in a[:-1]}
        assert "old" in modes and "dual-new" in modes  # the flag was followed
        with FeatureFlags(old) as check:
            assert check.get("unified").percent == 0
        reg = open_by_flag("unified", old, new)  # 0 %: the old registry alone
        newer = open_location(new)
        try:
            assert reg.backend.kind == "shm"
            for proc, lines in zip(procs, acked, strict=True):
                for name, mode, kind in lines[:-1]:
                    assert reg.lookup("jobs", name) == proc.pid, (name, mode)
                    # The backend the writer actually opened: the flag may move between
                    # its read of the mode and open_by_flag's own read.
                    if kind == "dual":
                        assert newer.lookup("jobs", name) == proc.pid, (name, mode)
        finally:
            reg.close()
            newer.close()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        flags.close()
        open_location(old).destroy()
        try:
            open_location(new, create=False).destroy()
        except shmreg.RegistryNotFound:
            pass

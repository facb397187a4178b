"""The supervision part of ``shmreg demo``: agents started, one killed and restarted, a
failing one given up on with its reason, and a capability query, in a second or two."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Callable
from typing import TextIO

from shmreg._registry import Registry
from shmreg.agents._records import find_agents_by_capability
from shmreg.agents._supervisor import Supervisor
from shmreg.testing.agents import failing_config, ml_config, worker_config


def _wait(cond: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"demo: timed out waiting for {what}")
        time.sleep(0.001)


def show_supervision(reg: Registry, say: Callable[[str], None], out: TextIO) -> None:
    """Run the supervision scene on ``reg``, narrating through ``say``."""
    with tempfile.TemporaryDirectory(prefix="shmreg-demo-logs-") as logs:
        _scene(reg, say, out, logs)
    say("supervisor closed: every agent stopped")


def _scene(reg: Registry, say: Callable[[str], None], out: TextIO, logs: str) -> None:
    with Supervisor(reg, namespace="demo-agents", log_dir=logs) as sup:
        flaky = {"type": "permanent", "max_restarts": 2, "max_seconds": 30.0,
                 "backoff_initial": 0.01}  # fmt: skip
        for config in (
            ml_config("ml-1"),
            ml_config("ml-2", capabilities=["inference"]),
            worker_config("io-1"),
            failing_config("flaky", "after", delay=0.05, restart_policy=flaky),
        ):
            sup.register_agent(config)
        for info in sup.list_agents():
            sup.start_agent(info.id)
        say("supervisor started 4 agents (processes restarted under their policies):")
        for info in sup.list_agents():
            caps = ", ".join(info.capabilities)
            print(f"             {info.id:8} pid {info.pid!s:<8} {caps}", file=out)
        victim = sup.get_agent_info("ml-1").pid
        assert victim is not None
        killed = time.perf_counter()
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: reg.lookup(sup.namespace, "ml-1") not in (None, victim), "the restart")
        took = (time.perf_counter() - killed) * 1e3
        info = sup.get_agent_info("ml-1")
        last = info.last_exit.reason if info.last_exit else "-"
        say(f"agent ml-1 (pid {victim}) killed with SIGKILL: restarted as pid {info.pid} "
            f"in {took:.1f} ms, last exit '{last}'")  # fmt: skip
        _wait(lambda: sup.get_agent_status("flaky") == "failed", "the failing agent")
        say(f"agent flaky: failed, {sup.get_agent_info('flaky').reason}")
        found = find_agents_by_capability(reg, ["inference"], namespace=sup.namespace)
        say("agents with capability 'inference': "
            + ", ".join(f"{a.id} (pid {a.pid})" for a in found))  # fmt: skip

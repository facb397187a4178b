"""Shared pieces of the agent tests: waiting on a condition, and a supervisor that is closed
(every agent stopped) however the test ends."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from helpers import proc_state, wait_until

import shmreg
from shmreg import agents


def alive(pid: int) -> bool:
    """A running (not exited, not zombie) process has ``pid``."""
    return proc_state(pid) not in (None, "Z", "X")


@contextmanager
def supervisor(reg: shmreg.Registry, **options: Any) -> Iterator[agents.Supervisor]:
    """A supervisor closed afterwards, its agents' logs in a directory removed afterwards."""
    options.setdefault("namespace", f"agents-{uuid.uuid4().hex[:8]}")
    logs = tempfile.mkdtemp(prefix="shmreg-test-logs-")
    options.setdefault("log_dir", logs)
    sup = agents.Supervisor(reg, **options)
    try:
        yield sup
    finally:
        sup.close(timeout=5.0)
        shutil.rmtree(logs, ignore_errors=True)


def restarted(sup: agents.Supervisor, agent_id: str, old_pid: int) -> agents.AgentInfo:
    """Wait until ``agent_id`` runs again under a pid other than ``old_pid``."""
    return wait_until(  # type: ignore[no-any-return]
        lambda: (i := sup.get_agent_info(agent_id)).status == "running" and i.pid != old_pid and i,
        f"{agent_id} restarted",
    )


def settled(sup: agents.Supervisor, agent_id: str, status: str) -> agents.AgentInfo:
    return wait_until(  # type: ignore[no-any-return]
        lambda: (i := sup.get_agent_info(agent_id)).status == status and i,
        f"{agent_id} {status}",
    )

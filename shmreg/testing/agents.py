"""Ready agent programs and configs for tests (the seed's test workers).

Each program is a class whose ``main`` runs it as an agent; a config names it as
``"shmreg.testing.agents:TestWorker.main"``. The ``*_config`` functions build such configs.

- ``TestWorker``: runs until asked to stop, then exits 0; heartbeats if told to.
- ``MLWorker``: advertises inference / training capabilities and a changing ``load``.
- ``CoordinationAgent``: finds others by capability and records their ids in ``peers``.
- ``FailingAgent``: fails ``immediate``-ly, ``after`` a delay, at a ``random`` time within
  the delay, or ``never``; by raising, or with ``exit_code``.
"""

from __future__ import annotations

import random
import sys
import time
from typing import Any

from shmreg.agents._records import find_agents_by_capability
from shmreg.agents._runner import current

__all__ = [
    "CoordinationAgent",
    "FailingAgent",
    "MLWorker",
    "TestWorker",
    "coordination_config",
    "failing_config",
    "load_set",
    "ml_config",
    "worker_config",
]

_TICK = 0.05


class TestWorker:
    """Runs until SIGTERM (``current().stopping``), then exits 0."""

    __test__ = False  # not a pytest test class despite its name

    @staticmethod
    def main(heartbeat: float | None = None, hang_after: float | None = None) -> int:
        """``heartbeat``: beat every that many seconds; ``hang_after``: stop beating then."""
        ctx = current()
        started = time.monotonic()
        tick = heartbeat or _TICK
        while not ctx.stopping.wait(tick):
            hung = hang_after is not None and time.monotonic() - started >= hang_after
            if heartbeat and not hung:
                ctx.heartbeat()
        print(f"worker {ctx.id} stopping", flush=True)
        return 0


class MLWorker:
    """Advertises ``inference`` / ``training`` and a ``load`` that changes every tick."""

    @staticmethod
    def main(model: str = "tiny") -> int:
        ctx = current()
        rng = random.Random()
        ctx.update(model=model, load=0.0)
        while not ctx.stopping.wait(_TICK * 2):
            ctx.update(load=round(rng.random(), 3))
        return 0


class CoordinationAgent:
    """Finds the running agents with ``capabilities`` and records them in ``peers``."""

    @staticmethod
    def main(capabilities: list[str] | None = None) -> int:
        ctx = current()
        wanted = capabilities or ["inference"]
        while True:
            found = find_agents_by_capability(ctx.registry, wanted, namespace=ctx.namespace)
            ctx.update(peers=sorted(a.id for a in found if a.id != ctx.id))
            if ctx.stopping.wait(_TICK * 2):
                return 0


class FailingAgent:
    """Fails by ``mode``: ``immediate``, ``after`` ``delay`` s, ``random`` within ``delay``,
    or ``never``. With ``exit_code`` it exits with that code, else it raises RuntimeError."""

    @staticmethod
    def main(mode: str = "immediate", delay: float = 0.1, exit_code: int | None = None) -> int:
        ctx = current()
        if mode == "never":
            ctx.stopping.wait()
            return 0
        wait = {"immediate": 0.0, "after": delay, "random": random.uniform(0, delay)}[mode]
        if ctx.stopping.wait(wait):
            return 0
        if exit_code is not None:
            sys.exit(exit_code)
        raise RuntimeError(f"FailingAgent {ctx.id} failed ({mode})")


def _config(
    agent_id: str, kind: str, target: str, capabilities: list[str], extra: dict[str, Any]
) -> dict[str, Any]:
    # ``extra`` may override anything, the capabilities included.
    return {
        "id": agent_id,
        "type": kind,
        "module": f"shmreg.testing.agents:{target}",
        "capabilities": capabilities,
        **extra,
    }


def worker_config(agent_id: str = "worker", **extra: Any) -> dict[str, Any]:
    """A ``TestWorker`` with capability ``work``."""
    return _config(agent_id, "worker", "TestWorker.main", ["work"], extra)


def ml_config(agent_id: str = "ml", **extra: Any) -> dict[str, Any]:
    """An ``MLWorker`` with capabilities ``inference`` and ``training``."""
    return _config(agent_id, "ml", "MLWorker.main", ["inference", "training"], extra)


def coordination_config(agent_id: str = "coordinator", **extra: Any) -> dict[str, Any]:
    """A ``CoordinationAgent`` looking for ``inference`` agents."""
    return _config(agent_id, "coordinator", "CoordinationAgent.main", [], extra)


def failing_config(
    agent_id: str = "failing",
    mode: str = "immediate",
    delay: float = 0.1,
    exit_code: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A ``FailingAgent``; ``extra`` may set its ``restart_policy``."""
    kwargs = {"mode": mode, "delay": delay, "exit_code": exit_code}
    return _config(agent_id, "failing", "FailingAgent.main", [], {"kwargs": kwargs, **extra})


def load_set(count: int, prefix: str = "load", **extra: Any) -> list[dict[str, Any]]:
    """``count`` worker configs ``load-0`` .. ``load-<count-1>``."""
    return [worker_config(f"{prefix}-{i}", **extra) for i in range(count)]

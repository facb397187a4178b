"""Where agents live in the registry, and the read side any process can use.

Per supervisor namespace ``NS`` there are three kinds of entry:

- ``NS`` / ``<agent id>``: the *live entry*, owned by the agent's own pid. The agent's death
  removes it (the death monitor, a sweep, or the supervisor), so a capability query only ever
  sees running agents.
- ``NS:records`` / ``<agent id>``: the *record* (config, status, pid, restarts, last exit). It
  must outlive the agent and the supervisor, so it is owned by pid 1, the one process that
  lives as long as the machine (or the container and its ``/dev/shm``): no liveness check or
  sweep ever reclaims it, and ``cleanup_namespace`` never signals pid 1.
- ``NS:supervisor`` / ``"supervisor"``: the claim of the live supervisor, owned by its pid.
  ``register`` refusing it proves another live supervisor.

Requests from other processes go through ``NS:control`` (see ``_control``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from shmreg._errors import AgentAlreadyRunning, AgentNotFound, AlreadyRegistered, NotRegistered
from shmreg._registry import Registry

__all__ = [
    "ACTIVE",
    "RECORD_OWNER",
    "AgentInfo",
    "ExitInfo",
    "claim_supervisor",
    "control_ns",
    "find_agents_by_capability",
    "find_agents_by_type",
    "get_agent_info",
    "list_agents",
    "records_ns",
    "supervisor_ns",
]

#: The owner of records that no process death may remove.
RECORD_OWNER: Final = 1
SUPERVISOR_KEY: Final = "supervisor"
#: Statuses that mean "a process is, or is about to be, there".
ACTIVE: Final = frozenset({"starting", "running", "stopping", "restarting"})
#: A traceback kept in a record is cut to its last this many characters (records share the
#: registry's metadata size limit with the config).
TRACEBACK_CHARS: Final = 1200


def records_ns(namespace: str) -> str:
    return f"{namespace}:records"


def supervisor_ns(namespace: str) -> str:
    return f"{namespace}:supervisor"


def control_ns(namespace: str) -> str:
    return f"{namespace}:control"


@dataclass(frozen=True)
class ExitInfo:
    """How an agent's process ended: ``reason`` reads ``normal``, ``exit 3``,
    ``killed by SIGKILL`` or ``exception ValueError: boom``."""

    code: int | None
    signal: int | None
    reason: str
    traceback: str | None = None
    at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "signal": self.signal,
            "reason": self.reason,
            "traceback": self.traceback,
            "at": self.at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ExitInfo | None:
        if not data:
            return None
        return cls(
            code=data.get("code"),
            signal=data.get("signal"),
            reason=str(data.get("reason", "")),
            traceback=data.get("traceback"),
            at=float(data.get("at", 0.0)),
        )


@dataclass(frozen=True)
class AgentInfo:
    """One agent as its record shows it."""

    id: str
    type: str
    status: str
    pid: int | None
    capabilities: list[str]
    restarts: int
    last_exit: ExitInfo | None
    config: dict[str, Any]
    started_at: float | None = None
    reason: str | None = None  # why it is failed or stopped, when it is
    log: str | None = None

    @property
    def uptime(self) -> float | None:
        """Seconds since the current process started, while it runs."""
        if self.status != "running" or self.started_at is None:
            return None
        return max(0.0, time.time() - self.started_at)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "status": self.status,
            "pid": self.pid,
            "capabilities": self.capabilities,
            "restarts": self.restarts,
            "uptime": self.uptime,
            "last_exit": None if self.last_exit is None else self.last_exit.to_dict(),
            "reason": self.reason,
            "log": self.log,
            "config": self.config,
        }


def info_from_record(record: Mapping[str, Any], supervised: bool = True) -> AgentInfo:
    """An ``AgentInfo`` from a record; with no live supervisor, active states read ``stopped``
    (its agents died with it)."""
    config = dict(record.get("config", {}))
    status = str(record.get("status", "registered"))
    pid = record.get("pid")
    reason = record.get("reason")
    if not supervised and status in ACTIVE:
        status, pid, reason = "stopped", None, "supervisor not running"
    return AgentInfo(
        id=str(config.get("id")),
        type=str(config.get("type")),
        status=status,
        pid=pid if status in ACTIVE else None,
        capabilities=list(config.get("capabilities", [])),
        restarts=int(record.get("restarts", 0)),
        last_exit=ExitInfo.from_dict(record.get("last_exit")),
        config=config,
        started_at=record.get("started_at"),
        reason=reason,
        log=record.get("log"),
    )


def claim_supervisor(registry: Registry, namespace: str) -> None:
    """Register this process as the supervisor of ``namespace``; ``AgentAlreadyRunning`` if
    another live process (or another supervisor in this one) holds it."""
    # ``register`` refuses a name held by another live process; the lookup first also
    # refuses a second supervisor in this same process (re-registering would succeed).
    holder = registry.lookup(supervisor_ns(namespace), SUPERVISOR_KEY)
    try:
        if holder is not None:
            raise AlreadyRegistered(pid=holder)
        registry.register(
            supervisor_ns(namespace), SUPERVISOR_KEY, metadata={"started_at": time.time()}
        )
    except AlreadyRegistered as exc:
        raise AgentAlreadyRunning(
            f"another supervisor (pid {exc.pid}) already runs namespace {namespace!r} "
            f"of registry {registry.name!r}",
            pid=exc.pid,
        ) from None


def supervisor_pid(reg: Registry, namespace: str) -> int | None:
    """The live supervisor's pid for ``namespace``, or ``None``."""
    return reg.lookup(supervisor_ns(namespace), SUPERVISOR_KEY)


def _records(reg: Registry, namespace: str) -> list[Mapping[str, Any]]:
    found = reg.list_services_with_metadata(records_ns(namespace))
    return sorted(found.values(), key=lambda r: (r.get("order", 0), str(r.get("config"))))


def list_agents(reg: Registry, namespace: str = "agents") -> list[AgentInfo]:
    """Every agent of ``namespace``, in registration order, from any process."""
    supervised = supervisor_pid(reg, namespace) is not None
    return [info_from_record(r, supervised) for r in _records(reg, namespace)]


def get_agent_info(reg: Registry, agent_id: str, namespace: str = "agents") -> AgentInfo:
    """One agent's ``AgentInfo``, from any process; ``AgentNotFound`` if there is none."""
    try:
        record = reg.get_metadata(records_ns(namespace), agent_id)
    except NotRegistered:
        raise AgentNotFound(agent_id=agent_id) from None
    return info_from_record(record, supervisor_pid(reg, namespace) is not None)


def _running(reg: Registry, namespace: str, ids: Iterable[Any]) -> list[AgentInfo]:
    wanted = set(ids)
    return [a for a in list_agents(reg, namespace) if a.id in wanted and a.status == "running"]


def find_agents_by_capability(
    reg: Registry, capabilities: Iterable[str], namespace: str = "agents"
) -> list[AgentInfo]:
    """Running agents that have every one of ``capabilities`` (AND)."""
    wanted = set([capabilities] if isinstance(capabilities, str) else capabilities)
    live = reg.find_services_by_metadata(
        namespace, lambda md: wanted <= set(md.get("capabilities", ()))
    )
    return _running(reg, namespace, (e.service for e in live))


def find_agents_by_type(
    reg: Registry, agent_type: str, namespace: str = "agents"
) -> list[AgentInfo]:
    """Running agents of ``agent_type``."""
    live = reg.find_services_by_metadata(namespace, lambda md: md.get("agent_type") == agent_type)
    return _running(reg, namespace, (e.service for e in live))

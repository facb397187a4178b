"""``Supervisor``: owns agent processes and restarts them under their policies.

One lock guards all agent state. One loop thread waits in ``epoll`` on each child's exit
descriptor and on timers (backoff restarts, heartbeat deadlines, log rotation), so a death is
handled as soon as the kernel reports it. A process is only ever started for an agent that
has none (its previous one reaped), which is what keeps one live process per agent id.
Every state change is written to the agent's record in the registry (see ``_records``).
"""

from __future__ import annotations

import os
import select
import signal
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

from shmreg._errors import (
    AgentAlreadyRunning,
    AgentError,
    AgentNotFound,
    AgentNotRunning,
    AgentStartFailed,
    InvalidArgument,
    NotRegistered,
    RegistryClosed,
    RegistryDestroyed,
    ShmregError,
)
from shmreg._registry import Registry
from shmreg.agents import _launch
from shmreg.agents._config import RestartPolicy, validate_config
from shmreg.agents._control import ControlServer
from shmreg.agents._policy import RestartTracker
from shmreg.agents._records import (
    ACTIVE,
    RECORD_OWNER,
    SUPERVISOR_KEY,
    TRACEBACK_CHARS,
    AgentInfo,
    ExitInfo,
    claim_supervisor,
    info_from_record,
    records_ns,
    supervisor_ns,
)
from shmreg.agents._runner import live_metadata

__all__ = ["STRATEGIES", "Supervisor"]

STRATEGIES: Final = ("one_for_one", "one_for_all", "rest_for_one")
_LOG_CHECK_S: Final = 1.0
_SIBLING_GRACE_S: Final = 5.0


@dataclass
class _Agent:
    config: dict[str, Any]
    policy: RestartPolicy
    tracker: RestartTracker
    order: int
    log: str | None
    status: str = "registered"
    restarts: int = 0
    reason: str | None = None
    last_exit: ExitInfo | None = None
    child: _launch.Child | None = None
    intent: str | None = None  # why we signalled it: stop, restart, sibling, watchdog
    restart_at: float | None = None
    kill_at: float | None = None
    created_at: float = field(default_factory=time.time)


class Supervisor:
    """Starts, stops and restarts agent processes; see ``docs/agents.md``."""

    def __init__(
        self,
        registry: Registry,
        namespace: str = "agents",
        strategy: str = "one_for_one",
        *,
        start_method: str = "forkserver",
        log_dir: str | None = None,
        recover: bool = True,
    ) -> None:
        if strategy not in STRATEGIES:
            raise InvalidArgument(f"strategy must be one of {', '.join(STRATEGIES)}")
        if start_method not in _launch.START_METHODS:
            raise InvalidArgument(f"start_method must be one of {', '.join(_launch.START_METHODS)}")
        self.registry, self.namespace, self.strategy = registry, namespace, strategy
        self._method = start_method
        self._log_dir = log_dir or os.path.join(
            tempfile.gettempdir(), f"shmreg-agents-{os.getuid()}", registry.name, namespace
        )
        claim_supervisor(registry, namespace)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._agents: dict[str, _Agent] = {}
        self._by_fd: dict[int, _Agent] = {}
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe()
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._closed = False
        self._next_log_check = 0.0
        self._loop = threading.Thread(target=self._run, name="shmreg-supervisor", daemon=True)
        self._loop.start()
        self._control = ControlServer(registry, namespace, self._execute)
        self._control.start()
        if recover:
            self._recover()

    # ------------------------------------------------------------------ public API

    def register_agent(self, config: dict[str, Any]) -> AgentInfo:
        """Validate and store ``config``; the agent is ``registered`` (not started)."""
        cfg = validate_config(config)
        with self._lock:
            self._check_open()
            if cfg["id"] in self._agents:
                raise AgentAlreadyRunning(f"agent {cfg['id']!r} is already registered")
            order = 1 + max((a.order for a in self._agents.values()), default=0)
            agent = self._new_agent(cfg, order)
            self._agents[cfg["id"]] = agent
            self._save(agent)
            return self._info(agent)

    def start_agent(self, agent_id: str) -> int:
        """Start the agent; return its pid once it runs and is registered."""
        with self._lock:
            agent = self._get(agent_id)
            if agent.child is not None:
                raise AgentAlreadyRunning(agent_id=agent_id, pid=agent.child.pid)
            agent.tracker.reset()
            agent.restart_at = None
            self._spawn(agent, raise_errors=True)
            assert agent.child is not None
            return agent.child.pid

    def stop_agent(self, agent_id: str, timeout: float = 5.0) -> None:
        """SIGTERM the agent, SIGKILL it after ``timeout`` s; its status becomes ``stopped``."""
        with self._lock:
            agent = self._get(agent_id)
            if agent.child is None:
                if agent.status in ("restarting", "starting"):
                    agent.restart_at = None
                    self._set(agent, "stopped", "stopped")
                    return
                raise AgentNotRunning(agent_id=agent_id)
            self._terminate(agent, "stop", timeout)

    def restart_agent(self, agent_id: str, timeout: float = 5.0) -> int:
        """Stop the agent if it runs, then start it again; its new pid."""
        with self._lock:
            agent = self._get(agent_id)
            if agent.child is not None:
                self._terminate(agent, "restart", timeout)
            agent.restarts += 1
            return self.start_agent(agent_id)

    def unregister_agent(self, agent_id: str, timeout: float = 5.0) -> None:
        """Stop the agent if it runs and forget it, record included."""
        with self._lock:
            agent = self._get(agent_id)
            if agent.child is not None:
                self._terminate(agent, "stop", timeout)
            del self._agents[agent_id]
            try:
                self.registry.unregister(records_ns(self.namespace), agent_id)
            except NotRegistered:
                pass

    def get_agent_status(self, agent_id: str) -> str:
        with self._lock:
            return self._get(agent_id).status

    def get_agent_info(self, agent_id: str) -> AgentInfo:
        with self._lock:
            return self._info(self._get(agent_id))

    def list_agents(self) -> list[AgentInfo]:
        with self._lock:
            return [self._info(a) for a in sorted(self._agents.values(), key=lambda a: a.order)]

    def close(self, timeout: float = 5.0) -> None:
        """Stop every agent (SIGTERM, SIGKILL after ``timeout``) and release the namespace."""
        self._control.stop()  # first: a request in progress needs the lock to finish
        with self._lock:
            if self._closed:
                return
            running = [a for a in self._agents.values() if a.child is not None]
            for agent in running:
                agent.intent = "stop"
                self._set(agent, "stopping")
                agent.child.signal(signal.SIGTERM)  # type: ignore[union-attr]
            for agent in self._agents.values():
                if agent.child is None and agent.status in ACTIVE:
                    agent.restart_at = None
                    self._set(agent, "stopped", "supervisor closed")
            self._wait_gone(running, timeout)
            self._closed = True
        self._wake()
        self._loop.join(30.0)
        self._epoll.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        try:
            self.registry.unregister(supervisor_ns(self.namespace), SUPERVISOR_KEY)
        except NotRegistered:
            pass

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ state

    def _check_open(self) -> None:
        if self._closed:
            raise AgentError("this supervisor is closed")

    def _get(self, agent_id: str) -> _Agent:
        self._check_open()
        agent = self._agents.get(agent_id)
        if agent is None:
            raise AgentNotFound(agent_id=agent_id)
        return agent

    def _new_agent(self, cfg: dict[str, Any], order: int) -> _Agent:
        policy = RestartPolicy.from_config(cfg["restart_policy"])
        log = None
        if cfg["output"] == "file":
            os.makedirs(self._log_dir, mode=0o700, exist_ok=True)
            log = os.path.join(self._log_dir, f"{cfg['id']}.log")
        return _Agent(cfg, policy, RestartTracker(policy), order, log)

    def _record(self, agent: _Agent) -> dict[str, Any]:
        last = agent.last_exit.to_dict() if agent.last_exit else None
        if last and last["traceback"]:
            last["traceback"] = last["traceback"][-TRACEBACK_CHARS:]
        child = agent.child
        return {
            "config": agent.config,
            "status": agent.status,
            "pid": None if child is None else child.pid,
            "restarts": agent.restarts,
            "last_exit": last,
            "reason": agent.reason,
            "started_at": None if child is None else child.started_wall,
            "order": agent.order,
            "log": agent.log,
            "created_at": agent.created_at,
        }

    def _info(self, agent: _Agent) -> AgentInfo:
        return info_from_record(self._record(agent))

    def _save(self, agent: _Agent) -> None:
        ns, record = records_ns(self.namespace), self._record(agent)
        try:
            self.registry.update_metadata(ns, agent.config["id"], record)
        except NotRegistered:
            self.registry.register(ns, agent.config["id"], pid=RECORD_OWNER, metadata=record)

    def _set(self, agent: _Agent, status: str, reason: str | None = None) -> None:
        agent.status, agent.reason = status, reason
        self._save(agent)
        self._changed.notify_all()

    # ------------------------------------------------------------------ processes

    def _spawn(self, agent: _Agent, raise_errors: bool = False) -> None:
        cfg = agent.config
        self._set(agent, "starting")
        try:
            modules = [a.config["module"].partition(":")[0] for a in self._agents.values()
                       if "module" in a.config]  # fmt: skip
            child = _launch.start_child(
                self.registry.name, self.namespace, cfg, agent.log, self._method, modules
            )
            if "command" in cfg:
                self._register_command(child, cfg)
        except (AgentStartFailed, ShmregError) as exc:
            reason = f"start failed: {getattr(exc, 'reason', None) or exc}"
            tb = exc.context.get("traceback") if isinstance(exc, AgentStartFailed) else None
            agent.last_exit = ExitInfo(None, None, reason, tb, time.time())
            self._set(agent, "failed", reason)
            if raise_errors:
                raise
            return
        agent.child, agent.intent, agent.kill_at = child, None, None
        self._by_fd[child.fd] = agent
        self._epoll.register(child.fd, select.EPOLLIN)
        self._set(agent, "running")

    def _register_command(self, child: _launch.Child, cfg: dict[str, Any]) -> None:
        # A program cannot register itself: its entry is made under its pid for it.
        try:
            self.registry.register(
                self.namespace, cfg["id"], pid=child.pid,
                metadata=live_metadata(cfg, child.started_wall),
            )  # fmt: skip
        except BaseException:
            child.signal(signal.SIGKILL)
            child.reap()
            raise

    def _terminate(self, agent: _Agent, intent: str, timeout: float) -> None:
        # Called with the lock held; the wait releases it so the loop can reap.
        agent.intent = intent
        self._set(agent, "stopping")
        agent.child.signal(signal.SIGTERM)  # type: ignore[union-attr]
        self._wait_gone([agent], timeout)

    def _wait_gone(self, agents: list[_Agent], timeout: float) -> None:
        if not self._changed.wait_for(lambda: all(a.child is None for a in agents), timeout):
            for agent in agents:
                if agent.child is not None:
                    agent.child.signal(signal.SIGKILL)
            # Only a process in uninterruptible sleep outlives SIGKILL for long.
            self._changed.wait_for(lambda: all(a.child is None for a in agents), 60.0)

    def _on_exit(self, agent: _Agent) -> None:
        child = agent.child
        assert child is not None
        self._epoll.unregister(child.fd)
        del self._by_fd[child.fd]
        ran_for = time.monotonic() - child.started
        info = child.reap()
        agent.child = None
        try:
            self.registry.unregister(self.namespace, agent.config["id"])
        except NotRegistered:
            pass  # the death monitor was first
        intent, agent.intent = agent.intent, None
        if intent == "watchdog":
            timeout = agent.config["heartbeat_timeout"]
            info = ExitInfo(info.code, info.signal, f"{info.reason} (no heartbeat within "
                            f"{timeout} s)", info.traceback, info.at)  # fmt: skip
        agent.last_exit = info
        if intent in ("stop", "restart"):
            self._set(agent, "stopped", "stopped")
            return
        if intent == "sibling":
            agent.restart_at = time.monotonic()
            self._set(agent, "restarting", f"restarted with a sibling ({self.strategy})")
            return
        abnormal = info.reason != "normal"
        if not agent.policy.wants_restart(abnormal):
            self._set(agent, "failed" if abnormal else "stopped", info.reason)
            return
        now = time.monotonic()
        if agent.tracker.exceeded(now):
            p = agent.policy
            self._set(agent, "failed", f"restart intensity exceeded: more than {p.max_restarts}"
                      f" restarts in {p.max_seconds} s; last exit: {info.reason}")  # fmt: skip
            return
        agent.restarts += 1
        agent.restart_at = now + agent.tracker.next_delay(now, ran_for)
        self._set(agent, "restarting", info.reason)
        self._stop_siblings(agent)

    def _stop_siblings(self, agent: _Agent) -> None:
        if self.strategy == "one_for_one":
            return
        for other in self._agents.values():
            if other is agent or other.child is None or other.intent is not None:
                continue
            if self.strategy == "rest_for_one" and other.order < agent.order:
                continue
            other.intent = "sibling"
            other.kill_at = time.monotonic() + _SIBLING_GRACE_S
            other.child.signal(signal.SIGTERM)

    # ------------------------------------------------------------------ the loop

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _run(self) -> None:
        while True:
            try:
                with self._lock:
                    if self._closed:
                        return
                    timeout = self._tick()
                for fd, _ in self._epoll.poll(timeout):
                    with self._lock:
                        if fd == self._wake_r:
                            os.read(self._wake_r, 4096)
                        elif fd in self._by_fd:
                            self._on_exit(self._by_fd[fd])
            except (RegistryClosed, RegistryDestroyed):
                return  # the registry went away under us: nothing left to record into
            except Exception:  # one bad event must not end supervision of every agent
                traceback.print_exc()
                time.sleep(0.1)

    def _tick(self) -> float:
        """Due timers; returns seconds until the next one."""
        now = time.monotonic()
        due = _LOG_CHECK_S
        for agent in list(self._agents.values()):
            if agent.restart_at is not None and agent.child is None:
                if agent.restart_at <= now:
                    agent.restart_at = None
                    self._spawn(agent)
                else:
                    due = min(due, agent.restart_at - now)
            child = agent.child
            if child is None:
                continue
            if agent.kill_at is not None:
                if agent.kill_at <= now:
                    child.signal(signal.SIGKILL)
                    agent.kill_at = None
                else:
                    due = min(due, agent.kill_at - now)
            deadline = agent.config["heartbeat_timeout"]
            if deadline and agent.intent is None:
                left = self._heartbeat_left(agent, child, deadline, now)
                if left <= 0:
                    agent.intent = "watchdog"
                    child.signal(signal.SIGKILL)
                else:
                    due = min(due, left)
        if now >= self._next_log_check:
            self._next_log_check = now + _LOG_CHECK_S
            self._rotate_logs()
        return max(0.0, due)

    def _heartbeat_left(
        self, agent: _Agent, child: _launch.Child, deadline: float, now: float
    ) -> float:
        found = self.registry.lookup_with_metadata(self.namespace, agent.config["id"])
        beat = found[1].get("heartbeat") if found and found[0] == child.pid else None
        last = max(child.started, beat if isinstance(beat, (int, float)) else 0.0)
        return float(last + deadline - now)

    def _rotate_logs(self) -> None:
        for agent in self._agents.values():
            if agent.log is not None:
                _launch.rotate_log(agent.log, agent.config["log_max_bytes"])

    # ------------------------------------------------------------------ recovery, control

    def _recover(self) -> None:
        """Take over the records a previous supervisor left; restart what was running."""
        found = self.registry.list_services_with_metadata(records_ns(self.namespace))
        for record in sorted(found.values(), key=lambda r: r.get("order", 0)):
            try:
                cfg = validate_config(record.get("config"))
            except AgentError:
                continue  # a record this version cannot use: left for a person to look at
            with self._lock:
                agent = self._new_agent(cfg, int(record.get("order", 0)))
                agent.restarts = int(record.get("restarts", 0))
                agent.last_exit = ExitInfo.from_dict(record.get("last_exit"))
                agent.status, agent.reason = (
                    record.get("status", "registered"),
                    record.get("reason"),
                )
                self._agents[cfg["id"]] = agent
                self._kill_orphan(cfg["id"])
                if agent.status in ACTIVE and agent.policy.type != "temporary":
                    agent.restart_at = time.monotonic()
                    self._set(agent, "restarting", "supervisor restarted")
                elif agent.status in ACTIVE:
                    self._set(agent, "stopped", "supervisor restarted")
        self._wake()

    def _kill_orphan(self, agent_id: str) -> None:
        # An agent that outlived its supervisor (no parent-death signal on this platform):
        # it must be gone before a new one starts, or the id would have two processes.
        pid = self.registry.lookup(self.namespace, agent_id)
        if pid is None or pid == os.getpid():
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 60.0
        while self.registry.lookup(self.namespace, agent_id) == pid and time.monotonic() < deadline:
            time.sleep(0.005)

    def _execute(self, op: str, agent_id: str) -> dict[str, Any]:
        """Carry out a control request from another process."""
        try:
            if op == "start":
                self.start_agent(agent_id)
            elif op == "stop":
                self.stop_agent(agent_id)
            elif op == "restart":
                self.restart_agent(agent_id)
            else:
                raise InvalidArgument(f"unknown operation {op!r}")
            return {"ok": True, "error": None, "agent": self.get_agent_info(agent_id).to_dict()}
        except ShmregError as exc:
            return {"ok": False, "error": exc.to_dict(), "agent": None}

"""The agent's side: what runs in the child process, and ``current()`` for the agent's code.

A ``module`` agent runs ``run_module`` in a process started by multiprocessing (a forkserver
that has this module preloaded, by default). It dies with its parent (``PR_SET_PDEATHSIG``),
sends its output to its log file, imports its callable, registers its live entry under its
own pid and only then tells the supervisor it is ready. An exception during that start-up is
sent back instead, so ``start_agent`` raises ``AgentStartFailed`` with it; an exception from
the callable later is sent back too, and becomes the exit reason.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any, Final

from shmreg._errors import AgentNotRunning
from shmreg._registry import Registry

__all__ = ["AgentContext", "current", "live_metadata", "set_parent_death_signal"]

_PR_SET_PDEATHSIG: Final = 1
ENV_REGISTRY: Final = "SHMREG_AGENT_REGISTRY"
ENV_NAMESPACE: Final = "SHMREG_AGENT_NAMESPACE"
ENV_ID: Final = "SHMREG_AGENT_ID"

_libc: Any = None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _prctl: Any = _libc.prctl
except (OSError, AttributeError):  # not Linux: agents then die with the supervisor's pipe only
    _prctl = None


def set_parent_death_signal(expected_parent: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; a no-op elsewhere).

    If the parent is already gone (it died between the fork and this call), exit now: the
    signal would never come.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)


def _die_with(supervisor: int) -> None:
    """SIGKILL this process when ``supervisor`` exits, whoever our parent is.

    Under a forkserver the parent is the forkserver, not the supervisor; the forkserver only
    exits when no process holds the write end of its "alive" pipe, and multiprocessing hands
    that end to every child it starts. So the child closes it (the forkserver can then exit
    with the supervisor) and watches the supervisor itself through a pidfd: a thread blocked
    in ``poll`` costs nothing until the supervisor dies.
    """
    try:
        from multiprocessing import forkserver

        alive_fd = forkserver._forkserver._forkserver_alive_fd  # type: ignore[attr-defined]
        if alive_fd is not None:
            os.close(alive_fd)
            forkserver._forkserver._forkserver_alive_fd = None  # type: ignore[attr-defined]
    except (ImportError, AttributeError, OSError):
        pass
    try:
        pidfd = os.pidfd_open(supervisor)
    except ProcessLookupError:
        os._exit(1)  # it died before we could watch it
    except (AttributeError, OSError):
        return  # no pidfds here: the parent-death signal is all there is

    def watch() -> None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        while not poller.poll():
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="shmreg-agent-watch", daemon=True).start()


def live_metadata(config: Mapping[str, Any], started_at: float) -> dict[str, Any]:
    """The metadata of an agent's live entry (the seed's field names)."""
    return {
        **config.get("metadata", {}),
        "type": "mabeam_agent",
        "agent_type": config["type"],
        "capabilities": list(config.get("capabilities", [])),
        "module": config.get("module") or " ".join(config.get("command", [])),
        "args": list(config.get("args", [])),
        "restart_policy": config.get("restart_policy", "permanent"),
        "created_at": started_at,
        "status": "running",
    }


class AgentContext:
    """What an agent's code sees of itself through ``current()``."""

    def __init__(self, registry: Registry, namespace: str, agent_id: str) -> None:
        self.id = agent_id
        self.registry = registry
        self.namespace = namespace
        #: Set when the supervisor asks the agent to stop (SIGTERM); return soon after.
        self.stopping = threading.Event()

    def update(self, **metadata: Any) -> None:
        """Merge ``metadata`` into this agent's live entry (visible to every process)."""
        self.registry.update_metadata(self.namespace, self.id, metadata, merge=True)

    def heartbeat(self) -> None:
        """Tell the supervisor's watchdog this agent is not hung (see ``heartbeat_timeout``)."""
        self.registry.update_metadata(
            self.namespace, self.id, {"heartbeat": time.monotonic()}, merge=True
        )

    def __repr__(self) -> str:
        return f"<AgentContext {self.id!r} in {self.registry.name}/{self.namespace}>"


_current: AgentContext | None = None


def current() -> AgentContext:
    """This agent's context. Inside a ``module`` agent it is set before the callable runs; a
    ``command`` agent written in Python gets it from the environment the supervisor set.
    ``AgentNotRunning`` outside an agent."""
    global _current
    if _current is not None and _current.registry is not None:
        return _current
    name, namespace, agent_id = (os.environ.get(k) for k in (ENV_REGISTRY, ENV_NAMESPACE, ENV_ID))
    if not (name and namespace and agent_id):
        raise AgentNotRunning("current() is only available inside a shmreg agent")
    _current = AgentContext(Registry.attach(name), namespace, agent_id)
    _install_sigterm(_current)
    return _current


def _install_sigterm(ctx: AgentContext) -> None:
    """On SIGTERM, set ``ctx.stopping``; the handler itself only writes to a pipe.

    Setting the event inside the handler could deadlock: a Python signal handler runs in
    the main thread between two bytecodes, and when the main thread is inside
    ``stopping.wait()`` at a moment it holds the event's (non-reentrant) lock, ``set()``
    waits for that lock forever and the agent never exits. So the handler writes a byte
    (no lock taken) and a small thread blocked on the pipe's other end sets the event.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # a flood of signals must never block the handler

    def relay() -> None:
        try:
            os.read(read_fd, 1)
        finally:
            os.close(read_fd)
        ctx.stopping.set()

    def on_sigterm(signum: int, frame: Any) -> None:
        try:
            os.write(write_fd, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: the relay already has a byte to read

    threading.Thread(target=relay, name="shmreg-agent-sigterm", daemon=True).start()
    signal.signal(signal.SIGTERM, on_sigterm)


def resolve(target: str) -> Callable[..., Any]:
    """The callable named by ``"pkg.mod:attr.attr"``."""
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    return obj  # type: ignore[no-any-return]


def _redirect_output(log_path: str | None) -> None:
    if log_path is None:
        return
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _exception_text(exc: BaseException) -> tuple[str, str]:
    return f"{type(exc).__name__}: {exc}", traceback.format_exc()


def run_module(
    registry_name: str,
    namespace: str,
    config: dict[str, Any],
    conn: Any,
    log_path: str | None,
    parent: int | None,
    supervisor: int,
) -> None:
    """The body of a ``module`` agent process (a multiprocessing target)."""
    global _current
    set_parent_death_signal(parent)
    if parent is None:  # a forkserver's child: its parent is not the supervisor
        _die_with(supervisor)
    _redirect_output(log_path)
    os.environ.update(config.get("env", {}))
    os.environ.update({ENV_REGISTRY: registry_name, ENV_NAMESPACE: namespace, ENV_ID: config["id"]})
    started = time.time()
    try:
        ctx = AgentContext(Registry.attach(registry_name), namespace, config["id"])
        _current = ctx
        _install_sigterm(ctx)
        fn = resolve(config["module"])
        ctx.registry.register(namespace, config["id"], metadata=live_metadata(config, started))
    except BaseException as exc:
        text, tb = _exception_text(exc)
        conn.send(("start_failed", text, tb))
        sys.stderr.write(tb)
        sys.exit(1)
    conn.send(("ready", os.getpid()))
    try:
        result = fn(*config.get("args", []), **config.get("kwargs", {}))
    except SystemExit:
        raise
    except BaseException as exc:
        text, tb = _exception_text(exc)
        sys.stderr.write(tb)
        sys.stderr.flush()
        conn.send(("exception", text, tb))
        sys.exit(1)
    sys.stdout.flush()
    sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)

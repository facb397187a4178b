"""Starting one agent process and reading how it ended.

``module`` agents start through multiprocessing: ``forkserver`` by default, whose server has
shmreg preloaded, so each start is one ``fork`` of a small clean process (no re-import, no
inherited supervisor threads); ``fork`` and ``spawn`` work too. ``command`` agents are a
``fork``/``exec`` with the parent-death signal set in between. Either way the caller gets a
``Child`` with a file descriptor that becomes readable the moment the process exits (the
multiprocessing sentinel, or a pidfd), so the supervisor learns of a death from the kernel
within a millisecond instead of on a polling tick.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any, Final

from shmreg._errors import AgentStartFailed
from shmreg.agents import _runner
from shmreg.agents._records import ExitInfo

__all__ = ["START_METHODS", "Child", "exit_reason", "rotate_log", "start_child"]

START_METHODS: Final = ("forkserver", "fork", "spawn")
#: How long a starting agent may take to import and register before it counts as failed.
#: Generous: a loaded machine can take seconds to import a large package.
START_TIMEOUT: Final = 60.0

_forkserver_lock = threading.Lock()
_forkserver_ready = False


def exit_reason(code: int | None, signum: int | None, exception: str | None = None) -> str:
    """``normal``, ``exit 3``, ``killed by SIGKILL`` or ``exception ValueError: boom``."""
    if exception:
        return f"exception {exception}"
    if signum:
        try:
            return f"killed by {signal.Signals(signum).name}"
        except ValueError:
            return f"killed by signal {signum}"
    return "normal" if code == 0 else f"exit {code}"


class Child:
    """One running agent process as the supervisor holds it."""

    def __init__(
        self,
        pid: int,
        fd: int,
        *,
        process: Any = None,
        popen: subprocess.Popen[bytes] | None = None,
        conn: Connection | None = None,
        pidfd: int | None = None,
    ) -> None:
        self.pid = pid
        self.fd = fd  # readable once the process has exited
        self.started = time.monotonic()
        self.started_wall = time.time()
        self._process = process
        self._popen = popen
        self._conn = conn
        self._pidfd = pidfd
        self._exception: tuple[str, str] | None = None

    def signal(self, signum: int) -> None:
        """Send ``signum`` unless the process has already been reaped."""
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, signum)
            except ProcessLookupError:
                pass
            return
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def _drain(self) -> None:
        # The last message the agent sent before it exited (an exception from its callable).
        conn = self._conn
        try:
            while conn is not None and conn.poll(0):
                msg = conn.recv()
                if msg[0] in ("exception", "start_failed"):
                    self._exception = (msg[1], msg[2])
        except (EOFError, OSError):
            pass

    def reap(self) -> ExitInfo:
        """Collect the exit status of the exited process; closes its descriptors."""
        code: int | None
        signum: int | None = None
        if self._process is not None:
            self._drain()
            self._process.join()
            raw = self._process.exitcode
            code, signum = (None, -raw) if raw is not None and raw < 0 else (raw, None)
            self._process.close()
        else:
            assert self._popen is not None
            _, status = os.waitpid(self.pid, 0)
            raw = os.waitstatus_to_exitcode(status)
            self._popen.returncode = raw  # reaped here: the Popen must not wait again
            code, signum = (None, -raw) if raw < 0 else (raw, None)
        self.close()
        text, tb = self._exception or (None, None)
        reason = exit_reason(code, signum, text)
        return ExitInfo(code=code, signal=signum, reason=reason, traceback=tb, at=time.time())

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        self._conn = None


def rotate_log(path: str, max_bytes: int) -> None:
    """Keep ``path`` under about ``max_bytes``: copy it to ``path.1`` and truncate it.

    Copy-then-truncate because the agent holds its log open with ``O_APPEND``: after the
    truncation its next write lands at the new, empty end. One old file is kept.
    """
    try:
        if os.stat(path).st_size > max_bytes:
            shutil.copyfile(path, path + ".1")
            os.truncate(path, 0)
    except OSError:
        pass  # gone or unreadable: nothing to rotate


def _context(method: str, preload: Sequence[str]) -> Any:
    global _forkserver_ready
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        with _forkserver_lock:
            if not _forkserver_ready:
                # Imported once in the forkserver, not in every agent: the runner, the
                # agents' own modules known so far, and the main script (which each child
                # would otherwise run again as ``__mp_main__``; see docs/agents.md).
                ctx.set_forkserver_preload(["__main__", "shmreg.agents._runner", *preload])
                _forkserver_ready = True
    return ctx


def start_child(
    registry_name: str,
    namespace: str,
    config: Mapping[str, Any],
    log_path: str | None,
    method: str,
    preload: Sequence[str] = (),
) -> Child:
    """Start the agent's process; return once it runs (and, for a module, has registered).

    ``preload``: modules the forkserver imports when this is the first start in the process.

    ``AgentStartFailed`` if it cannot be started or dies first, with its exception's text.
    """
    if "command" in config:
        return _start_command(registry_name, namespace, config, log_path)
    return _start_module(registry_name, namespace, dict(config), log_path, method, preload)


def _start_module(
    registry_name: str,
    namespace: str,
    config: dict[str, Any],
    log_path: str | None,
    method: str,
    preload: Sequence[str],
) -> Child:
    ctx = _context(method, preload)
    receiver, sender = ctx.Pipe(duplex=False)
    # A forkserver's child has the forkserver as its parent: its death signal follows the
    # forkserver, which exits when this process dies. Otherwise the parent is us.
    parent = None if method == "forkserver" else os.getpid()
    process = ctx.Process(
        target=_runner.run_module,
        args=(registry_name, namespace, config, sender, log_path, parent, os.getpid()),
        name=f"shmreg-agent-{config['id']}",
        daemon=False,
    )
    process.start()
    sender.close()
    child = Child(process.pid, process.sentinel, process=process, conn=receiver)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            if receiver.poll(0.05):
                msg = receiver.recv()
                if msg[0] == "ready":
                    return child
                if msg[0] == "start_failed":
                    child._exception = (msg[1], msg[2])
        except (EOFError, OSError):
            pass  # it exited before saying anything: reaped below
        if not process.is_alive() or time.monotonic() > deadline:
            timed_out = process.is_alive()
            if timed_out:
                child.signal(signal.SIGKILL)
            info = child.reap()
            reason = f"not ready within {START_TIMEOUT:.0f} s" if timed_out else info.reason
            raise AgentStartFailed(
                agent_id=config["id"], reason=reason, context={"traceback": info.traceback}
            )


def _start_command(
    registry_name: str, namespace: str, config: Mapping[str, Any], log_path: str | None
) -> Child:
    parent = os.getpid()
    env = {
        **os.environ,
        **config.get("env", {}),
        _runner.ENV_REGISTRY: registry_name,
        _runner.ENV_NAMESPACE: namespace,
        _runner.ENV_ID: config["id"],
    }
    out: Any = None
    if log_path is not None:
        out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        popen = subprocess.Popen(
            list(config["command"]) + [str(a) for a in config.get("args", [])],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            close_fds=True,
            preexec_fn=lambda: _runner.set_parent_death_signal(parent),
        )
    except OSError as exc:
        raise AgentStartFailed(agent_id=config["id"], reason=f"exec failed: {exc}") from exc
    finally:
        if out is not None:
            os.close(out)
    pidfd = os.pidfd_open(popen.pid)
    return Child(popen.pid, pidfd, popen=popen, pidfd=pidfd)

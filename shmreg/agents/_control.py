"""Asking a running supervisor to start, stop or restart an agent, from any process.

The asking process registers a request under its own pid in ``NS:control`` (so a request
whose asker died is swept like any entry); the supervisor's control thread notices the
registry's event counter move, carries the request out and writes the outcome into the same
entry; the asker reads it and removes the entry. No socket, no extra daemon: the registry is
the channel, which is what lets ``shmreg agents NAME stop ID`` work from any shell.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Final

from shmreg._errors import (
    AgentNotRunning,
    InvalidArgument,
    NotRegistered,
    RegistryClosed,
    RegistryDestroyed,
    RegistryTimeout,
)
from shmreg._registry import Registry
from shmreg.agents._records import control_ns, supervisor_pid

__all__ = ["OPS", "ControlServer", "request"]

OPS: Final = ("start", "stop", "restart")
_POLL_S: Final = 0.005
#: How often the supervisor's control thread looks at the event counter when idle: one word
#: read 20 times a second costs nothing measurable.
_SERVE_POLL_S: Final = 0.05


def request(
    reg: Registry, namespace: str, op: str, agent_id: str, timeout: float = 60.0
) -> dict[str, Any]:
    """Have the live supervisor of ``namespace`` carry out ``op`` on ``agent_id``.

    Returns ``{"ok": bool, "error": dict | None, "agent": dict | None}`` once it is done.
    ``AgentNotRunning`` if no supervisor runs there; ``RegistryTimeout`` after ``timeout``.
    """
    if op not in OPS:
        raise InvalidArgument(f"op must be one of {', '.join(OPS)}, got {op!r}")
    if supervisor_pid(reg, namespace) is None:
        raise AgentNotRunning(f"no supervisor is running namespace {namespace!r} of {reg.name}")
    ns = control_ns(namespace)
    key = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    reg.register(ns, key, metadata={"op": op, "id": agent_id, "state": "new"})
    deadline = time.monotonic() + timeout
    try:
        while True:
            md = reg.get_metadata(ns, key)
            if md.get("state") == "done":
                return {
                    "ok": md.get("ok", False),
                    "error": md.get("error"),
                    "agent": md.get("agent"),
                }
            if time.monotonic() > deadline:
                raise RegistryTimeout(f"the supervisor did not answer within {timeout} s")
            if supervisor_pid(reg, namespace) is None:
                raise AgentNotRunning(f"the supervisor of {namespace!r} went away")
            time.sleep(_POLL_S)
    finally:
        try:
            reg.unregister(ns, key)
        except NotRegistered:
            pass


class ControlServer:
    """The supervisor's side: a thread that carries out requests as they arrive."""

    def __init__(
        self,
        reg: Registry,
        namespace: str,
        execute: Callable[[str, str], dict[str, Any]],
    ) -> None:
        self._reg = reg
        self._ns = control_ns(namespace)
        self._execute = execute
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shmreg-agents-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(30.0)

    def _run(self) -> None:
        last_seq = getattr(self._reg.backend, "last_event_seq", None)
        seen = -2
        while not self._stop.is_set():
            try:
                seq = last_seq() if last_seq is not None else -1
                if seq != seen or seq == -1:
                    seen = seq
                    self.serve_pending()
            except (RegistryClosed, RegistryDestroyed):
                return
            self._stop.wait(_SERVE_POLL_S)

    def serve_pending(self) -> None:
        """Carry out every request not yet answered."""
        for key, md in self._reg.list_services_with_metadata(self._ns).items():
            if md.get("state") != "new":
                continue
            outcome = self._execute(str(md.get("op")), str(md.get("id")))
            try:
                self._reg.update_metadata(self._ns, key, {"state": "done", **outcome}, merge=True)
            except NotRegistered:
                pass  # the asker gave up and left

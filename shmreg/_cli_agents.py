"""``shmreg agents NAME [start|stop|restart|logs ID]``: supervisorctl's job, through the registry.

Listing reads the agents' records, so it works with or without a live supervisor. ``start``,
``stop`` and ``restart`` ask the live supervisor (``shmreg.agents.request``) and wait for the
new state; ``logs`` prints the tail of the agent's log file.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

from shmreg._errors import AgentError
from shmreg._registry import Registry
from shmreg.agents import get_agent_info, list_agents, request

__all__ = ["add_parser", "cmd_agents"]


def add_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the ``agents`` command through ``_cli``'s own sub-command factory."""
    p = command("agents", "list agents, or start / stop / restart one, or show its log")
    p.add_argument(
        "action", nargs="?", choices=("start", "stop", "restart", "logs"),
        help="what to do with agent ID (without one: list the agents)",
    )
    p.add_argument("agent_id", nargs="?", metavar="ID", help="the agent's id")
    p.add_argument("--namespace", "-n", default="agents", help="the supervisor's namespace")
    p.add_argument("--lines", type=int, default=40, help="log lines to show (logs)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer")
    p.set_defaults(fn=cmd_agents)


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02}:{secs:02}"


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=repr))


def cmd_agents(args: argparse.Namespace) -> int:
    with Registry.attach(args.name) as reg:
        if args.action is None:
            return _list(reg, args)
        if args.agent_id is None:
            raise AgentError(f"shmreg agents {args.action} needs an agent ID")
        if args.action == "logs":
            return _logs(reg, args)
        outcome = request(reg, args.namespace, args.action, args.agent_id, args.timeout)
    if args.json:
        _print({"error": outcome["error"]} if not outcome["ok"] else outcome["agent"])
    elif outcome["ok"]:
        agent = outcome["agent"]
        print(f"{agent['id']}: {agent['status']} (pid {agent['pid']})")
    else:
        err = outcome["error"]
        print(f"shmreg: {err.get('name', 'error')} [{err.get('code')}]: {err.get('message')}")
    return 0 if outcome["ok"] else 2


def _list(reg: Registry, args: argparse.Namespace) -> int:
    infos = list_agents(reg, args.namespace)
    if args.json:
        _print([i.to_dict() for i in infos])
        return 0
    if not infos:
        print(f"(no agents in namespace {args.namespace!r})")
    for i in infos:
        last = i.last_exit.reason if i.last_exit else "-"
        reason = f"  ({i.reason})" if i.reason and i.status in ("failed", "stopped") else ""
        print(
            f"{i.id:<20} {i.status:<10} pid {i.pid or '-':<8} restarts {i.restarts:<4} "
            f"uptime {_uptime(i.uptime):<9} last exit: {last}{reason}"
        )
    return 0


def _logs(reg: Registry, args: argparse.Namespace) -> int:
    info = get_agent_info(reg, args.agent_id, args.namespace)
    lines: list[str] = []
    if info.log and os.path.exists(info.log):
        with open(info.log, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 256 * args.lines))
            lines = f.read().decode("utf-8", "replace").splitlines()[-args.lines :]
    if args.json:
        _print({"id": info.id, "log": info.log, "lines": lines, "at": time.time()})
    else:
        print("\n".join(lines) if lines else f"(no output in {info.log or 'an inherited stream'})")
    return 0

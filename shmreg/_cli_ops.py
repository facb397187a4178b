"""Operators' commands: ``shmreg health`` and ``shmreg metrics``, and ``monitor``'s exporters.

``health`` follows the convention Nagios-style checks and container health probes expect:
exit 0 healthy, 1 degraded, 2 unhealthy, and one line saying why.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from shmreg._types import HealthReport, HealthStatus

EXIT_CODES = {HealthStatus.HEALTHY: 0, HealthStatus.DEGRADED: 1, HealthStatus.UNHEALTHY: 2}


def health_reason(name: str, report: HealthReport) -> str:
    """The one line ``shmreg health`` prints: the status, then what to do about it."""
    if report.damaged:
        return f"{report.status.value}: {name}: {report.detail}"
    share = f"{report.dead} of {report.total} entries belong to dead processes"
    if report.status is HealthStatus.HEALTHY:
        return f"healthy: {name}: {report.total} entries, {report.dead} of dead processes"
    return f"{report.status.value}: {name}: {share}; run shmreg sweep {name} or shmreg monitor"


def cmd_health(args: argparse.Namespace) -> int:
    from shmreg._cli_target import open_target

    with open_target(args.name) as reg:
        report = reg.health_check()
    line = health_reason(args.name, report)
    if args.json:
        data = {
            "name": args.name,
            "status": report.status.value,
            "exit_code": EXIT_CODES[report.status],
            "reason": line,
            "backend": report.backend,
            "total": report.total,
            "alive": report.alive,
            "dead": report.dead,
            "unknown": report.unknown,
            "damaged": report.damaged,
        }
        print(json.dumps(data, sort_keys=True))
    else:
        print(line)
    return EXIT_CODES[report.status]


def add_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the operators' commands through ``shmreg._cli``'s ``command`` helper."""
    command(
        "health", "exit 0 / 1 / 2 for healthy / degraded / unhealthy, with the reason"
    ).set_defaults(fn=cmd_health)

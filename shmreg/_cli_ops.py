"""Operators' commands: ``shmreg health`` and ``shmreg metrics``, and ``monitor``'s exporters.

``health`` follows the convention Nagios-style checks and container health probes expect:
exit 0 healthy, 1 degraded, 2 unhealthy, and one line saying why.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from shmreg._types import HealthReport, HealthStatus

if TYPE_CHECKING:
    from shmreg._liveness import Monitor
    from shmreg._registry import Registry

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


def cmd_metrics(args: argparse.Namespace) -> int:
    from shmreg import _opmetrics
    from shmreg._cli_target import open_target
    from shmreg.metrics import exposition

    _opmetrics.set_enabled(False)  # this short-lived process's own calls say nothing
    with open_target(args.name) as reg:
        sys.stdout.write(exposition(reg))
    return 0


def add_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the operators' commands through ``shmreg._cli``'s ``command`` helper."""
    command(
        "health", "exit 0 / 1 / 2 for healthy / degraded / unhealthy, with the reason"
    ).set_defaults(fn=cmd_health)
    command("metrics", "print one Prometheus scrape of a registry").set_defaults(fn=cmd_metrics)


def add_monitor_options(p: argparse.ArgumentParser) -> None:
    """``shmreg monitor``'s exporters: an HTTP endpoint and a node_exporter text file."""
    p.add_argument(
        "--metrics-port", type=int, default=None, help="serve /metrics on this port (0: any free)"
    )
    p.add_argument("--metrics-addr", default="127.0.0.1", help="address to serve metrics on")
    p.add_argument("--textfile", default=None, help="write metrics to this .prom file atomically")
    p.add_argument(
        "--textfile-interval", type=float, default=15.0, help="seconds between text file writes"
    )


@contextlib.contextmanager
def exporters(args: argparse.Namespace, reg: Registry, monitor: Monitor) -> Iterator[None]:
    """Run the exporters ``args`` asks for while the monitor runs; stop them after."""
    if args.metrics_port is None and args.textfile is None:
        yield
        return
    from shmreg import _opmetrics
    from shmreg.metrics import scrape_registry, serve, write_textfile

    _opmetrics.uninstrument(reg)  # the exporter's own calls would only add noise
    scrape = scrape_registry(reg, monitor=monitor)
    server: Any = None
    stop = threading.Event()
    writer: threading.Thread | None = None
    try:
        if args.metrics_port is not None:
            server = serve(scrape, args.metrics_port, args.metrics_addr)
            url = f"http://{args.metrics_addr}:{server.server_port}/metrics"
            print(
                json.dumps({"metrics_url": url}) if args.json else f"metrics at {url}", flush=True
            )
        if args.textfile is not None:
            path, every = args.textfile, max(args.textfile_interval, 0.1)
            write_textfile(scrape, path)  # at once: a bad path fails the command here

            def write_loop() -> None:
                while not stop.wait(every):
                    try:
                        write_textfile(scrape, path)
                    except Exception as exc:  # keep exporting; the next write may work
                        print(f"shmreg: writing {path} failed: {exc!r}", file=sys.stderr)

            writer = threading.Thread(target=write_loop, name="shmreg-textfile", daemon=True)
            writer.start()
        yield
    finally:
        stop.set()
        if writer is not None:
            writer.join(timeout=10)
        if server is not None:
            server.shutdown()
            server.server_close()

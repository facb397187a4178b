"""The ``shmreg`` command (also ``python -m shmreg``).

Every command that reads works on a registry whose writers are all dead: reading needs no
lock, and a write (``sweep``) repairs what a dead writer left half-done before it starts.

One exit-code table for every command (docs/errors.md, "The command line"):

    0    done (``watch`` and ``monitor`` stopped by Ctrl-C or SIGTERM included)
    1    done, and what it looked at has problems (``fsck`` without ``--repair``)
    2    a shmreg error (no such registry, a bad name, ...): ``{"error": {...}}`` under --json
    64   usage: an unknown command or option, a malformed value (same JSON shape, code 3008)
    130  interrupted by Ctrl-C (other commands)

Under ``--json`` an error is the object ``{"error": ShmregError.to_dict()}`` on stdout, and
the text form goes to stderr either way. A new command group is one ``command(...)`` call
in ``build_parser`` plus its ``cmd_*`` function.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from shmreg import _cli_migrate
from shmreg._cli_ops import add_commands as add_ops_commands
from shmreg._cli_ops import add_monitor_options, exporters
from shmreg._cli_target import list_names, open_target, split_target
from shmreg._engine.segment import list_segments
from shmreg._errors import InvalidArgument, RegistryNotFound, ShmregError
from shmreg._registry import Registry


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple):
        return list(value)
    return repr(value)


def _registries() -> list[str]:
    return sorted(seg[len("shmreg-") :] for seg in list_segments() if "." not in seg)


EXIT_OK, EXIT_PROBLEMS, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 64, 130


class _UsageError(Exception):
    """argparse's complaint, raised instead of its own exit(2) so the exit-code table and
    the JSON error shape hold for usage mistakes too."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's hook; never returns
        raise _UsageError(f"{self.prog}: {message}")


def _open(name: str) -> Registry:
    return open_target(name)  # a NAME, or a Redis URL with #NAME


def _exists(name: str) -> bool:
    return bool(list_segments(f"shmreg-{name}"))


def cmd_ls(args: argparse.Namespace) -> int:
    if not args.name or split_target(args.name)[0] is None:
        names = list_names(args.name) if args.name else _registries()
        if args.json:
            _print_json(names)
        else:
            print("\n".join(names) if names else "(no registries)")
        return 0
    with _open(args.name) as reg:
        rows = reg.backend.dump()  # type: ignore[attr-defined]
    if args.namespace is not None:
        rows = [r for r in rows if r["namespace"] == args.namespace]
    hidden = 0 if args.all else sum(not r["alive"] for r in rows)
    if not args.all:
        rows = [r for r in rows if r["alive"]]
    rows.sort(key=lambda r: (r["namespace"], repr(r["service"])))
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("(no entries)")
    if hidden:
        # On stderr: the rows on stdout stay one entry per line for scripts.
        print(
            f"({hidden} entr{'y' if hidden == 1 else 'ies'} of dead processes hidden: "
            "--all shows them, `shmreg sweep` removes them)",
            file=sys.stderr,
        )
    for r in rows:
        dead = "" if r["alive"] else "  [dead]"
        print(
            f"{r['namespace']}\t{r['service']!r}\tpid {r['pid']}\tgen {r['generation']}\t"
            f"{json.dumps(r['metadata'], default=_jsonable)}{dead}"
        )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from shmreg._engine import fastpath

    with _open(args.name) as reg:
        stats = reg.stats()
        health = reg.health_check()
    info = {
        "name": args.name,
        "backend": stats.backend,
        "entries": stats.used,
        "capacity": stats.capacity,
        "tombstones": stats.tombstones,
        "load_factor": round(stats.load_factor, 4),
        "namespaces": stats.namespaces,
        "memory_bytes": stats.memory_bytes,
        "sweeps": stats.sweeps,
        "last_sweep_time": stats.last_sweep_time,
        "dead_found": stats.dead_found,
        "health": {
            "status": health.status.value,
            "total": health.total,
            "alive": health.alive,
            "dead": health.dead,
            "unknown": health.unknown,
        },
        "engine": stats.extra,
        "engine_path": fastpath.describe(),
    }
    if args.json:
        _print_json(info)
    else:
        for key, value in _flatten(info):
            print(f"{key:28} {'-' if value is None else value}")
    return 0


def _flatten(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``health.status  healthy`` rows instead of a Python dict's repr."""
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def cmd_sweep(args: argparse.Namespace) -> int:
    with _open(args.name) as reg:
        removed = reg.sweep()
    if args.json:
        _print_json({"removed": removed})
    else:
        print(f"removed {removed} dead entr{'y' if removed == 1 else 'ies'}")
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    from shmreg._engine.store import destroy_by_name

    if not destroy_by_name(args.name):
        raise RegistryNotFound(name=args.name)
    if args.json:
        _print_json({"destroyed": True, "name": args.name})
    else:
        print(f"destroyed registry {args.name!r}")
    return EXIT_OK


def _event_dict(event: Any) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "kind": event.kind,
        "namespace": event.namespace,
        "service": event.service,
        "pid": event.pid,
        "generation": event.generation,
        "reason": event.reason,
        "time": event.time,
        "lost": event.lost,
    }


def cmd_watch(args: argparse.Namespace) -> int:
    """Print events as they happen, one per line, until Ctrl-C / SIGTERM (or --timeout)."""
    _exit_on_sigterm()
    with _open(args.name) as reg:
        for event in reg.watch(args.namespace, since=args.since, timeout=args.timeout):
            if args.json:
                print(json.dumps(_event_dict(event), default=_jsonable), flush=True)
            elif event.kind == "lost":
                print(
                    f"{event.seq}\tlost\t{event.lost} events overwritten before they were read",
                    flush=True,
                )
            else:
                reason = f"\t({event.reason})" if event.reason else ""
                print(
                    f"{event.seq}\t{event.kind}\t{event.namespace}\t{event.service!r}\t"
                    f"pid {event.pid}\tgen {event.generation}{reason}",
                    flush=True,
                )
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    """The death monitor in the foreground: a per-host daemon (e.g. under systemd)."""
    from shmreg._liveness import Monitor

    with _open(args.name) as reg:

        def report(ident: Any, verdict: Any, removed: int) -> None:
            if removed:
                line = {"pid": ident.pid, "verdict": verdict.value, "removed": removed}
                print(
                    json.dumps(line)
                    if args.json
                    else f"pid {ident.pid} {verdict.value}: removed {removed} "
                    f"entr{'y' if removed == 1 else 'ies'}",
                    flush=True,
                )

        monitor = Monitor(
            reg.backend,
            poll_interval=args.poll_interval,
            sweep_interval=args.sweep_interval,
            on_death=report,
        )

        def stop(signum: int, frame: Any) -> None:
            monitor.request_stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        if not args.json:
            print(
                f"monitoring {args.name!r} (pid {os.getpid()}); SIGTERM or Ctrl-C stops", flush=True
            )
        removed = reg.sweep()  # whatever died while nobody watched
        if removed and not args.json:
            print(f"initial sweep removed {removed}", flush=True)
        with exporters(args, reg, monitor):
            monitor.run_forever()
        if not args.json:
            print(
                f"stopped: {monitor.stats.deaths} deaths, {monitor.stats.removed} removed",
                flush=True,
            )
    return 0


def _exit_on_sigterm() -> None:
    def leave(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, leave)


def cmd_fsck(args: argparse.Namespace) -> int:
    from shmreg._engine.fsck import check

    if not _exists(args.name):
        raise RegistryNotFound(name=args.name)  # nothing to check: an error, not a problem
    report = check(args.name, repair=args.repair)
    if args.json:
        _print_json(report.as_dict())
    else:
        print(
            f"{args.name}: {'ok' if report.ok else 'PROBLEMS'} ({report.entries} entries, "
            f"{report.checked_slots} slots checked)"
        )
        for line in report.problems:
            print(f"  problem: {line}")
        for line in report.repaired:
            print(f"  repaired: {line}")
    return EXIT_OK if report.ok or args.repair else EXIT_PROBLEMS


def cmd_demo(args: argparse.Namespace) -> int:
    from shmreg import _demo

    return _demo.run(workers=args.workers)


def cmd_bench(args: argparse.Namespace) -> int:
    from shmreg import _bench

    return int(_bench.main(args.rest))


def build_parser() -> argparse.ArgumentParser:
    from shmreg import __version__
    from shmreg._engine import fastpath

    parser = _Parser(
        prog="shmreg",
        description="A process registry in shared memory.",
        epilog="Exit codes: 0 done, 1 problems found (fsck), 2 shmreg error, 64 usage, "
        "130 interrupted. With --json an error prints {\"error\": {code, name, message, ...}}.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"shmreg {__version__}; engine: {fastpath.describe()}",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND",
        help="one of these; `shmreg COMMAND --help` lists its options",
    )

    def command(
        name: str, help: str, *, named: bool = True, optional: bool = False
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        if named:
            p.add_argument(
                "name",
                nargs="?" if optional else None,
                help="registry name, or a Redis URL naming it: redis://host:6379/0#NAME",
            )
        p.add_argument("--json", action="store_true", help="print data as JSON")
        return p

    p = command("ls", "list registries, or the entries of one", optional=True)
    p.add_argument("--namespace", "-n", help="only this namespace")
    p.add_argument("--all", "-a", action="store_true", help="include entries of dead owners")
    p.set_defaults(fn=cmd_ls)
    command("info", "settings, counters and health of a registry").set_defaults(fn=cmd_info)
    command("sweep", "remove entries whose owners are dead").set_defaults(fn=cmd_sweep)
    command("destroy", "remove a registry for every process").set_defaults(fn=cmd_destroy)
    p = command("fsck", "check a registry's segments (works with every writer dead)")
    p.add_argument("--repair", action="store_true", help="fix what can be fixed")
    p.set_defaults(fn=cmd_fsck)
    p = command("watch", "print events as they happen")
    p.add_argument("--namespace", "-n", help="only this namespace")
    p.add_argument("--since", type=int, default=None, help="resume after this event number")
    p.add_argument(
        "--timeout", type=float, default=None, help="stop after this many seconds without an event"
    )
    p.set_defaults(fn=cmd_watch)
    p = command("monitor", "remove entries of dying processes, in the foreground")
    p.add_argument(
        "--poll-interval", type=float, default=0.01, metavar="S",
        help="seconds between looks at the event ring for new owners (default 0.01)",
    )
    p.add_argument(
        "--sweep-interval", type=float, default=1.0, metavar="S",
        help="seconds between full sweeps for owners no pidfd can watch (default 1.0)",
    )
    add_monitor_options(p)
    p.set_defaults(fn=cmd_monitor)
    add_ops_commands(command)
    from shmreg import _cli_agents

    _cli_agents.add_parser(command)
    p = command("demo", "worker pool, a crash, the sweep and a capability query", named=False)
    p.add_argument(
        "--workers", type=int, default=4, metavar="N", help="worker processes to start (default 4)"
    )
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser(
        "bench", help="a short benchmark against the installed peers", add_help=False
    )
    p.add_argument(
        "rest", nargs=argparse.REMAINDER, help="the benchmark's options: shmreg bench --help"
    )
    p.set_defaults(fn=cmd_bench)
    _cli_migrate.add_commands(sub)  # migrate, rollback, flags, upgrade
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # Everything after "bench" is the benchmark's own (argparse's REMAINDER would
        # refuse a first argument that starts with "-").
        from shmreg import _bench

        return int(_bench.main(argv[1:]))
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        return _report(
            InvalidArgument(str(exc), argument="command line", value=" ".join(argv)),
            "--json" in argv,
            EXIT_USAGE,
        )
    try:
        code: int = args.fn(args)
        return code
    except ShmregError as exc:
        return _report(exc, getattr(args, "json", False), EXIT_ERROR)
    except KeyboardInterrupt:
        return EXIT_OK if args.command in ("watch", "monitor") else EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


def _report(exc: ShmregError, as_json: bool, code: int) -> int:
    """The one error shape: the object on stdout under --json, the text on stderr always."""
    if as_json:
        _print_json({"error": exc.to_dict()})
    print(f"shmreg: {type(exc).__name__} [{exc.code}]: {exc}", file=sys.stderr)
    return code

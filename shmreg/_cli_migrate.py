"""``shmreg migrate``, ``shmreg rollback`` and ``shmreg flags`` (see docs/migration.md).

Registries are given as locations: a NAME (shared memory), a Redis URL with ``#NAME``,
``memory://NAME`` or a ``dual+`` location (``shmreg.migration.open_location``).

``migrate`` keeps a journal of what it wrote in the temporary directory, named after the
source and target, so running the same command again after it was killed finishes the job
and its report covers both runs; the journal is removed once a report is saved.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shmreg.migration import FeatureFlags, MigrationReport, migrate, rollback, validate


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def journal_path(source: str, target: str) -> Path:
    """Where ``shmreg migrate SOURCE TARGET`` keeps its journal between runs."""
    digest = hashlib.sha256(f"{source}\x00{target}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"shmreg-migrate-{digest}.journal"


class _Progress:
    """Progress on stderr for copies of 1000 entries or more: a line per 10 %."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.shown = -1
        self.started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if self.quiet or total < 1000:
            return
        tenth = done * 10 // total
        if tenth > self.shown:
            self.shown = tenth
            rate = done / max(time.monotonic() - self.started, 1e-9)
            print(f"migrate: {done}/{total} entries ({rate:,.0f}/s)", file=sys.stderr, flush=True)


def _new_report_path() -> Path:
    """A default report name no earlier run holds: names carry the time to the second, and
    overwriting the report of a run moments ago would leave its rollback nothing to undo."""
    stem = f"shmreg-migration-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    for n in range(1, 10_000):
        path = Path(f"{stem}.json" if n == 1 else f"{stem}-{n}.json")
        try:
            path.open("x").close()  # claimed atomically: a concurrent run picks the next one
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{stem}*.json: too many reports in this directory this second")


def cmd_migrate(args: argparse.Namespace) -> int:
    journal = None if args.dry_run else journal_path(args.source, args.target)
    report = migrate(
        args.source,
        args.target,
        namespaces=args.namespace or None,
        dry_run=args.dry_run,
        on_conflict=args.on_conflict,
        journal=journal,
        progress=_Progress(args.quiet),
    )
    out: dict[str, Any] = {k: v for k, v in report.as_json().items() if k != "added"}
    ok = report.ok
    if not args.dry_run:
        path = Path(args.report) if args.report else _new_report_path()
        report.save(path)
        out["report"] = str(path)
        if journal is not None:
            journal.unlink(missing_ok=True)
    if args.validate:
        check = validate(args.source, args.target, args.namespace or None)
        out["validation"] = {
            "ok": check.ok,
            "checked": check.checked,
            "missing": len(check.missing),
            "extra": len(check.extra),
            "different": len(check.different),
        }
        ok = ok and check.ok
    if args.json:
        _print_json(out)
    else:
        verb = "would copy" if args.dry_run else "copied"
        print(
            f"{verb} {report.copied}, skipped {report.skipped} (already there), "
            f"conflicts {len(report.conflicts)}, failed {len(report.failed)} "
            f"in {report.seconds:.2f} s"
        )
        for c in report.conflicts:
            print(
                f"  conflict ({c.kind}, {c.resolution}): {c.source.namespace}/{c.source.service!r}"
            )
        for f in report.failed:
            print(f"  failed: {f.entry.namespace}/{f.entry.service!r}: {f.reason}")
        if "report" in out:
            print(f"report: {out['report']} (shmreg rollback {out['report']} undoes it)")
        if "validation" in out:
            v = out["validation"]
            print(
                f"validate: {'ok' if v['ok'] else 'NOT OK'}: {v['checked']} checked, "
                f"{v['missing']} missing, {v['extra']} extra, {v['different']} different"
            )
    return 0 if ok else 1


def cmd_rollback(args: argparse.Namespace) -> int:
    report = MigrationReport.load(args.report)
    done = rollback(report)
    if args.json:
        _print_json(done.as_json())
    else:
        print(f"removed {done.removed}; kept {len(done.kept)} changed since the migration")
        for e in done.kept:
            print(f"  kept: {e.namespace}/{e.service!r}")
    return 0


def cmd_flags(args: argparse.Namespace) -> int:
    with FeatureFlags(args.name) as flags:
        if args.action == "set":
            if args.flag is None or args.percent is None:
                print("shmreg flags NAME set FLAG PERCENT", file=sys.stderr)
                return 1
            flags.set(args.flag, args.percent, cutover=args.cutover)
        states = {name: state.as_json() for name, state in sorted(flags.all().items())}
    if args.json:
        _print_json(states)
    elif not states:
        print("(no flags)")
    else:
        for name, state in states.items():
            cut = "  cutover" if state["cutover"] else ""
            print(f"{name}\t{state['percent']} %{cut}")
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    from shmreg._engine.upgrade import upgrade

    done = upgrade(args.name)
    if args.json:
        _print_json(done)
    elif done["upgraded"]:
        print(f"upgraded layout {done['from']} -> {done['to']} ({done['entries']} entries)")
    else:
        print(f"already at layout {done['to']}")
    return 0


def add_commands(sub: Any) -> None:
    """Add ``migrate``, ``rollback``, ``flags`` and ``upgrade`` to the ``shmreg`` parser."""
    p = sub.add_parser("upgrade", help="upgrade a registry written by an older layout, in place")
    p.add_argument("name", help="shared-memory registry name")
    p.add_argument("--json", action="store_true", help="print data as JSON")
    p.set_defaults(fn=cmd_upgrade)
    p = sub.add_parser("migrate", help="copy a registry's entries into another backend")
    p.add_argument("source", help="NAME, redis://host:6379/0#NAME, memory://NAME or dual+...")
    p.add_argument("target", help="same forms as SOURCE")
    p.add_argument("--dry-run", action="store_true", help="count what would be copied")
    p.add_argument("--validate", action="store_true", help="compare both sides afterwards")
    p.add_argument(
        "--on-conflict",
        choices=("skip", "overwrite", "fail"),
        default="skip",
        help="a name the target holds with another entry (default: skip and report it)",
    )
    p.add_argument("--namespace", "-n", action="append", help="only this namespace (repeatable)")
    p.add_argument("--report", help="where to save the report (default: ./shmreg-migration-*.json)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.add_argument("--json", action="store_true", help="print data as JSON")
    p.set_defaults(fn=cmd_migrate)
    p = sub.add_parser("rollback", help="remove what a migration added and nobody changed since")
    p.add_argument("report", help="the REPORT.json shmreg migrate saved")
    p.add_argument("--json", action="store_true", help="print data as JSON")
    p.set_defaults(fn=cmd_rollback)
    p = sub.add_parser("flags", help="show or set the feature flags stored in a registry")
    p.add_argument("name", help="registry holding the flags (NAME or URL#NAME)")
    p.add_argument("action", nargs="?", choices=("set",), help="set: change FLAG (else list)")
    p.add_argument("flag", nargs="?", help="the flag's name, e.g. use_new_backend")
    p.add_argument("percent", nargs="?", type=int, help="share of keys or processes, 0-100")
    p.add_argument("--cutover", action="store_true", help="with 100: the new backend alone")
    p.add_argument("--json", action="store_true", help="print data as JSON")
    p.set_defaults(fn=cmd_flags)

"""Tables from result files: plain text for the terminal, Markdown for docs/benchmarks.md.

Ratios are speed-ups: above 1 means faster than the reference (lmdb, or the plain dict)
whether the figure is a latency or a rate. On this kind of machine a ratio between 0.67 and
1.5 is noise, not a result.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

US = "\N{MICRO SIGN}s"
Run = dict[str, Any]


def _g(run: Run, *path: str) -> Any:
    x: Any = run
    for p in path:
        if not isinstance(x, dict) or p not in x:
            return None
        x = x[p]
    return x


# (label, getter, unit, higher_is_better). Latencies are medians.
LATENCY_OPS = [
    ("register", "register"),
    ("lookup hit", "lookup_hit"),
    ("lookup miss", "lookup_miss"),
    ("lookup + metadata", "lookup_meta"),
    ("update", "update"),
    ("unregister", "unregister"),
    ("find by type", "find_type"),
    ("find by capability", "find_capability"),
    ("list all", "list_all"),
]


def figures(procs: list[int]) -> list[tuple[str, Callable[[Run], Any], str, bool]]:
    figs: list[tuple[str, Callable[[Run], Any], str, bool]] = [
        ("register", lambda r: _g(r, "ops", "register", "ops_s"), "rate", True),
        ("register, batched", lambda r: _g(r, "ops", "register_batch", "ops_s"), "rate", True),
    ]
    figs += [
        (label, lambda r, k=k: _g(r, "ops", k, "p50_us"), "us", False)
        for label, k in LATENCY_OPS[1:]
    ]
    figs += [
        ("visible in another process", lambda r: _g(r, "visibility", "p50_us"), "us", False),
        ("attach (fresh process)", lambda r: _g(r, "attach", "p50_ms"), "ms", False),
    ]
    figs += [
        (
            f"mixed 90/10, {p} proc{'s' * (p > 1)}",
            lambda r, p=p: _g(r, f"mixed_{p}", "ops_s"),
            "rate",
            True,
        )
        for p in procs
    ]
    figs += [("bytes per entry", lambda r: _g(r, "memory", "per_entry"), "bytes", False)]
    return figs


def fmt(v: Any, unit: str) -> str:
    if v is None or isinstance(v, str):
        return "-"
    if unit == "rate":
        return (
            f"{v / 1e6:.2f}M"
            if v >= 1e6
            else f"{v / 1e3:.0f}k"
            if v >= 1e4
            else f"{v / 1e3:.1f}k"
            if v >= 1e3
            else f"{v:.0f}"
        )
    if unit == "bytes":
        return f"{v:.0f} B"
    us = v * 1000 if unit == "ms" else v
    if us < 1:
        return f"{us:.2f} {US}"
    if us < 1000:
        return f"{us:.3g} {US}"
    return f"{us / 1e3:.3g} ms" if us < 1e6 else f"{us / 1e6:.3g} s"


def load(paths: list[str]) -> dict[str, Any]:
    """Merge result files; a later file's (peer, size) replaces an earlier one's."""
    data: dict[str, Any] = {}
    runs: dict[tuple[str, int], Run] = {}
    for p in paths:
        with open(p) as f:
            d = json.load(f)
        data.setdefault("env", d["env"])
        data.setdefault("config", d["config"])
        data.setdefault("skipped", {}).update(d.get("skipped", {}))
        data["config"]["procs"] = sorted(set(data["config"]["procs"]) | set(d["config"]["procs"]))
        for r in d["runs"]:
            runs[(r["peer"], r["size"])] = r
    data["runs"] = list(runs.values())
    data["ratios"] = ratios(data["runs"])
    return data


def _procs(runs: list[Run]) -> list[int]:
    return sorted({int(k[6:]) for r in runs for k in r if k.startswith("mixed_")})


def ratios(runs: list[Run]) -> dict[str, Any]:
    """{size: {peer: {figure: {"vs_lmdb": x, "vs_dict": y}}}}, speed-up over the reference."""
    out: dict[str, Any] = {}
    figs = figures(_procs(runs))
    for n in sorted({r["size"] for r in runs}):
        at = {r["peer"]: r for r in runs if r["size"] == n and r.get("ops")}
        for peer, run in at.items():
            for label, get, _, higher in figs:
                v = get(run)
                for ref in ("lmdb", "dict"):
                    b = get(at[ref]) if ref in at else None
                    if isinstance(v, (int, float)) and isinstance(b, (int, float)) and v > 0 < b:
                        out.setdefault(str(n), {}).setdefault(peer, {}).setdefault(label, {})[
                            f"vs_{ref}"
                        ] = round(v / b if higher else b / v, 3)
    return out


def _by_size(data: dict[str, Any]) -> dict[int, list[Run]]:
    out: dict[int, list[Run]] = {}
    for r in data["runs"]:
        out.setdefault(r["size"], []).append(r)
    return dict(sorted(out.items()))


def _name(r: Run) -> str:
    return (
        r["peer"]
        + (" (capped)" if _g(r, "ops", "capped") else "")
        + ("" if r.get("status") == "ok" else f" ({r.get('status')}, partial)")
    )


def _table(head: list[str], rows: list[list[str]], md: bool) -> list[str]:
    if md:
        return [
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
            *["| " + " | ".join(r) + " |" for r in rows],
        ]
    w = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    return [
        "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))
        for r in [head, *rows]
    ]


def _correctness(r: Run) -> list[str]:
    mixed = [v for k, v in r.items() if k.startswith("mixed_") and isinstance(v, dict)]
    acked = sum(m.get("acked", 0) for m in mixed)
    lost = sum(m.get("lost", 0) + m.get("base_missing", 0) for m in mixed)
    exc = sum(m.get("errors", 0) for m in mixed) + sum(
        v.get("errors", 0) for v in (r.get("ops") or {}).values() if isinstance(v, dict)
    )
    wrong = sum(m.get("wrong_reads", 0) for m in mixed) + (_g(r, "ops", "wrong_reads") or 0)
    k = r.get("kill") or {}
    kill = (
        "-"
        if not k
        else f"error: {k['error']}"
        if "error" in k
        else f"{len(k['rounds'])} rounds: lost {k['lost']} of {k['acked']}, survivor stuck "
        f"{k['stuck']}, unusable after {k['unusable']}"
    )
    return [
        r["peer"],
        f"{acked}" if mixed else "-",
        f"{lost}" if mixed else "-",
        str(exc),
        str(wrong),
        kill,
    ]


def render(data: dict[str, Any], md: bool) -> str:
    env, runs = data["env"], data["runs"]
    procs = _procs(runs)
    out = [
        f"Python {env['python']} ({env['implementation']}), {env['cpu_count']} CPUs "
        f"({env['cpu']}), Linux {env['kernel']}, {env['when']}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
    ]
    out += [f"skipped {k}: {v}" for k, v in data.get("skipped", {}).items()]
    if md:  # one line each, not one paragraph
        out = [f"- {x}" for x in out]
    for n, rs in _by_size(data).items():
        ok = [r for r in rs if r.get("ops")]  # finished, or the phases that did
        out += ["", f"{'### ' if md else '== '}N = {n:,} entries"]
        out += [
            f"{r['peer']}: {r['status']} ({r.get('reason') or r.get('error', '')})"
            for r in rs
            if r.get("status") != "ok"
        ]
        if not ok:
            continue
        figs = figures(procs)
        out += ["", "Medians (rates in operations per second):", ""]
        out += _table(
            ["figure", *[_name(r) for r in ok]],
            [[label, *[fmt(get(r), unit) for r in ok]] for label, get, unit, _ in figs],
            md,
        )
        out += ["", "Latency per operation, p50 / p90 / p99:", ""]
        rows = []
        for label, k in LATENCY_OPS:
            cells = []
            for r in ok:
                o = _g(r, "ops", k) or {}
                cells.append(
                    " / ".join(fmt(o.get(q), "us") for q in ("p50_us", "p90_us", "p99_us"))
                    if o
                    else "-"
                )
            rows.append([label, *cells])
        vis = [
            " / ".join(fmt(_g(r, "visibility", q), "us") for q in ("p50_us", "p90_us", "p99_us"))
            for r in ok
        ]
        rows.append(["visible in another process", *vis])
        out += _table(["operation", *[r["peer"] for r in ok]], rows, md)
        rat = data.get("ratios", {}).get(str(n), {})
        if rat:
            out += ["", "Speed-up over lmdb / over the plain dict (> 1 = faster):", ""]
            rows = [
                [
                    label,
                    *[
                        " / ".join(
                            f"{rat.get(r['peer'], {}).get(label, {}).get(f'vs_{ref}', 0):.2f}"
                            if rat.get(r["peer"], {}).get(label, {}).get(f"vs_{ref}")
                            else "-"
                            for ref in ("lmdb", "dict")
                        )
                        for r in ok
                    ],
                ]
                for label, *_ in figs
            ]
            out += _table(["figure", *[r["peer"] for r in ok]], rows, md)
        out += [
            "",
            "Correctness (all multi-process runs at this size; kill -9 at the first size):",
            "",
        ]
        out += _table(
            [
                "peer",
                "acknowledged",
                "lost",
                "exceptions",
                "wrong reads",
                "kill -9 one of two writers",
            ],
            [_correctness(r) for r in ok],
            md,
        )
        vis = [
            f"{r['peer']} {fmt(_g(r, 'visibility', 'register_call_p50_us'), 'us')}"
            for r in ok
            if _g(r, "visibility", "register_call_p50_us")
        ]
        if vis:
            out += [
                "",
                "Visibility counts from the start of the writer's register call; "
                "that call alone took (p50): " + ", ".join(vis) + ".",
            ]
        for r in ok:
            m = r.get("memory") or {}
            if m.get("per_slot"):
                out += [
                    "",
                    f"{r['peer']} memory: {m['bytes']:,} B for {m['capacity']:,} slots "
                    f"= {m['per_slot']:.0f} B per slot ({m['per_entry']:.0f} B per entry "
                    f"at N = {n:,}).",
                ]
            lv = r.get("liveness")
            if lv:
                out += [
                    "",
                    f"{r['peer']} liveness: "
                    + "; ".join(f"{k}: {_live(v)}" for k, v in lv.items()),
                ]
        notes = [f"{r['peer']}: {x}" for r in ok for x in r.get("notes", [])]
        loads = [
            f"{r['peer']} {r['loadavg_1min'][0]:.1f}-{r['loadavg_1min'][1]:.1f}"
            + (
                f" (idle {r['cpu_idle_before']:.0%} at start)"
                if r.get("cpu_idle_before") is not None
                else ""
            )
            for r in rs
            if r.get("loadavg_1min")
        ]
        if loads:
            notes.append(
                f"1-minute load average before-after each run ({env['cpu_count']} "
                f"CPUs): " + ", ".join(loads)
            )
        if notes:
            out += ["", "Notes:", ""] + [f"- {x}" for x in notes]
    for n in sorted({r["size"] for r in runs if r["peer"] == "shmreg" and r["size"] >= 100_000}):
        rows = bars(data, n)
        if rows:
            out += ["", f"{'### ' if md else '== '}shmreg against its bars, N = {n:,}", ""]
            out += _table(["figure", "bar", "shmreg", "lmdb", "verdict"], rows, md)
    return "\n".join(out)


def bars(data: dict[str, Any], n: int = 100_000) -> list[list[str]]:
    """shmreg against the bars of the project's anchors (at ``n`` entries), beside lmdb."""
    at = {r["peer"]: r for r in data["runs"] if r["size"] == n and r.get("ops")}
    s, lm = at.get("shmreg"), at.get("lmdb") or {}
    if s is None:
        return []

    def v(r: Run, *path: str) -> Any:
        return _g(r, *path) if r else None

    def le(a: Any, b: Any, k: float = 1.0) -> bool | None:  # a <= k * b
        ok = all(isinstance(x, (int, float)) for x in (a, b))
        return bool(a <= k * b) if ok else None

    def row(
        figure: str,
        bar: str,
        path: tuple[str, ...],
        unit: str,
        ok: bool | None,
        near: bool | None = None,
    ) -> list[str]:
        # near: the bar would be met with the 1.5x this machine's noise allows
        verdict = "-" if ok is None else "meets" if ok else "within noise" if near else "misses"
        return [figure, bar, fmt(v(s, *path), unit), fmt(v(lm, *path), unit), verdict]

    lk, ll = v(s, "ops", "lookup_hit", "p50_us"), v(lm, "ops", "lookup_hit", "p50_us")
    mk, ml = v(s, "ops", "lookup_meta", "p50_us"), v(lm, "ops", "lookup_meta", "p50_us")
    rg, rl = v(s, "ops", "register", "ops_s"), v(lm, "ops", "register", "ops_s")
    bg, bl = v(s, "ops", "register_batch", "ops_s"), v(lm, "ops", "register_batch", "ops_s")
    x2, l2 = v(s, "mixed_2", "ops_s"), v(lm, "mixed_2", "ops_s")
    live = ("liveness", "sweep_live", "p50_us"), ("liveness", "death_to_removal", "p99_ms")
    bad = _correctness(s)
    clean = bad[2] in ("0", "-") and bad[3] == "0" and bad[4] == "0"
    lk_ok = None if le(lk, ll) is None else bool(le(lk, ll) and lk <= 1)
    return [
        row(
            "lookup hit, pid only",
            "faster than lmdb, <= 1 us",
            ("ops", "lookup_hit", "p50_us"),
            "us",
            lk_ok,
        ),
        row(
            "lookup with metadata",
            "no slower than lmdb",
            ("ops", "lookup_meta", "p50_us"),
            "us",
            le(mk, ml),
            le(mk, ml, 1.5),
        ),
        row(
            "register, one process",
            ">= 0.7x lmdb",
            ("ops", "register", "ops_s"),
            "rate",
            le(0.7 * rl, rg) if rl and rg else None,
            le(0.7 * rl, rg, 1.5) if rl and rg else None,
        ),
        row(
            "register, batched",
            "faster than lmdb",
            ("ops", "register_batch", "ops_s"),
            "rate",
            None if not (bg and bl) else bg > bl,
            le(bl, bg, 1.5),
        ),
        row(
            "mixed 90/10, 2 processes",
            ">= lmdb",
            ("mixed_2", "ops_s"),
            "rate",
            le(l2, x2) if l2 and x2 else None,
            le(l2, x2, 1.5) if l2 and x2 else None,
        ),
        row(
            "visible in another process",
            "<= 10 us",
            ("visibility", "p50_us"),
            "us",
            le(v(s, "visibility", "p50_us"), 10),
        ),
        row(
            "attach",
            "<= 1 ms, flat in N",
            ("attach", "p50_ms"),
            "ms",
            le(v(s, "attach", "p50_ms"), 1),
        ),
        row(
            "find by type",
            "<= 5 ms",
            ("ops", "find_type", "p50_us"),
            "us",
            le(v(s, "ops", "find_type", "p50_us"), 5000),
        ),
        row(
            "find by capability",
            "<= 5 ms",
            ("ops", "find_capability", "p50_us"),
            "us",
            le(v(s, "ops", "find_capability", "p50_us"), 5000),
        ),
        row("sweep of all entries", "<= 50 ms", live[0], "us", le(v(s, *live[0]), 50_000)),
        row(
            "entry gone after death, monitor on (p99)",
            "<= 5 ms",
            live[1],
            "ms",
            le(v(s, *live[1]), 5),
        ),
        row(
            "bytes per entry",
            "<= 128 + 41 (metadata)",
            ("memory", "per_entry"),
            "bytes",
            le(v(s, "memory", "per_entry"), 169),
        ),
        [
            "lost / exceptions / wrong reads",
            "0",
            f"{bad[2]} / {bad[3]} / {bad[4]}",
            "",
            "meets" if clean else "misses",
        ],
    ]


def _live(v: Any) -> str:
    if isinstance(v, float):
        return fmt(v, "ms")
    if not isinstance(v, dict):
        return str(v)
    if "p50_us" in v:
        return f"p50 {fmt(v['p50_us'], 'us')}, p99 {fmt(v['p99_us'], 'us')}"
    if "p50_ms" in v:
        return (
            f"p50 {fmt(v['p50_ms'], 'ms')}, p99 {fmt(v['p99_ms'], 'ms')} ({v['reps']} "
            f"deaths, {v.get('timeouts', 0)} not removed within 2 s; via {v.get('via')})"
        )
    if "removed" in v:
        return f"{v['removed']} of {v['dead']} dead removed in {fmt(v['ms'], 'ms')}"
    return json.dumps(v)


def render_text(data: dict[str, Any]) -> str:
    return render(data, md=False)


def render_markdown(data: dict[str, Any]) -> str:
    return render(data, md=True)

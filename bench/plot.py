"""PNG plots for docs/benchmarks.md: latency by size, throughput by process count.

python bench/plot.py bench/results/latest.json [more.json ...]   # -> docs/img/
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import _g, load  # noqa: E402

PANELS = [
    (
        "register",
        lambda r: 1e6 / v if (v := _g(r, "ops", "register", "ops_s")) else None,
        "\N{MICRO SIGN}s per registration (1 / rate)",
    ),
    ("lookup hit", lambda r: _g(r, "ops", "lookup_hit", "p50_us"), "median \N{MICRO SIGN}s"),
    (
        "lookup + metadata",
        lambda r: _g(r, "ops", "lookup_meta", "p50_us"),
        "median \N{MICRO SIGN}s",
    ),
    ("find by type", lambda r: _g(r, "ops", "find_type", "p50_us"), "median \N{MICRO SIGN}s"),
]


ORDER = [
    "dict",
    "lmdb",
    "sqlite",
    "ultradict",
    "manager",
    "redis",
    "shared-memory-dict",
    "shmreg",
    "shmreg-py",
]


def _peers(runs: list[dict[str, Any]]) -> list[str]:
    names = {r["peer"] for r in runs}
    return [p for p in ORDER if p in names] + sorted(names - set(ORDER))


def _style(peer: str) -> dict[str, Any]:
    """One colour per peer in every plot; shmreg drawn heavier, in black."""
    if peer == "shmreg":
        return {"color": "black", "lw": 2.5, "zorder": 5}
    if peer == "shmreg-py":  # the same engine on its pure-Python path: grey, dashed
        return {"color": "dimgray", "lw": 2.0, "ls": "--", "zorder": 4}
    i = ORDER.index(peer) if peer in ORDER else len(ORDER)
    return {"color": plt.get_cmap("tab10")(i % 10), "lw": 1.5}


def plot(data: dict[str, Any], outdir: Path) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    runs = [r for r in data["runs"] if r.get("status") == "ok"]
    peers, made = _peers(runs), []
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (title, get, ylabel) in zip(axes.flat, PANELS, strict=True):
        for peer in peers:
            pts = sorted(
                (r["size"], get(r), bool(_g(r, "ops", "capped")))
                for r in runs
                if r["peer"] == peer and get(r)
            )
            if not pts:
                continue
            (line,) = ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], marker="o", label=peer, **_style(peer)
            )
            capped = [p for p in pts if p[2]]
            if capped:  # hollow marker: the peer did not reach this size in its budget
                ax.plot(
                    [p[0] for p in capped],
                    [p[1] for p in capped],
                    "o",
                    mfc="white",
                    color=line.get_color(),
                    ms=9,
                )
        ax.set(xscale="log", yscale="log", title=title, xlabel="entries", ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Latency by size (hollow = capped by time budget); {_env(data)}", fontsize=9)
    fig.tight_layout()
    made.append(outdir / "latency_by_size.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)

    sizes = sorted({r["size"] for r in runs})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4.5), squeeze=False)
    for ax, n in zip(axes.flat, sizes, strict=True):
        for peer in peers:
            r = next((x for x in runs if x["peer"] == peer and x["size"] == n), None)
            if r is None:
                continue
            pts = sorted(
                (int(k[6:]), v["ops_s"])
                for k, v in r.items()
                if k.startswith("mixed_") and isinstance(v, dict) and "ops_s" in v
            )
            if pts:
                ax.plot(
                    [p[0] for p in pts], [p[1] for p in pts], marker="o", label=peer, **_style(peer)
                )
        ax.set(
            yscale="log",
            title=f"mixed 90/10, N = {n:,}",
            xlabel="worker processes",
            ylabel="operations per second (all workers)",
        )
        ax.set_xticks(sorted({int(k[6:]) for r in runs for k in r if k.startswith("mixed_")}))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Throughput by process count; {_env(data)}", fontsize=9)
    fig.tight_layout()
    made.append(outdir / "throughput_by_procs.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)
    return made


def _env(data: dict[str, Any]) -> str:
    e = data["env"]
    return f"Python {e['python']}, {e['cpu_count']} CPUs, {e['when'][:10]}"


if __name__ == "__main__":
    for png in plot(
        load(sys.argv[1:] or [str(ROOT / "bench/results/latest.json")]), ROOT / "docs" / "img"
    ):
        print(png)

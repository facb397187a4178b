"""docs/reliability.md quotes the tests' own numbers: each is recomputed here from the
constants and matrices of the test that enforces it, so the page cannot drift from the code.

Measured figures (kills of one storm run, overlap a machine produced) are not checked:
the page marks them as measurements.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import test_crash
import test_fuzz_segments as fuzz
import test_hostile
import test_kill_storm as storm
import test_linearizable as lin
import test_model
from helpers import DEADLINE_S, REPO, TESTS, child_env

from shmreg.testing import CHECKS

PAGE = (REPO / "docs" / "reliability.md").read_text()
TIMES = "\N{MULTIPLICATION SIGN}"


def _default(param: Any) -> bool:
    return not param.marks


def crash_figures() -> dict[str, int]:
    """Kills and cases of the crash-point matrices, default run and ``--run-slow``."""
    out: dict[str, int] = {}
    for run, keep in (("default", _default), ("slow", lambda p: True)):
        pairs = [p for p in test_crash._matrix() if keep(p)]
        reached = sum(p.values[1] in test_crash.REACHES[p.values[0]] for p in pairs)
        recovery = [p for p in test_crash._recovery_matrix() if keep(p)]
        readers = [p for p in test_crash._reader_matrix() if keep(p)]
        # One kill per reached pair, per reader case, per first writer of a recovery case,
        # and one more where the recovering writer reaches its crash point.
        kills = reached + len(readers) + sum(1 + bool(p.values[2]) for p in recovery)
        out |= {f"{run}_kills": kills, f"{run}_recovery": len(recovery),
                f"{run}_readers": len(readers), f"{run}_reached": reached}
    return out


def _source_int(path: Path, pattern: str) -> list[int]:
    return [int(x) for x in re.findall(pattern, path.read_text())]


def _max_examples(fn: Any) -> int:
    return int(fn._hypothesis_internal_use_settings.max_examples)


def _collected(module: str) -> int:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider",
         f"tests/{module}"],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=DEADLINE_S,
        check=True,
    )
    return int(re.search(r"(\d+) tests? collected", proc.stdout).group(1))  # type: ignore[union-attr]


def expected_fragments() -> list[str]:
    """Every figure of the page, as the text it must contain."""
    crash = crash_figures()
    garbage = [fn for name, fn in vars(test_hostile).items()
               if name.startswith("test_garbage") and hasattr(fn, "hypothesis")]
    many = _max_examples(test_hostile.test_garbage_register_many)
    others = {_max_examples(fn) for fn in garbage
              if fn is not test_hostile.test_garbage_register_many}
    assert len(others) == 1, others
    tables = {name: len(table) for name, table in fuzz.FIXED_TABLES.items()}
    loop = _source_int(TESTS / "test_multiprocess.py",
                       r"_kill_loop\(reg_name, tmp_path, iterations=(\d+)")
    model = test_model.MODEL
    rejects = next(m for m in lin.test_checker_rejects_non_linearizable_histories.pytestmark
                   if m.name == "parametrize").args[1]
    return [
        f"fails its test after {DEADLINE_S:g} s",
        f"{len(test_crash.POINTS)} named crash points",
        f"{TIMES} {len(test_crash.PATHS)} write paths",
        f"{crash['slow_reached']} reachable pairs",
        f"{crash['default_kills']} kills in the default run, {crash['slow_kills']} with "
        "`--run-slow`",
        f"{crash['default_recovery']} cases by default, {crash['slow_recovery']} slow",
        f"{crash['default_readers']} cases by default, {crash['slow_readers']} slow",
        f"{storm.WRITERS} writers doing random register / update / unregister on "
        f"{storm.KEYS} keys",
        f"a {storm.STORM_SECONDS:g} s run",
        f"all {storm.KEYS} keys compared, at least {storm.WRITERS} kills",
        f"{loop[0]} kills ({loop[1]} with `--run-slow`)",
        f"{lin.ROUNDS} rounds, {lin.ROUNDS * lin.WORKERS * lin.OPS_PER_WORKER:,} operations "
        f"from {lin.WORKERS} worker processes",
        f"brute force on {_max_examples(lin.test_checker_agrees_with_brute_force)} random "
        f"histories and {len(rejects)} known non-linearizable ones",
        f"at least {lin.MIN_OVERLAPPING_PAIRS} overlapping operation pairs",
        f"up to {lin.MAX_ATTEMPTS} times",
        f"{model.max_examples} runs {TIMES} {model.stateful_step_count} steps by default",
        f"{len(CHECKS)} checks, run on every backend",
        f"{_collected('test_hostile.py')} tests, including {len(garbage)} hypothesis garbage "
        f"generators ({others.pop()} examples each, {many} for `register_many`)",
        f"{fuzz.RANDOM_BATCHES * fuzz.BATCH} random patches and {sum(tables.values())} fixed",
        f"{fuzz.SOAK_BATCHES * fuzz.BATCH:,} in the soak",
        f"{fuzz.FIXED_BEYOND_REPAIR['root-words']} of the {tables['root-words']} root-word "
        f"cases",
        f"{fuzz.FIXED_BEYOND_REPAIR['data-header']} of the {tables['data-header']} "
        "data-header cases",
        f"{fuzz.FIXED_BEYOND_REPAIR['journal-replayed']} of the "
        f"{tables['journal-replayed']} journal cases",
    ]


def missing_from(page: str) -> list[str]:
    return [fragment for fragment in expected_fragments() if fragment not in page]


def test_every_figure_on_the_page_matches_the_code() -> None:
    assert missing_from(PAGE) == []


def test_a_drifted_figure_is_caught() -> None:
    """The check itself: the old, wrong kill counts and example counts fail it."""
    drifted = PAGE.replace(f"{crash_figures()['default_kills']} kills in the default run",
                           "148 kills in the default run")
    assert any("kills in the default run" in m for m in missing_from(drifted))
    assert missing_from(PAGE.replace("60 for `register_many`", "150 for `register_many`"))


@pytest.mark.parametrize("word", ["constant", "assertion", "Measured"])
def test_the_page_says_where_figures_come_from(word: str) -> None:
    assert word in PAGE

"""Every code block in README.md and docs/*.md runs, so the docs cannot drift from the code.

The convention (also in docs/contributing.md, "Code blocks in these docs"):

- A fenced block whose info string is ``python`` runs. ``python no-run`` is shown, not run
  (a signature, a fragment that needs a server this machine may not have).
- Each file's runnable blocks run top to bottom in one fresh interpreter, in one namespace
  (``__main__``'s, so functions a ``ProcessPoolExecutor`` pickles by name resolve), with a
  temporary directory as the working directory, bounded by a generous timeout. A traceback
  names the Markdown file and its line.
- In ``bash`` / ``sh`` / ``console`` / ``shell`` blocks, each line that starts with
  ``shmreg `` runs as the CLI (``python -m shmreg``) against whatever the file's earlier
  blocks made, in document order, and must exit 0. Other lines (venv, pip, apt-get, pytest)
  are set-up a reader does once and are skipped; ``bash no-run`` skips a whole block. A
  trailing ``# comment`` is dropped before the line runs.
- Blocks without an info string are diagrams and output samples: never run.

Isolation: the docs use fixed names ("jobs"). As root with ``unshare`` (CI), each file runs
in a private mount namespace with its own tmpfs on /dev/shm, so two runs at once cannot
clash and whatever a file leaves behind vanishes with the namespace. Elsewhere the files run
on the machine's /dev/shm one at a time under a file lock (``filelock``), are skipped if a
registry they would use already exists, and every segment they add is removed afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

import shmreg
from shmreg._engine.segment import list_segments, unlink_segment

REPO = Path(__file__).resolve().parents[1]
SHELLS = {"bash", "sh", "console", "shell"}
#: One whole file's blocks; only a hang comes near it.
FILE_TIMEOUT_S = float(os.environ.get("SHMREG_TEST_DEADLINE", "60")) * 5


@dataclass(frozen=True)
class Block:
    """One fenced block: its language, whether it runs, the line its body starts on."""

    lang: str
    runs: bool
    line: int
    body: str


_FENCE = re.compile(r"^(```+)\s*(.*)$")


def parse_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, in order (info string: ``lang [no-run]``)."""
    blocks: list[Block] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, words = match.group(1), match.group(2).split()
        start = i + 1
        i = start
        while i < len(lines) and not lines[i].startswith(fence):
            i += 1
        lang = words[0] if words else ""
        runs = lang in {"python", *SHELLS} and "no-run" not in words[1:]
        blocks.append(Block(lang, runs, start + 1, "\n".join(lines[start:i])))
        i += 1
    return blocks


def shell_commands(body: str) -> list[str]:
    """The ``shmreg ...`` lines of a shell block, comments dropped, as CLI arguments."""
    commands = []
    for raw in body.split("\n"):
        line = raw.split(" #", 1)[0].strip()
        if line.startswith("shmreg "):
            commands.append(line[len("shmreg ") :])
    return commands


def plan(path: Path) -> list[dict[str, object]]:
    """What the driver runs for one file: python sources and CLI argument strings, in order."""
    steps: list[dict[str, object]] = []
    for block in parse_blocks(path.read_text()):
        if not block.runs:
            continue
        if block.lang == "python":
            steps.append({"python": block.body, "line": block.line})
        else:
            steps.extend({"cli": args, "line": block.line} for args in shell_commands(block.body))
    return steps


#: Runs one file's plan (JSON on stdin) as ``__main__``; line numbers are the Markdown's.
#: Each registry name it opens or passes to the CLI is written to $SHMREG_DOCS_TOUCHED
#: (one a line, as it happens): what the clean-up on a shared /dev/shm may remove.
DRIVER = r"""
import __main__, json, os, shlex, subprocess, sys
from shmreg._engine.store import Store
path, steps = sys.argv[1], json.load(sys.stdin)
# Underscored names: the pages' blocks share this namespace and must not clobber them.
_docs_touched = open(os.environ["SHMREG_DOCS_TOUCHED"], "a", buffering=1)
_docs_open = Store.open.__func__
def _docs_noting_open(cls, name, **kwargs):
    _docs_touched.write(name + "\n")
    return _docs_open(cls, name, **kwargs)
Store.open = classmethod(_docs_noting_open)
for step in steps:
    if "python" in step:
        source = "\n" * (step["line"] - 1) + step["python"]
        exec(compile(source, path, "exec"), __main__.__dict__)
        continue
    argv = [sys.executable, "-m", "shmreg", *shlex.split(step["cli"])]
    _docs_touched.writelines(arg + "\n" for arg in argv[3:])  # any of them may name a registry
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        sys.exit(f"{path}:{step['line']}: shmreg {step['cli']} exited {done.returncode}:\n"
                 f"{done.stdout}{done.stderr}")
"""

#: Runs first inside the private namespace: a fresh tmpfs on /dev/shm, then the driver.
_ISOLATED = r"""
import os, subprocess, sys
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", "/dev/shm"], check=True)
os.execv(sys.executable, [sys.executable, "-c", *sys.argv[1:]])
"""


def _isolated() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None


def run_markdown(path: Path) -> subprocess.CompletedProcess[str]:
    """Run one Markdown file's blocks as described in the module docstring."""
    steps = json.dumps(plan(path))
    label = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
    with tempfile.TemporaryDirectory(prefix="shmreg-docs-") as cwd:
        touched = os.path.join(cwd, ".touched-registries")
        env = {**os.environ, "SHMREG_DOCS_TOUCHED": touched}
        if _isolated():
            argv = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c",
                    _ISOLATED, DRIVER, label]
            return subprocess.run(argv, input=steps, capture_output=True, text=True,
                                  timeout=FILE_TIMEOUT_S, cwd=cwd, env=env)
        with FileLock(os.path.join(tempfile.gettempdir(), "shmreg-docs.lock")):
            before = set(list_segments())
            try:
                return subprocess.run([sys.executable, "-c", DRIVER, label], input=steps,
                                      capture_output=True, text=True,
                                      timeout=FILE_TIMEOUT_S, cwd=cwd, env=env)
            finally:
                _remove_new_segments(before, touched)


def _remove_new_segments(before: set[str], touched_file: str) -> None:
    """Remove the segments a page's run added, and only those: other processes (other
    xdist workers, other checkouts) create registries on the same /dev/shm meanwhile, and
    removing theirs would pull a live registry from under them. A new segment is the page's
    if its registry is one the page opened or named on a CLI line."""
    try:
        with open(touched_file) as f:
            touched = set(f.read().split())
    except FileNotFoundError:
        touched = set()
    for segment in set(list_segments()) - before:
        # Registry names hold no '.': the root is shmreg-NAME, the rest shmreg-NAME.<...>.
        if segment[len("shmreg-") :].split(".", 1)[0] in touched:
            unlink_segment(segment)


def markdown_files() -> list[Path]:
    """README.md and every docs/*.md, found anew on each run (new pages join by existing)."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.name)
def test_markdown_code_blocks_run(path: Path) -> None:
    if not plan(path):
        pytest.skip("no runnable blocks")
    if not _isolated():
        used = set(re.findall(r"Registry(?:\.create|\.attach)?\(\s*\"([^\"]+)\"", path.read_text()))
        clash = sorted(n for n in used if f"shmreg-{n}" in list_segments())
        if clash:
            pytest.skip(f"registries {clash} exist on this machine and no private /dev/shm")
    done = run_markdown(path)
    assert done.returncode == 0, f"{path.name}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"


# ------------------------------------------------------------------ the runner itself


def test_the_info_string_decides_what_runs() -> None:
    text = "\n".join([
        "```python", "a = 1", "```",
        "```python no-run", "b = 2", "```",
        "```bash", "python3 -m venv .venv", "shmreg ls jobs --json   # entries", "```",
        "```bash no-run", "shmreg bench", "```",
        "```", "diagram", "```",
    ])
    blocks = parse_blocks(text)
    assert [(b.lang, b.runs, b.line) for b in blocks] == [
        ("python", True, 2), ("python", False, 5), ("bash", True, 8), ("bash", False, 12),
        ("", False, 15),
    ]
    assert shell_commands(blocks[2].body) == ["ls jobs --json"]


def test_a_failing_block_fails_with_its_markdown_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# t\n\n```python\nx = 1\n```\n\ntext\n\n```python\nassert x == 2\n```\n")
    done = run_markdown(page)
    assert done.returncode != 0
    assert 'page.md", line 10' in done.stderr  # the Markdown file's own line


def test_a_failing_cli_line_fails(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```bash\nshmreg info no-such-registry-here\n```\n")
    done = run_markdown(page)
    assert done.returncode != 0 and "page.md:2: shmreg info" in done.stderr


def test_without_a_private_dev_shm_what_a_page_leaves_is_removed(
    tmp_path: Path, reg_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "_isolated", lambda: False)
    page = tmp_path / "page.md"
    page.write_text(f'```python\nimport shmreg\nshmreg.Registry("{reg_name}").close()\n```\n'
                    f"```bash\nshmreg info {reg_name}\n```\n")
    done = run_markdown(page)
    assert done.returncode == 0, done.stderr
    assert list_segments(f"shmreg-{reg_name}") == []  # left behind, then removed


def test_without_a_private_dev_shm_registries_made_elsewhere_meanwhile_survive(
    tmp_path: Path, reg_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other tests (other xdist workers, other checkouts) create registries while a page
    runs on the shared /dev/shm: the clean-up after the page must leave those alone."""
    monkeypatch.setattr(sys.modules[__name__], "_isolated", lambda: False)
    started, go = tmp_path / "started", tmp_path / "go"
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nimport os, pathlib, time\n"
        f"pathlib.Path({str(started)!r}).touch()\n"
        f"deadline = time.monotonic() + {FILE_TIMEOUT_S / 2}\n"
        f"while not os.path.exists({str(go)!r}) and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n```\n"
    )
    result: list[subprocess.CompletedProcess[str]] = []
    bystander: shmreg.Registry | None = None
    runner = threading.Thread(target=lambda: result.append(run_markdown(page)))
    runner.start()
    try:
        deadline = time.monotonic() + FILE_TIMEOUT_S / 2
        while not started.exists() and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert started.exists(), "the page never started"
        bystander = shmreg.Registry.create(reg_name)  # made by "someone else" meanwhile
    finally:
        go.touch()
        runner.join()
    try:
        assert result and result[0].returncode == 0, result and result[0].stderr
        assert f"shmreg-{reg_name}" in list_segments(f"shmreg-{reg_name}")
        assert bystander is not None
        assert bystander.lookup("ns", "missing") is None  # still attached and usable
        shmreg.Registry.attach(reg_name).close()  # and still there for a new attacher
    finally:
        try:
            shmreg.Registry.attach(reg_name).destroy()
        except shmreg.RegistryNotFound:
            from shmreg._engine.store import destroy_by_name

            destroy_by_name(reg_name)
        if bystander is not None:
            bystander.close()

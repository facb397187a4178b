"""Helpers for tests that need real processes: independent interpreters, barriers, cleanup.

Everything a test starts goes through a ``Children`` context manager, which SIGKILLs and
reaps every child it knows about on the way out, failure or not. Child programs are short
``python -c`` strings; ``CHILD_PRELUDE`` gives them the same small toolbox (file barrier,
acknowledgement file, JSON result line) so each test's child code stays a few lines.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

#: Upper bound for anything a test waits on; only ever reached when something is broken.
#: A slow or overloaded CI machine may raise it (SHMREG_TEST_DEADLINE=300) without edits.
DEADLINE_S = float(os.environ.get("SHMREG_TEST_DEADLINE", "60"))

#: Imported by every child program: a barrier on a file, and a way to report a result.
CHILD_PRELUDE = r"""
import json, os, sys, time
import shmreg

def wait_file(path, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {path}")
        time.sleep(0.001)

def touch(path):
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)

def report(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()
"""


def child_env(**extra: str) -> dict[str, str]:
    """The current environment with the repository (and tests/) importable."""
    env = dict(os.environ)
    paths = [str(REPO), str(TESTS)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("SHMREG_BACKEND", None)
    env.update(extra)
    return env


def run_py(
    code: str,
    *args: str,
    prelude: bool = True,
    flags: tuple[str, ...] = (),
    stdin: Any = subprocess.DEVNULL,
    stdout: Any = subprocess.PIPE,
    stderr: Any = subprocess.PIPE,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """Start ``sys.executable -c code *args`` as an independent interpreter.

    Its own session (so no terminal signal reaches it), the repository on ``PYTHONPATH``,
    text-mode pipes for stdout and stderr by default; ``env`` adds variables to its
    environment.
    """
    source = (CHILD_PRELUDE + "\n" + code) if prelude else code
    return subprocess.Popen(
        [sys.executable, *flags, "-c", source, *args],
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=child_env(**(env or {})),
        cwd=str(REPO),
        text=True,
        start_new_session=True,
    )


def wait_for_file(
    path: str | Path, *, procs: tuple[Any, ...] = (), timeout: float = DEADLINE_S
) -> None:
    """Wait until ``path`` exists; fail early if one of ``procs`` exited first."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        for proc in procs:
            code = proc.poll() if isinstance(proc, subprocess.Popen) else proc.exitcode
            if code is not None and not os.path.exists(path):
                raise AssertionError(
                    f"child {proc.pid} exited ({code}) before {path} appeared" + _stderr_of(proc)
                )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.002)


def _stderr_of(proc: Any) -> str:
    if isinstance(proc, subprocess.Popen) and proc.stderr is not None and proc.poll() is not None:
        try:
            return ":\n" + proc.stderr.read()
        except (OSError, ValueError):
            return ""
    return ""


def touch(path: str | Path) -> None:
    """Create ``path`` atomically (a barrier release: waiters see it whole or not at all)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, path)


def finish(proc: subprocess.Popen[str], timeout: float = DEADLINE_S) -> tuple[str, str]:
    """Wait for a child to exit on its own; return (stdout, stderr). Fails on a timeout."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"child {proc.pid} did not finish in {timeout} s:\n{err}") from None
    return out, err


def finish_ok(proc: subprocess.Popen[str], timeout: float = DEADLINE_S) -> list[Any]:
    """``finish``, assert exit status 0 and a clean stderr; return the JSON lines it printed."""
    out, err = finish(proc, timeout)
    assert proc.returncode == 0, f"child {proc.pid} exited {proc.returncode}:\n{err}\n{out}"
    assert err == "", f"child {proc.pid} wrote to stderr:\n{err}"
    return json_lines(out)


def json_lines(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_line(proc: subprocess.Popen[str], timeout: float = DEADLINE_S) -> Any:
    """The next JSON line a child printed.

    Bounded: a child that neither prints a line nor exits within ``timeout`` is SIGKILLed
    and the test fails with whatever the child had printed, so a hung child fails one test
    instead of stalling the whole run. The read runs in a thread because a text pipe's
    buffered ``readline`` cannot be given a timeout; killing the child ends it (EOF).
    """
    assert proc.stdout is not None
    stdout = proc.stdout
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        proc.kill()
        reader.join(DEADLINE_S)
        proc.wait()
        raise AssertionError(
            f"child {proc.pid} printed no line in {timeout} s and was killed; "
            f"its unfinished line: {''.join(got)!r}" + _stderr_of(proc)
        )
    line = got[0]
    if not line:
        proc.wait()
        raise AssertionError(
            f"child {proc.pid} exited ({proc.returncode}) without a reply" + _stderr_of(proc)
        )
    return json.loads(line)


def send_line(proc: subprocess.Popen[str], obj: Any) -> None:
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(obj) + "\n")
    proc.stdin.flush()


def proc_state(pid: int) -> str | None:
    """Kernel state letter of ``pid`` (``"Z"`` for a zombie), or ``None`` if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return chr(data[data.rfind(b")") + 2])


def proc_threads(pid: int) -> int | None:
    """Thread count of ``pid`` (field 20 of its stat line), or ``None`` if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(data[data.rfind(b")") + 2 :].split()[17])


def wait_until(
    cond: Callable[[], Any], what: str, timeout: float = DEADLINE_S, poll: float = 0.01
) -> Any:
    """Poll ``cond`` until it returns something true and return it; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)
    return value


def wait_zombie(pid: int, timeout: float = DEADLINE_S) -> None:
    """Wait until ``pid`` has exited completely but is not yet reaped.

    A killed multi-threaded process (numpy's BLAS threads) shows ``Z`` for its leader a few
    milliseconds before its other threads are gone; until then the kernel still counts them
    and the process is still exiting. Wait for the finished state: ``Z`` with one thread.
    """
    deadline = time.monotonic() + timeout
    while proc_state(pid) != "Z" or proc_threads(pid) != 1:
        if time.monotonic() > deadline:
            raise AssertionError(f"pid {pid} did not become a zombie (state {proc_state(pid)})")
        time.sleep(0.001)


def segments_of(name: str) -> list[str]:
    """The /dev/shm files of registry ``name``: its root and every ``name.*`` segment."""
    root = f"shmreg-{name}"
    try:
        files = os.listdir("/dev/shm")
    except FileNotFoundError:
        return []
    return sorted(f for f in files if f == root or f.startswith(root + "."))


class Children:
    """Tracks child processes; on exit SIGKILLs and reaps every one of them.

    Accepts ``subprocess.Popen`` objects, ``multiprocessing`` processes and bare pids of
    our own children.
    """

    def __init__(self) -> None:
        self.items: list[Any] = []

    def add(self, proc: Any) -> Any:
        self.items.append(proc)
        return proc

    def py(self, code: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        """``run_py`` and track the child."""
        proc = run_py(code, *args, **kwargs)
        self.items.append(proc)
        return proc

    def sleeper(self, seconds: int | None = None) -> subprocess.Popen[bytes]:
        """A helper process whose pid entries can be registered under.

        It lives until the test kills it (``kill_all`` on the way out) unless ``seconds``
        asks for less: a fixed lifetime would die under a test that runs long on a slow
        machine, and its entries with it.
        """
        proc = subprocess.Popen(
            ["sleep", "infinity" if seconds is None else str(seconds)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.items.append(proc)
        return proc

    def kill_all(self) -> None:
        for item in reversed(self.items):
            try:
                _kill_and_reap(item)
            except Exception:  # cleanup must reach every child
                pass
        self.items.clear()

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill_all()


def _kill_and_reap(item: Any) -> None:
    if isinstance(item, int):
        try:
            os.kill(item, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(item, 0)
        except ChildProcessError:
            pass
        return
    if isinstance(item, subprocess.Popen):
        if item.returncode is None:
            try:
                item.kill()
            except ProcessLookupError:
                pass
        try:
            item.communicate(timeout=DEADLINE_S)
        except (ValueError, OSError, subprocess.TimeoutExpired):
            item.wait()
        return
    # A multiprocessing.Process (any start method).
    if item.exitcode is None:
        try:
            item.kill()
        except (ProcessLookupError, AttributeError):
            pass
    item.join(DEADLINE_S)
    try:
        item.close()
    except ValueError:
        pass


@contextmanager
def children() -> Iterator[Children]:
    """``with children() as kids:`` ... every child SIGKILLed and reaped on the way out."""
    kids = Children()
    try:
        yield kids
    finally:
        kids.kill_all()


@contextmanager
def destroying(name: str) -> Iterator[None]:
    """Destroy registry ``name`` (by name, even if corrupt) on the way out."""
    try:
        yield
    finally:
        from shmreg._engine.store import destroy_by_name

        destroy_by_name(name)
        for seg in segments_of(name):
            try:
                os.unlink(os.path.join("/dev/shm", seg))
            except FileNotFoundError:
                pass


#: Set to replay a randomized test: every one prints the seed it used under this name.
SEED_ENV = "SHMREG_TEST_SEED"


def test_seed(label: str) -> int:
    """The seed of one randomized test: ``$SHMREG_TEST_SEED`` if set, else a fresh one.

    Printed (pytest shows it with a failure's captured output) as the exact variable
    assignment that replays the run.
    """
    text = os.environ.get(SEED_ENV, "").strip()
    seed = int(text) if text else int.from_bytes(os.urandom(4), "little")
    print(f"{label}: seed {seed} (replay with {SEED_ENV}={seed})")
    return seed


test_seed.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test to collect

def reach_minimum(what: str, minimum: int, attempt: Callable[[], int],
                  max_attempts: int) -> int:
    """Call ``attempt()`` (each returns how much of ``what`` it produced) until the total
    reaches ``minimum``; fail loudly if ``max_attempts`` calls cannot get there.

    For tests whose proof depends on the machine producing real concurrency: a slow or
    busy machine gets more attempts instead of a test that passes having checked nothing.
    """
    total = 0
    for done in range(1, max_attempts + 1):
        total += attempt()
        if total >= minimum:
            print(f"{what}: {total} (minimum {minimum}) in {done} attempt(s)")
            return total
    raise AssertionError(
        f"only {total} {what} in {max_attempts} attempts, {minimum} needed: this machine "
        "did not produce the concurrency the test needs, so it proved nothing"
    )


#: The last stderr line of ``unshare`` or ``mount`` when the kernel or a container refuses
#: them (EPERM, EACCES, EINVAL for an unsupported namespace, ENOSPC for exhausted
#: namespaces). Only these mean "this machine cannot run the test"; anything else is a failure.
_REFUSED = re.compile(
    r"unshare: (unshare failed|cannot change root filesystem propagation): "
    r"(Operation not permitted|Permission denied|Invalid argument|No space left on device)"
    r"|mount: /dev/shm: (permission denied|must be superuser to use mount)\.?"
)


def refused_by_the_machine(returncode: int, stderr: str) -> str | None:
    """The refusal if a namespace or mount child failed only because it was not allowed.

    ``None`` for success and for every other failure (a traceback, a crash, a wrong
    result): the caller reports those as failures, never as skips.
    """
    lines = stderr.strip().splitlines()
    if returncode == 0 or not lines:
        return None
    last = lines[-1].strip()
    return last if _REFUSED.fullmatch(last) else None


# ------------------------------------------------- targets for multiprocessing children
# (importable by spawn and forkserver children, which cannot see functions defined in ``-c``)


def mp_attach_and_register(name: str, ns: str, service: str, owner: int) -> None:
    """Attach by name, register ``service`` for ``owner`` and one entry of our own, close."""
    import shmreg

    reg = shmreg.Registry.attach(name)
    try:
        _use(reg, ns, service, owner)
    finally:
        reg.close()


def mp_use_registry(reg: Any, ns: str, service: str, owner: int) -> None:
    """Use a Registry received as an argument (inherited by fork, else unpickled by name)."""
    try:
        _use(reg, ns, service, owner)
    finally:
        reg.close()


def _use(reg: Any, ns: str, service: str, owner: int) -> None:
    reg.register(ns, service, pid=owner, metadata={"by": os.getpid()})
    reg.register(ns, f"{service}-self")  # dies with this child
    assert reg.lookup(ns, service) == owner
    assert reg.lookup_with_metadata(ns, "driver") is not None
    assert service in reg.list_services(ns)


@contextmanager
def alarm_after(seconds: float, error: type[BaseException], message: str) -> Iterator[None]:
    """Raise ``error(message)`` in this thread if the block is still running after
    ``seconds``: a hang becomes a failure instead of a stuck test run (main thread only)."""

    def ring(signum: int, frame: object) -> None:
        raise error(message)

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

"""Supervision, measured side by side with supervisord and circus: ``python bench/supervision.py``.

Needs the ``bench`` extra (supervisor, circus). Each system runs the same agent: a shell
program that writes its pid to a file and then sleeps. Measured, in interleaved rounds (one
kill per peer, then several for shmreg, so machine noise falls on all alike):

1. restart latency: SIGKILL of an agent to its replacement running (shmreg: running and
   registered; peers: the new pid written), p50 / p99; shmreg for a ``command`` agent and a
   Python ``module`` agent (forkserver), >= 200 kills each; the peers with their defaults;
2. agents started per second, 100 agents (shmreg: ``start_agent`` one after another; peers:
   daemon start until all 100 pid files exist);
3. supervisor CPU over 10 s when idle with 100 agents (``/proc/<pid>/stat`` utime + stime).

Bars: restart p50 <= 10 ms (command) and <= 25 ms (module); idle < 1 % of a core.
Options: ``--peer-kills N`` (default 30), ``--kills N`` (default 200), ``--no-peers``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import shmreg
from shmreg import agents
from shmreg.testing.agents import worker_config

AGENT_SH = '#!/bin/sh\necho $$ > "$1.tmp" && mv "$1.tmp" "$1"\nexec sleep 3600\n'
IDLE_S = 10.0
TICKS = os.sysconf("SC_CLK_TCK")


def _pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return chr(data[data.rfind(b")") + 2]) not in "ZX"


def _wait(cond: Any, timeout: float = 120.0, step: float = 0.0002) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(step)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _idle_cpu(pid: int) -> float:
    before, t0 = _cpu_seconds(pid), time.monotonic()
    time.sleep(IDLE_S)
    return (_cpu_seconds(pid) - before) / (time.monotonic() - t0) * 100


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------------- peers


class Peer:
    """A supervisord or circus daemon running ``count`` copies of the pid-writing agent."""

    def __init__(self, kind: str, workdir: Path, count: int, script: Path) -> None:
        self.kind, self.dir, self.count = kind, workdir / kind, count
        self.dir.mkdir(parents=True)
        self.script = script
        self.proc: subprocess.Popen[bytes] | None = None

    def pidfile(self, i: int) -> Path:
        return self.dir / f"a{i}.pid"

    def _config(self) -> tuple[list[str], str]:
        bindir = Path(sys.executable).parent
        if self.kind == "supervisord":
            lines = [
                "[supervisord]", "nodaemon=true", f"logfile={self.dir}/daemon.log",
                f"pidfile={self.dir}/daemon.pid", "user=root" if os.getuid() == 0 else "",
            ]  # fmt: skip
            for i in range(self.count):
                lines += [
                    f"[program:a{i}]", f"command={self.script} {self.pidfile(i)}",
                    "autorestart=true", "startsecs=0", "startretries=100000",
                ]  # fmt: skip
            return [str(bindir / "supervisord"), "-c", str(self.dir / "conf")], "\n".join(lines)
        port = 20000 + os.getpid() % 20000
        lines = [
            "[circus]", f"endpoint = tcp://127.0.0.1:{port}",
            f"pubsub_endpoint = tcp://127.0.0.1:{port + 1}", "statsd = False",
        ]  # fmt: skip
        for i in range(self.count):
            lines += [
                f"[watcher:a{i}]",
                f"cmd = {self.script} {self.pidfile(i)}",
                "numprocesses = 1",
            ]
        return [str(bindir / "circusd"), str(self.dir / "conf")], "\n".join(lines)

    def start(self) -> float:
        """Start the daemon; seconds until every agent has written its pid."""
        argv, conf = self._config()
        (self.dir / "conf").write_text(conf + "\n")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        _wait(lambda: all(_pid_in(self.pidfile(i)) for i in range(self.count)), step=0.001)
        return time.perf_counter() - t0

    def kill_one(self, i: int) -> float:
        old = _pid_in(self.pidfile(i))
        assert old is not None
        t0 = time.perf_counter()
        os.kill(old, signal.SIGKILL)
        _wait(lambda: (p := _pid_in(self.pidfile(i))) not in (None, old) and _alive(p))
        return time.perf_counter() - t0

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                proc.wait()
        for i in range(self.count):  # agents the daemon left behind
            pid = _pid_in(self.pidfile(i))
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------- shmreg

SUPERVISOR_CHILD = textwrap.dedent(
    """
    import sys, time
    import shmreg
    from shmreg import agents
    reg = shmreg.Registry.attach(sys.argv[1])
    sup = agents.Supervisor(reg, namespace="idle")
    for i in range(100):
        sup.register_agent({"id": f"a{i}", "type": "w", "command": ["sleep", "3600"],
                            "output": "inherit"})
        sup.start_agent(f"a{i}")
    print("ready", flush=True)
    sys.stdin.read()
    sup.close()
    """
)


def _shmreg_kill(reg: shmreg.Registry, sup: agents.Supervisor, agent_id: str) -> float:
    old = reg.lookup(sup.namespace, agent_id)
    assert old is not None
    t0 = time.perf_counter()
    os.kill(old, signal.SIGKILL)
    _wait(lambda: reg.lookup(sup.namespace, agent_id) not in (None, old), step=0.00005)
    return time.perf_counter() - t0


def _shmreg_starts(reg: shmreg.Registry, kind: str) -> float:
    logs = tempfile.mkdtemp(prefix="shmreg-bench-logs-")
    with agents.Supervisor(reg, namespace=f"starts-{kind}", log_dir=logs) as sup:
        for i in range(100):
            if kind == "module":
                sup.register_agent(worker_config(f"s{i}"))
            else:
                sup.register_agent(
                    {"id": f"s{i}", "type": "w", "command": ["sleep", "3600"], "output": "inherit"}
                )
        sup.start_agent("s0")  # the forkserver's one-off start is not a per-agent cost
        t0 = time.perf_counter()
        for i in range(1, 100):
            sup.start_agent(f"s{i}")
        rate = 99 / (time.perf_counter() - t0)
    shutil.rmtree(logs, ignore_errors=True)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--peer-kills", type=int, default=30)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--start-method", default="forkserver", help="for module agents")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shmreg-bench-sup-"))
    (work / "agent.sh").write_text(AGENT_SH)
    (work / "agent.sh").chmod(0o755)
    name = f"bench-sup-{os.getpid()}"
    reg = shmreg.Registry.create(name, capacity=4096)
    results: dict[str, Any] = {}
    script = work / "agent.sh"
    kinds = [] if args.no_peers else ["supervisord", "circus"]
    peers = [Peer(kind, work, 5, script) for kind in kinds]
    # Restarts as after a stable run (the first restart is immediate; backoff is for crash
    # loops, and a kill every ~100 ms per agent would otherwise count as one).
    policy = {"type": "permanent", "max_restarts": 10**6, "max_seconds": 1.0, "stable_after": 0.01}
    try:
        sup = agents.Supervisor(
            reg, namespace="bench", log_dir=str(work / "logs"), start_method=args.start_method
        )
        for i in range(5):
            argv = [str(work / "agent.sh"), str(work / f"c{i}.pid")]
            command = {"id": f"c{i}", "type": "w", "restart_policy": policy, "command": argv}
            sup.register_agent(command)
            sup.register_agent(worker_config(f"m{i}", restart_policy=policy))
            sup.start_agent(f"c{i}")
            sup.start_agent(f"m{i}")
        for peer in peers:
            peer.start()
        lat: dict[str, list[float]] = {"shmreg command": [], "shmreg module": []}
        lat.update({p.kind: [] for p in peers})
        rounds = max(args.peer_kills if peers else 0, 1)
        per_round = -(-args.kills // rounds)
        for r in range(rounds):
            for peer in peers:
                if len(lat[peer.kind]) < args.peer_kills:
                    lat[peer.kind].append(peer.kill_one(r % peer.count))
            for k in range(per_round):
                if len(lat["shmreg command"]) < args.kills:
                    i = (r * per_round + k) % 5
                    lat["shmreg command"].append(_shmreg_kill(reg, sup, f"c{i}"))
                    lat["shmreg module"].append(_shmreg_kill(reg, sup, f"m{i}"))
                    time.sleep(0.02)  # let the replacement settle before the next kill
        for kind, values in lat.items():
            results[f"restart {kind}"] = {
                "n": len(values),
                "p50_ms": round(statistics.median(values) * 1000, 2),
                "p99_ms": round(_pct(values, 0.99) * 1000, 2),
            }
        sup.close()
        for peer in peers:
            peer.stop()
        peers = []
        print(json.dumps(results), file=sys.stderr, flush=True)  # in case a later part fails
        # agents started per second, 100 agents
        results["starts/s shmreg command"] = round(_shmreg_starts(reg, "command"), 1)
        results["starts/s shmreg module"] = round(_shmreg_starts(reg, "module"), 1)
        for kind in kinds:
            peer = Peer(kind, work / "starts", 100, script)
            peers.append(peer)
            results[f"starts/s {kind}"] = round(100 / peer.start(), 1)
            results[f"idle cpu % {kind}"] = round(_idle_cpu(peer.proc.pid), 3)  # type: ignore[union-attr]
            peer.stop()
        # idle CPU of a shmreg supervisor with 100 agents, in a process of its own
        child = subprocess.Popen(
            [sys.executable, "-c", SUPERVISOR_CHILD, name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(1.0)
        results["idle cpu % shmreg"] = round(_idle_cpu(child.pid), 3)
        child.stdin.close()
        child.wait(120)
    finally:
        for peer in peers:
            peer.stop()
        reg.destroy()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""A supervisor in another process: SIGKILL it and no agent survives; the records stay readable
from any process; a new supervisor takes them over and restarts what was running; another
process controls the live supervisor through the registry (``shmreg agents``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import pytest
from agent_helpers import alive, restarted, supervisor, wait_until
from helpers import REPO, child_env, children, read_line

import shmreg
from shmreg import agents

SUPERVISOR = r"""
import json, sys, time
import shmreg
from shmreg import agents
from shmreg.testing.agents import worker_config
reg = shmreg.Registry.attach(sys.argv[1])
sup = agents.Supervisor(reg, namespace=sys.argv[2], log_dir=sys.argv[3])
pids = {}
for agent_id, policy in (("p1", "permanent"), ("p2", "permanent"), ("t1", "transient"),
                         ("tmp", "temporary")):
    sup.register_agent(worker_config(agent_id, restart_policy=policy))
    pids[agent_id] = sup.start_agent(agent_id)
sup.register_agent(worker_config("idle"))
print(json.dumps(pids), flush=True)
time.sleep(600)
"""


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmreg", *args],
        capture_output=True, text=True, timeout=120, env=child_env(), cwd=REPO,
    )  # fmt: skip


def test_supervisor_death_kills_its_agents_and_a_new_one_recovers(
    registry: shmreg.Registry, reg_name: str, tmp_path
) -> None:
    ns = f"agents-{uuid.uuid4().hex[:8]}"
    with children() as kids:
        proc = kids.py(SUPERVISOR, reg_name, ns, str(tmp_path))
        pids = read_line(proc)
        assert all(alive(pid) for pid in pids.values())
        # While it lives, it is the only supervisor of the namespace; any process reads.
        with pytest.raises(shmreg.AgentAlreadyRunning) as caught:
            agents.Supervisor(registry, namespace=ns)
        assert caught.value.pid == proc.pid
        info = agents.get_agent_info(registry, "p1", namespace=ns)
        assert (info.status, info.pid) == ("running", pids["p1"])
        os.kill(proc.pid, signal.SIGKILL)
        # The parent-death signal: every agent dies with the supervisor, none is orphaned.
        wait_until(lambda: not any(alive(pid) for pid in pids.values()), "agents to die")

    # Without a supervisor the records still say what there was.
    listed = {a.id: a for a in agents.list_agents(registry, ns)}
    assert list(listed) == ["p1", "p2", "t1", "tmp", "idle"]
    assert {a.status for a in listed.values()} == {"stopped", "registered"}
    assert listed["p1"].reason == "supervisor not running" and listed["p1"].pid is None
    assert listed["idle"].status == "registered"
    assert listed["p1"].config["module"] == "shmreg.testing.agents:TestWorker.main"
    assert agents.find_agents_by_type(registry, "worker", namespace=ns) == []
    registry.sweep()  # no sweep reclaims a record
    assert len(agents.list_agents(registry, ns)) == 5

    with supervisor(registry, namespace=ns) as sup:
        for agent_id in ("p1", "p2", "t1"):
            info = restarted(sup, agent_id, pids[agent_id])
            assert info.config["id"] == agent_id
        tmp = sup.get_agent_info("tmp")
        assert (tmp.status, tmp.reason) == ("stopped", "supervisor restarted")
        assert sup.get_agent_status("idle") == "registered"
        running = agents.find_agents_by_type(registry, "worker", namespace=ns)
        assert sorted(a.id for a in running) == ["p1", "p2", "t1"]


def test_control_from_another_process(registry: shmreg.Registry, reg_name: str, tmp_path) -> None:
    with supervisor(registry, log_dir=str(tmp_path)) as sup:
        ns = sup.namespace
        sup.register_agent(
            {"id": "w", "type": "worker", "module": "shmreg.testing.agents:TestWorker.main"}
        )
        sup.register_agent(
            {"id": "c", "type": "cmd", "command": ["sh", "-c", "echo hello; exec sleep 120"]}
        )
        pid = sup.start_agent("w")
        sup.start_agent("c")

        out = _cli("agents", reg_name, "--json", "-n", ns)
        assert out.returncode == 0, out.stderr
        rows = {r["id"]: r for r in json.loads(out.stdout)}
        assert rows["w"]["status"] == "running" and rows["w"]["pid"] == pid
        assert rows["w"]["uptime"] is not None and rows["w"]["restarts"] == 0

        out = _cli("agents", reg_name, "stop", "w", "--json", "-n", ns)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["status"] == "stopped"
        assert sup.get_agent_status("w") == "stopped" and not alive(pid)

        out = _cli("agents", reg_name, "start", "w", "-n", ns)
        assert out.returncode == 0 and "w: running" in out.stdout, out
        new_pid = sup.get_agent_info("w").pid
        out = _cli("agents", reg_name, "restart", "w", "--json", "-n", ns)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["pid"] not in (None, new_pid)

        out = _cli("agents", reg_name, "start", "w", "--json", "-n", ns)
        assert out.returncode == 2
        assert json.loads(out.stdout)["error"]["name"] == "AgentAlreadyRunning"

        wait_until(lambda: "hello" in (tmp_path / "c.log").read_text(), "output")
        out = _cli("agents", reg_name, "logs", "c", "-n", ns)
        assert out.returncode == 0 and "hello" in out.stdout

        out = _cli("agents", reg_name, "-n", ns)
        assert out.returncode == 0 and "running" in out.stdout and "w " in out.stdout
    # No supervisor: listing still works, control says why it cannot.
    out = _cli("agents", reg_name, "--json", "-n", ns)
    assert {r["status"] for r in json.loads(out.stdout)} == {"stopped"}
    out = _cli("agents", reg_name, "start", "w", "-n", ns)
    assert out.returncode == 2 and "no supervisor" in out.stderr


def test_demo_shows_supervision() -> None:
    out = _cli("demo", "--workers", "2")
    assert out.returncode == 0, out.stderr
    assert "supervisor started 4 agents" in out.stdout
    assert "agent ml-1 (pid" in out.stdout and "last exit 'killed by SIGKILL'" in out.stdout
    assert "agent flaky: failed, restart intensity exceeded" in out.stdout
    assert "agents with capability 'inference': ml-1" in out.stdout
    assert "supervisor closed: every agent stopped" in out.stdout
    assert "Traceback" not in out.stderr  # agent output goes to their log files

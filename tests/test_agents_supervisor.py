"""The supervisor with real agent processes: start, stop, restart types, exit reasons,
intensity, start-up failures, strategies, the heartbeat watchdog, logs, command agents and
the read side. Every wait is on a condition with a generous deadline."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
from agent_helpers import alive, restarted, settled, supervisor, wait_until
from helpers import DEADLINE_S

import shmreg
from shmreg import agents
from shmreg.testing.agents import (
    coordination_config,
    failing_config,
    ml_config,
    worker_config,
)

QUICK = {"type": "permanent", "max_restarts": 1000, "max_seconds": 60.0, "backoff_max": 0.05}


def test_start_registers_the_agent_under_its_own_pid(registry: shmreg.Registry) -> None:
    with supervisor(registry) as sup:
        info = sup.register_agent(worker_config("w1", capabilities=["nlp", "gpu"]))
        assert info.status == "registered" and info.pid is None
        pid = sup.start_agent("w1")
        assert alive(pid) and pid != os.getpid()
        assert registry.lookup(sup.namespace, "w1") == pid
        md = registry.get_metadata(sup.namespace, "w1")
        assert md["type"] == "mabeam_agent" and md["agent_type"] == "worker"
        assert md["capabilities"] == ["nlp", "gpu"] and md["status"] == "running"
        info = sup.get_agent_info("w1")
        assert (info.status, info.pid, info.restarts, info.last_exit) == ("running", pid, 0, None)
        with pytest.raises(shmreg.AgentAlreadyRunning):
            sup.start_agent("w1")
        sup.stop_agent("w1", timeout=DEADLINE_S)  # a slow exit is no SIGKILL here
        info = sup.get_agent_info("w1")
        assert info.status == "stopped" and info.last_exit is not None
        assert info.last_exit.reason == "normal"  # TestWorker returns on SIGTERM
        assert not alive(pid)
        assert registry.lookup(sup.namespace, "w1") is None
        with pytest.raises(shmreg.AgentNotRunning):
            sup.stop_agent("w1")


def test_sigkill_of_a_permanent_agent_restarts_it(registry: shmreg.Registry) -> None:
    with supervisor(registry) as sup:
        sup.register_agent(worker_config("w1", restart_policy=QUICK))
        pid = sup.start_agent("w1")
        os.kill(pid, signal.SIGKILL)
        info = restarted(sup, "w1", pid)
        assert info.restarts == 1 and info.last_exit is not None
        assert (info.last_exit.reason, info.last_exit.signal) == ("killed by SIGKILL", 9)
        assert registry.lookup(sup.namespace, "w1") == info.pid
        new = sup.restart_agent("w1")
        assert new != info.pid and not alive(info.pid)


@pytest.mark.parametrize(
    ("policy", "mode", "exit_code", "status", "reason"),
    [
        ("temporary", "immediate", 3, "failed", "exit 3"),
        ("temporary", "immediate", None, "failed", "exception RuntimeError"),
        ("transient", "immediate", 0, "stopped", "normal"),
        ("temporary", "immediate", 0, "stopped", "normal"),
    ],
)
def test_exits_that_are_not_restarted(
    registry: shmreg.Registry, policy: str, mode: str, exit_code: int | None, status: str,
    reason: str,
) -> None:  # fmt: skip
    with supervisor(registry) as sup:
        sup.register_agent(failing_config("f", mode, exit_code=exit_code, restart_policy=policy))
        sup.start_agent("f")
        info = settled(sup, "f", status)
        assert info.last_exit is not None and info.last_exit.reason.startswith(reason)
        assert info.restarts == 0 and info.pid is None
        if exit_code is None:
            assert "RuntimeError: FailingAgent f failed" in (info.last_exit.traceback or "")
        time.sleep(0.2)  # nothing may restart it meanwhile
        assert sup.get_agent_info("f").restarts == 0


def test_transient_agent_restarts_after_an_abnormal_exit(registry: shmreg.Registry) -> None:
    policy = {**QUICK, "type": "transient", "max_restarts": 2}
    with supervisor(registry) as sup:
        sup.register_agent(
            failing_config("f", "after", delay=0.2, exit_code=4, restart_policy=policy)
        )
        sup.start_agent("f")
        info = settled(sup, "f", "failed")
        assert info.restarts == 2
        assert info.reason is not None and "more than 2 restarts in 60.0 s" in info.reason
        assert "last exit: exit 4" in info.reason


def test_intensity_sends_the_agent_to_failed_and_it_stays_visible(
    registry: shmreg.Registry,
) -> None:
    policy = {"type": "permanent", "max_restarts": 3, "max_seconds": 60.0, "backoff_initial": 0.01}
    with supervisor(registry) as sup:
        sup.register_agent(failing_config("f", "immediate", restart_policy=policy))
        sup.start_agent("f")
        info = settled(sup, "f", "failed")
        assert info.restarts == 3
        assert "restart intensity exceeded" in (info.reason or "")
        assert "exception RuntimeError" in (info.reason or "")
        listed = {a.id: a for a in agents.list_agents(registry, sup.namespace)}
        assert listed["f"].status == "failed" and listed["f"].reason == info.reason
        # Not restarted until someone starts it; an explicit start resets the history.
        time.sleep(0.2)
        assert sup.get_agent_info("f").restarts == 3
        sup.start_agent("f")
        assert settled(sup, "f", "failed").restarts == 6


def test_a_startup_exception_raises_agent_start_failed(registry: shmreg.Registry) -> None:
    with supervisor(registry) as sup:
        sup.register_agent({"id": "bad", "type": "x", "module": "shmreg.testing.agents:Nope"})
        with pytest.raises(shmreg.AgentStartFailed) as caught:
            sup.start_agent("bad")
        assert "AttributeError" in str(caught.value)
        assert "has no attribute 'Nope'" in (caught.value.reason or "")
        info = sup.get_agent_info("bad")
        assert info.status == "failed" and info.last_exit is not None
        assert "Traceback" in (info.last_exit.traceback or "")
        sup.register_agent({"id": "gone", "type": "x", "module": "no_such_module_x:main"})
        with pytest.raises(shmreg.AgentStartFailed, match="ModuleNotFoundError"):
            sup.start_agent("gone")
        sup.register_agent({"id": "cmd", "type": "x", "command": ["/nonexistent/prog"]})
        with pytest.raises(shmreg.AgentStartFailed, match="exec failed"):
            sup.start_agent("cmd")


def test_invalid_config_lists_every_fault(registry: shmreg.Registry) -> None:
    with supervisor(registry) as sup:
        with pytest.raises(shmreg.InvalidAgentConfig) as caught:
            sup.register_agent({"args": 3, "restart_policy": "sometimes", "color": "red"})
        err = caught.value
        assert err.missing == ["id", "type", "module or command"]
        for fault in ("args must be a list", "restart_policy", "unknown fields color"):
            assert fault in str(err)
        with pytest.raises(shmreg.InvalidAgentConfig, match="exactly one"):
            sup.register_agent({"id": "a", "type": "t", "module": "m:f", "command": ["x"]})
        assert sup.list_agents() == []  # bad input changes nothing
        with pytest.raises(shmreg.AgentNotFound):
            sup.start_agent("a")


def test_a_second_live_supervisor_on_the_namespace_is_refused(registry: shmreg.Registry) -> None:
    with supervisor(registry) as sup:
        with pytest.raises(shmreg.AgentAlreadyRunning, match="another supervisor"):
            agents.Supervisor(registry, namespace=sup.namespace)
        with supervisor(registry):  # another namespace is another supervisor's
            pass


@pytest.mark.parametrize(
    ("strategy", "expect_restarted"),
    [("one_for_one", {"b"}), ("one_for_all", {"a", "b", "c"}), ("rest_for_one", {"b", "c"})],
)
def test_strategies(registry: shmreg.Registry, strategy: str, expect_restarted: set[str]) -> None:
    with supervisor(registry, strategy=strategy) as sup:
        pids = {}
        for agent_id in "abc":
            sup.register_agent(worker_config(agent_id, restart_policy=QUICK))
            pids[agent_id] = sup.start_agent(agent_id)
        os.kill(pids["b"], signal.SIGKILL)
        for agent_id in expect_restarted:
            restarted(sup, agent_id, pids[agent_id])
        for agent_id in set("abc") - expect_restarted:
            assert sup.get_agent_info(agent_id).pid == pids[agent_id]
            assert alive(pids[agent_id])


def test_a_hung_agent_is_killed_by_the_watchdog(registry: shmreg.Registry) -> None:
    config = worker_config(
        "hb", kwargs={"heartbeat": 0.05, "hang_after": 0.5}, heartbeat_timeout=1.0,
        restart_policy="temporary",
    )  # fmt: skip
    with supervisor(registry) as sup:
        sup.register_agent(config)
        sup.start_agent("hb")
        info = settled(sup, "hb", "failed")
        assert info.last_exit is not None
        assert info.last_exit.reason == "killed by SIGKILL (no heartbeat within 1.0 s)"


def test_output_goes_to_a_capped_rotated_log_file(registry: shmreg.Registry, tmp_path) -> None:
    with supervisor(registry, log_dir=str(tmp_path)) as sup:
        sup.register_agent(worker_config("w"))
        sup.start_agent("w")
        sup.stop_agent("w", timeout=DEADLINE_S)  # it must exit on its own to log its line
        log = tmp_path / "w.log"
        assert sup.get_agent_info("w").log == str(log)
        assert "worker w stopping" in log.read_text()
        big = "head -c 300000 /dev/zero | tr '\\0' x; echo; exec sleep 120"
        sup.register_agent(
            {"id": "loud", "type": "x", "command": ["sh", "-c", big], "log_max_bytes": 100_000}
        )
        sup.start_agent("loud")
        rotated = tmp_path / "loud.log.1"
        wait_until(lambda: rotated.exists() and rotated.stat().st_size >= 300_000, "rotation")
        assert (tmp_path / "loud.log").stat().st_size < 100_000


def test_command_agents_restart_and_see_their_context(registry: shmreg.Registry) -> None:
    with supervisor(registry) as sup:
        sup.register_agent(
            {"id": "c", "type": "cmd", "command": ["sleep", "120"], "restart_policy": QUICK}
        )
        pid = sup.start_agent("c")
        assert registry.lookup(sup.namespace, "c") == pid
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        assert env[b"SHMREG_AGENT_ID"] == b"c"
        os.kill(pid, signal.SIGKILL)
        info = restarted(sup, "c", pid)
        assert info.last_exit is not None and info.last_exit.reason == "killed by SIGKILL"


def test_stop_kills_an_agent_that_ignores_sigterm(registry: shmreg.Registry, tmp_path) -> None:
    with supervisor(registry, log_dir=str(tmp_path)) as sup:
        stubborn = ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done"]
        sup.register_agent({"id": "s", "type": "x", "command": stubborn})
        pid = sup.start_agent("s")
        wait_until(lambda: "ready" in (tmp_path / "s.log").read_text(), "the trap set")
        sup.stop_agent("s", timeout=0.5)
        info = sup.get_agent_info("s")
        assert info.status == "stopped" and info.last_exit is not None
        assert info.last_exit.reason == "killed by SIGKILL"
        assert not alive(pid)


#: An agent that checks ``stopping`` as often as it can: nearly all its time is spent inside
#: ``stopping.wait()``, where a handler that set the event itself would deadlock.
_SPINNER = """\
from shmreg.agents import current
ctx = current()
print("ready", flush=True)
while not ctx.stopping.wait(0):
    pass
"""


def test_sigterm_during_stopping_wait_ends_the_agent_normally(
    registry: shmreg.Registry, tmp_path
) -> None:
    with supervisor(registry, log_dir=str(tmp_path)) as sup:
        for attempt in range(8):  # each attempt lands the signal at another point of the loop
            agent_id = f"spin{attempt}"
            sup.register_agent(
                {"id": agent_id, "type": "x", "command": [sys.executable, "-c", _SPINNER]}
            )
            pid = sup.start_agent(agent_id)
            log = tmp_path / f"{agent_id}.log"
            wait_until(lambda log=log: "ready" in log.read_text(), "the handler set")
            sup.stop_agent(agent_id, timeout=DEADLINE_S)  # SIGKILL only if it hangs that long
            info = sup.get_agent_info(agent_id)
            assert info.last_exit is not None and info.last_exit.reason == "normal", (
                f"attempt {attempt}: {info.last_exit}\n{log.read_text()}"
            )
            assert not alive(pid)


def test_capability_and_type_queries_see_only_running_agents(registry: shmreg.Registry) -> None:
    with supervisor(registry) as sup:
        sup.register_agent(ml_config("m1"))
        sup.register_agent(ml_config("m2", capabilities=["inference"]))
        sup.register_agent(coordination_config("coord"))
        sup.register_agent(worker_config("w"))
        for agent_id in ("m1", "m2", "coord"):
            sup.start_agent(agent_id)
        ns = sup.namespace

        def ids(found: list[agents.AgentInfo]) -> list[str]:
            return sorted(a.id for a in found)

        assert ids(agents.find_agents_by_capability(registry, ["inference"], namespace=ns)) == [
            "m1", "m2",
        ]  # fmt: skip
        both = agents.find_agents_by_capability(registry, ["inference", "training"], namespace=ns)
        assert ids(both) == ["m1"]
        assert ids(agents.find_agents_by_type(registry, "ml", namespace=ns)) == ["m1", "m2"]
        assert agents.find_agents_by_capability(registry, ["work"], namespace=ns) == []
        # The coordinator found both through the registry; the ML workers publish a load.
        wait_until(lambda: registry.get_metadata(ns, "coord").get("peers") == ["m1", "m2"], "peers")
        wait_until(lambda: "load" in registry.get_metadata(ns, "m1"), "load")
        sup.stop_agent("m2")
        assert ids(agents.find_agents_by_type(registry, "ml", namespace=ns)) == ["m1"]
        sup.unregister_agent("m1")
        assert [a.id for a in sup.list_agents()] == ["m2", "coord", "w"]
        assert [a.id for a in agents.list_agents(registry, ns)] == ["m2", "coord", "w"]


def test_current_outside_an_agent_raises() -> None:
    with pytest.raises(shmreg.AgentNotRunning):
        agents.current()


def test_spawn_and_fork_start_methods(registry: shmreg.Registry) -> None:
    for method in ("spawn", "fork"):
        with supervisor(registry, start_method=method) as sup:
            sup.register_agent(worker_config("w", restart_policy=QUICK))
            pid = sup.start_agent("w")
            assert os.getppid() != pid and alive(pid)
            os.kill(pid, signal.SIGKILL)
            restarted(sup, "w", pid)


def test_plugin_fixtures(
    agent_supervisor: agents.Supervisor,
    worker_agent_config: dict,
    ml_agent_config: dict,
    coordination_agent_config: dict,
    agent_load_set,
) -> None:
    configs = [worker_agent_config, ml_agent_config, coordination_agent_config, *agent_load_set(3)]
    for config in configs:
        agent_supervisor.register_agent(config)
        agent_supervisor.start_agent(config["id"])
    assert {a.status for a in agent_supervisor.list_agents()} == {"running"}
    assert len(agent_supervisor.list_agents()) == 6

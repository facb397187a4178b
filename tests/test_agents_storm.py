"""Kill storm: random SIGKILLs over permanent agents. Afterwards every agent runs; at no
sampled moment did one id have two live processes; no process is left a zombie.

The fast run: 60 kills over 6 agents. The slow run (``--run-slow``): 500 kills over 20.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from agent_helpers import alive, supervisor, wait_until
from helpers import proc_state

import shmreg
from shmreg import agents
from shmreg.testing.agents import worker_config

POLICY = {
    "type": "permanent",
    "max_restarts": 100_000,
    "max_seconds": 1.0,
    "backoff_initial": 0.001,
    "backoff_max": 0.01,
}


def _storm(reg: shmreg.Registry, count: int, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    ids = [f"a{i}" for i in range(count)]
    history: dict[str, set[int]] = {i: set() for i in ids}
    with supervisor(reg) as sup:
        for agent_id in ids:
            sup.register_agent(worker_config(agent_id, restart_policy=POLICY))
            history[agent_id].add(sup.start_agent(agent_id))
        done = 0
        killed: set[int] = set()
        while done < kills:
            # A killed pid reads as running until the supervisor has reaped it: skip those.
            infos = [
                i
                for i in sup.list_agents()
                if i.status == "running" and i.pid and i.pid not in killed
            ]
            for info in infos:
                history[info.id].add(info.pid)  # type: ignore[arg-type]
            if not infos:
                time.sleep(0.001)
                continue
            victim = rng.choice(infos)
            try:
                os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
                killed.add(victim.pid)  # type: ignore[arg-type]
                done += 1
            except ProcessLookupError:
                pass
            if done % 10 == 0:
                for agent_id, pids in history.items():
                    live = [p for p in pids if alive(p)]
                    assert len(live) <= 1, f"{agent_id} has two live processes: {live}"
        # A killed agent reads "running" until it is reaped: wait for every restart too.
        def recovered() -> bool:
            infos = sup.list_agents()
            running = all(i.status == "running" for i in infos)
            return running and sum(i.restarts for i in infos) >= kills

        wait_until(recovered, "every agent restarted and running")
        infos = sup.list_agents()
        for info in infos:
            live = [p for p in history[info.id] | {info.pid} if alive(p)]  # type: ignore[operator]
            assert live == [info.pid]
            assert reg.lookup(sup.namespace, info.id) == info.pid
        running = agents.list_agents(reg, sup.namespace)
        assert [a.id for a in running] == ids
        every = set().union(*history.values())
        wait_until(lambda: not [p for p in every if proc_state(p) == "Z"], "no zombies")


def test_kill_storm_bounded(registry: shmreg.Registry) -> None:
    _storm(registry, count=6, kills=60, seed=1)


@pytest.mark.slow
def test_kill_storm_500_kills_over_20_agents(registry: shmreg.Registry) -> None:
    _storm(registry, count=20, kills=500, seed=2)

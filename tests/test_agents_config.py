"""Agent config validation and the restart bookkeeping (no processes needed here)."""

from __future__ import annotations

import random

import pytest

import shmreg
from shmreg.agents import RestartPolicy, validate_config
from shmreg.agents._policy import RestartTracker


def test_a_valid_config_is_normalised() -> None:
    cfg = validate_config({"id": "a", "type": "t", "command": ("prog", "-x")})
    assert cfg["command"] == ["prog", "-x"] and cfg["restart_policy"] == "permanent"
    assert cfg["capabilities"] == [] and cfg["output"] == "file"
    assert cfg["heartbeat_timeout"] is None


@pytest.mark.parametrize(
    ("config", "fault"),
    [
        ({"id": "a", "type": "t", "module": "nocolon"}, "module must name a callable"),
        ({"id": "a", "type": "t", "command": []}, "command must be a non-empty list"),
        ({"id": "", "type": "t", "command": ["x"]}, "id must be"),
        ({"id": "a/b", "type": "t", "command": ["x"]}, "id must be"),
        ({"id": "a", "type": "t", "command": ["x"], "capabilities": "gpu"}, "capabilities"),
        ({"id": "a", "type": "t", "command": ["x"], "heartbeat_timeout": 0}, "heartbeat"),
        ({"id": "a", "type": "t", "command": ["x"], "output": "pipe"}, "output"),
        ({"id": "a", "type": "t", "command": ["x"], "restart_policy": {"max_restarts": -1}},
         "max_restarts"),
        ({"id": "a", "type": "t", "command": ["x"], "restart_policy": {"typo": 1}}, "typo"),
        ("not a dict", "must be a dict"),
    ],
)  # fmt: skip
def test_bad_configs_say_what_is_wrong(config: object, fault: str) -> None:
    with pytest.raises(shmreg.InvalidAgentConfig, match=fault) as caught:
        validate_config(config)
    assert caught.value.code == 5005


def test_backoff_doubles_with_jitter_caps_and_resets_after_a_stable_run() -> None:
    policy = RestartPolicy(backoff_initial=0.1, backoff_max=0.5, stable_after=10.0,
                           max_restarts=100, max_seconds=1000.0)  # fmt: skip
    tracker = RestartTracker(policy, random.Random(7))
    delays = [tracker.next_delay(now=float(i), ran_for=0.1) for i in range(6)]
    assert delays[0] == 0.0  # the first restart is immediate
    for delay, base in zip(delays[1:], (0.1, 0.2, 0.4, 0.5, 0.5), strict=True):
        assert base * 0.5 <= delay < base
    assert tracker.next_delay(now=10.0, ran_for=30.0) == 0.0  # stable run: starts over


def test_intensity_counts_restarts_inside_the_window() -> None:
    tracker = RestartTracker(RestartPolicy(max_restarts=2, max_seconds=5.0))
    tracker.next_delay(0.0, 0.0)
    assert not tracker.exceeded(1.0)
    tracker.next_delay(1.0, 0.0)
    assert tracker.exceeded(2.0)
    assert not tracker.exceeded(5.5)  # the first has left the window


@pytest.mark.parametrize(
    ("kind", "abnormal", "expected"),
    [("permanent", False, True), ("transient", False, False), ("transient", True, True),
     ("temporary", True, False)],
)  # fmt: skip
def test_restart_types(kind: str, abnormal: bool, expected: bool) -> None:
    assert RestartPolicy(type=kind).wants_restart(abnormal) is expected

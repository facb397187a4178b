"""Prometheus metrics: the served endpoint scraped over HTTP, parsed by prometheus_client."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

import shmreg
from shmreg import _opmetrics
from shmreg.metrics import exposition
from tests.helpers import DEADLINE_S, children, read_line, wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "registry"))
            out[(s.name, labels)] = s.value
    return out


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return parse(response.read().decode())


WRITER = """
import sys, shmreg
reg = shmreg.Registry.attach(sys.argv[1])
for i in range(5):
    reg.register("web", f"w{i}", metadata={"i": i})
reg.update_metadata("web", "w0", {"i": 100})
reg.unregister("web", "w1")
print("done", flush=True)
sys.stdin.read()  # hold the entries until the test closes stdin or kills us
"""


def test_served_endpoint_follows_writers_in_other_processes(
    registry: shmreg.Registry, tmp_path: Path
) -> None:
    registry.register("db", "primary")
    textfile = tmp_path / "shmreg.prom"
    with children() as kids:
        monitor = subprocess.Popen(
            [sys.executable, "-m", "shmreg", "monitor", registry.name, "--json",
             "--metrics-port", "0", "--textfile", str(textfile), "--textfile-interval", "0.2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        kids.items.append(monitor)
        url = read_line(monitor)["metrics_url"]
        before = scrape(url)
        assert before[("shmreg_backend_up", ())] == 1
        assert before[("shmreg_entries", (("namespace", "db"),))] == 1
        assert before[("shmreg_registrations_total", ())] == 0

        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, registry.name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        kids.items.append(writer)
        assert writer.stdout is not None and writer.stdout.readline().strip() == "done"
        after = scrape(url)
        assert after[("shmreg_registrations_total", ())] == 5
        assert after[("shmreg_updates_total", ())] == 1
        assert after[("shmreg_removals_total", ())] == 1
        assert after[("shmreg_entries", (("namespace", "web"),))] == 4
        assert after[("shmreg_events_total", ())] == before[("shmreg_events_total", ())] + 7

        writer.kill()
        writer.wait(timeout=DEADLINE_S)
        # The died events are visible the moment the removal commits, a moment before the
        # monitor's thread adds the removal to its own figures. One scrape reads the stored
        # entries (dead ones among them) before the events, so a scrape can also count the
        # died events of a removal that committed after it read the entries: wait for a scrape
        # that has all three settled.
        died = wait_until(
            lambda: (s := scrape(url))[("shmreg_deaths_total", ())] == 4
            and s[("shmreg_monitor_removed_total", ())] == 4
            and s[("shmreg_dead_entries", ())] == 0
            and s,
            "deaths, the monitor's count of them, and no dead entry left stored",
        )
        assert ("shmreg_entries", (("namespace", "web"),)) not in died
        assert died[("shmreg_monitor_deaths_total", ())] >= 1
        assert died[("shmreg_dead_entries", ())] == 0
        assert died[("shmreg_monitor_up", ())] == 1
        assert died[("shmreg_monitor_lag_seconds", ())] >= 0  # exported; its value is timing

        # node_exporter's file: rewritten atomically, always a whole scrape
        text = wait_until(
            lambda: (
                textfile.exists()
                and "shmreg_deaths_total" in (t := textfile.read_text())
                and parse(t)[("shmreg_deaths_total", ())] == 4
                and t
            ),
            "the text file",
        )
        assert parse(text)[("shmreg_backend_up", ())] == 1
        monitor.terminate()
        monitor.communicate(timeout=DEADLINE_S)
        assert monitor.returncode == 0
    assert not [p for p in os.listdir(tmp_path) if p != "shmreg.prom"]  # no temporaries left


def test_metrics_command_prints_one_scrape(registry: shmreg.Registry) -> None:
    registry.register("a", 1)
    registry.register("b", 2)
    out = subprocess.run(
        [sys.executable, "-m", "shmreg", "metrics", registry.name],
        capture_output=True, text=True, timeout=DEADLINE_S, check=True,
    ).stdout  # fmt: skip
    samples = parse(out)
    assert samples[("shmreg_entries", (("namespace", "a"),))] == 1
    assert samples[("shmreg_capacity_entries", ())] >= 1024
    assert samples[("shmreg_health_status", ())] == 0
    assert not any(name == "shmreg_operations_total" for name, _ in samples)


def test_operation_metrics_count_calls_errors_and_latency(reg_name: str) -> None:
    reg = shmreg.Registry.create(reg_name, capacity=64)
    try:
        for i in range(10):
            reg.register("ns", i)
        for _ in range(200):
            reg.lookup("ns", 3)
        with pytest.raises(shmreg.NotRegistered):
            reg.update_metadata("ns", "missing", {})
        samples = parse(exposition(reg))
        op = lambda name: (("operation", name),)  # noqa: E731
        assert samples[("shmreg_operations_total", op("register"))] == 10
        assert samples[("shmreg_operations_total", op("lookup"))] == 200
        assert samples[("shmreg_operations_total", op("update_metadata"))] == 1
        errors = (("error", "NotRegistered"), ("operation", "update_metadata"))
        assert samples[("shmreg_operation_errors_total", errors)] == 1
        le = (("le", "+Inf"), ("operation", "register"))
        assert samples[("shmreg_operation_duration_seconds_bucket", le)] == 10 // 8  # sampled
        assert samples[("shmreg_operation_duration_seconds_sum", op("register"))] > 0
        timed = samples[("shmreg_operation_duration_seconds_count", op("lookup"))]
        assert timed == 200 // _opmetrics.READ_SAMPLE
    finally:
        reg.destroy()


def test_operation_metrics_switch_off(reg_name: str) -> None:
    _opmetrics.set_enabled(False)
    try:
        reg = shmreg.Registry.create(reg_name, capacity=64)
    finally:
        _opmetrics.set_enabled(True)
    try:
        assert reg.lookup == reg.backend.lookup  # bound straight to the backend
        assert _opmetrics.snapshot(reg) == {}
        assert "shmreg_operations_total" not in exposition(reg)
    finally:
        reg.destroy()
    on = shmreg.Registry.create(reg_name, capacity=64)
    try:
        assert _opmetrics.snapshot(on)
        _opmetrics.uninstrument(on)
        assert on.lookup == on.backend.lookup and _opmetrics.snapshot(on) == {}
        on.register("ns", "x")  # the class's method again
    finally:
        on.destroy()


def test_a_failing_backend_is_reported_down_not_raised(reg_name: str) -> None:
    from prometheus_client import generate_latest

    from shmreg.metrics import scrape_registry

    reg = shmreg.Registry.create(reg_name, capacity=64)
    scrape = scrape_registry(reg)
    reg.destroy()  # every read now raises RegistryDestroyed
    samples = parse(generate_latest(scrape).decode())
    assert samples[("shmreg_backend_up", ())] == 0
    assert samples[("shmreg_scrape_errors_total", ())] >= 1


def test_instrumented_handles_chain_and_free_promptly(reg_name: str) -> None:
    import gc
    import weakref

    reg = shmreg.Registry.create(reg_name, capacity=64)
    try:
        assert shmreg.Registry.attach(reg_name).register("ns", "chained") > 0  # a temporary
        handle = shmreg.Registry.attach(reg_name)
        assert isinstance(handle, shmreg.Registry) and _opmetrics.snapshot(handle)
        ref = weakref.ref(handle)
        gc.disable()  # freed by reference counting alone: no cycle through the wrappers
        try:
            del handle
            assert ref() is None
        finally:
            gc.enable()
    finally:
        reg.destroy()


def test_agents_by_status_and_their_restarts(registry: shmreg.Registry) -> None:
    """Supervised agents are exported from their records: a count per status (zeros too) and
    the restarts, per supervisor namespace."""
    import signal

    from agent_helpers import restarted, settled, supervisor

    from shmreg.testing.agents import failing_config, worker_config

    quick = {"type": "permanent", "max_restarts": 1000, "max_seconds": 60.0, "backoff_max": 0.05}
    with supervisor(registry) as sup:
        sup.register_agent(worker_config("w1", restart_policy=quick))
        sup.register_agent(failing_config("f1", exit_code=3, restart_policy="temporary"))
        pid = sup.start_agent("w1")
        sup.start_agent("f1")
        settled(sup, "f1", "failed")
        os.kill(pid, signal.SIGKILL)
        restarted(sup, "w1", pid)
        samples = parse(exposition(registry))
        ns = sup.namespace

        def agents_with(status: str) -> float:
            return samples[("shmreg_agents", (("agents", ns), ("status", status)))]

        assert (agents_with("running"), agents_with("failed"), agents_with("stopped")) == (1, 1, 0)
        assert samples[("shmreg_agent_restarts_total", (("agents", ns),))] == 1

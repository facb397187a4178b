"""The pytest plugin shmreg installs (entry point ``pytest11``): its fixtures and assertion
helpers work, and loading it changes nothing in a run that does not use them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from helpers import DEADLINE_S, child_env

import shmreg
from shmreg._engine.segment import list_segments
from shmreg.testing import (
    _plugin,
    assert_metadata_equals,
    assert_not_registered,
    assert_registered,
)


def test_shmreg_registry_is_fresh_and_writable(shmreg_registry: shmreg.Registry) -> None:
    assert shmreg_registry.count() == 0
    shmreg_registry.register("ns", "x", metadata={"a": 1})
    assert shmreg_registry.get_metadata("ns", "x") == {"a": 1}
    assert list_segments(f"shmreg-{shmreg_registry.name}")


def test_shmreg_namespace_is_unique_and_in_that_registry(
    shmreg_registry: shmreg.Registry, shmreg_namespace: str
) -> None:
    assert shmreg_namespace.startswith("test:")
    with shmreg_registry.register_self(shmreg_namespace, "me") as generation:
        assert generation > 0
        assert shmreg_registry.list_services(shmreg_namespace) == ["me"]


# ------------------------------------------------------------------- assertion helpers


def test_assertion_helpers_pass_on_the_truth(shmreg_registry: shmreg.Registry,
                                            shmreg_namespace: str) -> None:
    reg, ns = shmreg_registry, shmreg_namespace
    reg.register(ns, "w1", metadata={"role": "io", "n": [1, 2]})
    assert assert_registered(reg, ns, "w1") == (os.getpid(), {"role": "io", "n": [1, 2]})
    assert_registered(reg, ns, "w1", pid=None, metadata={"role": "io", "n": [1, 2]})
    assert_registered(reg, ns, "w1", pid=os.getpid())
    assert_metadata_equals(reg, ns, "w1", {"role": "io", "n": [1, 2]})
    assert_not_registered(reg, ns, "w2")
    reg.unregister(ns, "w1")
    assert_not_registered(reg, ns, "w1")


def test_assertion_helpers_fail_with_what_the_registry_holds(
    shmreg_registry: shmreg.Registry, shmreg_namespace: str
) -> None:
    reg, ns = shmreg_registry, shmreg_namespace
    reg.register(ns, "w1", metadata={"role": "io", "n": 1})
    with pytest.raises(AssertionError, match=r"'w2'\) is not registered .* holds 'w1'"):
        assert_registered(reg, ns, "w2")
    with pytest.raises(AssertionError, match=r"registered to pid .*, not 1$"):
        assert_registered(reg, ns, "w1", pid=1)
    with pytest.raises(AssertionError, match=r"'role': 'io', expected 'db'"):
        assert_registered(reg, ns, "w1", metadata={"role": "db", "n": 1})
    with pytest.raises(AssertionError) as info:
        assert_metadata_equals(reg, ns, "w1", {"role": "io", "extra": True})
    assert "unexpected 'n': 1" in str(info.value)
    assert "missing 'extra': expected True" in str(info.value)
    with pytest.raises(AssertionError, match="is not registered"):
        assert_metadata_equals(reg, ns, "nobody", {})
    with pytest.raises(AssertionError, match=r"registered to pid \d+ with metadata"):
        assert_not_registered(reg, ns, "w1")


def test_helpers_are_public_in_shmreg_testing() -> None:
    import shmreg.testing as testing

    assert sorted(testing.__all__) == sorted(testing._WHERE)  # every public name resolves
    for name in testing.__all__:
        assert getattr(testing, name) is not None
    for name in ("assert_registered", "assert_not_registered", "assert_metadata_equals"):
        assert name in testing.__all__ and getattr(testing, name).__module__ == "shmreg.testing"
        assert name in _plugin.__doc__  # the plugin's story names them


# ---------------------------------------------- loading the plugin changes nobody's run

_PROBE = '''
import json, os, sys

def test_probe(request):
    pm = request.config.pluginmanager
    plugin = pm.get_plugin("shmreg")
    with open(os.environ["PROBE_OUT"], "w") as f:
        json.dump({
            "loaded": plugin is not None,
            "hooks": sorted(h.name for h in pm.get_hookcallers(plugin) or []) if plugin else [],
            "modules": sorted(m for m in sys.modules if m.startswith("shmreg")),
            "pid": os.getpid(),
        }, f)
'''


def _pytest_in(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp / "probe.json"
    env = child_env(PROBE_OUT=str(out))
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_PLUGINS", None)
    env.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=DEADLINE_S, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def plugin_side_effects(probe: dict[str, Any], package_modules: set[str]) -> list[str]:
    """What loading the plugin did beyond defining fixtures (empty: nothing)."""
    problems = [f"implements hook {name}" for name in probe["hooks"]]
    # The plugin and its fixture blocks (modules that define fixtures and import nothing
    # else at load) are what loading it may bring in.
    extra = set(probe["modules"]) - package_modules - {"shmreg.testing",
                                                       "shmreg.testing._plugin",
                                                       "shmreg.testing._agent_fixtures"}
    problems += [f"imports {name} at load" for name in sorted(extra)]
    return problems


def test_plugin_does_nothing_at_load_but_offer_fixtures(tmp_path: Path) -> None:
    (tmp_path / "test_other_project.py").write_text(_PROBE)
    before = set(os.listdir(tmp_path))
    without, off = _pytest_in(tmp_path, "-p", "no:shmreg")
    with_plugin, on = _pytest_in(tmp_path)
    assert not off["loaded"] and on["loaded"], "the pytest11 entry point is not installed"
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, shmreg; print(' '.join(sys.modules))"],
        env=child_env(), capture_output=True, text=True, timeout=DEADLINE_S, check=True,
    ).stdout.split()
    assert plugin_side_effects(on, {m for m in imported if m.startswith("shmreg")}) == []
    # The run itself: same result line, no files, no shared memory left behind.
    assert with_plugin.stdout.splitlines()[-1].split(" in ")[0] == \
        without.stdout.splitlines()[-1].split(" in ")[0] == "1 passed"
    assert set(os.listdir(tmp_path)) - before <= {"probe.json", "__pycache__"}
    assert not list_segments(f"shmreg-pytest-{on['pid']}-")
    fixtures = subprocess.run(
        [sys.executable, "-m", "pytest", "--fixtures", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=DEADLINE_S,
        check=False,
    ).stdout
    assert "shmreg_registry" in fixtures and "shmreg_namespace" in fixtures


def test_side_effect_check_can_fail() -> None:
    probe = {"hooks": ["pytest_collection_modifyitems"],
             "modules": ["shmreg", "shmreg.testing", "shmreg.testing._plugin",
                         "shmreg.testing._conformance"]}
    assert plugin_side_effects(probe, {"shmreg"}) == [
        "implements hook pytest_collection_modifyitems",
        "imports shmreg.testing._conformance at load",
    ]


def test_the_docstring_story_runs(tmp_path: Path) -> None:
    story = textwrap.dedent(_plugin.__doc__.split("::\n", 1)[1])  # type: ignore[union-attr]
    (tmp_path / "test_story.py").write_text(story)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_story.py"],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=DEADLINE_S,
        check=False,
    )
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout + proc.stderr

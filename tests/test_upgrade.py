"""Layout versions: an older registry is refused naming ``shmreg upgrade``, which upgrades it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import shmreg
from shmreg._engine import layout as L


def _stamp(reg: shmreg.Registry, version: int) -> None:
    # What an older (or newer) shmreg would have left in the root's version word.
    reg.backend.store.rq[L.R_VERSION] = version  # type: ignore[attr-defined]


def _shmreg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmreg", *args], capture_output=True, text=True, timeout=300
    )


def test_an_older_layout_is_refused_then_upgraded_in_place(registry: shmreg.Registry) -> None:
    for i in range(50):
        registry.register("jobs", f"j{i}", metadata={"i": i})
    gens = {i: registry.generation("jobs", f"j{i}") for i in range(50)}
    data_gen = registry.backend.store.gen  # type: ignore[attr-defined]
    _stamp(registry, 0)
    with pytest.raises(shmreg.IncompatibleRegistry) as refused:
        shmreg.Registry.attach(registry.name)
    assert f"shmreg upgrade {registry.name}" in str(refused.value)
    done = _shmreg("upgrade", registry.name, "--json")
    assert done.returncode == 0, done.stderr
    expected = {"from": 0, "to": L.LAYOUT_VERSION, "upgraded": True, "entries": 50}
    assert json.loads(done.stdout) == expected
    with shmreg.Registry.attach(registry.name) as again:
        assert again.backend.store.gen > data_gen  # type: ignore[attr-defined]
        for i in range(50):
            assert again.get_metadata("jobs", f"j{i}") == {"i": i}
            assert again.generation("jobs", f"j{i}") == gens[i]
        again.register("jobs", "after")  # writable at the new layout
    # The handle attached before the upgrade follows the swap, as it follows growth.
    assert registry.lookup("jobs", "after") is not None
    again_out = _shmreg("upgrade", registry.name).stdout.strip()
    assert again_out == f"already at layout {L.LAYOUT_VERSION}"


def test_a_newer_layout_is_refused_and_not_upgraded(registry: shmreg.Registry) -> None:
    _stamp(registry, L.LAYOUT_VERSION + 1)
    try:
        with pytest.raises(shmreg.IncompatibleRegistry, match="upgrade shmreg"):
            shmreg.Registry.attach(registry.name)
        done = _shmreg("upgrade", registry.name)
        assert done.returncode == 2 and "IncompatibleRegistry" in done.stderr
    finally:
        _stamp(registry, L.LAYOUT_VERSION)  # so the fixture can destroy it

"""Degrade, don't die: scans skip damaged records, point reads of them raise, health says so."""

from __future__ import annotations

import logging
import random

import pytest

import shmreg
from shmreg import _codec
from shmreg._engine import layout as L


def _flip(reg: shmreg.Registry, count: int, seed: int) -> set[str]:
    """Flip one byte in ``count`` entries, half in records and half in slots; their names."""
    table = reg.backend._table()  # type: ignore[attr-defined]
    rnd = random.Random(seed)
    hit: set[str] = set()
    for n, index in enumerate(rnd.sample(table.used_indices().tolist(), count)):
        words = table.read_slot(index)
        key, _ = table.record_bytes(words)
        hit.add(_codec.decode_key(key)[1])
        if n % 2:  # a record byte, past the key: the metadata
            off = table.arena_off + (words[2] & L.LO32) * 8 + len(key) + rnd.randrange(2)
        else:  # a byte of the slot's record checksum (the owner word's upper half)
            off = table.slot_word0 * 8 + index * L.SLOT.size + L.S_OWNER * 8 + 4 + rnd.randrange(4)
        table.buf[off] ^= 0xFF
    return hit


def test_scans_return_the_intact_entries(
    registry: shmreg.Registry, caplog: pytest.LogCaptureFixture
) -> None:
    reg = registry
    reg.register_many("ns", [(f"s{i}", None, {"type": "w", "i": i}) for i in range(1000)])
    damaged = _flip(reg, 10, seed=12)
    expected = {f"s{i}": {"type": "w", "i": i} for i in range(1000) if f"s{i}" not in damaged}
    with caplog.at_level(logging.WARNING, logger="shmreg"):
        assert sorted(reg.list_services("ns")) == sorted(expected)
        assert reg.list_services_with_metadata("ns") == expected
        assert {e.service for e in reg.find_by_metadata("ns", type="w")} == expected.keys()
        assert {e.service for e in reg.list_by_type("ns", "w")} == expected.keys()
        found = reg.find_services_by_metadata("ns", lambda m: m["i"] % 2 == 0)
        assert {e.service for e in found} == {s for s, m in expected.items() if m["i"] % 2 == 0}
    lines = [r.getMessage() for r in caplog.records if r.name == "shmreg.scan"]
    assert lines and "skipped 10 damaged entries" in lines[0] and "fsck --repair" in lines[0]
    assert len(lines) == 1  # the same damage is logged once, not on every scan
    for name in damaged:
        with pytest.raises(shmreg.CorruptRegistry):
            reg.lookup_with_metadata("ns", name)
    for name, meta in expected.items():
        assert reg.lookup_with_metadata("ns", name) == (reg.lookup("ns", name), meta)
    health = reg.health_check()
    assert health.status is shmreg.HealthStatus.UNHEALTHY
    assert health.damaged == 10 and "fsck --repair" in health.detail


def test_repair_makes_it_healthy_again(registry: shmreg.Registry) -> None:
    from shmreg._engine.fsck import check

    registry.register_many("ns", [(f"s{i}", None, {"i": i}) for i in range(50)])
    _flip(registry, 2, seed=3)
    assert registry.health_check().status is shmreg.HealthStatus.UNHEALTHY
    check(registry.name, repair=True)
    health = registry.health_check()
    assert health.status is shmreg.HealthStatus.HEALTHY and health.damaged == 0
    assert len(registry.list_services("ns")) == 48

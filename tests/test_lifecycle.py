"""A registry's life: who may end it (only destroy()), what closing and destroying do to
other processes, what attach checks, how its segments look in /dev/shm, and growth.

Processes exit here in every way a process can (normally, SIGKILL, as creator, as
fork / spawn / forkserver child, as a pool worker) and the registry must outlive all of
them; their stderr must stay clean (no resource_tracker warning, no traceback).
"""

from __future__ import annotations

import os
import pickle
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    DEADLINE_S,
    children,
    destroying,
    finish,
    finish_ok,
    json_lines,
    read_line,
    segments_of,
    touch,
    wait_for_file,
)

import shmreg
from shmreg._engine import layout as _layout

NS = "life"


def assert_clean(err: str) -> None:
    """A child's stderr: no tracker warnings, no tracebacks, nothing at all."""
    assert "resource_tracker" not in err, err
    assert "leaked shared_memory" not in err, err
    assert "Traceback" not in err, err
    assert err.strip() == "", err


def assert_alive(name: str, expect: dict[str, Any]) -> None:
    """The registry is still there, attachable, with the given entries and their metadata."""
    segs = segments_of(name)
    assert f"shmreg-{name}" in segs, segs
    assert len(segs) == 2, segs  # root + current data generation
    reg = shmreg.Registry.attach(name)
    try:
        for service, meta in expect.items():
            found = reg.lookup_with_metadata(NS, service)
            assert found is not None, f"{service} vanished"
            assert found[1] == meta
    finally:
        reg.close()


def tracker_pid_gone(pid: int | None) -> None:
    """If a child had started a resource tracker, wait until that tracker has exited, so any
    cleanup it would do has happened before the test looks."""
    if pid is None:
        return
    deadline = time.monotonic() + DEADLINE_S
    while os.path.exists(f"/proc/{pid}"):
        with open(f"/proc/{pid}/stat", "rb") as f:
            if b") Z " in f.read():
                break
        assert time.monotonic() < deadline, "resource tracker did not exit"
        time.sleep(0.005)


# --------------------------------------------------------- processes ending, registry staying

_ATTACHER_CODE = r"""
from multiprocessing import resource_tracker
name, ns, owner, how = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

def work(reg):
    reg.register(ns, "child", pid=owner, metadata={"from": "child"})
    reg.register(ns, "child-self", metadata={"mine": True})
    assert reg.lookup_with_metadata(ns, "parent") == (int(sys.argv[5]), {"from": "parent"})

if how == "with":
    with shmreg.Registry.attach(name) as reg:
        work(reg)
elif how == "sigkill":
    reg = shmreg.Registry.attach(name)
    work(reg)
    report({"tracker": resource_tracker._resource_tracker._pid})
    time.sleep(1e9)  # until the test kills it
else:
    reg = shmreg.Registry.attach(name)
    work(reg)
    reg.close()
    if how == "sys.exit":
        sys.exit(0)
    if how == "os._exit":
        os._exit(0)
"""


@pytest.mark.parametrize("how", ["close", "with", "sys.exit", "os._exit", "sigkill"])
def test_independent_attacher_exit_leaves_registry(registry: shmreg.Registry, how: str) -> None:
    registry.register(NS, "parent", metadata={"from": "parent"})
    with children() as kids:
        owner = kids.sleeper()
        proc = kids.py(_ATTACHER_CODE, registry.name, NS, str(owner.pid), how,
                       str(os.getpid()))
        if how == "sigkill":
            hello = read_line(proc)
            os.kill(proc.pid, signal.SIGKILL)
            _, err = finish(proc)
            assert proc.returncode == -signal.SIGKILL
            tracker_pid_gone(hello["tracker"])
        else:
            _, err = finish(proc)
            assert proc.returncode == 0, err
        assert_clean(err)
        assert_alive(registry.name, {"parent": {"from": "parent"}, "child": {"from": "child"}})
        # The child's own entry died with it; the handle this process holds still works.
        assert registry.lookup(NS, "child-self") is None
        assert registry.lookup(NS, "child") == owner.pid
        assert registry.register(NS, "after", metadata={}) > 0


_UNCLOSED_CODE = r"""
name, ns, style = sys.argv[1:4]
if style == "global":
    reg = shmreg.Registry.attach(name)
    reg.register(ns, "unclosed")
    reg.lookup(ns, "unclosed")
else:
    def main():
        reg = shmreg.Registry.attach(name)
        reg.register(ns, "unclosed")
        reg.lookup(ns, "unclosed")
    main()
"""


@pytest.mark.parametrize("style", ["global", "local"])
def test_unclosed_handle_at_exit_leaves_registry(registry: shmreg.Registry, style: str) -> None:
    """A process that never calls close(): the registry survives its exit."""
    registry.register(NS, "parent", metadata={"from": "parent"})
    with children() as kids:
        proc = kids.py(_UNCLOSED_CODE, registry.name, NS, style)
        finish(proc)
        assert proc.returncode == 0
    assert_alive(registry.name, {"parent": {"from": "parent"}})


@pytest.mark.parametrize("style", ["global", "local"])
def test_unclosed_handle_at_exit_prints_nothing(registry: shmreg.Registry, style: str) -> None:
    """Never calling close() is allowed: interpreter exit (a module global) or collection
    (a local) must not print finalizer noise."""
    with children() as kids:
        proc = kids.py(_UNCLOSED_CODE, registry.name, NS, style)
        _, err = finish(proc)
        assert proc.returncode == 0
    assert_clean(err)


_CREATOR_CODE = r"""
name, ns, owner, how = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
reg = shmreg.Registry.create(name, capacity=128, max_metadata_bytes=1024)
reg.register(ns, "made-by-creator", pid=owner, metadata={"creator": os.getpid()})
reg.register(ns, "creator-self")
if how == "sigkill":
    report({"pid": os.getpid()})
    time.sleep(1e9)  # until the test kills it
reg.close()
report({"pid": os.getpid()})
"""


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_creator_exit_leaves_registry(reg_name: str, how: str) -> None:
    with destroying(reg_name), children() as kids:
        owner = kids.sleeper()
        proc = kids.py(_CREATOR_CODE, reg_name, NS, str(owner.pid), how)
        creator = read_line(proc)["pid"]
        if how == "sigkill":
            os.kill(proc.pid, signal.SIGKILL)
        _, err = finish(proc)
        assert proc.returncode == (-signal.SIGKILL if how == "sigkill" else 0)
        assert_clean(err)
        assert_alive(reg_name, {"made-by-creator": {"creator": creator}})
        reg = shmreg.Registry.attach(reg_name, capacity=128, max_metadata_bytes=1024)
        try:
            assert reg.lookup(NS, "creator-self") is None
            assert reg.list_services(NS) == ["made-by-creator"]
        finally:
            reg.close()


_DRIVER_CODE = r"""
import multiprocessing as mp
import helpers
name, ns, owner, methods, create = sys.argv[1:6]
owner = int(owner)
reg = shmreg.Registry.create(name, capacity=256) if create == "1" else shmreg.Registry.attach(name)
reg.register(ns, "driver", pid=owner, metadata={"driver": True})
expected = ["driver"]
for method in methods.split(","):
    ctx = mp.get_context(method)
    for target, first in ((helpers.mp_attach_and_register, name), (helpers.mp_use_registry, reg)):
        service = f"{method}-{target.__name__}"
        p = ctx.Process(target=target, args=(first, ns, service, owner))
        p.start()
        p.join(60)
        assert p.exitcode == 0, (service, p.exitcode)
        assert reg.lookup(ns, service) == owner
        assert reg.lookup(ns, service + "-self") is None
        expected.append(service)
    with ctx.Pool(2) as pool:
        services = [f"{method}-pool-{i}" for i in range(4)]
        pool.starmap(helpers.mp_use_registry, [(reg, ns, s, owner) for s in services])
    expected.extend(services)
report({"expected": expected, "listed": sorted(reg.list_services(ns))})
reg.close()
"""


def _run_driver(name: str, methods: str, create: bool) -> None:
    with children() as kids:
        owner = kids.sleeper()
        proc = kids.py(_DRIVER_CODE, name, NS, str(owner.pid), methods, "1" if create else "0",
                       flags=("-W", "error"))
        out, err = finish(proc)
        assert proc.returncode == 0, err
        assert_clean(err)  # the driver's, its children's, and any tracker's stderr
        [result] = json_lines(out)
        expected = set(result["expected"])
        # Pool workers may have been reaped before the listing: their "-self" entries are dead.
        assert {s for s in result["listed"] if not s.endswith("-self")} == expected
        assert_alive(name, {"driver": {"driver": True}})
        reg = shmreg.Registry.attach(name)
        try:
            assert {s for s in reg.list_services(NS)} == expected
            assert all(reg.lookup(NS, s) == owner.pid for s in expected)
        finally:
            reg.close()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_multiprocessing_children_attach_and_exit(registry: shmreg.Registry, method: str) -> None:
    _run_driver(registry.name, method, create=False)


def test_creator_with_children_of_every_start_method_under_W_error(reg_name: str) -> None:
    """The whole story in one interpreter run with ``-W error``: it creates the registry,
    fork / spawn / forkserver children and pools attach and exit, then it exits itself.
    Nothing may be printed and the registry must remain."""
    with destroying(reg_name):
        _run_driver(reg_name, "fork,spawn,forkserver", create=True)


_RACING_CREATOR_CODE = r"""
name, ns, workdir, idx = sys.argv[1:5]
touch(f"{workdir}/ready-{idx}")
wait_file(f"{workdir}/go")
reg = shmreg.Registry(name, capacity=64)
reg.register(ns, f"c{idx}")
touch(f"{workdir}/done-{idx}")
wait_file(f"{workdir}/exit")
report({"count": reg.count(ns), "incarnation": reg.backend.store.incarnation})
reg.close()
"""


def test_concurrent_creation_yields_one_registry(reg_name: str, tmp_path: Path) -> None:
    """Eight processes open a missing name at once: one creates, all share that registry."""
    n = 8
    with destroying(reg_name), children() as kids:
        procs = [kids.py(_RACING_CREATOR_CODE, reg_name, NS, str(tmp_path), str(i))
                 for i in range(n)]
        for i in range(n):
            wait_for_file(tmp_path / f"ready-{i}", procs=tuple(procs))
        touch(tmp_path / "go")
        for i in range(n):
            wait_for_file(tmp_path / f"done-{i}", procs=tuple(procs))
        touch(tmp_path / "exit")
        results = [finish_ok(p)[0] for p in procs]
        assert {r["count"] for r in results} == {n}
        assert len({r["incarnation"] for r in results}) == 1
        assert len(segments_of(reg_name)) == 2  # losers removed what they had built


# ------------------------------------------------------------------------------ destroy


def test_destroy_removes_every_segment(reg_name: str) -> None:
    reg = shmreg.Registry.create(reg_name, capacity=16)
    with destroying(reg_name):
        for i in range(100):
            reg.register(NS, i)
        assert reg.stats().extra["generation"] > 1
        assert len(segments_of(reg_name)) == 2
        other = shmreg.Registry.attach(reg_name)
        reg.destroy()
        assert segments_of(reg_name) == []
        reg.destroy()  # a second destroy is a no-op
        with pytest.raises(shmreg.RegistryDestroyed):
            reg.lookup(NS, 1)
        with pytest.raises(shmreg.RegistryNotFound):
            shmreg.Registry.attach(reg_name)
        # Another handle in this process: its next calls fail, they do not write anywhere.
        for call in (lambda: other.lookup(NS, 1), lambda: other.register(NS, "late"),
                     lambda: other.count(NS)):
            with pytest.raises(shmreg.RegistryDestroyed):
                call()
        assert segments_of(reg_name) == []
        other.close()
        # The name is free again: opening it makes a fresh, empty registry.
        fresh = shmreg.Registry(reg_name)
        try:
            assert fresh.count() == 0
            assert fresh.lookup(NS, 1) is None
            assert fresh.stats().extra["generation"] == 1
        finally:
            fresh.destroy()
        assert segments_of(reg_name) == []


_DESTROYED_PEER_CODE = r"""
name, ns, workdir, owner = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
reg = shmreg.Registry.attach(name)
reg.register(ns, "peer", pid=owner, metadata={"v": 1})
touch(f"{workdir}/ready")
calls = {
    "lookup": lambda: reg.lookup(ns, "peer"),
    "lookup_with_metadata": lambda: reg.lookup_with_metadata(ns, "peer"),
    "registered": lambda: reg.registered(ns, "peer"),
    "get_metadata": lambda: reg.get_metadata(ns, "peer"),
    "register": lambda: reg.register(ns, "late", pid=owner),
    "update_metadata": lambda: reg.update_metadata(ns, "peer", {"v": 2}),
    "unregister": lambda: reg.unregister(ns, "peer"),
    "list_services": lambda: reg.list_services(ns),
    "find_by_metadata": lambda: reg.find_by_metadata(ns, v=1),
    "count": lambda: reg.count(ns),
}
for phase in ("destroyed", "recreated"):
    wait_file(f"{workdir}/{phase}")
    out = {}
    for label, call in calls.items():
        try:
            out[label] = ["returned", repr(call())]
        except Exception as exc:
            out[label] = [type(exc).__name__, isinstance(exc, shmreg.RegistryNotFound)]
    report(out)
reg.close()
"""


def test_destroy_seen_by_another_process(reg_name: str, tmp_path: Path) -> None:
    reg = shmreg.Registry.create(reg_name)
    with destroying(reg_name), children() as kids:
        owner = kids.sleeper()
        proc = kids.py(_DESTROYED_PEER_CODE, reg_name, NS, str(tmp_path), str(owner.pid))
        wait_for_file(tmp_path / "ready", procs=(proc,))
        assert reg.lookup(NS, "peer") == owner.pid
        reg.destroy()
        assert segments_of(reg_name) == []
        touch(tmp_path / "destroyed")
        first = read_line(proc)
        assert first == {label: ["RegistryDestroyed", True] for label in first}, first
        assert len(first) == 10
        # No call of the stale handle wrote anything anywhere (no segment came back).
        assert segments_of(reg_name) == []

        fresh = shmreg.Registry(reg_name)  # a new registry under the same name
        touch(tmp_path / "recreated")
        second = read_line(proc)
        assert second == first  # still the old, destroyed registry for that handle
        assert fresh.count() == 0  # and nothing of the stale handle landed in the new one
        assert fresh.lookup(NS, "late") is None
        finish_ok(proc)
        fresh.close()


# ------------------------------------------------------------------------------- close


_AFTER_CLOSE = {
    "lookup": lambda r: r.lookup(NS, "a"),
    "lookup_with_metadata": lambda r: r.lookup_with_metadata(NS, "a"),
    "registered": lambda r: r.registered(NS, "a"),
    "get_metadata": lambda r: r.get_metadata(NS, "a"),
    "list_services": lambda r: r.list_services(NS),
    "find_by_metadata": lambda r: r.find_by_metadata(NS, k=1),
    "count": lambda r: r.count(),
    "stats": lambda r: r.stats(),
    "sweep": lambda r: r.sweep(),
    "register": lambda r: r.register(NS, "b"),
    "register_many": lambda r: r.register_many(NS, [("b", None, None)]),
    "update_metadata": lambda r: r.update_metadata(NS, "a", {"k": 2}),
    "unregister": lambda r: r.unregister(NS, "a"),
    "destroy": lambda r: r.destroy(),
}
@pytest.mark.parametrize("call", list(_AFTER_CLOSE))
def test_calls_after_close_raise_registry_closed(registry: shmreg.Registry, call: str) -> None:
    registry.register(NS, "a", metadata={"k": 1})
    handle = shmreg.Registry.attach(registry.name)
    handle.close()
    handle.close()  # idempotent
    with pytest.raises(shmreg.RegistryClosed):
        _AFTER_CLOSE[call](handle)
    # Nothing changed for anyone else.
    assert registry.lookup_with_metadata(NS, "a") == (os.getpid(), {"k": 1})
    assert registry.lookup(NS, "b") is None
    assert segments_of(registry.name) != []


_SURVIVOR_CODE = r"""
name, ns, workdir = sys.argv[1:4]
reg = shmreg.Registry.attach(name)
touch(f"{workdir}/ready")
wait_file(f"{workdir}/closed")
gen = reg.register(ns, "survivor", metadata={"ok": True})
report({"parent": reg.lookup(ns, "parent"), "gen": gen, "count": reg.count(ns)})
sys.stdin.readline()
reg.close()
"""


def test_close_leaves_other_processes_and_handles_working(registry: shmreg.Registry,
                                                          tmp_path: Path) -> None:
    registry.register(NS, "parent")
    closing = shmreg.Registry.attach(registry.name)
    with children() as kids:
        proc = kids.py(_SURVIVOR_CODE, registry.name, NS, str(tmp_path), stdin=subprocess.PIPE)
        wait_for_file(tmp_path / "ready", procs=(proc,))
        closing.close()
        touch(tmp_path / "closed")
        hello = read_line(proc)
        assert hello["parent"] == os.getpid()
        assert hello["gen"] > 0
        assert hello["count"] == 2
        # This process's other handle is unaffected as well.
        assert registry.lookup(NS, "survivor") == proc.pid
        assert_alive(registry.name, {"survivor": {"ok": True}})
        with pytest.raises(shmreg.RegistryClosed):
            closing.lookup(NS, "parent")
        finish_ok(proc)


def test_context_manager_closes(reg_name: str) -> None:
    with destroying(reg_name):
        with shmreg.Registry(reg_name) as reg:
            reg.register(NS, "cm", metadata={"x": 1})
            assert reg.lookup(NS, "cm") == os.getpid()
        with pytest.raises(shmreg.RegistryClosed):
            reg.lookup(NS, "cm")
        assert segments_of(reg_name) != []  # closing is not destroying
        with shmreg.Registry.attach(reg_name) as again:
            assert again.get_metadata(NS, "cm") == {"x": 1}


# ------------------------------------------------------------------------------ attach


def test_attach_with_other_settings_is_incompatible(reg_name: str) -> None:
    reg = shmreg.Registry.create(reg_name, capacity=64, max_metadata_bytes=512)
    with destroying(reg_name):
        for kwargs, setting, asked, actual in (
            ({"capacity": 128}, "capacity", 128, 64),
            ({"max_metadata_bytes": 1024}, "max_metadata_bytes", 1024, 512),
        ):
            for opener in (shmreg.Registry.attach, shmreg.Registry.create, shmreg.Registry):
                with pytest.raises(shmreg.IncompatibleRegistry) as info:
                    opener(reg_name, **kwargs)
                err = info.value
                assert (err.setting, err.expected, err.actual) == (setting, asked, actual)
                assert str(asked) in str(err) and str(actual) in str(err), str(err)
        # Matching (or omitted) settings attach; the registry itself is unchanged.
        same = shmreg.Registry.attach(reg_name, capacity=64, max_metadata_bytes=512)
        same.close()
        with shmreg.Registry.attach(reg_name) as plain:
            assert plain.backend.capacity == 64
            assert plain.backend.max_metadata_bytes == 512
        reg.close()


def test_attach_missing_registry(reg_name: str) -> None:
    with pytest.raises(shmreg.RegistryNotFound) as info:
        shmreg.Registry.attach(reg_name)
    assert info.value.name == reg_name
    assert not isinstance(info.value, shmreg.RegistryDestroyed)
    assert segments_of(reg_name) == []  # attach never creates


@pytest.mark.parametrize("name", ["", "a/b", "a.b", "x" * 101, "a\x00b", 5, None, " a",
                                  "a b", "../x", "-a"])
def test_invalid_registry_names(name: Any) -> None:
    for opener in (shmreg.Registry, shmreg.Registry.attach, shmreg.Registry.create):
        with pytest.raises(shmreg.InvalidRegistryName):
            opener(name)


def test_longest_valid_name(reg_name: str) -> None:
    name = (reg_name + "-" + "x" * 100)[:100]
    with destroying(name), shmreg.Registry(name) as reg:
        reg.register(NS, "long")
        assert reg.lookup(NS, "long") == os.getpid()
        assert f"shmreg-{name}" in segments_of(name)


# ------------------------------------------------------------------------ modes on /dev/shm


def _modes(name: str) -> dict[str, int]:
    return {s: stat.S_IMODE(os.stat(f"/dev/shm/{s}").st_mode) for s in segments_of(name)}


@pytest.mark.parametrize("umask", [0o022, 0o000, 0o077])
def test_segments_are_private_by_default(reg_name: str, umask: int) -> None:
    old = os.umask(umask)
    try:
        reg = shmreg.Registry.create(reg_name)
    finally:
        os.umask(old)
    with destroying(reg_name):
        modes = _modes(reg_name)
        assert len(modes) == 2
        assert set(modes.values()) == {0o600}, {k: oct(v) for k, v in modes.items()}
        reg.close()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_mode_is_applied_exactly(reg_name: str, umask: int) -> None:
    old = os.umask(umask)
    try:
        reg = shmreg.Registry.create(reg_name, mode=0o660)
    finally:
        os.umask(old)
    with destroying(reg_name):
        modes = _modes(reg_name)
        assert len(modes) == 2
        assert set(modes.values()) == {0o660}, {k: oct(v) for k, v in modes.items()}
        reg.close()


def test_mode_survives_growth(reg_name: str) -> None:
    reg = shmreg.Registry.create(reg_name, capacity=16, mode=0o660)
    with destroying(reg_name):
        for i in range(200):
            reg.register(NS, i)
        assert reg.stats().extra["generation"] > 1
        modes = _modes(reg_name)
        reg.close()
        assert len(modes) == 2
        assert set(modes.values()) == {0o660}, {k: oct(v) for k, v in modes.items()}


# ------------------------------------------------------------------------ damaged segments


def _poke_root(name: str, word: int, data: bytes) -> None:
    fd = os.open(f"/dev/shm/shmreg-{name}", os.O_RDWR)
    try:
        os.pwrite(fd, data, word * 8)
    finally:
        os.close(fd)


def test_bad_root_magic_is_corrupt(reg_name: str) -> None:
    shmreg.Registry.create(reg_name).close()
    with destroying(reg_name):
        _poke_root(reg_name, _layout.R_MAGIC, b"GARBAGE!")
        for opener in (shmreg.Registry.attach, shmreg.Registry, shmreg.Registry.create):
            with pytest.raises(shmreg.CorruptRegistry):
                opener(reg_name)
        # Nothing was re-created over it.
        with open(f"/dev/shm/shmreg-{reg_name}", "rb") as f:
            assert f.read(8) == b"GARBAGE!"
        from shmreg._engine.store import destroy_by_name

        assert destroy_by_name(reg_name)
        assert segments_of(reg_name) == []


def test_other_layout_version_is_incompatible(reg_name: str) -> None:
    shmreg.Registry.create(reg_name).close()
    with destroying(reg_name):
        _poke_root(reg_name, _layout.R_VERSION, (999).to_bytes(8, "little"))
        for opener in (shmreg.Registry.attach, shmreg.Registry):
            with pytest.raises(shmreg.IncompatibleRegistry) as info:
                opener(reg_name)
            err = info.value
            assert err.actual == 999
            assert err.expected == _layout.LAYOUT_VERSION
            assert "999" in str(err) and str(_layout.LAYOUT_VERSION) in str(err)
        from shmreg._engine.store import destroy_by_name

        assert destroy_by_name(reg_name)
        assert segments_of(reg_name) == []


# ------------------------------------------------------------------------------ growth


_COUNT_CODE = r"""
name, ns, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with shmreg.Registry.attach(name) as reg:
    report({"count": reg.count(ns),
            "ok": all(reg.get_metadata(ns, i) == {"i": i} for i in range(n))})
"""


def test_growth_far_beyond_capacity(reg_name: str) -> None:
    n = 2000
    reg = shmreg.Registry.create(reg_name, capacity=16)
    early = shmreg.Registry.attach(reg_name)  # opened before any growth
    with destroying(reg_name), children() as kids:
        assert early.stats().extra["generation"] == 1
        for i in range(n):
            reg.register(NS, i, metadata={"i": i})
        stats = reg.stats()
        assert stats.extra["generation"] > 1
        assert stats.used == n
        assert stats.capacity >= n
        for handle in (reg, early):
            assert handle.count(NS) == n
            assert all(handle.lookup_with_metadata(NS, i) == (os.getpid(), {"i": i})
                       for i in range(n))
            assert sorted(handle.list_services(NS)) == list(range(n))
        # Old generations are gone: one root and one data segment remain.
        segs = segments_of(reg_name)
        gen = stats.extra["generation"]
        assert len(segs) == 2, segs
        assert segs[0] == f"shmreg-{reg_name}"
        assert segs[1].endswith(f".g{gen}")
        # A process that attaches afterwards sees all of it.
        [result] = finish_ok(kids.py(_COUNT_CODE, reg_name, NS, str(n)))
        assert result == {"count": n, "ok": True}
        early.close()
        reg.close()


# ------------------------------------------------------------------------------ pickling


_UNPICKLE_CODE = r"""
import pickle
reg = pickle.loads(bytes.fromhex(sys.argv[1]))
report({"name": reg.name, "pid": reg.lookup("life", "pickled")})
reg.close()
"""


def test_pickles_by_name(registry: shmreg.Registry) -> None:
    registry.register(NS, "pickled", metadata={"p": 1})
    data = pickle.dumps(registry)
    assert len(data) < 256
    assert registry.name.encode() in data
    clone = pickle.loads(data)
    try:
        assert clone is not registry
        assert clone.name == registry.name
        assert clone.lookup_with_metadata(NS, "pickled") == (os.getpid(), {"p": 1})
        clone.register(NS, "from-clone")
        assert registry.lookup(NS, "from-clone") == os.getpid()
    finally:
        clone.close()
    with children() as kids:
        [result] = finish_ok(kids.py(_UNPICKLE_CODE, data.hex()))
    assert result == {"name": registry.name, "pid": os.getpid()}


_HANDLE_CHURN_CODE = r"""
import gc, pickle
name, ns, n, close = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
data = pickle.dumps(shmreg.Registry.attach(name))
def fds():
    return len(os.listdir("/proc/self/fd"))
def task():  # what a pool task does with a Registry argument
    reg = pickle.loads(data)
    reg.lookup(ns, "x")
    if close:
        reg.close()
task()
gc.collect()
before = fds()
for _ in range(n):
    task()
gc.collect()
report({"before": before, "after": fds()})
"""


@pytest.mark.parametrize("close", [True, False], ids=["closed", "dropped"])
def test_handles_release_their_file_descriptors(registry: shmreg.Registry, close: bool) -> None:
    """A pool task gets a fresh handle per call (pickled by name); dropping it, closed or
    not, must give back its file descriptors and print nothing."""
    n = 100
    with children() as kids:
        proc = kids.py(_HANDLE_CHURN_CODE, registry.name, NS, str(n), "1" if close else "0")
        out, err = finish(proc)
        assert proc.returncode == 0, err
        [result] = json_lines(out)
    assert result["after"] - result["before"] < 10, result
    assert_clean(err)


_LOOPING_PEER_CODE = r"""
name, ns, workdir, mode = sys.argv[1:5]
reg = shmreg.Registry.attach(name)
i = 0
try:
    while True:
        if mode == "write":
            reg.register(ns, f"p{i}", metadata={"i": i})
        else:
            reg.lookup(ns, f"w{i % 50}")
            if i % 10 == 0:
                reg.list_services(ns)
        i += 1
        if i == 200:
            touch(f"{workdir}/going")
except Exception as exc:
    report({"error": type(exc).__name__, "not_found": isinstance(exc, shmreg.RegistryNotFound),
            "ops": i})
reg.close()
"""


@pytest.mark.parametrize("mode", ["write", "read"])
def test_destroy_under_a_busy_peer(reg_name: str, tmp_path: Path, mode: str) -> None:
    """Destroy while another process writes (through table growth) or reads in a loop: its
    next call fails with RegistryDestroyed, and nothing of the registry is left behind."""
    reg = shmreg.Registry.create(reg_name, capacity=16)
    with destroying(reg_name), children() as kids:
        for i in range(50):
            reg.register(NS, f"w{i}")
        proc = kids.py(_LOOPING_PEER_CODE, reg_name, NS, str(tmp_path), mode)
        wait_for_file(tmp_path / "going", procs=(proc,))
        reg.destroy()
        [result] = finish_ok(proc)
        assert result["error"] == "RegistryDestroyed" and result["not_found"], result
        assert result["ops"] >= 200
        assert segments_of(reg_name) == []


def test_a_batch_that_grows_the_table_grows_it_a_few_times_only(reg_name: str) -> None:
    """Growth inside register_many: later items must see the new table, not rebuild again.

    (Each item once re-read the batch's first table, found it full and rebuilt: a rebuild
    per item, quadratic in the batch.)"""
    reg = shmreg.Registry.create(reg_name, capacity=16)
    with destroying(reg_name):
        reg.register_many(NS, [(i, None, {"i": i}) for i in range(3000)])
        assert reg.count(NS) == 3000
        assert reg.stats().extra["generation"] <= 10  # 16 -> 3000 by doubling: ~8 rebuilds
        assert reg.get_metadata(NS, 2999) == {"i": 2999}
        reg.close()

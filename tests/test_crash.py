"""Crash-point enumeration: a real writer SIGKILLed at every named point on every write path.

For each (path, point) a real interpreter runs the path's operation with ``SHMREG_CRASH_AT``
set so that it sends itself SIGKILL at that point (``shmreg._engine.crashpoints``). Before the
operation under test it runs a few ordinary registrations, printing one flushed
acknowledgement line per completed call. Then this process attaches and checks the promise:

* every acknowledged call is in the registry with its exact metadata (and generation);
* the interrupted operation is applied fully or not at all (and, as the redo journal
  promises, applied exactly when the kill came after its journal was marked valid);
* counters agree with a full scan, fsck is clean after one write has run recovery, and no
  slot is left half-written;
* the event ring holds exactly one event per applied operation, in order;
* further writes work, and a further recovery finds nothing to do.

Paths: a new registration, the same owner registering again, a takeover from a dead owner,
update_metadata (replace and merge), unregister, a sweep removing a dead owner's entry, growth
(the registration rebuilds the table), creation of a fresh registry, a creator that lost the
race dying next to a live registry, and ``fsck --repair``. Two more tests kill the
*recovering* writer (a third process then recovers), and let a reader be the first to touch
the registry after the kill (it must neither hang nor see a torn entry).

Entries are owned by a ``sleep`` process that outlives every writer, so a dead writer's
entries do not vanish from reads by design. Points a path cannot reach are asserted
unreachable (the child finishes normally) and the case is skipped; every point must be
reachable on at least one path. The default run covers every reachable (path, point) pair
and a few unreachable ones; ``--run-slow`` runs the full matrix.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest
from helpers import CHILD_PRELUDE, DEADLINE_S, REPO, Children, child_env, children, destroying

import shmreg
from shmreg._engine import fsck as _fsck
from shmreg._engine import layout as L
from shmreg._engine.crashpoints import POINTS
from shmreg._engine.segment import close_segment, create_segment, list_segments

# ------------------------------------------------------------------ points and paths

LOCK_POINTS = ("lock.owner_set",)
COMMIT_POINTS = tuple(p for p in POINTS if p.startswith("commit."))
WRITE_POINTS = LOCK_POINTS + COMMIT_POINTS  # every write passes these once per call
REBUILD_POINTS = tuple(p for p in POINTS if p.startswith("rebuild."))
RECOVER_POINTS = tuple(p for p in POINTS if p.startswith("recover."))
CREATE_POINTS = tuple(p for p in POINTS if p.startswith("create."))

#: Commit points after which the operation is in a valid redo journal: recovery replays it.
JOURNALED = (
    "commit.journal_valid",
    "commit.slot_odd",
    "commit.slot_words",
    "commit.counters",
    "commit.published",
    "commit.event_written",
)
#: Crash points after which the interrupted operation must be visible once recovered.
APPLIED_AFTER = (*JOURNALED, "commit.journal_retired")
#: Points where the slot being written is left with an odd sequence word.
ODD_SLOT = ("commit.slot_odd", "commit.slot_words", "commit.counters")

PATHS = (
    "register_new",  # a name nobody holds
    "reregister_same",  # the same live owner registers again with new metadata
    "takeover",  # a name held by a dead owner
    "update_replace",
    "update_merge",
    "unregister",
    "sweep",  # a sweep removes the entry of a dead owner (a "died" event)
    "growth",  # the table is full: the registration rebuilds into a new generation
    "create",  # a fresh name: the registry is created, then written
    "create_raced",  # a creator that lost the race to an existing registry dies mid-build
    "fsck_repair",  # ``fsck --repair`` (lock, recount, rebuild) removing a stray segment
)

#: Which points each path passes (and so can die at).
REACHES: dict[str, tuple[str, ...]] = {
    **{path: WRITE_POINTS for path in PATHS},
    "growth": WRITE_POINTS + REBUILD_POINTS,
    "create": WRITE_POINTS + CREATE_POINTS,
    "create_raced": CREATE_POINTS,
    # A repair recounts (Table.recover) and rebuilds; it has no journal to replay.
    "fsck_repair": (*LOCK_POINTS, "recover.tombstoned", *REBUILD_POINTS),
    # Recovery proper is its own path (test_crash_during_recovery): a writer that finds a
    # dead writer's owner word recovers, and is killed doing it.
    "recovery": RECOVER_POINTS,
}

#: Unreachable pairs the default run checks anyway (the rest run with --run-slow).
DEFAULT_UNREACHABLE = {
    ("register_new", "rebuild.flipped"),
    ("unregister", "create.data_built"),
    ("update_merge", "recover.replayed"),
    ("create_raced", "commit.published"),
}

NS = "crash"
TARGET = "t"
OLD = {"v": "old", "keep": [1, 2]}
NEW = {"v": "new", "type": "worker", "capabilities": ["a", "b"]}
UPDATE = {"v": "upd", "n": 3}
SENTINEL = ("sentinel", "s", {"sentinel": True})
JUNK = "junk"  # a stray segment for fsck --repair to remove
PRE_OPS = 2  # acknowledged registrations the child makes before the operation under test
BIG_CAPACITY = 64
GROWTH_CAPACITY = 6  # 8 slots, rebuild when live + tombstones + 1 > 6


# ------------------------------------------------------------------ the writer child

_WRITER_CODE = r"""
spec = json.loads(sys.argv[1])
name = spec["name"]
if spec.get("raw_create"):
    # A creator that lost the race: the root exists, yet this process builds its own.
    from shmreg._engine.store import Store
    store = Store._try_create(name, spec["capacity"], 4096, 0o600)
    report({"raw_create": store is not None})
    sys.exit(0)
reg = shmreg.Registry(name, capacity=spec["capacity"])
report({"opened": True})
for i, op in enumerate(spec["ops"]):
    kind = op[0]
    if kind == "register":
        result = reg.register(op[1], op[2], pid=op[3], metadata=op[4])
    elif kind == "update":
        result = reg.update_metadata(op[1], op[2], op[3], merge=op[4])
    elif kind == "unregister":
        result = reg.unregister(op[1], op[2])
    elif kind == "sweep":
        result = reg.sweep()
    elif kind == "fsck_repair":
        from shmreg._engine import fsck as _fsck
        result = _fsck.check(name, repair=True).repaired
    else:
        raise ValueError(kind)
    report({"ack": i, "result": result})
reg.close()
"""


def _spawn(kids: Children, spec: dict[str, Any], crash_at: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_PRELUDE + "\n" + _WRITER_CODE, json.dumps(spec)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=child_env(SHMREG_CRASH_AT=crash_at), cwd=str(REPO), text=True,
        start_new_session=True,
    )
    kids.add(proc)
    return proc


@dataclass
class Run:
    returncode: int
    lines: list[dict[str, Any]]
    stderr: str

    @property
    def acks(self) -> list[dict[str, Any]]:
        return [line for line in self.lines if "ack" in line]

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL


def _run(kids: Children, spec: dict[str, Any], crash_at: str) -> Run:
    proc = _spawn(kids, spec, crash_at)
    try:
        out, err = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"writer hung (crash at {crash_at}):\n{err}") from None
    # Only whole lines were acknowledged (each was flushed on its own).
    lines = [json.loads(x) for x in out.split("\n")[:-1] if x.strip()]
    return Run(proc.returncode, lines, err)


def _assert_unreachable(run: Run, ops: int, what: str) -> None:
    assert run.returncode == 0, f"{what}: expected a normal exit, got {run.returncode}:\n" \
                                f"{run.stderr}"
    assert run.stderr == "", run.stderr
    assert len(run.acks) == ops


# ------------------------------------------------------------------ the expected state


@dataclass
class Model:
    """What the registry must hold: entries of live owners, of dead ones, and the events."""

    keeper: int
    live: dict[tuple[str, Any], dict[str, Any]] = field(default_factory=dict)
    dead: dict[tuple[str, Any], tuple[int, dict[str, Any]]] = field(default_factory=dict)
    gens: dict[tuple[str, Any], int] = field(default_factory=dict)
    events: list[tuple[str, str, Any, int]] = field(default_factory=list)
    namespaces: set[str] = field(default_factory=lambda: {NS, "other", SENTINEL[0]})

    def registered(self, ns: str, svc: Any, meta: dict[str, Any], gen: int | None,
                   pid: int | None = None, kind: str = "registered") -> None:
        self.live[(ns, svc)] = meta
        self.dead.pop((ns, svc), None)
        if gen is None:
            self.gens.pop((ns, svc), None)
        else:
            self.gens[(ns, svc)] = gen
        self.events.append((kind, ns, svc, self.keeper if pid is None else pid))


def _setup_entry(reg: shmreg.Registry, model: Model, ns: str, svc: Any,
                 meta: dict[str, Any]) -> None:
    gen = reg.register(ns, svc, pid=model.keeper, metadata=meta)
    model.registered(ns, svc, meta, gen)


def _dead_entry(reg: shmreg.Registry, model: Model, kids: Children) -> int:
    """Register TARGET for a helper process, then kill and reap it: a dead owner's entry."""
    victim = kids.sleeper()
    gen = reg.register(NS, TARGET, pid=victim.pid, metadata=OLD)
    model.events.append(("registered", NS, TARGET, victim.pid))
    victim.kill()
    victim.wait(DEADLINE_S)
    model.dead[(NS, TARGET)] = (victim.pid, OLD)
    model.gens[(NS, TARGET)] = gen
    return victim.pid


def _state(reg: shmreg.Registry, ns: str, svc: Any) -> tuple[str, Any]:
    """('live', metadata), ('dead', (pid, metadata)) or ('absent', None), from every view."""
    found = reg.lookup_with_metadata(ns, svc)
    rows = [r for r in reg.backend.dump() if r["namespace"] == ns and r["service"] == svc]
    assert len(rows) <= 1, rows
    if found is not None:
        assert rows and rows[0]["alive"] and rows[0]["metadata"] == found[1]
        return "live", found[1]
    if rows:
        assert not rows[0]["alive"], rows
        return "dead", (rows[0]["pid"], rows[0]["metadata"])
    return "absent", None


def _check_invariants(reg: shmreg.Registry, name: str, model: Model) -> None:
    # Every acknowledged entry with its exact metadata, owner and generation.
    for (ns, svc), meta in model.live.items():
        assert reg.lookup_with_metadata(ns, svc) == (model.keeper, meta), (ns, svc)
        if (ns, svc) in model.gens:
            assert reg.generation(ns, svc) == model.gens[(ns, svc)], (ns, svc)
    # Nothing else: each namespace lists exactly the model's live entries.
    listed = 0
    for ns in sorted(model.namespaces):
        got = reg.list_services_with_metadata(ns)
        want = {svc: meta for (n, svc), meta in model.live.items() if n == ns}
        assert got == want, ns
        assert reg.count(ns) == len(want)
        listed += len(got)
    # Every used slot, dead owners included.
    rows = reg.backend.dump()
    alive = {(r["namespace"], r["service"]): r["metadata"] for r in rows if r["alive"]}
    dead = {(r["namespace"], r["service"]): (r["pid"], r["metadata"])
            for r in rows if not r["alive"]}
    assert alive == model.live
    assert dead == model.dead
    # Counters agree with the scans.
    stats = reg.stats()
    assert stats.used == len(rows) == listed + len(model.dead)
    assert reg.count() == listed
    # fsck: clean, no half-written slot, no stray segment.
    report = _fsck.check(name)
    assert report.ok, report.problems
    assert not any("half-written" in p for p in report.problems)
    assert report.entries == stats.used
    current = L.data_name(name, _incarnation(reg), stats.extra["generation"])
    assert list_segments(f"shmreg-{name}.") == [current]
    # Exactly one event per applied operation, in order, numbered without a gap.
    events = list(reg.watch(since=0, timeout=0))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [(e.kind, e.namespace, e.service, e.pid) for e in events] == model.events
    assert reg.backend.last_event_seq() == len(model.events)  # type: ignore[attr-defined]


def _incarnation(reg: shmreg.Registry) -> int:
    return int(reg.backend.store.incarnation)  # type: ignore[attr-defined]


def _write_sentinel(reg: shmreg.Registry, model: Model, recovers: bool = True) -> list[str]:
    """The first write after the crash: it runs recovery. Returns recovery's notes."""
    ns, svc, meta = SENTINEL
    store = reg.backend.store  # type: ignore[attr-defined]
    before = int(store.rq[L.R_RECOVERIES])
    gen = reg.register(ns, svc, pid=model.keeper, metadata=meta)
    model.live[(ns, svc)] = meta
    model.gens[(ns, svc)] = gen
    # Its event comes after the recovered operation's: the caller adds it (_sentinel_event).
    if recovers:
        assert int(store.rq[L.R_RECOVERIES]) == before + 1, "the first write did not recover"
    assert int(store.rq[L.R_OWNER_PID]) == 0
    notes: list[str] = list(store.last_recovery)
    return notes


def _sentinel_event(model: Model) -> None:
    model.events.append(("registered", SENTINEL[0], SENTINEL[1], model.keeper))


def _further_writes(reg: shmreg.Registry, name: str, model: Model) -> None:
    """More writes succeed, dead owners' leftovers sweep away, and recovery has nothing to do."""
    store = reg.backend.store  # type: ignore[attr-defined]
    recoveries = int(store.rq[L.R_RECOVERIES])
    gen = reg.register(NS, "after", pid=model.keeper, metadata={"after": 1})
    model.registered(NS, "after", {"after": 1}, gen)
    reg.update_metadata(NS, "after", {"more": 2}, merge=True)
    model.live[(NS, "after")] = {"after": 1, "more": 2}
    model.events.append(("updated", NS, "after", model.keeper))
    assert reg.unregister(NS, "after") is True
    del model.live[(NS, "after")]
    model.events.append(("unregistered", NS, "after", model.keeper))
    gen = reg.register(NS, "after2", pid=model.keeper, metadata={"after": 2})
    model.registered(NS, "after2", {"after": 2}, gen)
    dead = dict(model.dead)
    assert reg.sweep() == len(dead)
    for (ns, svc), (pid, _) in dead.items():
        model.events.append(("died", ns, svc, pid))
    model.dead.clear()
    _check_invariants(reg, name, model)
    # Every slot is now a live owner's: the counters equal the listings exactly.
    assert reg.stats().used == sum(len(reg.list_services(ns)) for ns in model.namespaces)
    assert int(store.rq[L.R_RECOVERIES]) == recoveries, "a clean write ran recovery"
    # A further recovery is a no-op: nothing to replay, tombstone or recount.
    table = store.begin()
    try:
        assert table.recover() == []
    finally:
        store.end()
    _check_invariants(reg, name, model)


def _pre_ops(keeper: int) -> list[list[Any]]:
    return [["register", NS, f"p{i}", keeper, {"pre": i}] for i in range(PRE_OPS)]


def _apply_pre_acks(model: Model, run: Run, ops: list[list[Any]]) -> None:
    for ack in run.acks:
        op = ops[ack["ack"]]
        assert op[0] == "register"
        model.registered(op[1], op[2], op[4], ack["result"])


def _crash_spec(point: str) -> str:
    """Die at the operation under test: write points are passed once per earlier call too."""
    return f"{point}:{PRE_OPS + 1}" if point in WRITE_POINTS else point


def _expect_symptoms(name: str, point: str, junk: bool = False) -> None:
    """fsck before recovery sees the crash exactly where the point says it happened."""
    report = _fsck.check(name)
    problems = "\n".join(p for p in report.problems if not p.endswith(f"{name}.{JUNK}"))
    assert not report.ok
    assert (f"stray segment shmreg-{name}.{JUNK}" in report.problems) == junk, report.problems
    assert "died holding the lock" in problems, problems
    assert ("redo journal is valid" in problems) == (point in JOURNALED), problems
    assert ("half-written" in problems) == (point in ODD_SLOT), problems
    building = point in ("rebuild.building_marked", "rebuild.segment_created", "rebuild.copied")
    assert ("was being built" in problems) == building, problems
    stray = point in ("rebuild.segment_created", "rebuild.copied", "rebuild.flipped")
    assert ("stray segment" in problems) == stray, problems


# ------------------------------------------------------------------ the operation under test


def _target_op(path: str, keeper: int) -> list[Any]:
    if path in ("register_new", "reregister_same", "takeover", "growth", "create"):
        return ["register", NS, TARGET, keeper, NEW]
    if path == "update_replace":
        return ["update", NS, TARGET, UPDATE, False]
    if path == "update_merge":
        return ["update", NS, TARGET, UPDATE, True]
    if path == "unregister":
        return ["unregister", NS, TARGET]
    if path == "sweep":
        return ["sweep"]
    if path == "fsck_repair":
        return ["fsck_repair"]
    raise ValueError(path)


def _setup(path: str, reg: shmreg.Registry | None, model: Model, kids: Children) -> int | None:
    """Entries the path needs before the writer starts; the victim pid if there is one."""
    if reg is None:
        return None
    _setup_entry(reg, model, NS, "a", {"v": 1})
    _setup_entry(reg, model, NS, 7, {"v": 2, "capabilities": ["x"]})
    _setup_entry(reg, model, "other", ("tuple", 1), {"type": "db"})
    if path == "growth":
        _setup_entry(reg, model, "other", "c", {})
    if path in ("reregister_same", "update_replace", "update_merge", "unregister"):
        _setup_entry(reg, model, NS, TARGET, OLD)
    if path in ("takeover", "sweep"):
        return _dead_entry(reg, model, kids)
    if path == "fsck_repair":
        close_segment(create_segment(f"shmreg-{reg.name}.{JUNK}", 4096, reg.name))
    return None


def _judge(path: str, point: str, reg: shmreg.Registry, model: Model,
           victim: int | None) -> bool:
    """Check the interrupted operation is all or nothing; record it; return whether applied."""
    kind, value = _state(reg, NS, TARGET)
    k = model.keeper
    if path in ("register_new", "growth", "create"):
        assert (kind, value) in (("live", NEW), ("absent", None)), (kind, value)
        applied = kind == "live"
        if applied:
            model.registered(NS, TARGET, NEW, None)
    elif path == "reregister_same":
        assert (kind, value) in (("live", NEW), ("live", OLD)), (kind, value)
        applied = value == NEW
        if applied:
            model.registered(NS, TARGET, NEW, model.gens[(NS, TARGET)], kind="updated")
    elif path == "takeover":
        assert (kind, value) in (("live", NEW), ("dead", (victim, OLD))), (kind, value)
        applied = kind == "live"
        if applied:
            held = model.gens[(NS, TARGET)]
            model.registered(NS, TARGET, NEW, None)
            assert reg.generation(NS, TARGET) > held  # type: ignore[operator]
    elif path in ("update_replace", "update_merge"):
        new = UPDATE if path == "update_replace" else {**OLD, **UPDATE}
        assert (kind, value) in (("live", new), ("live", OLD)), (kind, value)
        applied = value == new
        if applied:
            model.registered(NS, TARGET, new, model.gens[(NS, TARGET)], kind="updated")
    elif path == "unregister":
        assert (kind, value) in (("absent", None), ("live", OLD)), (kind, value)
        applied = kind == "absent"
        if applied:
            del model.live[(NS, TARGET)]
            model.gens.pop((NS, TARGET))
            model.events.append(("unregistered", NS, TARGET, k))
    elif path == "fsck_repair":
        assert (kind, value) == ("absent", None)  # a repair of a sound table changes no entry
        return False
    elif path == "sweep":
        assert (kind, value) in (("absent", None), ("dead", (victim, OLD))), (kind, value)
        applied = kind == "absent"
        if applied:
            del model.dead[(NS, TARGET)]
            model.gens.pop((NS, TARGET))
            model.events.append(("died", NS, TARGET, victim))  # type: ignore[arg-type]
    else:
        raise ValueError(path)
    assert applied == (point in APPLIED_AFTER), (
        f"{path} killed at {point}: applied={applied}, but the redo journal says "
        f"{'replay' if point in APPLIED_AFTER else 'discard'}"
    )
    return applied


def _attach(name: str) -> shmreg.Registry:
    return shmreg.Registry.attach(name)


# ------------------------------------------------------------------ the matrix


def _matrix() -> list[Any]:
    params = []
    for path in PATHS:
        for point in POINTS:
            reachable = point in REACHES[path]
            default = reachable or (path, point) in DEFAULT_UNREACHABLE
            marks = () if default else (pytest.mark.slow,)
            params.append(pytest.param(path, point, marks=marks, id=f"{path}-{point}"))
    return params


def test_every_point_is_reached_by_some_path() -> None:
    known = set().union(*REACHES.values())
    assert set(POINTS) == known, f"unclassified crash points: {set(POINTS) - known}"
    assert all(point in POINTS for _, point in DEFAULT_UNREACHABLE)
    # The default run (no slow mark) kills a writer at every point at least once.
    killed_at: set[str] = set()
    for param in _matrix():
        path, point = param.values
        if not param.marks and point in REACHES[path]:
            killed_at.add(point)  # type: ignore[arg-type]
    for param in _recovery_matrix():
        _, second, reachable = param.values
        if not param.marks and reachable:
            killed_at.add(second)  # type: ignore[arg-type]
    assert killed_at == set(POINTS), set(POINTS) - killed_at


@pytest.mark.parametrize(("path", "point"), _matrix())
def test_crash_point(path: str, point: str, reg_name: str) -> None:
    fresh = path == "create"
    capacity = GROWTH_CAPACITY if path == "growth" else BIG_CAPACITY
    reg: shmreg.Registry | None = None
    with destroying(reg_name), children() as kids:
        try:
            keeper = kids.sleeper().pid
            model = Model(keeper)
            if not fresh:
                reg = shmreg.Registry.create(reg_name, capacity=capacity)
            victim = _setup(path, reg, model, kids)
            if path == "create_raced":
                _crash_raced_creator(reg_name, point, reg, model, kids)  # type: ignore[arg-type]
                return
            ops = [*_pre_ops(keeper), _target_op(path, keeper)]
            spec = {"name": reg_name, "capacity": capacity, "ops": ops}
            run = _run(kids, spec, _crash_spec(point))
            if point not in REACHES[path]:
                _assert_unreachable(run, len(ops), f"{path} at {point}")
                pytest.skip(f"{point} is not on the {path} path (the writer finished normally)")
            assert run.killed, f"writer exited {run.returncode}, not by SIGKILL:\n{run.stderr}"
            if point in CREATE_POINTS:
                _check_crashed_creation(reg_name, point, run, model)
                return
            # Every call before the one under test was acknowledged, and that one was not.
            assert run.lines[0] == {"opened": True}
            assert len(run.acks) == PRE_OPS, run.lines
            _apply_pre_acks(model, run, ops)
            _expect_symptoms(reg_name, point, junk=path == "fsck_repair")
            if reg is None:
                reg = _attach(reg_name)
            if path == "growth":
                # The root names the new generation once the flip happened, and only then.
                flipped = point in ("rebuild.flipped", "rebuild.old_unlinked") or (
                    point in COMMIT_POINTS)
                assert int(reg.backend.store.rq[L.R_GEN]) == (2 if flipped else 1)  # type: ignore[attr-defined]
            notes = _write_sentinel(reg, model)
            if point in JOURNALED:
                assert any(n.startswith("replayed the journal") for n in notes), notes
            assert not any("tombstoned" in n for n in notes), notes  # the journal covered it
            _judge(path, point, reg, model, victim)
            _sentinel_event(model)
            if path == "fsck_repair":
                # Recovery removes only the registry's own stale generations: the stray
                # segment waits for the next repair.
                assert f"shmreg-{reg_name}.{JUNK}" in list_segments(f"shmreg-{reg_name}.")
                assert _fsck.check(reg_name, repair=True).repaired
            _check_invariants(reg, reg_name, model)
            _further_writes(reg, reg_name, model)
        finally:
            if reg is not None:
                reg.close()


def _check_crashed_creation(name: str, point: str, run: Run, model: Model) -> None:
    """A creator killed mid-build: no registry exists; the next creator builds a clean one and
    removes the dead creator's segments (shmreg._engine.store.Store._try_create)."""
    assert run.lines == []
    assert not os.path.exists(f"/dev/shm/shmreg-{name}"), "a half-built root was published"
    leftovers = list_segments(f"shmreg-{name}.")
    assert leftovers, "the killed creator left nothing: did it die where the point says?"
    assert any(".init-" in s for s in leftovers) == (point == "create.root_built"), leftovers
    with pytest.raises(shmreg.RegistryNotFound):
        shmreg.Registry.attach(name)
    assert not _fsck.check(name).ok
    reg = shmreg.Registry(name, capacity=BIG_CAPACITY)
    try:
        incarnation = _incarnation(reg)
        assert list_segments(f"shmreg-{name}.") == [L.data_name(name, incarnation, 1)]
        assert reg.stats().used == 0
        assert list(reg.watch(since=0, timeout=0)) == []
        _setup_entry(reg, model, NS, "first", {"first": True})
        gen = reg.register(*SENTINEL[:2], pid=model.keeper, metadata=SENTINEL[2])
        model.registered(*SENTINEL, gen)
        _check_invariants(reg, name, model)
        _further_writes(reg, name, model)
        # A process that attaches afresh sees the same registry.
        other = shmreg.Registry.attach(name)
        try:
            assert other.lookup_with_metadata(NS, "first") == (model.keeper, {"first": True})
        finally:
            other.close()
    finally:
        reg.close()


def _crash_raced_creator(name: str, point: str, reg: shmreg.Registry, model: Model,
                         kids: Children) -> None:
    """A creator that lost the race dies mid-build next to a live registry: the registry is
    untouched, fsck reports the creator's segments as strays and ``fsck --repair`` removes
    them (an attacher never creates, so only a repair can)."""
    run = _run(kids, {"name": name, "capacity": BIG_CAPACITY, "raw_create": True}, point)
    if point not in REACHES["create_raced"]:
        assert run.returncode == 0 and run.stderr == "", run.stderr
        assert run.lines == [{"raw_create": False}]  # lost the link, removed its own segments
        pytest.skip(f"{point} is not on the create_raced path (the creator finished normally)")
    assert run.killed, f"creator exited {run.returncode}, not by SIGKILL:\n{run.stderr}"
    assert run.lines == []
    current = L.data_name(name, _incarnation(reg), 1)
    strays = [s for s in list_segments(f"shmreg-{name}.") if s != current]
    assert strays, "the killed creator left nothing behind"
    assert any(".init-" in s for s in strays) == (point == "create.root_built"), strays
    # The live registry is unaffected: reads, writes and its events.
    gen = reg.register(*SENTINEL[:2], pid=model.keeper, metadata=SENTINEL[2])
    model.registered(*SENTINEL, gen)
    for (ns, svc), meta in model.live.items():
        assert reg.lookup_with_metadata(ns, svc) == (model.keeper, meta)
    report = _fsck.check(name)
    assert not report.ok
    assert all(p.startswith("stray segment") for p in report.problems), report.problems
    assert {p.split()[-1] for p in report.problems} == set(strays)
    repaired = _fsck.check(name, repair=True)
    assert any(r.startswith("removed stray segment") for r in repaired.repaired), repaired
    # Only the live registry's segments remain (the repair also rebuilt the table once).
    assert list_segments(f"shmreg-{name}.") == [L.data_name(name, _incarnation(reg), 2)]
    _check_invariants(reg, name, model)
    _further_writes(reg, name, model)


# ------------------------------------------------------------------ recovery itself


def _recovery_matrix() -> list[Any]:
    params = []
    for first in WRITE_POINTS + REBUILD_POINTS:
        for second in RECOVER_POINTS:
            reachable = second == "recover.tombstoned" or first in JOURNALED
            default = first in WRITE_POINTS and (
                reachable or (first, second) == ("commit.staged", "recover.replayed"))
            marks = () if default else (pytest.mark.slow,)
            params.append(pytest.param(first, second, reachable, marks=marks,
                                       id=f"{first}-then-{second}"))
    return params


@pytest.mark.parametrize(("first", "second", "reachable"), _recovery_matrix())
def test_crash_during_recovery(first: str, second: str, reachable: bool, reg_name: str) -> None:
    """A writer dies at ``first``; the next writer dies recovering (at ``second``); a third
    process recovers, and finds the first writer's operation whole or absent."""
    path = "growth" if first in REBUILD_POINTS else "register_new"
    capacity = GROWTH_CAPACITY if path == "growth" else BIG_CAPACITY
    with destroying(reg_name), children() as kids:
        reg = shmreg.Registry.create(reg_name, capacity=capacity)
        try:
            keeper = kids.sleeper().pid
            model = Model(keeper)
            _setup(path, reg, model, kids)
            ops = [*_pre_ops(keeper), _target_op(path, keeper)]
            run = _run(kids, {"name": reg_name, "capacity": capacity, "ops": ops},
                       _crash_spec(first))
            assert run.killed, run.stderr
            assert len(run.acks) == PRE_OPS
            _apply_pre_acks(model, run, ops)

            # The second writer recovers on its first write, and dies doing it.
            second_ops = [["register", NS, "second", keeper, {"second": True}]]
            run2 = _run(kids, {"name": reg_name, "capacity": capacity, "ops": second_ops},
                        second)
            if not reachable:
                _assert_unreachable(run2, 1, f"recovery after {first} at {second}")
                pytest.skip(f"nothing to replay after {first}: {second} is not reached")
            assert run2.killed, f"recovering writer exited {run2.returncode}:\n{run2.stderr}"
            assert run2.lines == [{"opened": True}]
            # What the dead recoverer left: replayed but not retired, or all but the recount.
            report = _fsck.check(reg_name)
            assert "died holding the lock" in "\n".join(report.problems)
            journal_left = second == "recover.replayed"
            assert any("journal is valid" in p for p in report.problems) == journal_left
            assert not any("half-written" in p for p in report.problems), report.problems

            # This process is the third: its first write recovers.
            _write_sentinel(reg, model)
            _judge(path, first, reg, model, None)
            _sentinel_event(model)
            assert _state(reg, NS, "second") == ("absent", None)  # died before its commit
            _check_invariants(reg, reg_name, model)
            _further_writes(reg, reg_name, model)
        finally:
            reg.close()


# ------------------------------------------------------------------ a reader comes first

_READER_CODE = r"""
name, ns, target = sys.argv[1:4]
reg = shmreg.Registry.attach(name)
found = reg.lookup_with_metadata(ns, target)  # the first touch: may meet the odd slot
listed = reg.list_services_with_metadata(ns)
report({"found": found, "listed": sorted(listed.items(), key=repr), "count": reg.count(ns),
        "owner_word": reg.backend.store.rq[3]})
reg.close()
"""


def _reader_matrix() -> list[Any]:
    params = []
    for path in ("register_new", "update_replace", "unregister"):
        for point in WRITE_POINTS:
            default = path != "unregister" or point in ODD_SLOT
            marks = () if default else (pytest.mark.slow,)
            params.append(pytest.param(path, point, marks=marks, id=f"{path}-{point}"))
    return params


@pytest.mark.parametrize(("path", "point"), _reader_matrix())
def test_reader_first_after_crash(path: str, point: str, reg_name: str) -> None:
    """After the kill a reader is first: it neither hangs nor sees a torn entry, a slot left
    odd makes it take the lock and recover, and what it saw is never rolled back."""
    with destroying(reg_name), children() as kids:
        reg = shmreg.Registry.create(reg_name, capacity=BIG_CAPACITY)
        try:
            keeper = kids.sleeper().pid
            model = Model(keeper)
            victim = _setup(path, reg, model, kids)
            ops = [*_pre_ops(keeper), _target_op(path, keeper)]
            run = _run(kids, {"name": reg_name, "capacity": BIG_CAPACITY, "ops": ops},
                       _crash_spec(point))
            assert run.killed, run.stderr
            assert len(run.acks) == PRE_OPS
            _apply_pre_acks(model, run, ops)

            reader = kids.py(_READER_CODE, reg_name, NS, TARGET)
            out, err = reader.communicate(timeout=DEADLINE_S)  # a hang fails here
            assert reader.returncode == 0 and err == "", err
            [seen] = [json.loads(x) for x in out.splitlines()]
            old = OLD if path != "register_new" else None
            new = {"register_new": NEW, "update_replace": UPDATE, "unregister": None}[path]
            allowed = [None if m is None else [keeper, m] for m in (old, new)]
            assert seen["found"] in allowed, seen
            others = {svc: meta for (ns, svc), meta in model.live.items()
                      if ns == NS and svc != TARGET}
            listed = {svc: meta for svc, meta in seen["listed"]}
            target = listed.pop(TARGET, None)
            assert listed == others
            assert target in (old, new), target
            assert seen["count"] == len(others) + (target is not None)
            # A slot left odd stalls readers only until one of them recovers it.
            assert (seen["owner_word"] == 0) == (point in ODD_SLOT), seen

            _write_sentinel(reg, model, recovers=point not in ODD_SLOT)
            applied = _judge(path, point, reg, model, victim)
            _sentinel_event(model)
            if seen["found"] != allowed[0] and old != new:
                assert applied, "a reader saw the change, and recovery rolled it back"
            _check_invariants(reg, reg_name, model)
            _further_writes(reg, reg_name, model)
        finally:
            reg.close()

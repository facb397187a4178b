"""A model of the registry, checked step by step against real processes.

A hypothesis ``RuleBasedStateMachine`` drives a small pool of long-lived helper processes
(each a child interpreter reading JSON commands on stdin and answering on stdout). Each
registers its own pid, updates, unregisters and looks up; the test process updates,
unregisters and sweeps; a helper can be killed with SIGKILL (and replaced by a fresh one);
a process that never saw the registry attaches and reads everything; a helper registers
many names at once to force the table to grow into a new generation.

The model is a plain dict ``(namespace, service) -> (pid, metadata, generation)``, plus the
"ghosts": entries of killed owners still in the table until a sweep or a takeover removes
them. After every step, for every key ever used: ``lookup`` and ``lookup_with_metadata``
agree with the model (a killed owner's entries are absent), ``list_services`` of each
namespace and ``count`` equal the model's, and fsck finds nothing wrong.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from helpers import Children, alarm_after, read_line, send_line
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import shmreg
from shmreg._engine.fsck import check

WORKERS = 3
NAMESPACES = ("m-a", "m-b")
BULK = "m-bulk"

# ------------------------------------------------------------------------------ helpers

HELPER = r"""
import json, os, sys
import shmreg

def decode(value):
    if isinstance(value, dict) and "tuple" in value:
        return tuple(decode(v) for v in value["tuple"])
    return value

def encode(value):
    if isinstance(value, tuple):
        return {"tuple": [encode(v) for v in value]}
    return value

reg = None
report({"ready": os.getpid()})
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd["op"]
    try:
        if op == "attach":
            if reg is not None:
                reg.close()
            reg = shmreg.Registry.attach(cmd["name"])
            out = {"ok": True}
        elif op == "detach":
            if reg is not None:
                reg.close()
            reg = None
            out = {"ok": True}
        elif op == "exit":
            report({"ok": True})
            break
        elif op == "register":
            out = {"ok": reg.register(cmd["ns"], decode(cmd["svc"]), metadata=cmd["meta"])}
        elif op == "register_many":
            items = [(decode(s), None, m) for s, m in cmd["items"]]
            out = {"ok": reg.register_many(cmd["ns"], items)}
        elif op == "update":
            reg.update_metadata(cmd["ns"], decode(cmd["svc"]), cmd["meta"], merge=cmd["merge"])
            out = {"ok": None}
        elif op == "unregister":
            out = {"ok": reg.unregister(cmd["ns"], decode(cmd["svc"]))}
        elif op == "read_all":
            out = {"ok": {
                "lookups": [reg.lookup_with_metadata(ns, decode(s)) for ns, s in cmd["keys"]],
                "pids": [reg.lookup(ns, decode(s)) for ns, s in cmd["keys"]],
                "lists": {ns: [encode(s) for s in reg.list_services(ns)]
                          for ns in cmd["namespaces"]},
                "count": reg.count(),
            }}
        else:
            out = {"error": "unknown op " + op}
    except shmreg.ShmregError as exc:
        out = {"error": type(exc).__name__, "code": exc.code, "pid": getattr(exc, "pid", None)}
    except BaseException as exc:
        out = {"error": "not-shmreg", "type": type(exc).__name__, "msg": str(exc)}
    report(out)
"""


def encode(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"tuple": [encode(v) for v in value]}
    return value


def decode(value: Any) -> Any:
    if isinstance(value, dict) and "tuple" in value:
        return tuple(decode(v) for v in value["tuple"])
    return value


def deadline(what: str, seconds: float = 30.0) -> contextlib.AbstractContextManager[None]:
    """Turn a helper that stopped answering into a failure instead of a hung test run."""
    return alarm_after(seconds, AssertionError, f"{what} within {seconds} s")


class Helper:
    """One helper process: send a command, read its one-line answer."""

    def __init__(self, kids: Children) -> None:
        self.proc = kids.py(HELPER, stdin=subprocess.PIPE)
        self.ready = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self) -> None:
        if not self.ready:
            assert read_line(self.proc) == {"ready": self.proc.pid}
            self.ready = True

    def call(self, **cmd: Any) -> Any:
        with deadline(f"helper {self.pid} did not answer {cmd}"):
            self.wait_ready()
            send_line(self.proc, cmd)
            reply = read_line(self.proc)
        assert reply.get("error") != "not-shmreg", f"helper {self.pid}: {cmd} -> {reply}"
        return reply

    def kill(self) -> None:
        """SIGKILL and reap: afterwards the pid names nobody (no zombie to look alive)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


class Pool:
    """The helpers of a test run, and spares that have already imported shmreg."""

    def __init__(self, kids: Children) -> None:
        self.kids = kids
        self.workers = [Helper(kids) for _ in range(WORKERS)]
        self.spares = [Helper(kids) for _ in range(2)]
        self.dead: set[int] = set()

    def fresh(self) -> Helper:
        """A helper that never attached to anything (a spare; a new spare starts now)."""
        while True:
            helper = self.spares.pop(0)
            self.spares.append(Helper(self.kids))
            helper.wait_ready()
            if helper.pid not in self.dead:
                return helper
            helper.kill()  # a pid reused within the test would look like the dead owner

    def replace(self, index: int) -> tuple[int, Helper]:
        old = self.workers[index]
        old.kill()
        self.dead.add(old.pid)
        self.workers[index] = self.fresh()
        return old.pid, self.workers[index]


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    with Children() as kids:
        yield Pool(kids)


# ------------------------------------------------------------------------------ machine

services = st.sampled_from(["s0", "s1", "s2", 3, ("agent", 1)])
keys = st.tuples(st.sampled_from(NAMESPACES), services)
metadata = st.dictionaries(
    st.sampled_from(["type", "n", "caps", "x"]),
    st.one_of(st.integers(-5, 5), st.text(max_size=3), st.lists(st.integers(0, 3), max_size=2)),
    max_size=3,
)
actors = st.integers(-1, WORKERS - 1)  # -1: the test process itself

Key = tuple[str, Any]


class RegistryModel(RuleBasedStateMachine):
    pool: ClassVar[Pool]

    def __init__(self) -> None:
        super().__init__()
        self.name = f"t-{os.getpid()}-{uuid.uuid4().hex[:10]}"
        self.reg: shmreg.Registry | None = shmreg.Registry.create(self.name, capacity=16)
        self.model: dict[Key, tuple[int, dict[str, Any], int]] = {}
        self.ghosts: dict[Key, int] = {}
        self.last_generation: dict[Key, int] = {}
        self.seen: set[Key] = set()
        self.bulk = 0

    @initialize()
    def attach_workers(self) -> None:
        for worker in self.pool.workers:
            assert worker.call(op="attach", name=self.name) == {"ok": True}

    def teardown(self) -> None:
        for worker in self.pool.workers:
            try:
                worker.call(op="detach")
            except Exception:
                pass
        if self.reg is not None:
            self.reg.destroy()
            self.reg = None

    @property
    def r(self) -> shmreg.Registry:
        assert self.reg is not None
        return self.reg

    # ------------------------------------------------------------------- expectations

    def _registered(self, key: Key, pid: int, meta: dict[str, Any], generation: int) -> None:
        current = self.model.get(key)
        if current is not None and current[0] == pid:
            assert generation == current[2], "same owner again: generation must not move"
        else:
            previous = self.last_generation.get(key, 0)
            assert generation > previous, f"new owner: generation {generation} <= {previous}"
        self.model[key] = (pid, meta, generation)
        self.last_generation[key] = generation
        self.ghosts.pop(key, None)  # a takeover removes the dead owner's entry

    # -------------------------------------------------------------------------- rules

    @rule(worker=st.integers(0, WORKERS - 1), key=keys, meta=metadata)
    def register(self, worker: int, key: Key, meta: dict[str, Any]) -> None:
        helper = self.pool.workers[worker]
        self.seen.add(key)
        reply = helper.call(op="register", ns=key[0], svc=encode(key[1]), meta=meta)
        holder = self.model.get(key)
        if holder is None or holder[0] == helper.pid:
            assert "ok" in reply, reply
            event(
                "register: takeover of a dead owner"
                if key in self.ghosts
                else "register: new or same owner"
            )
            self._registered(key, helper.pid, meta, reply["ok"])
        else:
            assert reply == {"error": "AlreadyRegistered", "code": 3004, "pid": holder[0]}, reply
            event("register: AlreadyRegistered")

    @precondition(lambda self: self.ghosts)
    @rule(worker=st.integers(0, WORKERS - 1), data=st.data(), meta=metadata)
    def take_over(self, worker: int, data: st.DataObject, meta: dict[str, Any]) -> None:
        """Register a name whose owner was killed and not yet swept: the new owner wins."""
        key = data.draw(st.sampled_from(sorted(self.ghosts, key=repr)))
        self.register(worker, key, meta)

    @rule(actor=actors, key=keys, meta=metadata, merge=st.booleans())
    def update(self, actor: int, key: Key, meta: dict[str, Any], merge: bool) -> None:
        self.seen.add(key)
        if actor < 0:
            try:
                self.r.update_metadata(key[0], key[1], meta, merge=merge)
                reply: dict[str, Any] = {"ok": None}
            except shmreg.NotRegistered:
                reply = {"error": "NotRegistered"}
        else:
            reply = self.pool.workers[actor].call(
                op="update", ns=key[0], svc=encode(key[1]), meta=meta, merge=merge
            )
        if key in self.model:
            assert reply == {"ok": None}, reply
            pid, old, generation = self.model[key]
            self.model[key] = (pid, {**old, **meta} if merge else meta, generation)
        else:
            assert reply.get("error") == "NotRegistered", reply

    @rule(actor=actors, key=keys)
    def unregister(self, actor: int, key: Key) -> None:
        self.seen.add(key)
        if actor < 0:
            was = self.r.unregister(key[0], key[1])
        else:
            reply = self.pool.workers[actor].call(op="unregister", ns=key[0], svc=encode(key[1]))
            was = reply["ok"]
        # "Was it there": a live entry yes; a dead owner's leftover is removed but was not.
        assert was is (key in self.model), (key, was)
        self.model.pop(key, None)
        self.ghosts.pop(key, None)

    @rule(worker=st.integers(0, WORKERS - 1))
    def kill_owner(self, worker: int) -> None:
        dead_pid, fresh = self.pool.replace(worker)
        assert fresh.call(op="attach", name=self.name) == {"ok": True}
        for key, (pid, _, _) in list(self.model.items()):
            if pid == dead_pid:
                del self.model[key]
                self.ghosts[key] = pid
                event("kill: an owner of entries")

    @rule()
    def sweep(self) -> None:
        event(f"sweep: removes {min(len(self.ghosts), 2)}+" if self.ghosts else "sweep: none")
        assert self.r.sweep() == len(self.ghosts)
        self.ghosts.clear()

    @rule()
    def fresh_process_reads_everything(self) -> None:
        reader = self.pool.fresh()
        try:
            assert reader.call(op="attach", name=self.name) == {"ok": True}
            order = sorted(self.seen, key=repr)
            namespaces = [*NAMESPACES, BULK]
            got = reader.call(
                op="read_all", keys=[[ns, encode(s)] for ns, s in order], namespaces=namespaces
            )["ok"]
            for key, found, pid in zip(order, got["lookups"], got["pids"], strict=True):
                want = self.model.get(key)
                assert found == (None if want is None else [want[0], want[1]]), key
                assert pid == (None if want is None else want[0]), key
            for ns in namespaces:
                listed = sorted((decode(s) for s in got["lists"][ns]), key=repr)
                assert listed == sorted((s for n, s in self.model if n == ns), key=repr), ns
            assert got["count"] == len(self.model)
            assert reader.call(op="exit") == {"ok": True}
            reader.proc.wait()
        finally:
            reader.kill()

    @precondition(lambda self: self.bulk < 120)
    @rule(worker=st.integers(0, WORKERS - 1), n=st.integers(8, 30))
    def grow(self, worker: int, n: int) -> None:
        helper = self.pool.workers[worker]
        names = [f"b{i}" for i in range(self.bulk, self.bulk + n)]
        self.bulk += n
        metas = [{"type": "bulk", "i": i} for i in range(n)]
        reply = helper.call(
            op="register_many",
            ns=BULK,
            items=[[name, meta] for name, meta in zip(names, metas, strict=True)],
        )
        assert "ok" in reply and len(reply["ok"]) == n, reply
        for name, meta, generation in zip(names, metas, reply["ok"], strict=True):
            key = (BULK, name)
            self.seen.add(key)
            self._registered(key, helper.pid, meta, generation)
        # Past the 16 the registry was created for: the table has grown to hold them all.
        assert self.r.stats().capacity >= len(self.model) + len(self.ghosts)

    # --------------------------------------------------------------------- invariants

    @invariant()
    def reads_agree_with_the_model(self) -> None:
        reg = self.r
        for key in self.seen:
            want = self.model.get(key)
            assert reg.lookup(*key) == (None if want is None else want[0]), key
            assert reg.lookup_with_metadata(*key) == (None if want is None else want[:2]), key
            assert reg.registered(*key) is (want is not None), key
        for ns in (*NAMESPACES, BULK):
            listed = sorted(reg.list_services(ns), key=repr)
            assert listed == sorted((s for n, s in self.model if n == ns), key=repr), ns
            assert reg.count(ns) == sum(1 for n, _ in self.model if n == ns)
        assert reg.count() == len(self.model)

    @invariant()
    def fsck_is_clean(self) -> None:
        report = check(self.name)
        assert report.ok, report.problems
        assert report.entries == len(self.model) + len(self.ghosts)


MODEL = settings(
    max_examples=15,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_registry_matches_the_model(pool: Pool) -> None:
    RegistryModel.pool = pool
    run_state_machine_as_test(RegistryModel, settings=MODEL)


@pytest.mark.slow
def test_registry_matches_the_model_soak(pool: Pool) -> None:
    RegistryModel.pool = pool
    run_state_machine_as_test(
        RegistryModel, settings=settings(MODEL, max_examples=80, stateful_step_count=60)
    )


def test_helpers_speak_the_protocol(pool: Pool, reg_name: str) -> None:
    """The helper program itself: errors come back as shmreg errors with their codes."""
    with shmreg.Registry.create(reg_name) as reg:
        try:
            helper = pool.workers[0]
            assert helper.call(op="attach", name=reg_name) == {"ok": True}
            assert helper.call(op="register", ns="p", svc=encode(("a", 1)), meta={"x": 1})["ok"]
            assert reg.lookup_with_metadata("p", ("a", 1)) == (helper.pid, {"x": 1})
            reply = helper.call(op="update", ns="p", svc="nope", meta={}, merge=False)
            assert reply == {"error": "NotRegistered", "code": 3005, "pid": None}
            assert json.dumps(encode(("a", (1, "b")))) == '{"tuple": ["a", {"tuple": [1, "b"]}]}'
            assert decode(encode(("a", (1, "b")))) == ("a", (1, "b"))
            assert helper.call(op="detach") == {"ok": True}
        finally:
            reg.destroy()

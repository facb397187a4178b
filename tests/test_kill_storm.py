"""Random SIGKILL storms: several writers on one key space, killed and restarted at random.

Four independent interpreters each run a random mix of register / update_metadata (replace
or merge) / unregister over a shared set of keys, all owned by one long-lived ``sleep``
process (so no entry disappears because its writer died). Each writer logs a line before
every call (what it is about to do, with a CLOCK_MONOTONIC time) and a line after it (the
result and the time), flushing both; the call between is "in flight". The test kills a random
writer at random times with SIGKILL and starts a replacement, until the time is up, then
kills the rest.

Afterwards one write runs recovery and every key is checked against a model built from the
logs: its state must be what the last acknowledged operation on it left, or what an
operation in flight when its writer died would leave. With several writers "last" is a
partial order: an operation is superseded only by an acknowledged one that started after it
ended (an in-flight operation ends when its writer was reaped). Metadata is unique per call,
so a state no call could have produced cannot pass. The seed is printed; the number of
kills, operations checked and lost registrations (always 0) are printed and recorded.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import soak_seconds
from helpers import CHILD_PRELUDE, DEADLINE_S, REPO, Children, child_env, children, destroying

import shmreg
from shmreg import _fsck
from shmreg import _layout as L
from shmreg._segment import list_segments

NS = "storm"
KEYS = 24
WRITERS = 4
CAPACITY = 8  # small: the storm grows and compacts the table over and over

_WRITER_CODE = r"""
import random
name, ns, owner, wid, inc, seed, logpath, nkeys = sys.argv[1:9]
owner, wid, inc, nkeys = int(owner), int(wid), int(inc), int(nkeys)
rng = random.Random(int(seed))
reg = shmreg.Registry.attach(name)
now = time.monotonic_ns
with open(logpath, "w") as log:
    n = 0
    while True:
        key = f"k{rng.randrange(nkeys)}"
        r = rng.random()
        op = "register" if r < 0.45 else "update" if r < 0.75 else "unregister"
        merge = rng.random() < 0.5
        # Every call's metadata is unique; a merge carries every field, so it equals a replace.
        meta = {"w": wid, "i": inc, "n": n, "pad": "x" * rng.randrange(0, 300)}
        log.write(json.dumps({"b": n, "op": op, "key": key, "meta": meta, "t": now()}) + "\n")
        log.flush()
        try:
            if op == "register":
                res = reg.register(ns, key, pid=owner, metadata=meta)
            elif op == "update":
                reg.update_metadata(ns, key, meta, merge=merge)
                res = "ok"
            else:
                res = reg.unregister(ns, key)
        except shmreg.NotRegistered:
            res = "notregistered"
        log.write(json.dumps({"a": n, "res": res, "t": now()}) + "\n")
        log.flush()
        n += 1
"""


@dataclass
class Op:
    """One call on one key: its interval and the state it leaves if applied."""

    key: str
    start: int
    end: int  # acknowledged: when the ack was logged; in flight: when the writer was reaped
    after: tuple[str, Any]  # ("present", metadata) or ("absent", None)
    acked: bool
    changes: bool  # it appends an event when applied


@dataclass
class Writer:
    wid: int
    inc: int
    proc: subprocess.Popen[str]
    log: Path


def _start(kids: Children, name: str, owner: int, wid: int, inc: int, seed: int,
           log: Path) -> Writer:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_PRELUDE + "\n" + _WRITER_CODE, name, NS, str(owner),
         str(wid), str(inc), str(seed), str(log), str(KEYS)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=child_env(), cwd=str(REPO), text=True, start_new_session=True,
    )
    kids.add(proc)
    return Writer(wid, inc, proc, log)


def _kill(writer: Writer) -> int:
    """SIGKILL and reap; return the time it was certainly dead (CLOCK_MONOTONIC ns)."""
    if writer.proc.poll() is not None:
        _, err = writer.proc.communicate()
        raise AssertionError(f"writer {writer.wid}.{writer.inc} exited "
                             f"{writer.proc.returncode} on its own:\n{err}")
    writer.proc.kill()
    _, err = writer.proc.communicate(timeout=DEADLINE_S)
    assert writer.proc.returncode == -9, err
    return time.monotonic_ns()


def _parse(log: Path, killed_at: int) -> tuple[list[Op], int]:
    """Operations of one writer's log: acknowledged ones, plus at most one in flight."""
    text = log.read_text() if log.exists() else ""
    lines = [json.loads(x) for x in text.split("\n")[:-1]]  # a cut-off last line never landed
    ops: list[Op] = []
    pending: dict[str, Any] | None = None
    for line in lines:
        if "b" in line:
            assert pending is None, f"{log}: two calls in flight"
            pending = line
            continue
        assert pending is not None and line["a"] == pending["b"], f"{log}: ack without call"
        op, res, meta = pending["op"], line["res"], pending["meta"]
        if op == "register":
            assert isinstance(res, int) and res > 0, res
            after: tuple[str, Any] = ("present", meta)
            changes = True
        elif op == "update":
            assert res in ("ok", "notregistered"), res
            after = ("present", meta) if res == "ok" else ("absent", None)
            changes = res == "ok"
        else:
            assert isinstance(res, bool), res
            after, changes = ("absent", None), res
        ops.append(Op(pending["key"], pending["t"], line["t"], after, True, changes))
        pending = None
    if pending is not None:  # started, never acknowledged: may or may not have landed
        after = ("absent", None) if pending["op"] == "unregister" else ("present",
                                                                         pending["meta"])
        ops.append(Op(pending["key"], pending["t"], killed_at, after, False, True))
    return ops, len(lines)


def _candidates(ops: list[Op]) -> list[tuple[str, Any]]:
    """States a key may be in: left by an operation no acknowledged one surely followed."""
    acked = [op for op in ops if op.acked]
    latest_start = max((op.start for op in acked), default=-1)
    out = [op.after for op in ops if not latest_start > op.end]
    if not acked:
        out.append(("absent", None))  # nothing acknowledged: maybe nothing ever landed
    return out


def _storm(name: str, tmp_path: Path, seconds: float, record_property: Any) -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"\nkill storm: seed {seed}, {seconds:.1f} s, {WRITERS} writers, {KEYS} keys")
    rng = random.Random(seed)
    kills = 0
    logs: list[tuple[Path, int]] = []  # every writer's log with the time it was reaped
    with destroying(name), children() as kids:
        reg = shmreg.Registry.create(name, capacity=CAPACITY)
        try:
            owner = kids.sleeper(600).pid

            def start(wid: int, inc: int) -> Writer:
                log = tmp_path / f"w{wid}.{inc}.log"
                return _start(kids, name, owner, wid, inc, rng.getrandbits(32), log)

            writers = [start(wid, 0) for wid in range(WRITERS)]
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                time.sleep(rng.uniform(0.02, 0.25))  # a random kill time, not a timing assert
                victim = writers[rng.randrange(WRITERS)]
                starting = not victim.log.exists() or victim.log.stat().st_size == 0
                if starting and victim.proc.poll() is None:
                    continue  # still starting up: let it reach its loop first
                logs.append((victim.log, _kill(victim)))
                kills += 1
                writers[victim.wid] = start(victim.wid, victim.inc + 1)
            for writer in writers:  # the end of the storm kills the rest, mid-call or not
                logs.append((writer.log, _kill(writer)))
                kills += 1

            by_key: dict[str, list[Op]] = {f"k{i}": [] for i in range(KEYS)}
            lines = 0
            for log, killed_at in logs:
                ops, n = _parse(log, killed_at)
                lines += n
                for op in ops:
                    by_key[op.key].append(op)
            acked = sum(op.acked for ops in by_key.values() for op in ops)
            in_flight = sum(not op.acked for ops in by_key.values() for op in ops)
            assert in_flight <= kills

            # One write: it recovers whatever the last writer to die left behind.
            reg.register("sentinel", "s", pid=owner, metadata={"sentinel": True})
            assert int(reg.backend.store.rq[L.R_OWNER_PID]) == 0  # type: ignore[attr-defined]

            state: dict[str, tuple[str, Any]] = {}
            for key in by_key:
                found = reg.lookup_with_metadata(NS, key)
                if found is None:
                    state[key] = ("absent", None)
                else:
                    assert found[0] == owner, (key, found)
                    state[key] = ("present", found[1])
            lost = wrong = 0
            problems = []
            for key, ops in by_key.items():
                allowed = _candidates(ops)
                if state[key] in allowed:
                    continue
                if state[key][0] == "absent":
                    lost += 1
                else:
                    wrong += 1
                problems.append(f"{key}: {state[key]!r} not in {allowed!r}")

            summary = {"seed": seed, "kills": kills, "ops_checked": acked,
                       "in_flight": in_flight, "lost_registrations": lost,
                       "impossible_states": wrong, "keys": KEYS,
                       "present": sum(s[0] == "present" for s in state.values()),
                       "recoveries": int(reg.stats().extra["recoveries"]),
                       "generation": int(reg.stats().extra["generation"])}
            for k, v in summary.items():
                record_property(k, v)
            print("kill storm result:", json.dumps(summary))
            assert not problems, "\n".join(problems)
            assert lost == 0 and wrong == 0
            assert kills >= WRITERS and acked > 0

            _check_consistent(reg, name, state, by_key, owner)
        finally:
            reg.close()


def _check_consistent(reg: shmreg.Registry, name: str, state: dict[str, tuple[str, Any]],
                      by_key: dict[str, list[Op]], owner: int) -> None:
    """Counters, fsck, segments and the event ring agree with the table."""
    present = {k: s[1] for k, s in state.items() if s[0] == "present"}
    assert reg.list_services_with_metadata(NS) == present
    assert reg.list_services_with_metadata("sentinel") == {"s": {"sentinel": True}}
    rows = reg.backend.dump()
    assert all(r["alive"] and r["pid"] == owner for r in rows)
    stats = reg.stats()
    assert stats.used == len(rows) == len(present) + 1 == reg.count()
    report = _fsck.check(name)
    assert report.ok, report.problems
    store = reg.backend.store  # type: ignore[attr-defined]
    assert list_segments(f"shmreg-{name}.") == [
        L.data_name(name, store.incarnation, stats.extra["generation"])]

    # Events: one per applied change. Acknowledged changes all applied; each in-flight call
    # added at most one; the sentinel one.
    acked_changes = sum(op.changes for ops in by_key.values() for op in ops if op.acked)
    in_flight = sum(not op.acked for ops in by_key.values() for op in ops)
    last = reg.backend.last_event_seq()  # type: ignore[attr-defined]
    assert acked_changes + 1 <= last <= acked_changes + in_flight + 1, (acked_changes, last)
    since = max(0, last - L.RING_EVENTS)
    events = list(reg.watch(since=since, timeout=0))
    assert [e.seq for e in events] == list(range(since + 1, last + 1))
    assert Counter(e.kind for e in events).keys() <= {"registered", "updated", "unregistered"}
    newest: dict[str, str] = {}
    for e in events:
        assert e.pid == owner
        if e.namespace == NS:
            assert e.service in by_key, e
            newest[e.service] = e.kind
    assert events[-1].namespace == "sentinel"
    for key, kind in newest.items():  # the last event of each key matches its state
        assert (kind != "unregistered") == (key in present), (key, kind)

    # Further writes succeed; recovery then has nothing to do.
    reg.register(NS, "after", pid=owner, metadata={"after": 1})
    reg.update_metadata(NS, "after", {"after": 2}, merge=True)
    assert reg.unregister(NS, "after") is True
    table = store.begin()
    try:
        assert table.recover() == []
    finally:
        store.end()
    assert _fsck.check(name).ok


def test_kill_storm(reg_name: str, tmp_path: Path, record_property: Any) -> None:
    _storm(reg_name, tmp_path, 5.0, record_property)


@pytest.mark.slow
def test_kill_storm_soak(reg_name: str, tmp_path: Path, record_property: Any) -> None:
    _storm(reg_name, tmp_path, soak_seconds(), record_property)

"""Random SIGKILL storms: several writers on one key space, killed and restarted at random.

Four independent interpreters each run a random mix of register / update_metadata (replace
or merge) / unregister over a shared set of keys, all owned by one long-lived ``sleep``
process (so no entry disappears because its writer died). Each writer logs a line before
every call (what it is about to do, with a CLOCK_MONOTONIC time) and a line after it (the
result and the time), flushing both; the call between is "in flight". The test kills a random
writer at random times with SIGKILL and starts a replacement, until the time is up, then
kills the rest.

Afterwards one write runs recovery and the whole final state (every key of the key space:
present or absent, metadata, owner and generation, and nothing else in the namespace) is
compared with a model replayed from the logs: a key's state must be what the last
acknowledged operation on it left, or what an operation in flight when its writer died
would leave. With several writers "last" is a partial order: an operation is superseded
only by an acknowledged one that started after it ended (an in-flight operation ends when
its writer was reaped). Metadata is unique per call, so a state no call could have produced
cannot pass. Generations are fencing tokens: a present key carries the newest generation an
acknowledged ``register`` of it returned, or a newer one only if a ``register`` of it was in
flight; and of two acknowledged ``register`` calls on one key, the later never returned a
smaller generation. An acknowledged call that found a key absent (``update`` ->
NotRegistered, ``unregister`` -> False) must be explained by a removal that could have run
between it and the last call that surely left the key present. The seed is printed
(``SHMREG_TEST_SEED`` replays it); the number of kills, operations replayed, keys,
metadata, owners and generations compared, and lost registrations (always 0) are printed
and recorded.
"""

from __future__ import annotations

import bisect
import itertools
import json
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
from helpers import (
    CHILD_PRELUDE,
    DEADLINE_S,
    REPO,
    Children,
    child_env,
    children,
    destroying,
    test_seed,
)

import shmreg
from shmreg._engine import fsck as _fsck
from shmreg._engine import layout as L
from shmreg._engine.segment import list_segments

NS = "storm"
KEYS = 24
WRITERS = 4
CAPACITY = 8  # small: the storm grows and compacts the table over and over
STORM_SECONDS = 5.0  # the default run; the soak runs SHMREG_SOAK_SECONDS (20)

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
    gen: int | None = None  # what an acknowledged register returned
    registers: bool = False  # a register call (acknowledged or in flight)


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
        gen = res if op == "register" else None
        ops.append(Op(pending["key"], pending["t"], line["t"], after, True, changes, gen,
                      op == "register"))
        pending = None
    if pending is not None:  # started, never acknowledged: may or may not have landed
        after = ("absent", None) if pending["op"] == "unregister" else ("present",
                                                                         pending["meta"])
        ops.append(Op(pending["key"], pending["t"], killed_at, after, False, True, None,
                      pending["op"] == "register"))
    return ops, len(lines)


def _candidates(ops: list[Op]) -> list[tuple[str, Any]]:
    """States a key may be in: left by an operation no acknowledged one surely followed."""
    acked = [op for op in ops if op.acked]
    latest_start = max((op.start for op in acked), default=-1)
    out = [op.after for op in ops if not latest_start > op.end]
    if not acked:
        out.append(("absent", None))  # nothing acknowledged: maybe nothing ever landed
    return out


def compare(by_key: dict[str, list[Op]], final: dict[Any, tuple[int, Any, int]],
            owner: int) -> tuple[list[str], dict[str, int]]:
    """Compare the registry's final namespace (service -> (pid, metadata, generation)) with
    the model replayed from the logs; return every discrepancy and what was compared."""
    problems: list[str] = []
    counts = dict.fromkeys(("keys_compared", "metadata_compared", "owners_compared",
                            "generations_compared", "register_results_ordered",
                            "absence_results_checked",
                            "lost_registrations", "impossible_states"), 0)
    for extra in sorted(set(final) - set(by_key), key=repr):
        problems.append(f"{extra!r}: present, but no writer ever touched it")
        counts["impossible_states"] += 1
    for key, ops in by_key.items():
        counts["keys_compared"] += 1
        state: tuple[str, Any] = ("absent", None)
        if key in final:
            pid, meta, generation = final[key]
            state = ("present", meta)
            counts["metadata_compared"] += 1
            counts["owners_compared"] += 1
            if pid != owner:
                problems.append(f"{key}: owner {pid}, every call registered {owner}")
                counts["impossible_states"] += 1
            stale = _generation_problems(key, ops, generation)
            counts["generations_compared"] += 1
            counts["impossible_states"] += len(stale)
            problems += stale
        allowed = _candidates(ops)
        if state not in allowed:
            counts["lost_registrations" if state[0] == "absent" else "impossible_states"] += 1
            problems.append(f"{key}: {state!r} not in {allowed!r}")
        claims, impossible = _absence_claims(ops)
        counts["absence_results_checked"] += claims
        counts["impossible_states"] += len(impossible)
        problems += [f"{key}: {text}" for text in impossible]
        ordered, backwards = _register_order(ops)
        counts["register_results_ordered"] += ordered
        counts["impossible_states"] += len(backwards)
        problems += [f"{key}: {text}" for text in backwards]
    return problems, counts


def _absence_claims(ops: list[Op]) -> tuple[int, list[str]]:
    """Acknowledged calls that found the key absent (``update`` -> NotRegistered,
    ``unregister`` -> False): how many, and those no order of the calls explains.

    Such a result is impossible when an acknowledged call that left the key present ended
    before it started, and no removing call (an acknowledged unregister that removed, or
    one in flight) could fall between the two: none started before the claim ended and
    ended after that call began.
    """
    present = sorted((op.end, op.start) for op in ops if op.acked and op.after[0] == "present")
    present_ends = [end for end, _ in present]
    latest_start = list(itertools.accumulate((start for _, start in present), max))
    removers = sorted((op.start, op.end) for op in ops
                      if op.changes and op.after[0] == "absent")
    remover_starts = [start for start, _ in removers]
    latest_end = list(itertools.accumulate((end for _, end in removers), max))
    claims, impossible = 0, []
    for op in ops:
        if not op.acked or op.changes:
            continue
        claims += 1
        before = bisect.bisect_left(present_ends, op.start)
        if not before:
            continue  # nothing surely made it present before this call
        witness = latest_start[before - 1]  # the latest-starting such call
        could_remove = bisect.bisect_left(remover_starts, op.end)
        if not (could_remove and latest_end[could_remove - 1] > witness):
            impossible.append(f"a call at {op.start} found it absent, but a call that left "
                              f"it present began at {witness} and nothing removed it since")
    return claims, impossible


def _register_order(ops: list[Op]) -> tuple[int, list[str]]:
    """Pairs of acknowledged registers on one key where one ended before the other started
    (the later must not have returned a smaller generation): how many, and violations."""
    done = sorted((op.end, op.gen) for op in ops if op.acked and op.gen is not None)
    ends = [end for end, _ in done]
    newest_so_far = list(itertools.accumulate((gen for _, gen in done), max))
    pairs, backwards = 0, []
    for op in ops:
        if not (op.acked and op.gen is not None):
            continue
        before = bisect.bisect_left(ends, op.start)  # registers that ended before it began
        pairs += before
        if before and newest_so_far[before - 1] > op.gen:
            backwards.append(f"register returned {op.gen} after an earlier one had "
                             f"returned {newest_so_far[before - 1]}")
    return pairs, backwards


def _generation_problems(key: str, ops: list[Op], generation: int) -> list[str]:
    """A present key carries the newest generation any acknowledged register of it returned,
    or a newer one if a register of it was in flight (that call created the entry)."""
    returned = [op.gen for op in ops if op.acked and op.gen is not None]
    newest = max(returned, default=0)
    if generation == newest and returned:
        return []
    if generation > newest and any(op.registers and not op.acked for op in ops):
        return []
    return [f"{key}: generation {generation}, acknowledged registers returned "
            f"{sorted(set(returned))} and none was in flight with a newer one"]


def _storm(name: str, tmp_path: Path, seconds: float, record_property: Any) -> None:
    seed = test_seed("kill storm")
    print(f"kill storm: {seconds:.1f} s, {WRITERS} writers, {KEYS} keys")
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

            rows = [r for r in reg.backend.dump() if r["namespace"] == NS]
            final = {r["service"]: (r["pid"], r["metadata"], r["generation"]) for r in rows}
            assert len(final) == len(rows)
            problems, counts = compare(by_key, final, owner)
            state = {key: ("present", final[key][1]) if key in final else ("absent", None)
                     for key in by_key}
            lost, wrong = counts["lost_registrations"], counts["impossible_states"]

            summary = {"seed": seed, "kills": kills, "ops_checked": acked,
                       "log_lines": lines, "in_flight": in_flight, **counts,
                       "recoveries": int(reg.stats().extra["recoveries"]),
                       "table_generation": int(reg.stats().extra["generation"])}
            for k, v in summary.items():
                record_property(k, v)
            print("kill storm result:", json.dumps(summary))
            assert not problems, "\n".join(problems)
            assert lost == 0 and wrong == 0
            assert kills >= WRITERS and acked > 0
            assert counts["keys_compared"] == KEYS

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
    _storm(reg_name, tmp_path, STORM_SECONDS, record_property)


@pytest.mark.slow
def test_kill_storm_soak(reg_name: str, tmp_path: Path, record_property: Any) -> None:
    _storm(reg_name, tmp_path, soak_seconds(), record_property)


# ------------------------------------------------- the model itself catches what it should

_OWNER = 4242


def _op(key: str, start: int, end: int, after: tuple[str, Any], *, acked: bool = True,
        gen: int | None = None, registers: bool = False) -> Op:
    return Op(key, start, end, after, acked, True, gen, registers)


def _history() -> dict[str, list[Op]]:
    """k0: registered (gen 3), updated. k1: registered (gen 5), unregistered. k2: a register
    in flight at a kill, after an acknowledged one (gen 7)."""
    return {
        "k0": [_op("k0", 1, 2, ("present", {"n": 1}), gen=3, registers=True),
               _op("k0", 3, 4, ("present", {"n": 2}))],
        "k1": [_op("k1", 1, 2, ("present", {"n": 3}), gen=5, registers=True),
               _op("k1", 3, 4, ("absent", None))],
        "k2": [_op("k2", 1, 2, ("present", {"n": 4}), gen=7, registers=True),
               _op("k2", 3, 9, ("present", {"n": 5}), acked=False, registers=True)],
    }


def _final(**changes: Any) -> dict[Any, tuple[int, Any, int]]:
    final: dict[Any, tuple[int, Any, int]] = {"k0": (_OWNER, {"n": 2}, 3),
                                              "k2": (_OWNER, {"n": 4}, 7)}
    final.update(changes)
    return {k: v for k, v in final.items() if v is not None}


def test_model_accepts_the_true_state_and_the_in_flight_one() -> None:
    problems, counts = compare(_history(), _final(), _OWNER)
    assert problems == []
    assert counts["keys_compared"] == 3 and counts["generations_compared"] == 2
    # the in-flight register landed, with a generation nobody was told about
    assert compare(_history(), _final(k2=(_OWNER, {"n": 5}, 9)), _OWNER)[0] == []


@pytest.mark.parametrize(
    ("final", "counter"),
    [
        pytest.param(_final(k0=None), "lost_registrations", id="lost-registration"),
        pytest.param(_final(k0=(_OWNER, {"n": 1}, 3)), "impossible_states", id="stale-metadata"),
        pytest.param(_final(k1=(_OWNER, {"n": 3}, 5)), "impossible_states", id="resurrected"),
        pytest.param(_final(k0=(1, {"n": 2}, 3)), "impossible_states", id="wrong-owner"),
        pytest.param(_final(k0=(_OWNER, {"n": 2}, 2)), "impossible_states", id="old-generation"),
        pytest.param(_final(k0=(_OWNER, {"n": 2}, 8)), "impossible_states",
                     id="new-generation-with-no-register-in-flight"),
        pytest.param(_final(k2=(_OWNER, {"n": 4}, 6)), "impossible_states",
                     id="generation-below-acknowledged"),
        pytest.param(_final(stranger=(_OWNER, {}, 1)), "impossible_states", id="extra-key"),
    ],
)
def test_model_rejects_a_doctored_final_state(final: dict[Any, Any], counter: str) -> None:
    problems, counts = compare(_history(), final, _OWNER)
    assert problems and counts[counter] >= 1, (problems, counts)


def test_model_rejects_an_absence_no_removal_explains() -> None:
    history = _history()
    # k0 was registered (1-2) and updated (3-4); an update at 5-6 saying NotRegistered is
    # impossible with no unregister anywhere near.
    history["k0"].append(Op("k0", 5, 6, ("absent", None), True, False))
    problems, counts = compare(history, _final(), _OWNER)
    assert counts["absence_results_checked"] == 1
    assert any("found it absent" in p for p in problems), problems
    # An unregister in flight across that time explains it.
    history["k0"].append(_op("k0", 4, 9, ("absent", None), acked=False))
    problems, _ = compare(history, _final(), _OWNER)
    assert not any("found it absent" in p for p in problems), problems


def test_model_rejects_a_register_result_that_goes_back() -> None:
    history = _history()
    history["k0"].append(_op("k0", 5, 6, ("present", {"n": 6}), gen=2, registers=True))
    problems, counts = compare(history, _final(k0=(_OWNER, {"n": 6}, 3)), _OWNER)
    assert any("returned 2 after an earlier one had returned 3" in p for p in problems)
    assert counts["register_results_ordered"] == 1

"""Corrupted segments: whatever bytes a registry's shared memory holds, no call may crash,
hang or raise anything but a shmreg error, and fsck must bring it back (or destroy it).

The fuzzing runs in a child interpreter (``RUNNER``), so a segfault or a hang is observed
by the test instead of suffered by it: the child gets a batch of patches, and for each one
builds a fresh registry of a few dozen entries (tombstones and superseded records
included), writes the patch through its own ``mmap`` of ``/dev/shm/<segment>``, then
attaches and exercises every read, a few writes, a sweep, ``fsck``, ``fsck --repair``,
``fsck`` again, a write after the repair and ``destroy_by_name``. Each call's outcome is
reported back as a JSON line and judged here against what docs/reliability.md promises:
success or ``CorruptRegistry``, or the one other error the damaged word explains
(``BY_WORD``); then either the repair worked (``fsck`` clean, the next write succeeds) or
the repair said it could not open the registry, and ``destroy_by_name`` removed it all. The
cases beyond repair are counted and printed (exactly, for the fixed tables).

Every bug the fuzzing found has an explicit test in ``test_corrupt_segments.py``, named for
the damage it pins. One known limitation is tolerated: a pid-only ``lookup`` trusts a
slot's owner word.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from typing import Any

import pytest
from helpers import children, test_seed
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from shmreg._engine import layout as L
from shmreg._engine.segment import list_segments, unlink_segment
from shmreg._engine.store import destroy_by_name

CHILD_TIMEOUT_S = 60.0  # a batch normally takes 1-4 s: only a hang gets near this
BATCH = 25

# ------------------------------------------------------------------------------ the child

RUNNER = r'''
import gc, json, mmap, os, struct, subprocess, sys, traceback
import shmreg
from shmreg._engine import layout as L
from shmreg._engine.fsck import check
from shmreg._engine.store import destroy_by_name

NAMESPACES = ("fz-a", "fz-b")


def population(me, other):
    """(namespace, service, pid, metadata) of every entry a fresh registry gets."""
    out = []
    for i in range(36):
        service = (f"s{i}", f"svc-{i}", ("t", i), i * 1000)[i % 4]
        meta = {"type": ("worker", "agent", "db")[i % 3], "capabilities": [f"c{i % 4}", "x"],
                "i": i, "blob": bytes([i]) * (i % 7), "nested": {"l": [i, str(i)]}}
        out.append((NAMESPACES[i % 2], service, me if i % 3 == 0 else other, meta))
    return out


def build(name, me, other):
    """A registry with live entries, tombstones and superseded records; its expected map."""
    reg = shmreg.Registry.create(name, capacity=48)
    try:
        entries = {}
        pop = population(me, other)
        for ns, service, pid, meta in pop:
            reg.register(ns, service, pid=pid, metadata=meta)
            entries[(ns, service)] = (pid, meta)
        for ns, service, _, _ in pop[::5]:
            reg.unregister(ns, service)
            del entries[(ns, service)]
        for ns, service, pid, meta in pop[1::7]:
            if (ns, service) in entries:
                meta = dict(meta, updated=True)
                reg.update_metadata(ns, service, meta)
                entries[(ns, service)] = (pid, meta)
        info = reg.stats().extra
        last = reg.backend.last_event_seq()
    finally:
        reg.close()
    return entries, info["slots"], info["arena_top"], last


def paths(name):
    root = "/dev/shm/" + L.root_name(name)
    with open(root, "rb") as f:
        words = struct.unpack_from("<32Q", f.read(L.PAGE))
    return root, "/dev/shm/" + L.data_name(name, words[L.R_INCARNATION], words[L.R_GEN])


def regions(nslots, top, last):
    return {
        "root_words": ("root", 0, 20 * 8),
        "root_page": ("root", 0, L.PAGE),
        "ring": ("root", L.RING_OFFSET, (last + 2) * L.EVENT_SIZE),
        "data_header": ("data", 0, 16 * 8),
        "journal": ("data", L.J_STATE * 8, (L.J_CRC + 1 - L.J_STATE) * 8),
        "slots": ("data", L.HEADER_SIZE, nslots * L.SLOT_SIZE),
        "arena": ("data", L.arena_offset(nslots), max(top, 8)),
    }


def touched(seg, start, end, nslots):
    """Names of the words a patch of [start, end) in ``seg`` changed (for the judge)."""
    out = set()
    for word in range(start // 8, (end - 1) // 8 + 1):
        at = word * 8
        if seg == "root":
            out.add(f"root:{word}" if at < L.RING_OFFSET else "ring")
        elif at < L.HEADER_SIZE:
            out.add(f"data:{word}")
        elif at < L.HEADER_SIZE + nslots * L.SLOT_SIZE:
            index, w = divmod((at - L.HEADER_SIZE) // 8, L.SLOT_WORDS)
            out.add(f"slot:{index}:{w}")
        else:
            out.add("arena")
    return out


def poke(path, offset, data):
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
        try:
            data = data[: max(0, len(m) - offset)]
            m[offset:offset + len(data)] = data
        finally:
            m.close()
    return len(data)


def peek(path, offset, n):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def apply(name, patch, nslots, top, last, dead_pid):
    seg, base, size = regions(nslots, top, last)[patch["region"]]
    root, data = paths(name)
    path = root if seg == "root" else data
    offset = base + patch["pos"] % size
    kind = patch["kind"]
    if kind == "flip":
        new = bytes([peek(path, offset, 1)[0] ^ (1 << patch["bit"])])
    elif kind == "bytes":
        new = bytes.fromhex(patch["data"])
    else:  # "word": one aligned 8-byte value
        offset -= offset % 8
        new = (patch["value"] % 2**64).to_bytes(8, "little")
    written = poke(path, offset, new)
    words = touched(seg, offset, offset + max(written, 1), nslots)
    if patch.get("journal_valid"):  # whatever the journal holds now is "to be replayed"
        poke(data, L.J_STATE * 8, struct.pack("<Q", L.J_VALID))
        words.add(f"data:{L.J_STATE}")
    if patch.get("dead_writer"):  # and a writer died holding the lock: recovery runs
        poke(root, L.R_OWNER_PID * 8, struct.pack("<Q", dead_pid))
        words.add(f"root:{L.R_OWNER_PID}")
    return offset, sorted(words)


def guarded(res, label, fn):
    try:
        value = fn()
    except shmreg.ShmregError as exc:
        res["calls"].setdefault(label, set()).add(type(exc).__name__)
        return exc
    except BaseException as exc:
        frames = [f"{os.path.basename(f.filename)}:{f.name}"
                  for f in traceback.extract_tb(exc.__traceback__) if "shmreg" in f.filename]
        res["bad"].append({"call": label, "exc": type(exc).__name__, "msg": str(exc)[:300],
                           "frames": frames[-4:], "tb": traceback.format_exc()[-2000:]})
        return exc
    res["calls"].setdefault(label, set()).add("ok")
    return value


def exercise(name, res, entries, ring_only):
    reg = guarded(res, "attach", lambda: shmreg.Registry.attach(name))
    if not isinstance(reg, shmreg.Registry):
        return
    try:
        keys = list(entries.items())[:14] + [(("fz-a", "missing"), (None, None))]
        for (ns, service), (pid, meta) in keys:
            got = guarded(res, "lookup", lambda: reg.lookup(ns, service))
            if isinstance(got, int) and got != pid:
                res["wrong"].append({"call": "lookup", "key": repr((ns, service)),
                                     "got": got, "want": pid})
            if ring_only and pid is not None and got != pid:
                res["wrong"].append({"call": "lookup (ring patch)", "key": repr((ns, service)),
                                     "got": repr(got)[:200], "want": pid})
            got = guarded(res, "lookup_with_metadata",
                          lambda: reg.lookup_with_metadata(ns, service))
            if isinstance(got, tuple) and got[1] != meta:
                res["wrong"].append({"call": "lookup_with_metadata", "key": repr((ns, service)),
                                     "got": repr(got)[:200], "want": repr(meta)[:200]})
            if ring_only and pid is not None and got != (pid, meta):
                res["wrong"].append({"call": "lookup_with_metadata (ring patch)",
                                     "key": repr((ns, service)), "got": repr(got)[:200]})
        for ns in NAMESPACES:
            known = {s for (n, s) in entries if n == ns}
            got = guarded(res, "list_services", lambda: reg.list_services(ns))
            if isinstance(got, list) and not set(got) <= known:
                res["wrong"].append({"call": "list_services",
                                     "extra": repr(set(got) - known)[:200]})
            if ring_only and isinstance(got, list) and set(got) != known:
                res["wrong"].append({"call": "list_services (ring patch)"})
            got = guarded(res, "list_services_with_metadata",
                          lambda: reg.list_services_with_metadata(ns))
            if isinstance(got, dict):
                for service, meta in got.items():
                    want = entries.get((ns, service), (None, None))[1]
                    if meta != want:
                        res["wrong"].append({"call": "list_services_with_metadata",
                                             "key": repr(service), "got": repr(meta)[:200]})
            guarded(res, "find_by_metadata", lambda: reg.find_by_metadata(ns, type="worker"))
            guarded(res, "find_caps", lambda: reg.find_by_metadata(ns, capabilities="x"))
            guarded(res, "list_by_type", lambda: reg.list_by_type(ns, "db"))
            guarded(res, "find_services_by_metadata",
                    lambda: reg.find_services_by_metadata(ns, lambda m: True))
            guarded(res, "count_ns", lambda: reg.count(ns))
        guarded(res, "count", lambda: reg.count())
        guarded(res, "stats", lambda: reg.stats())
        guarded(res, "dump", lambda: reg.backend.dump())
        guarded(res, "health_check", lambda: reg.health_check())
        guarded(res, "watch", lambda: list(reg.watch(since=0, timeout=0)))
        guarded(res, "register", lambda: reg.register("fz-a", "after", metadata={"n": 1}))
        guarded(res, "update", lambda: reg.update_metadata("fz-a", "after", {"n": 2}, merge=True))
        first = next(iter(entries))
        guarded(res, "unregister", lambda: reg.unregister(*first))
        guarded(res, "sweep", lambda: reg.sweep())
    finally:
        guarded(res, "close", reg.close)


def after_repair(name):
    reg = shmreg.Registry.attach(name)
    try:
        reg.register("fz-b", "post-repair", metadata={"ok": True})
        got = reg.lookup_with_metadata("fz-b", "post-repair")
        assert got == (os.getpid(), {"ok": True}), got
        assert reg.unregister("fz-b", "post-repair") is True
    finally:
        reg.close()


CURRENT = {}


def unraisable(u):
    CURRENT["res"]["unraisable"].append(
        f"{u.exc_type.__name__}: {u.exc_value} in {u.object!r}"[:300])


def run_case(name, patch, me, other, dead_pid):
    res = {"name": name, "patch": patch, "calls": {}, "bad": [], "wrong": [], "unraisable": []}
    CURRENT["res"] = res
    entries, nslots, top, last = build(name, me, other)
    res["offset"], res["touched"] = apply(name, patch, nslots, top, last, dead_pid)
    ring_only = all(t == "ring" for t in res["touched"])
    exercise(name, res, entries, ring_only)
    gc.collect()
    r1 = guarded(res, "fsck", lambda: check(name))
    r2 = guarded(res, "fsck_repair", lambda: check(name, repair=True))
    r3 = guarded(res, "fsck_after", lambda: check(name))
    res["fsck"] = [getattr(r, "ok", None) for r in (r1, r2, r3)]
    res["problems"] = (getattr(r1, "problems", None) or [])[:6]
    res["after_problems"] = (getattr(r3, "problems", None)
                             or ([f"raised {type(r3).__name__}: {r3}"] if r3 is not None
                                 and not hasattr(r3, "ok") else []))[:6]
    # Beyond repair: fsck still finds problems after --repair. The judge accepts that only
    # if the repair itself said it gave up (could not open the registry, or raised), and
    # destroy_by_name then removes every segment.
    res["beyond_repair"] = getattr(r3, "ok", None) is not True
    res["repair_gave_up"] = isinstance(r2, shmreg.ShmregError) or any(
        p.startswith("cannot open") for p in getattr(r2, "problems", None) or [])
    if not res["beyond_repair"]:
        guarded(res, "post_repair_write", lambda: after_repair(name))
    gc.collect()
    guarded(res, "destroy_by_name", lambda: destroy_by_name(name))
    root = L.root_name(name)
    res["left"] = sorted(s for s in os.listdir("/dev/shm")
                         if s == root or s.startswith(root + "."))
    for seg in res["left"]:
        os.unlink("/dev/shm/" + seg)
    res["calls"] = {k: sorted(v) for k, v in res["calls"].items()}
    return res


def main():
    sys.unraisablehook = unraisable
    job = json.loads(sys.stdin.read())
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that names nobody now: the "writer that died holding the lock"
    for i, patch in enumerate(job["patches"]):
        sys.stdout.write(json.dumps({"start": i}) + "\n")
        sys.stdout.flush()
        res = run_case(f"{job['prefix']}{i}", patch, os.getpid(), job["other"], dead.pid)
        sys.stdout.write(json.dumps(res, default=repr) + "\n")
        sys.stdout.flush()


main()
'''

# -------------------------------------------------------------------------- the judge


#: Damage fsck cannot tell from a legitimate setting, and what it makes writes raise, even
#: after a repair (known limits, docs/reliability.md): a pid-namespace word that differs
#: from ours reads as a registry of another pid namespace; a small metadata limit is a limit.
UNSEEN_BY_FSCK = {
    f"root:{L.R_PIDNS}": frozenset({"IncompatibleRegistry"}),
    f"root:{L.R_MAX_META}": frozenset({"MetadataTooLarge"}),
}
#: What a call on a damaged registry may raise besides succeeding, by the words a patch
#: touched (see docs/reliability.md). Anything else is a complaint.
ALWAYS = frozenset({"CorruptRegistry"})
BY_WORD = {
    f"root:{L.R_VERSION}": frozenset({"IncompatibleRegistry"}),  # reads as another layout
    f"root:{L.R_GEN}": frozenset({"RegistryDestroyed"}),  # all ones is the destroyed mark
    **UNSEEN_BY_FSCK,
}


def allowed_errors(case: dict[str, Any], call: str) -> frozenset[str]:
    """The errors ``call`` may raise in this case, besides succeeding."""
    allowed = set(ALWAYS)
    for word in case["touched"]:
        allowed |= BY_WORD.get(word, frozenset())
    if call == "update" and case["calls"].get("register") != ["ok"]:
        allowed.add("NotRegistered")  # it updates the name the failed register would add
    return frozenset(allowed)


def judge(cases: list[dict[str, Any]]) -> list[str]:
    """Every complaint about a batch's results."""
    complaints = []
    for case in cases:
        where = f"case {case['name']} patch={case['patch']} touched={case['touched']}"
        for bad in case["bad"]:
            complaints.append(
                f"{where}: {bad['call']} raised {bad['exc']}: {bad['msg']}\n{bad['tb']}"
            )
        for call, outcomes in case["calls"].items():
            unexpected = set(outcomes) - {"ok"} - allowed_errors(case, call)
            if unexpected:
                complaints.append(f"{where}: {call} raised {sorted(unexpected)}, documented: "
                                  f"{sorted(allowed_errors(case, call))}")
        for wrong in case["wrong"]:
            owner_word = any(w.startswith("slot:") and w.endswith(":4") for w in case["touched"])
            if wrong["call"] == "lookup" and owner_word:
                continue  # pid-only lookups trust the owner word: see test_owner_pid_word_...
            complaints.append(f"{where}: wrong read {wrong}")
        for text in case["unraisable"]:
            complaints.append(f"{where}: unraisable exception {text}")
        if case["beyond_repair"]:
            if not (case["repair_gave_up"] and case["after_problems"]):
                complaints.append(f"{where}: fsck --repair ran but fsck still reports "
                                  f"{case['after_problems']}")
        elif case["calls"].get("post_repair_write") != ["ok"] and not (
            set(case["calls"].get("post_repair_write", ["missing"]))
            <= {e for w in case["touched"] for e in UNSEEN_BY_FSCK.get(w, ())}
        ):
            complaints.append(f"{where}: fsck repaired it, but the next write gave "
                              f"{case['calls'].get('post_repair_write')}")
        if case["left"]:
            complaints.append(f"{where}: destroy_by_name left {case['left']}")
    return complaints


# ------------------------------------------------------------------------------ driving


def _prefix() -> str:
    """Registry names of one batch: the reg_name pattern (worker pid for the leak guard)."""
    return f"t-{os.getpid()}-{uuid.uuid4().hex[:8]}-fz"


def _purge(prefix: str) -> None:
    """Remove every segment of a batch, whatever state the child left it in."""
    names = {seg[len("shmreg-") :].split(".")[0] for seg in list_segments(f"shmreg-{prefix}")}
    for name in names:
        try:
            destroy_by_name(name)
        except Exception:
            pass
    for seg in list_segments(f"shmreg-{prefix}"):
        unlink_segment(seg)


def run_batch(patches: list[dict[str, Any]], timeout: float = CHILD_TIMEOUT_S) -> list[Any]:
    """Run the patches in one child interpreter; return its per-case results.

    Fails if the child died of a signal, exited non-zero or outlived ``timeout`` (a hang:
    the last ``start`` line names the case it hung in).
    """
    prefix = _prefix()
    with children() as kids:
        sleeper = kids.sleeper(600)
        proc = kids.py(RUNNER, prelude=False, stdin=subprocess.PIPE)
        job = json.dumps({"prefix": prefix, "other": sleeper.pid, "patches": patches})
        try:
            try:
                out, err = proc.communicate(job, timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                lines = [json.loads(x) for x in out.splitlines() if x.strip()]
                started = [x["start"] for x in lines if "start" in x]
                hung = patches[started[-1]] if started else None
                raise AssertionError(
                    f"fuzz child hung for {timeout} s in patch {hung}:\n{err[-3000:]}"
                ) from None
        finally:
            _purge(prefix)
    lines = [json.loads(x) for x in out.splitlines() if x.strip()]
    results = [x for x in lines if "start" not in x]
    started = [x["start"] for x in lines if "start" in x]
    last = patches[started[-1]] if started else None
    assert proc.returncode == 0, (
        f"fuzz child exited with {proc.returncode} (negative: killed by that signal) in "
        f"patch {last}:\n{err[-3000:]}"
    )
    assert len(results) == len(patches), f"child reported {len(results)} of {len(patches)}"
    return results


def assert_survived(patches: list[dict[str, Any]]) -> list[Any]:
    results = run_batch(patches)
    complaints = judge(results)
    assert not complaints, f"{len(complaints)} problem(s):\n" + "\n\n".join(complaints[:5])
    return results


def beyond_repair(results: list[Any]) -> dict[str, int]:
    """Cases fsck --repair gave up on (every one removed by destroy_by_name), by region."""
    counts: dict[str, int] = {}
    for case in results:
        if case["beyond_repair"]:
            region = case["patch"]["region"]
            counts[region] = counts.get(region, 0) + 1
    return counts


def _report(label: str, results: list[Any], record_property: Any) -> dict[str, int]:
    beyond = beyond_repair(results)
    total = sum(beyond.values())
    print(f"{label}: {len(results)} cases, {total} beyond repair (fsck says it cannot "
          f"open them; destroy_by_name removed them): {beyond}")
    record_property(f"{label}_cases", len(results))
    record_property(f"{label}_beyond_repair", total)
    return beyond


REGIONS = ("root_words", "root_page", "ring", "data_header", "journal", "slots", "arena")
SPECIAL = [0, 1, 2, 3, 7, 8, 255, 2**31, 2**32 - 1, 2**32, 2**48, 2**63, 2**64 - 1]

patch_strategy = st.fixed_dictionaries(
    {
        "region": st.sampled_from(REGIONS),
        "pos": st.integers(0, 2**20),
        "kind": st.sampled_from(("flip", "bytes", "word")),
        "bit": st.integers(0, 7),
        "data": st.binary(min_size=1, max_size=16).map(bytes.hex),
        "value": st.one_of(st.sampled_from(SPECIAL), st.integers(0, 2**64 - 1)),
        "journal_valid": st.sampled_from((False, False, False, True)),
        "dead_writer": st.sampled_from((False, False, False, True)),
    }
)

FUZZ = settings(
    deadline=None,
    # No shrinking: each complaint already names the one patch (of its batch) that caused
    # it, and shrinking a batch means hundreds of child interpreters.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _random_batches(label: str, examples: int, record_property: Any) -> None:
    """``examples`` random batches of ``BATCH`` patches, from a printed, replayable seed."""
    seen: list[Any] = []

    @seed(test_seed(label))
    @settings(FUZZ, max_examples=examples)
    @given(st.lists(patch_strategy, min_size=BATCH, max_size=BATCH))
    def run(patches: list[dict[str, Any]]) -> None:
        seen.extend(assert_survived(patches))

    run()
    _report(label, seen, record_property)
    assert len(seen) == examples * BATCH  # every batch ran (none skipped as a duplicate)


#: Random batches per run (x BATCH patches), and in the soak.
RANDOM_BATCHES, SOAK_BATCHES = 8, 60


def test_random_corruption_never_crashes_hangs_or_leaks(record_property: Any) -> None:
    _random_batches("random corruption", RANDOM_BATCHES, record_property)


@pytest.mark.slow
def test_random_corruption_soak(record_property: Any) -> None:
    _random_batches("random corruption soak", SOAK_BATCHES, record_property)


def _word_table(region: str, words: int, **extra: Any) -> list[dict[str, Any]]:
    return [
        {"region": region, "pos": w * 8, "kind": "word", "value": v, **extra}
        for w in range(words)
        for v in (0, 5, 2**40 + 3, 2**63, 2**64 - 1)
    ]


#: Cases of each fixed table that fsck --repair gives up on (all removed by destroy_by_name):
#: root words 0-2 and 16 (magic, layout version, generation, incarnation) and data header
#: words 0-4 (magic, generation, slot count, arena offset and size) at values no repair can
#: trust; docs/reliability.md quotes these numbers.
FIXED_BEYOND_REPAIR = {"root-words": 20, "data-header": 14, "journal-replayed": 0}
FIXED_TABLES = {
    "root-words": _word_table("root_words", 20),
    "data-header": _word_table("data_header", 16),
    "journal-replayed": _word_table("journal", L.J_CRC + 1 - L.J_STATE, journal_valid=True,
                                    dead_writer=True),
}


@pytest.mark.parametrize("table", list(FIXED_TABLES))
def test_every_header_word_at_extreme_values(table: str, record_property: Any) -> None:
    """Each header word set to 0, small, large, 2**63 and all ones, one at a time."""
    patches = FIXED_TABLES[table]
    results = []
    for start in range(0, len(patches), 40):
        results += assert_survived(patches[start : start + 40])
    beyond = _report(table, results, record_property)
    assert sum(beyond.values()) == FIXED_BEYOND_REPAIR[table], beyond


def test_judge_flags_what_it_should() -> None:
    """The judge itself: unknown exceptions, undocumented errors, wrong reads, unraisables,
    repairs that left damage or a registry that still refuses writes, leaked segments."""
    ok = {"attach": ["ok"], "register": ["ok"], "update": ["ok"], "post_repair_write": ["ok"]}
    base: dict[str, Any] = {
        "name": "n", "patch": {}, "touched": ["arena"], "calls": ok, "bad": [], "wrong": [],
        "unraisable": [], "beyond_repair": False, "repair_gave_up": False,
        "fsck": [False, True, True], "after_problems": [], "left": [],
    }

    def complaints(**change: Any) -> int:
        return len(judge([dict(base, **change)]))

    def calls(**change: list[str]) -> dict[str, list[str]]:
        return {**ok, **change}

    assert judge([base]) == []
    assert complaints(bad=[{"call": "lookup", "exc": "KeyError", "msg": "", "tb": ""}]) == 1
    assert complaints(touched=["root:17"],
                      bad=[{"call": "register", "exc": "error", "msg": "", "tb": ""}]) == 1
    # Documented errors only, by region: what the audit saw accepted is refused now.
    assert complaints(calls=calls(register=["IncompatibleRegistry"])) == 1
    assert complaints(calls=calls(attach=["RegistryDestroyed"])) == 1
    assert complaints(touched=["root:2"], calls=calls(attach=["RegistryDestroyed"])) == 0
    assert complaints(touched=["root:1"], calls=calls(attach=["IncompatibleRegistry"])) == 0
    assert complaints(calls=calls(register=["CorruptRegistry"], update=["NotRegistered"])) == 0
    assert complaints(calls=calls(update=["NotRegistered"])) == 1  # its register worked
    # Wrong reads: one tolerated limitation only.
    assert complaints(touched=["slot:3:4"], wrong=[{"call": "lookup"}]) == 0
    assert complaints(wrong=[{"call": "lookup_with_metadata"}]) == 1
    assert complaints(unraisable=["ValueError: x in y"]) == 1
    # Repair: either it works (the next write succeeds) or fsck said it gave up.
    assert complaints(fsck=[False, True, False], beyond_repair=True,
                      after_problems=["slot 3: bad"]) == 1
    assert complaints(fsck=[False, False, False], beyond_repair=True, repair_gave_up=True,
                      after_problems=["cannot open: CorruptRegistry: x"]) == 0
    assert complaints(calls=calls(post_repair_write=["CorruptRegistry"])) == 1
    unseen = calls(register=["IncompatibleRegistry"], post_repair_write=["IncompatibleRegistry"])
    assert complaints(touched=[f"root:{L.R_PIDNS}"], calls=unseen) == 0
    assert complaints(touched=["arena"], calls=unseen) == 3  # two calls, and the repair
    assert complaints(left=["shmreg-n"]) == 1

"""The byte layout as data: the C header, the single writer of slots, golden bytes.

``shmreg/_engine/layout.py`` is the executable spec of a registry's bytes. These tests pin it:
the committed C header is the one the spec generates, no module but the engine's writers
stores into segment memory, and a registry built from fixed inputs has exactly the bytes
recorded in ``tests/data/golden_layout.json`` (regenerate with SHMREG_WRITE_GOLDEN=1 only when
the layout version changes on purpose).
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from typing import Any

import pytest

import shmreg
from shmreg._engine import cheader
from shmreg._engine import layout as L
from shmreg._types import ProcessIdentity

ROOT = Path(shmreg.__file__).parent
GOLDEN = Path(__file__).parent / "data" / "golden_layout.json"

# Modules allowed to store into segment memory: the table (slots, data header, journal),
# the store (root words) and the event ring.
WRITERS = {"_engine/table.py", "_engine/store.py", "_engine/events.py"}
# Names of the views into segment memory used across shmreg.
VIEWS = {"q", "rq", "dq", "buf", "dbuf", "head"}


def test_committed_c_header_is_generated_one() -> None:
    committed = (ROOT / "_engine" / "_layout.h").read_text()
    assert committed == cheader.c_header(), "run: python -m shmreg._engine.cheader > ..."


def test_c_header_carries_every_field() -> None:
    header = cheader.c_header()
    for name, field in L.SLOT_FIELDS.items():
        assert f"#define SHMREG_S_{name}_SHIFT {field.shift}\n" in header
        assert f"#define SHMREG_S_{name}_WORD {field.word}\n" in header
    assert f"#define SHMREG_LAYOUT_VERSION {L.LAYOUT_VERSION}\n" in header
    assert f"#define SHMREG_J_EVENT {L.J_EVENT}\n" in header


def test_slot_fields_tile_words_without_overlap() -> None:
    bits: dict[int, int] = {}
    for field in L.SLOT_FIELDS.values():
        span = field.mask << field.shift
        assert span < 2**64
        assert not bits.get(field.word, 0) & span, field
        bits[field.word] = bits.get(field.word, 0) | span


def test_accessors_invert_packers() -> None:
    body = L.slot_body(0xAABBCCDD, 0x11223344, 4096, 17, L.USED, 300, 7, 4242, 0xDEAD, 99, 5, 3)
    words = (2, *body)
    assert (L.slot_key_hash(words), L.slot_ns_hash(words)) == (0xAABBCCDD, 0x11223344)
    assert (L.slot_offset(words), L.slot_key_len(words), L.slot_state(words)) == (4096, 17, 1)
    assert (L.slot_meta_len(words), L.slot_type_tag(words)) == (300, 7)
    assert (L.slot_pid(words), L.slot_crc(words), L.slot_start(words)) == (4242, 0xDEAD, 99)
    assert (L.slot_generation(words), L.slot_caps(words), L.slot_seq(words)) == (5, 3, 2)
    assert L.rec_state(L.with_state(words[L.S_REC], L.TOMB)) == L.TOMB
    assert L.rec_offset(L.with_offset(words[L.S_REC], 64)) == 64
    assert L.unpack_event_word(L.pack_event_word(3, 2, 12345)) == (3, 2, 12345)
    assert L.unpack_event_head(L.pack_event_head(1, 4, 40, 777)) == (1, 4, 40, 777)


def _stores_into_view(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign):
            targets = [node.target]
        for target in targets:
            elts = target.elts if isinstance(target, ast.Tuple) else [target]
            for elt in elts:
                if isinstance(elt, ast.Subscript):
                    base = elt.value
                    name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
                    if name in VIEWS:
                        lines.append(node.lineno)
        call = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        if call and node.func.attr == "pack_into":  # type: ignore[attr-defined]
            lines.append(node.lineno)
    return lines


def test_only_the_engine_writers_store_into_segments() -> None:
    offenders = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel in WRITERS:
            continue
        lines = _stores_into_view(ast.parse(path.read_text()))
        if lines:
            offenders[rel] = lines
    assert offenders == {}


# ---------------------------------------------------------------------- golden bytes

_OWNER = ProcessIdentity(4242, 1234567, "")
_TIME_NS = 1_700_000_000_000_000_000
# Times are masked out of the snapshot (event and journal time words, and the journal's
# checksum over them): the compiled path reads the clock itself, and the same bytes must
# come out of both paths. Everything else is compared exactly.
# Root words that legitimately differ between runs and hosts.
_ROOT_VARIES = {
    L.R_OWNER_PID,  # the last writer: this test process
    L.R_OWNER_START,
    L.R_PIDNS,
    L.R_CREATED_NS,
    L.R_BOOT_ID,
    L.R_BOOT_ID + 1,
    L.R_MODE,
}


def _hex(raw: bytes) -> str:
    return raw.hex()


def _snapshot(reg: shmreg.Registry) -> dict[str, Any]:
    store = reg._backend._store  # type: ignore[attr-defined]
    table = store.table
    nwords = L.R_LIFE_SLOTS + 1
    root = store.rq.tobytes()[: nwords * 8]
    root_words = [
        0 if i in _ROOT_VARIES else int.from_bytes(root[i * 8 : i * 8 + 8], "little")
        for i in range(nwords)
    ]
    used = [int(i) for i in table.used_indices().tolist()]
    slots = {
        str(i): _hex(bytes(table.buf[L.slot_word(i) * 8 : L.slot_word(i + 1) * 8])) for i in used
    }
    records = {}
    for i in used:
        words = table.read_slot(i)
        off = table.arena_off + L.slot_offset(words)
        records[str(i)] = _hex(
            bytes(table.buf[off : off + L.align_record(L.slot_record_len(words))])
        )
    ring = store.ring
    events = {}
    for seq in range(1, int(store.rq[L.R_EVENT_SEQ]) + 1):
        base = ring.offset + (seq % L.RING_EVENTS) * L.EVENT_SIZE
        event = bytearray(ring.buf[base : base + L.EVENT_SIZE])
        event[L.E_TIME * 8 : L.E_TIME * 8 + 8] = bytes(8)  # the clock: see _TIMELESS
        events[str(seq)] = _hex(bytes(event))
    journal = bytearray(table.buf[L.J_STATE * 8 : (L.J_CRC + 1) * 8])
    for word in (L.J_EVENT_TIME, L.J_CRC):  # the time, and the checksum that covers it
        at = (word - L.J_STATE) * 8
        journal[at : at + 8] = bytes(8)
    return {
        "root_words": [f"{w:016x}" for w in root_words],
        "data_header": _hex(bytes(table.buf[: (L.D_ALLOCATED + 1) * 8])),
        "journal": _hex(bytes(journal)),
        "slots": slots,
        "records": records,
        "events": events,
    }


def test_golden_bytes(reg_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from shmreg._engine import store as store_mod
    from shmreg._engine import table as table_mod

    monkeypatch.setattr(store_mod.secrets, "randbits", lambda bits: 0x0123456789ABCDEF)
    monkeypatch.setattr(table_mod, "_time_ns", lambda: _TIME_NS)
    reg = shmreg.Registry.create(reg_name, capacity=16)
    try:
        monkeypatch.setattr(reg, "_owner", lambda pid=None: _OWNER)
        reg.register("golden", "alpha", metadata={"port": 8080, "tags": ["a", "b"]})
        reg.register("golden", ("beta", 2), metadata={"v": 1.5})
        reg.register("other", 7)
        reg.register("golden", "alpha", metadata={"port": 8081})  # an update: new record
        reg.unregister("golden", ("beta", 2))
        # New str and int names in namespaces seen before: these commit through the
        # compiled path when it is active (the ones above take the Python path there too).
        reg.register("golden", "gamma", metadata={"caps": ["x"], "type": "w", "n": -70000})
        reg.register("other", 8, metadata={"big": 2**64 - 1, "f": -0.25, "b": b"\x00"})
        got = _snapshot(reg)
    finally:
        reg.destroy()
    if os.environ.get("SHMREG_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())
    for part in want:
        assert got[part] == want[part], (
            f"{part} differs from {GOLDEN.name}: the byte layout changed"
        )

"""Migration's primitives on Redis (``shmreg.backends._portable`` says what they promise).

Kept out of ``_redis.py``, which is the registry API proper. The swap judges the stored
value on the client (a pid is probed on its own host, a remote host by its lease), then
asks the ``swap`` script to replace exactly that value: if another client changed it
meanwhile the script says so and the judgement is made again.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from shmreg import _codec, _identity
from shmreg._types import Service
from shmreg.backends._portable import StoredEntry, same_entry
from shmreg.backends._redis_conn import mapped

if TYPE_CHECKING:
    from shmreg.backends._redis import RedisBackend


def _stored(
    backend: RedisBackend, namespace: str, key: bytes, ns: bytes, value: bytes
) -> StoredEntry:
    pid, start, gen, _, host = backend._head(value)
    entry = backend._entry(ns, key, value)
    owner = backend._ident(pid, start, host)
    return StoredEntry(namespace, entry.service, owner, int(gen), entry.metadata)


def export(backend: RedisBackend, namespace: str) -> list[StoredEntry]:
    """Every live entry of ``namespace``: one scan, liveness judged as reads judge it."""
    stored = backend._space(namespace)
    return [_stored(backend, namespace, key, ns, value) for ns, key, value in stored]


def _live(backend: RedisBackend, value: bytes) -> bool:
    head = backend._head(value)
    if head[4] == backend._here:
        return _identity.probe_alive(int(head[0]))
    return backend._lease_lives(head[4])


def swap(
    backend: RedisBackend,
    namespace: str,
    service: Service,
    expect: StoredEntry | None,
    new: StoredEntry | None,
) -> tuple[bool, StoredEntry | None]:
    """Compare-and-swap one entry; see ``BackendBase.swap_entry``."""
    key = _codec.encode_key(namespace, service)
    ns = key[: key.index(b"\x00")]
    args: list[object] = [1, b"", b"", b"", b"", b"", 0]
    host, lease = b"", 0
    if new is not None:
        _, _, tags, packed = backend._prepare(namespace, service, new.metadata)
        host = backend._host(new.owner)
        lease = backend._lease_ms if host == backend._here else 0
        owner = new.owner
        args = [0, owner.pid, owner.start_ticks, host, tags, packed, new.generation]
    while True:
        found = backend._get_raw(ns, key)
        current = None
        if found is not None and _live(backend, found):
            current = _stored(backend, namespace, key, ns, found)
        if not same_entry(current, expect):
            return False, current
        got = backend._run(
            "swap",
            ns,
            key,
            found or b"",
            *args,
            time.time(),
            backend.ring_events,
            lease,
            operation="migrate",
        )
        if got[0] == b"MOVED":
            continue
        if new is None:
            return True, None
        owner = backend._ident(b"%d" % new.owner.pid, b"%d" % new.owner.start_ticks, host)
        service = _codec.decode_service(key, len(ns))
        return True, new._replace(service=service, owner=owner, generation=int(got[1]))


def import_many(
    backend: RedisBackend, entries: list[StoredEntry]
) -> list[tuple[bool, StoredEntry | None]]:
    """Import entries into absent names, pipelined: one round trip per 1000.

    A name found taken (the script answers MOVED) is left to ``swap`` one by one, which
    judges what holds it.
    """
    prepared = []
    for e in entries:
        key = _codec.encode_key(e.namespace, e.service)
        _, _, tags, packed = backend._prepare(e.namespace, e.service, e.metadata)
        host = backend._host(e.owner)
        lease = backend._lease_ms if host == backend._here else 0
        ns = key[: key.index(b"\x00")]
        args = [ns, key, b"", 0, e.owner.pid, e.owner.start_ticks, host, tags, packed]
        prepared.append((e, key, host, [*args, e.generation], lease))
    if backend._closed:
        backend._run("last")  # raises the right error for this handle
    sha = backend._scripts.sha("swap")
    out: list[tuple[bool, StoredEntry | None]] = []
    for start in range(0, len(prepared), 1000):
        chunk = prepared[start : start + 1000]
        with mapped(backend._name, "migrate"):
            backend._client.script_load(backend._scripts.source("swap"))
            pipe = backend._client.pipeline(transaction=False)
            now = time.time()
            for _, _, _, args, lease in chunk:
                pipe.evalsha(sha, 1, *backend._keys, *args, now, backend.ring_events, lease)
            results = pipe.execute()
        for (e, key, host, _, _), got in zip(chunk, results, strict=True):
            if got[0] == b"MOVED":
                out.append(swap(backend, e.namespace, e.service, None, e))
                continue
            owner = backend._ident(b"%d" % e.owner.pid, b"%d" % e.owner.start_ticks, host)
            service = _codec.decode_service(key, key.index(b"\x00"))
            out.append((True, e._replace(service=service, owner=owner, generation=int(got[1]))))
    return out

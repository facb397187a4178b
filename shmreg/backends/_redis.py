"""``RedisBackend``: the registry on a Redis server, shared by processes on many hosts.

Storage only: the policy (fencing, lost events, sweeps, health, queries) is
``BackendBase``'s, and every operation is one Lua script (``_redis_lua``), atomic on the
server; a lookup is one ``HGET``. This module holds the point reads, writes, queries and
statistics; liveness and events are in ``_redis_liveness.py``, plumbing in ``_redis_base.py``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from shmreg import _codec, _identity
from shmreg._errors import (
    NotRegistered,
)
from shmreg._types import (
    Entry,
    Metadata,
    ProcessIdentity,
    RegistryStats,
    Service,
)
from shmreg.backends import _redis_portable
from shmreg.backends._base import (
    check_generation,
    held_by,
)
from shmreg.backends._portable import StoredEntry
from shmreg.backends._redis_base import _Stored
from shmreg.backends._redis_conn import mapped, translate
from shmreg.backends._redis_liveness import RedisLiveness

_INDEXED = (("type", b"t"), ("capabilities", b"c"))  # field, tag prefix
_CACHED = (str, int)  # service types whose encoded key a handle remembers (not bool: exact)


def _field_tags(prefix: bytes, value: object) -> list[bytes]:
    items = value if type(value) is list else [value]
    return [prefix + item.encode().hex().encode() for item in items if type(item) is str]


def _tags(meta: Metadata) -> bytes:
    """Index tags for ``type`` and ``capabilities``: str values and list members, in hex.

    Only str values are indexed: Python equality makes 1, 1.0 and True one value, which no
    byte-keyed set can; a query on a non-str value scans instead (``find``). A list field is
    tagged per member because queries match list fields by membership.
    """
    tags = {t for field, prefix in _INDEXED for t in _field_tags(prefix, meta.get(field))}
    return b",".join(sorted(tags))


def _wanted_tags(equals: Mapping[str, Any]) -> list[bytes] | None:
    """Tags every match of an ``equals`` query must carry, or None when none is indexable."""
    tags = [t for field, prefix in _INDEXED for t in _field_tags(prefix, equals.get(field))]
    return tags or None


class RedisBackend(RedisLiveness):
    """Registry storage in Redis; see docs/redis.md.

    ``RedisBackend(name, url=None, *, create=True, capacity=None, max_metadata_bytes=None,
    ring_events=None)``: ``url`` (else ``$SHMREG_URL``) names the server; the registry lives
    under keys with the hash tag ``{name}``. ``create=False`` attaches only
    (``RegistryNotFound`` if absent).
    """

    # ------------------------------------------------------------------ reads

    def _get(self, namespace: str, service: Service) -> tuple[bytes, bytes, bytes] | None:
        """The stored value of a live entry: one ``HGET``, the work of a bare ``GET``.

        A miss asks once more whether the registry still exists (a destroyed one must say
        so); a remote owner's host lease is checked at most every ``_LEASE_CACHE`` seconds.
        """
        if type(service) in _CACHED and type(namespace) is str:
            cached = self._keycache.get((namespace, service))
            if cached is None or cached[3] is not type(service):
                cached = self._cache_key(namespace, service)
        else:
            # Tuples are encoded every time: ("a", 1) and ("a", True) are one dict key, and
            # the second is no valid name; only encode_key's own checks can say so.
            cached = self._cache_key(namespace, service, keep=False)
        hkey, ns, key, _ = cached
        if self._closed:
            self._run("last")  # raises the right error for this handle
        try:
            value = self._line.call("HGET", hkey, key)
        except self._redis_error as exc:
            raise translate(self._name, "lookup", exc) from exc
        if value is None:
            self._run("last", operation="lookup")  # RegistryDestroyed if it is gone
            return None
        head = self._head(value)
        if head[4] == self._here:
            if not _identity.probe_alive(int(head[0])):
                return None  # the per-read probe, for owners on this host only
        elif not self._lease_lives(head[4]):
            return None
        return ns, key, value

    def _cache_key(
        self, namespace: str, service: Service, keep: bool = True
    ) -> tuple[bytes, bytes, bytes, type]:
        # The type is kept because 1, 1.0 and True are one dict key but different names.
        key = _codec.encode_key(namespace, service)
        ns = key[: key.index(b"\x00")]
        cached = (self._bprefix + b"ns:" + ns, ns, key, type(service))
        if not keep:
            return cached
        if len(self._keycache) >= 65_536:
            self._keycache.clear()  # a bound, not an LRU: hot keys come back at once
        self._keycache[(namespace, service)] = cached
        return cached

    def _lease_lives(self, host: bytes) -> bool:
        now = time.monotonic()
        if now - self._leases.get(host, -1e9) < self._lease_cache:
            return True
        with mapped(self._name, "lookup"):
            alive = bool(self._line.call("EXISTS", self._bprefix + b"lease:" + host))
        if alive:
            self._leases[host] = now
        else:
            self._leases.pop(host, None)
        return alive

    def lookup(self, namespace: str, service: Service) -> int | None:
        found = self._get(namespace, service)
        return None if found is None else int(found[2][: found[2].index(b"\t")])

    def lookup_entry(self, namespace: str, service: Service) -> tuple[int, int, Metadata] | None:
        found = self._get(namespace, service)
        if found is None:
            return None
        value = found[2]
        pid, _, gen, _, _ = self._head(value)
        return int(pid), int(gen), _codec.unpack_metadata(value[value.index(b"\n") + 1 :])

    def _entry(self, ns: bytes, key: bytes, value: bytes) -> Entry:
        cut = value.index(b"\n")
        return Entry(
            _codec.decode_service(key, len(ns)),
            int(value[: value.index(b"\t")]),
            _codec.unpack_metadata(value[cut + 1 :]),
        )

    def _space(self, namespace: str) -> list[_Stored]:
        return self._live_raw(_codec.check_namespace(namespace))

    def _live_raw(self, ns: bytes) -> list[_Stored]:
        stored, expired = self._scan_raw(ns)
        probed: dict[int, bool] = {}
        return [s for s in stored if self._alive(s[2], expired, probed)]

    def list_entries(self, namespace: str) -> list[Entry]:
        return [self._entry(*s) for s in self._space(namespace)]

    def list_services(self, namespace: str) -> list[Service]:
        return [_codec.decode_service(key, len(ns)) for ns, key, _ in self._space(namespace)]

    def find(
        self,
        namespace: str,
        equals: Mapping[str, Any] | None = None,
        predicate: Any = None,
    ) -> list[Entry]:
        tags = _wanted_tags(equals) if equals else None
        if tags is None:
            return super().find(namespace, equals, predicate)
        ns = _codec.check_namespace(namespace)
        flat = self._run("find", ns, *tags, operation="find")
        _, expired = self._scan_hosts()
        probed: dict[int, bool] = {}
        entries = [
            self._entry(ns, flat[i], flat[i + 1])
            for i in range(0, len(flat), 2)
            if self._alive(flat[i + 1], expired, probed)
        ]
        entries = _codec.select(entries, equals or {})  # the index only narrowed: confirm
        if predicate is not None:
            entries = [e for e in entries if predicate(e.metadata)]
        return entries

    def _scan_hosts(self) -> tuple[None, set[bytes]]:
        return None, set(self._run("expired", operation="find"))

    def namespace_owners(self, namespace: str) -> list[tuple[Service, ProcessIdentity, int]]:
        out = []
        for ns, key, value in self._space(namespace):
            pid, start, gen, _, host = self._head(value)
            out.append(
                (_codec.decode_service(key, len(ns)), self._ident(pid, start, host), int(gen))
            )
        return out

    def count(self, namespace: str | None = None) -> int:
        if namespace is None:
            return len(self._live_raw(b""))
        return len(self._space(namespace))

    def dump(self) -> list[dict[str, Any]]:
        """Every stored entry, dead owners included (flagged), with its host: ``shmreg ls``."""
        stored, expired = self._scan()
        probed: dict[int, bool] = {}
        out = []
        for ns, key, value in stored:
            pid, start, gen, _, host = self._head(value)
            entry = self._entry(ns, key, value)
            out.append(
                {
                    "namespace": ns.decode(),
                    "service": entry.service,
                    "pid": entry.pid,
                    "host": self._ident(pid, start, host).host or _identity.host_id(),
                    "alive": self._alive(value, expired, probed),
                    "generation": int(gen),
                    "metadata": entry.metadata,
                }
            )
        return out

    # ------------------------------------------------------------------ writes

    def _prepare(
        self, namespace: str, service: Service, metadata: Mapping[str, Any] | None
    ) -> tuple[bytes, bytes, bytes, bytes]:
        key = _codec.encode_key(namespace, service)
        meta = _codec.as_metadata(metadata)
        packed = _codec.pack_metadata(meta, self.max_metadata_bytes)
        return key[: key.index(b"\x00")], key, _tags(meta), packed

    def register(
        self,
        namespace: str,
        service: Service,
        owner: ProcessIdentity,
        metadata: Mapping[str, Any] | None,
    ) -> int:
        return self._register(
            namespace, service, owner, self._prepare(namespace, service, metadata)
        )

    def register_many(
        self,
        namespace: str,
        items: list[tuple[Service, ProcessIdentity, Mapping[str, Any] | None]],
    ) -> list[int]:
        """Every item validated first (bad input stores none), then one script each."""
        prepared = [
            (service, owner, self._prepare(namespace, service, metadata))
            for service, owner, metadata in items
        ]
        return [self._register(namespace, s, o, p) for s, o, p in prepared]

    def _register(
        self,
        namespace: str,
        service: Service,
        owner: ProcessIdentity,
        prepared: tuple[bytes, bytes, bytes, bytes],
    ) -> int:
        ns, key, tags, packed = prepared
        host = self._host(owner)
        expect = b""
        # Renew the owner host's lease with the registration, unless this handle renewed it
        # within a fifth of the lease (what a monitor's heartbeat would do anyway).
        now = time.monotonic()
        lease = self._lease_ms
        if host == self._here and now - self._renewed < self._target.lease / 5:
            lease = 0
        while True:
            got = self._run(
                "register",
                ns,
                key,
                owner.pid,
                owner.start_ticks,
                host,
                tags,
                packed,
                time.time(),
                self.ring_events,
                lease,
                expect,
                operation="register",
            )
            if lease and host == self._here:
                self._renewed = now
            verdict = got[0]
            if verdict == b"MOVED":  # the holder we judged was replaced meanwhile: again
                expect = b""
                continue
            if verdict in (b"HELD", b"LIVE"):
                pid, start, _, _, hhost = self._head(got[1])
                holder = self._ident(pid, start, hhost)
                # HELD: a holder on the owner's host, judged here (a proof of death is needed);
                # LIVE: a remote holder whose host's lease lives.
                if verdict == b"LIVE" or not _identity.check(holder).is_dead:
                    raise held_by(namespace, service, holder.pid)
                expect = got[1]
                continue
            return int(verdict)

    def update_metadata(
        self,
        namespace: str,
        service: Service,
        metadata: Mapping[str, Any],
        *,
        merge: bool = False,
        generation: int | None = None,
    ) -> None:
        update = _codec.as_metadata(metadata)
        limit = self.max_metadata_bytes
        packed = _codec.pack_metadata(update, 2**62 if merge else limit)
        while True:
            found = self._get(namespace, service)
            if found is None:
                raise NotRegistered(
                    f"{namespace}/{service!r} is not registered",
                    namespace=namespace,
                    service=service,
                )
            ns, key, old = found
            cut = old.index(b"\n")
            pid, start, gen, _, host = self._head(old)
            check_generation(namespace, service, int(gen), generation)
            meta = update
            if merge:
                meta = _codec.unpack_metadata(old[cut + 1 :])
                meta.update(update)  # shallow, as documented: nested dicts are replaced
                packed = _codec.pack_metadata(meta, limit)
            tags = _tags(meta)
            new = b"\t".join((pid, start, gen, tags, host)) + b"\n" + packed
            args = (ns, key, old, new, tags, time.time(), self.ring_events)
            if self._run("update", *args, operation="update_metadata"):
                return

    def unregister(
        self, namespace: str, service: Service, *, generation: int | None = None
    ) -> bool:
        key = _codec.encode_key(namespace, service)
        ns = key[: key.index(b"\x00")]
        fence = b"" if generation is None else str(generation).encode()
        got = self._run(
            "unregister",
            ns,
            key,
            fence,
            time.time(),
            self.ring_events,
            self._here,
            operation="unregister",
        )
        if got is None:
            return False
        if got[0] == b"STALE":
            check_generation(namespace, service, int(got[1]), generation)
        # A dead owner's entry is removed all the same, but no read saw it: answer as they did.
        return self._alive(got[0], set() if got[1] else {self._head(got[0])[4]}, {})

    # ------------------------------------------------------------------ migration

    def namespaces(self) -> list[str]:
        return sorted(ns.decode() for ns in self._run("namespaces", operation="namespaces"))

    def export_entries(self, namespace: str) -> list[StoredEntry]:
        return _redis_portable.export(self, namespace)

    def swap_entry(
        self,
        namespace: str,
        service: Service,
        expect: StoredEntry | None,
        new: StoredEntry | None,
    ) -> tuple[bool, StoredEntry | None]:
        return _redis_portable.swap(self, namespace, service, expect, new)

    def import_entries(self, entries: list[StoredEntry]) -> list[tuple[bool, StoredEntry | None]]:
        return _redis_portable.import_many(self, entries)

    def _get_raw(self, ns: bytes, key: bytes) -> bytes | None:
        """The stored value, dead owner or not (None when absent)."""
        if self._closed:
            self._run("last")  # raises the right error for this handle
        with mapped(self._name, "lookup"):
            value: bytes | None = self._client.hget(self._bprefix + b"ns:" + ns, key)
        if value is None:
            self._run("last", operation="lookup")  # RegistryDestroyed if it is gone
        return value

    # ------------------------------------------------------------------ reporting

    def stats(self) -> RegistryStats:
        seq, gen, sweeps, dead_found, last_sweep, namespaces = self._run("meta", operation="stats")
        stored, _ = self._scan()
        used = len(stored)
        capacity = max(self.capacity, used)
        return RegistryStats(
            backend=self.kind,
            capacity=capacity,
            used=used,
            tombstones=0,
            load_factor=used / capacity,
            namespaces=int(namespaces),
            memory_bytes=sum(len(k) + len(v) for _, k, v in stored) or 1,
            sweeps=int(sweeps or 0),
            last_sweep_time=float(last_sweep) if last_sweep else None,
            dead_found=int(dead_found or 0),
            extra={
                "name": self._name,
                "url": self.url,
                "capacity_setting": self.capacity,
                "max_metadata_bytes": self.max_metadata_bytes,
                "ring_events": self.ring_events,
                "ops": int(seq or 0),  # every change appends one event
                "owner_changes": int(gen or 0),
                "event_seq": int(seq or 0),
            },
            unknown_owners=self.health_check().unknown,
        )

    def __repr__(self) -> str:
        return f"<shmreg.backends.RedisBackend {self._name!r} at {self.url}>"

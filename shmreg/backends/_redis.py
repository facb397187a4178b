"""``RedisBackend``: the registry on a Redis server, shared by processes on many hosts.

Storage only: the policy (fencing, lost events, sweeps, health, queries) is
``BackendBase``'s, and every operation is one Lua script (``_redis_lua``), atomic on the server.

Liveness across hosts. An owner is ``(pid, start ticks, host)``; only its own host can judge
a pid. Each host keeps a lease key alive (a monitor renews it, ``heartbeat``; every
registration renews it too). Reads here probe local owners' pids as the shared-memory backend
does, and trust a remote owner while its host's lease lives; once the lease expired, that
host's entries read as dead and any sweeper removes them with a ``died`` event whose reason is
``host-lost``. The scripts themselves refuse to remove an entry of a host whose lease lives.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from shmreg import _codec, _identity
from shmreg._errors import (
    AlreadyRegistered,
    IncompatibleRegistry,
    InvalidBackendConfig,
    NotRegistered,
    RegistryClosed,
    RegistryDestroyed,
    RegistryNotFound,
)
from shmreg._events import Event
from shmreg._limits import (
    DEFAULT_CAPACITY,
    DEFAULT_MAX_METADATA_BYTES,
    MAX_CAPACITY,
    MAX_METADATA_LIMIT,
    RING_EVENTS,
)
from shmreg._types import (
    Entry,
    Liveness,
    Metadata,
    ProcessIdentity,
    RegistryStats,
    Service,
)
from shmreg.backends import _redis_lua as lua
from shmreg.backends import _redis_portable
from shmreg.backends._base import (
    BackendBase,
    check_generation,
    dead_reasons,
    event_window,
    setting,
)
from shmreg.backends._portable import StoredEntry
from shmreg.backends._redis_conn import Scripts, connect, mapped, parse

HOST_LOST = "host-lost"  # the ``died`` reason for entries of a host whose lease expired
_SCRIPTS = {
    "open": lua.OPEN,
    "register": lua.REGISTER,
    "update": lua.UPDATE,
    "unregister": lua.UNREGISTER,
    "remove": lua.REMOVE,
    "scan": lua.SCAN,
    "find": lua.FIND,
    "events": lua.EVENTS,
    "last": lua.LAST,
    "expired": lua.EXPIRED,
    "heartbeat": lua.HEARTBEAT,
    "meta": lua.META,
    "swap": lua.SWAP,
    "namespaces": lua.NAMESPACES,
}
# (namespace bytes, key bytes, stored value)
_Stored = tuple[bytes, bytes, bytes]


_INDEXED = (("type", b"t"), ("capabilities", b"c"))  # field, tag prefix


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


def registry_names(url: str) -> list[str]:
    """The names of the registries stored on the server at ``url`` (``shmreg ls URL``)."""
    client = connect(parse(url))
    try:
        with mapped(url, "list registries"):
            keys = client.scan_iter(match="shmreg:{*}:meta", count=1000)
            return sorted(k.decode()[len("shmreg:{") : -len("}:meta")] for k in keys)
    finally:
        client.close()


class RedisBackend(BackendBase):
    """Registry storage in Redis; see the module docstring and docs/redis.md.

    ``url`` (else ``$SHMREG_URL``) names the server; the registry lives under keys with the
    hash tag ``{name}``. ``create=False`` attaches only (``RegistryNotFound`` if absent).
    """

    kind = "redis"

    def __init__(
        self,
        name: str,
        url: str | None = None,
        *,
        create: bool = True,
        capacity: int | None = None,
        max_metadata_bytes: int | None = None,
        ring_events: int | None = None,
    ) -> None:
        url = url or os.environ.get("SHMREG_URL")
        if not url:
            raise InvalidBackendConfig("the Redis backend needs url= or $SHMREG_URL")
        self._name = name
        self._target = parse(url)
        self._closed = self._destroyed = False
        self._client = connect(self._target)
        self._scripts = Scripts(self._client, _SCRIPTS)
        self._keys = [f"shmreg:{{{name}}}:"]
        self._bprefix = self._keys[0].encode()
        # A remote host seen alive is believed for a tenth of the lease: a lookup then costs
        # one round trip, and a lost host reads dead at most lease * 1.1 after its last renewal.
        self._leases: dict[bytes, float] = {}
        self._lease_cache = self._target.lease / 10
        self._renewed = -1e9  # when this handle last renewed its host's lease (monotonic)
        self._lease_ms = int(self._target.lease * 1000)
        self._here = _identity.host_id().encode().hex().encode()  # fixed once opened
        asked = {
            "capacity": setting("capacity", capacity, DEFAULT_CAPACITY, MAX_CAPACITY),
            "max_metadata_bytes": setting(
                "max_metadata_bytes",
                max_metadata_bytes,
                DEFAULT_MAX_METADATA_BYTES,
                MAX_METADATA_LIMIT,
            ),
            "ring_events": setting("ring_events", ring_events, RING_EVENTS, 2**24),
        }
        got = self._run("open", int(create), *asked.values(), time.time(), operation="open")
        if got is None:
            self._client.close()
            raise RegistryNotFound(f"no Redis registry named {name!r} at {url}", name=name)
        actual = dict(zip(asked, (int(v) for v in got), strict=True))
        for option, value in (
            ("capacity", capacity),
            ("max_metadata_bytes", max_metadata_bytes),
            ("ring_events", ring_events),
        ):
            if value is not None and value != actual[option]:
                self._client.close()
                raise IncompatibleRegistry(
                    f"{option}: registry {name!r} has {actual[option]}, caller asked for {value}",
                    setting=option,
                    expected=value,
                    actual=actual[option],
                )
        self.capacity: int = actual["capacity"]
        self.max_metadata_bytes: int = actual["max_metadata_bytes"]
        self.ring_events: int = actual["ring_events"]

    # ------------------------------------------------------------------ plumbing

    @property
    def name(self) -> str:
        return self._name

    @property
    def url(self) -> str:
        """The URL this handle was opened with (pickles and ``shmreg`` commands carry it)."""
        return self._target.url

    def _run(self, op: str, *args: Any, operation: str | None = None) -> Any:
        if self._closed:
            if self._destroyed:
                raise RegistryDestroyed(f"registry {self._name!r} was destroyed", name=self._name)
            raise RegistryClosed(
                f"registry {self._name!r} is closed in this handle", name=self._name
            )
        with mapped(self._name, operation or op):
            return self._scripts.run(op, self._keys, list(args))

    def _ident(self, pid: bytes, start: bytes, host: bytes) -> ProcessIdentity:
        if host == self._here:
            return ProcessIdentity(int(pid), int(start))
        return ProcessIdentity(int(pid), int(start), bytes.fromhex(host.decode()).decode())

    def _host(self, owner: ProcessIdentity) -> bytes:
        return owner.host.encode().hex().encode() if owner.host else self._here

    @staticmethod
    def _head(value: bytes) -> list[bytes]:
        """``[pid, start, generation, tags, host]`` of a stored value."""
        return value[: value.index(b"\n")].split(b"\t")

    def _alive(self, value: bytes, expired: set[bytes], probed: dict[int, bool]) -> bool:
        """Whether a stored entry reads as live: pid probe here, the lease elsewhere."""
        pid, _, _, _, host = self._head(value)
        if host != self._here:
            return host not in expired
        n = int(pid)
        if n not in probed:
            probed[n] = _identity.probe_alive(n)
        return probed[n]

    # ------------------------------------------------------------------ reads

    def _get(self, namespace: str, service: Service) -> tuple[bytes, bytes, bytes] | None:
        """The stored value of a live entry: one ``HGET``, the work of a bare ``GET``.

        A miss asks once more whether the registry still exists (a destroyed one must say
        so); a remote owner's host lease is checked at most every ``_LEASE_CACHE`` seconds.
        """
        key = _codec.encode_key(namespace, service)
        ns = key[: key.index(b"\x00")]
        if self._closed:
            self._run("last")  # raises the right error for this handle
        with mapped(self._name, "lookup"):
            value = self._client.hget(self._bprefix + b"ns:" + ns, key)
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

    def _lease_lives(self, host: bytes) -> bool:
        now = time.monotonic()
        if now - self._leases.get(host, -1e9) < self._lease_cache:
            return True
        with mapped(self._name, "lookup"):
            alive = bool(self._client.exists(self._bprefix + b"lease:" + host))
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

    def lookup_with_metadata(self, namespace: str, service: Service) -> tuple[int, Metadata] | None:
        found = self.lookup_entry(namespace, service)
        return None if found is None else (found[0], found[2])

    def _scan(self, namespace: str | None = None) -> tuple[list[_Stored], set[bytes]]:
        """Every stored entry (of one namespace), dead included, and the expired hosts."""
        return self._scan_raw(b"" if namespace is None else _codec.check_namespace(namespace))

    def _scan_raw(self, ns: bytes) -> tuple[list[_Stored], set[bytes]]:
        flat = self._run("scan", ns, operation="scan")
        cut = flat.index(b"")
        stored = [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, cut, 3)]
        return stored, set(flat[cut + 1 :])

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
                    raise AlreadyRegistered(
                        f"{namespace}/{service!r} is held by live pid {holder.pid}",
                        namespace=namespace,
                        service=service,
                        pid=holder.pid,
                    )
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

    # ------------------------------------------------------------------ liveness

    def owner_counts(self) -> dict[ProcessIdentity, int]:
        stored, _ = self._scan()
        heads = [self._head(value) for _, _, value in stored]
        return dict(Counter(self._ident(h[0], h[1], h[4]) for h in heads))

    def _verdicts(self, identities: Iterable[ProcessIdentity]) -> dict[ProcessIdentity, Liveness]:
        """Local owners by ``/proc``; remote ones by their host's lease (dead only if expired)."""
        identities = list(identities)
        expired = set(self._run("expired", operation="sweep"))
        local = [i for i in identities if _identity.is_local(i)]
        verdicts = _identity.check_many(local)
        for ident in identities:
            if ident not in verdicts:
                lost = ident.host.encode().hex().encode() in expired
                verdicts[ident] = Liveness.GONE if lost else Liveness.SAME
        return verdicts

    def remove_dead(self, verdicts: Mapping[ProcessIdentity, Liveness]) -> int:
        return self._remove(verdicts, sweeping=False)

    def sweep(self) -> int:
        return self._remove(self._verdicts(self.owners()), sweeping=True)

    def _remove(self, verdicts: Mapping[ProcessIdentity, Liveness], sweeping: bool) -> int:
        reasons = {
            ident: (reason if _identity.is_local(ident) else HOST_LOST)
            for ident, reason in dead_reasons(verdicts).items()
        }
        args: list[Any] = [time.time(), self.ring_events, self._here, int(sweeping)]
        if reasons:
            stored, _ = self._scan()
            for ns, key, value in stored:
                head = self._head(value)
                reason = reasons.get(self._ident(head[0], head[1], head[4]))
                if reason is not None:
                    args += [ns, key, value, reason]
        if len(args) == 4 and not sweeping:
            return 0
        return int(self._run("remove", *args, operation="remove_dead"))

    @property
    def heartbeat_interval(self) -> float:
        """How often a monitor calls ``heartbeat``: a fifth of the lease (2 s of 10 s)."""
        return self._target.lease / 5

    def heartbeat(self) -> int:
        """Renew this host's lease; remove the entries of hosts whose lease expired. How many.

        A monitor calls it every ``heartbeat_interval`` seconds.
        """
        renewed = time.monotonic()
        expired = set(self._run("heartbeat", self._here, self._lease_ms, operation="heartbeat"))
        self._renewed = renewed
        if not expired:
            return 0
        stored, _ = self._scan()
        args: list[Any] = [time.time(), self.ring_events, self._here, 0]
        for ns, key, value in stored:
            if self._head(value)[4] in expired:
                args += [ns, key, value, HOST_LOST]
        return int(self._run("remove", *args, operation="heartbeat")) if len(args) > 4 else 0

    # ------------------------------------------------------------------ events

    def last_event_seq(self) -> int:
        return int(self._run("last", operation="last_event_seq") or 0)

    def read_events(self, after: int, limit: int = 1024) -> tuple[list[Event], int]:
        after = max(after, 0)
        last, raw = self._run(
            "events", after, max(limit, 1), self.ring_events, operation="read_events"
        )
        first, stop, lost = event_window(after, int(last or 0), self.ring_events, limit)
        out = []
        for entry_id, fields in raw:
            seq = int(entry_id.split(b"-")[0])
            if first <= seq <= stop:
                out.append(self._event(seq, fields))
        return out, lost

    def wait_events(self, after: int, timeout: float) -> bool:
        """Block until an event numbered after ``after`` exists (``XREAD BLOCK``), or timeout.

        Blocks in slices shorter than the socket timeout, so a slow wait is never mistaken
        for an unreachable server.
        """
        deadline = time.monotonic() + timeout
        stream = self._keys[0] + "ev"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            block = max(1, int(min(left, self._target.timeout * 0.5) * 1000))
            with mapped(self._name, "wait"):
                if self._client.xread({stream: f"{after}-1"}, count=1, block=block):
                    return True

    def _event(self, seq: int, fields: list[bytes]) -> Event:
        f = dict(zip(fields[::2], fields[1::2], strict=True))
        ns, key, host = f[b"n"], f[b"s"], f[b"h"]
        return Event(
            seq,
            f[b"k"].decode(),
            ns.decode(),
            _codec.decode_service(key, len(ns)),
            int(f[b"p"]),
            int(f[b"g"]),
            float(f[b"t"]),
            f[b"r"].decode() or None,
            start_ticks=int(f[b"st"]),
            host="" if host == self._here else bytes.fromhex(host.decode()).decode(),
        )

    # ------------------------------------------------------------------ reporting

    def stats(self) -> RegistryStats:
        seq, gen, sweeps, dead_found, last_sweep, namespaces = self._run(
            "meta", operation="stats"
        )
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

    def close(self) -> None:
        """Detach this handle and its connections; the registry stays. Idempotent."""
        if not self._closed:
            self._closed = True
            self._client.close()

    def destroy(self) -> None:
        """Delete every key of the registry (other handles' next call: RegistryDestroyed)."""
        if not self._destroyed:
            prefix = self._keys[0]
            with mapped(self._name, "destroy"):
                self._client.delete(prefix + "meta")  # first: every script now refuses
                batch = list(self._client.scan_iter(match=prefix + "*", count=1000))
                for i in range(0, len(batch), 1000):
                    self._client.delete(*batch[i : i + 1000])
        self.close()
        self._destroyed = True

    def __repr__(self) -> str:
        return f"<shmreg.backends.RedisBackend {self._name!r} at {self.url}>"

"""``RedisBackend``'s plumbing: opening, the script runner, the entry format, close, destroy.

``RedisBackend`` (``_redis.py``) is assembled from this base and one mixin, each one job:
point reads, writes, queries and statistics (``_redis.py``), liveness across hosts and events
(``_redis_liveness.py``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from shmreg import _codec, _identity
from shmreg._errors import (
    IncompatibleRegistry,
    InvalidBackendConfig,
    RegistryClosed,
    RegistryDestroyed,
    RegistryNotFound,
)
from shmreg._limits import (
    DEFAULT_CAPACITY,
    DEFAULT_MAX_METADATA_BYTES,
    MAX_CAPACITY,
    MAX_METADATA_LIMIT,
    RING_EVENTS,
)
from shmreg._types import (
    ProcessIdentity,
)
from shmreg.backends import _redis_lua as lua
from shmreg.backends._base import (
    BackendBase,
    check_settings,
    setting,
)
from shmreg.backends._redis_conn import Line, Scripts, connect, mapped, parse, translate

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


def registry_names(url: str) -> list[str]:
    """The names of the registries stored on the server at ``url`` (``shmreg ls URL``)."""
    client = connect(parse(url))
    try:
        with mapped(url, "list registries"):
            keys = client.scan_iter(match="shmreg:{*}:meta", count=1000)
            return sorted(k.decode()[len("shmreg:{") : -len("}:meta")] for k in keys)
    finally:
        client.close()


def _errors() -> type[Exception]:
    from redis.exceptions import RedisError

    return RedisError


class RedisBase(BackendBase):
    """State and helpers shared by every part of ``RedisBackend``."""

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
        self._line = Line(self._client)
        self._scripts = Scripts(self._line, _SCRIPTS)
        self._keys = [f"shmreg:{{{name}}}:"]
        self._bprefix = self._keys[0].encode()
        # A remote host seen alive is believed for a tenth of the lease: a lookup then costs
        # one round trip, and a lost host reads dead at most lease * 1.1 after its last renewal.
        self._leases: dict[bytes, float] = {}
        self._lease_cache = self._target.lease / 10
        self._renewed = -1e9  # when this handle last renewed its host's lease (monotonic)
        # (namespace, service) -> (hash key, namespace bytes, key bytes, service type)
        self._keycache: dict[tuple[str, Any], tuple[bytes, bytes, bytes, type]] = {}
        self._redis_error: type[Exception] = _errors()
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
            self._line.close()
            raise RegistryNotFound(f"no Redis registry named {name!r} at {url}", name=name)
        actual = dict(zip(asked, (int(v) for v in got), strict=True))
        try:
            check_settings(
                name,
                {
                    "capacity": capacity,
                    "max_metadata_bytes": max_metadata_bytes,
                    "ring_events": ring_events,
                },
                actual,
            )
        except IncompatibleRegistry:
            self._line.close()
            raise
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
        try:
            return self._scripts.run(op, self._keys, list(args))
        except self._redis_error as exc:  # as ``mapped`` does, without its cost per call
            error = translate(self._name, operation or op, exc)
            if isinstance(error, RegistryDestroyed):
                raise error from None
            raise error from exc

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

    def _scan(self, namespace: str | None = None) -> tuple[list[_Stored], set[bytes]]:
        """Every stored entry (of one namespace), dead included, and the expired hosts."""
        return self._scan_raw(b"" if namespace is None else _codec.check_namespace(namespace))

    def _scan_raw(self, ns: bytes) -> tuple[list[_Stored], set[bytes]]:
        flat = self._run("scan", ns, operation="scan")
        cut = flat.index(b"")
        stored = [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, cut, 3)]
        return stored, set(flat[cut + 1 :])

    def close(self) -> None:
        """Detach this handle and its connections; the registry stays. Idempotent."""
        if not self._closed:
            self._closed = True
            self._line.close()

    def destroy(self) -> None:
        """Delete every key of the registry (other handles' next call: RegistryDestroyed)."""
        if not self._destroyed:
            prefix = self._keys[0]
            with mapped(self._name, "destroy"):
                self._client.delete(prefix + "meta")  # first: every script now refuses
                # The name is not a pattern: "x*" must not match registry "xy"'s keys.
                pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
                batch = list(self._client.scan_iter(match=pattern, count=1000))
                for i in range(0, len(batch), 1000):
                    self._client.delete(*batch[i : i + 1000])
        self.close()
        self._destroyed = True

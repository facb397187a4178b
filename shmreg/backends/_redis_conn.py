"""Reaching Redis: URLs, clients with bounded timeouts, scripts, and errors mapped to shmreg's.

``redis`` (redis-py) is imported here, lazily, only when a Redis registry is opened: the core
needs numpy, msgpack, psutil and filelock and nothing else.

URLs: ``redis://[user:password@]host[:port][/db]``, ``rediss://`` (TLS), ``unix:///path``,
and ``redis+sentinel://[password@]host:port[,host:port...]/service[/db]`` for a master that
Sentinel elects. Query options: ``timeout`` (seconds a call may wait on an unresponsive
server before ``BackendUnavailable``, default 1), ``lease``
(host lease seconds, default 10).

Errors are mapped at this seam, once: a server that cannot be reached or answers too late is
``BackendUnavailable`` (retry with backoff: the client reconnects by itself on the next call),
a command the server refused is ``BackendOperationFailed``, and a script's own refusal
("the registry was destroyed") the matching shmreg error.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from shmreg._errors import (
    BackendOperationFailed,
    BackendUnavailable,
    InvalidBackendConfig,
    RegistryDestroyed,
)

DEFAULT_TIMEOUT = 1.0
DEFAULT_LEASE = 10.0
SCHEMES = ("redis", "rediss", "unix", "redis+sentinel")


def is_url(text: object) -> bool:
    """Whether ``text`` names a Redis registry (``shmreg ls`` takes a name or a URL)."""
    return isinstance(text, str) and text.split("://", 1)[0] in SCHEMES and "://" in text


@dataclass(frozen=True)
class Target:
    """A parsed URL: where the server is, and the options shmreg reads from the query."""

    url: str
    timeout: float
    lease: float


def parse(url: str) -> Target:
    """Check ``url`` and read shmreg's options from it; ``InvalidBackendConfig`` if malformed."""
    if not is_url(url):
        raise InvalidBackendConfig(
            f"not a Redis URL: {url!r} (use redis://, rediss://, unix:// or redis+sentinel://)"
        )
    query = parse_qs(urlsplit(url).query)
    options = {}
    for option, default in (("timeout", DEFAULT_TIMEOUT), ("lease", DEFAULT_LEASE)):
        raw = query.get(option, [None])[-1]
        try:
            value = default if raw is None else float(raw)
        except ValueError:
            value = -1.0
        if not 0 < value <= 3600:
            raise InvalidBackendConfig(f"{option} in {url!r} must be seconds in (0, 3600]")
        options[option] = value
    return Target(url, options["timeout"], options["lease"])


def _redis() -> Any:
    try:
        import redis
    except ImportError as exc:  # an optional dependency: say how to get it
        raise BackendUnavailable(
            "the Redis backend needs redis-py: pip install 'shmreg[redis]'", backend="redis"
        ) from exc
    return redis


def connect(target: Target) -> Any:
    """A redis-py client for ``target``, with shmreg's timeouts, decoding nothing."""
    redis = _redis()
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # One immediate retry lets a pooled connection broken by a server restart reconnect
    # without the caller seeing an error; each of the two attempts gets half the timeout,
    # so a hung server costs a call at most the timeout, not twice it.
    attempt = target.timeout / 2
    common: dict[str, Any] = {
        "socket_timeout": attempt,
        "socket_connect_timeout": attempt,
        "retry": Retry(NoBackoff(), 1),
        "health_check_interval": 0,
    }
    parts = urlsplit(target.url)
    if parts.scheme != "redis+sentinel":
        base = target.url.split("?", 1)[0]
        return redis.Redis.from_url(base, **common)
    from redis.sentinel import Sentinel

    password = unquote(parts.password) if parts.password else None
    hosts = []
    for item in parts.netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidBackendConfig(f"sentinel address {item!r} needs host:port")
        hosts.append((host, int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise InvalidBackendConfig(f"{target.url!r} names no Sentinel service (…/mymaster)")
    db = int(path[1]) if len(path) > 1 and path[1].isdigit() else 0
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        hosts,
        socket_timeout=attempt,
        socket_connect_timeout=attempt,
        # Given explicitly, these replace redis-py's defaults for talking to the sentinels:
        # without a connect timeout a sentinel that drops connections hangs the caller for
        # minutes (the kernel's SYN retries).
        sentinel_kwargs={
            "socket_timeout": attempt,
            "socket_connect_timeout": attempt,
            "retry": Retry(NoBackoff(), 0),  # the master's connection retries the lookup
        },
    )
    return sentinel.master_for(  # type: ignore[no-untyped-call]
        path[0], db=db, password=password, **common
    )


def translate(name: str, operation: str, exc: Exception) -> Exception:
    """The shmreg error for a redis-py exception (see the module docstring)."""
    redis = _redis()
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        # redis-py reports a Sentinel with no master as MasterNotFoundError, a ConnectionError.
        return BackendUnavailable(
            f"Redis unreachable during {operation} on {name!r}: {exc}", backend="redis"
        )
    text = str(exc)
    if isinstance(exc, redis.exceptions.ResponseError):
        if "SHMREG_DESTROYED" in text:
            return RegistryDestroyed(f"registry {name!r} was destroyed", name=name)
        if "READONLY" in text or "LOADING" in text or "MASTERDOWN" in text:
            # A replica answering for a demoted master, or a server still loading its data:
            # the same retry that waits out an unreachable server waits this out.
            return BackendUnavailable(
                f"Redis cannot serve {operation} on {name!r} yet: {text}", backend="redis"
            )
    return BackendOperationFailed(
        f"Redis refused {operation} on {name!r}: {text}", backend="redis", operation=operation
    )


@contextlib.contextmanager
def mapped(name: str, operation: str) -> Iterator[None]:
    """Turn redis-py's exceptions raised inside into shmreg errors (``translate``)."""
    try:
        yield
    except _redis().exceptions.RedisError as exc:
        error = translate(name, operation, exc)
        if isinstance(error, RegistryDestroyed):
            raise error from None
        raise error from exc


class Line:
    """Commands on one connection this handle keeps out of the pool, falling back to the pool.

    redis-py's ``execute_command`` takes a pooled connection and returns it on every call,
    which costs as much client time as the round trip's own work. A handle's calls come one
    at a time from one thread nearly always, so they share one connection; a call made while
    another is in flight (another thread, a blocking read) goes through the pool as before.
    Failures are handled as the pool does: a broken or timed-out connection is dropped and
    the call tried once more on a fresh one, so a server restart is invisible to callers.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self._pool = client.connection_pool
        self._lock = threading.Lock()
        self._conn: Any = None
        self._pid = os.getpid()
        exceptions = _redis().exceptions
        self._broken = (exceptions.ConnectionError, exceptions.TimeoutError)
        self._refused = exceptions.ResponseError  # a reply: the connection is fine

    def call(self, *args: Any) -> Any:
        """Send one command and return its raw reply (errors as redis-py raises them)."""
        if not self._lock.acquire(blocking=False):
            return self._client.execute_command(*args)
        try:
            # A connection just taken has tried to connect twice already (its own retry):
            # only one that broke in use is worth another go, on a fresh connection.
            fresh = self._conn is None or self._pid != os.getpid()
            try:
                return self._send(args)
            except self._broken:
                self._drop()  # the next attempt connects afresh (asking Sentinel again)
                if fresh:
                    raise
            return self._send(args)
        except self._refused:
            raise
        except BaseException:
            # An interrupted call may leave a reply unread on the socket: never reuse it.
            self._drop()
            raise
        finally:
            self._lock.release()

    def _send(self, args: tuple[Any, ...]) -> Any:
        if self._conn is None or self._pid != os.getpid():
            # After a fork the parent's socket is not ours to use (or to shut down). The pool
            # connects what it hands out the way each connection class must (a Sentinel one
            # looks up the master first).
            self._conn, self._pid = None, os.getpid()
            self._conn = self._pool.get_connection()
        conn = self._conn
        conn.send_packed_command(conn.pack_command(*args), check_health=False)
        return conn.read_response(disconnect_on_error=True)

    def _drop(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.disconnect()
            self._pool.release(conn)

    def close(self) -> None:
        """Hand the kept connection back and close every connection of the client.

        Takes no lock: a ``close()`` from a signal handler that interrupted a call of the
        same thread must not wait for that call (a call in flight elsewhere then fails).
        """
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            self._pool.release(conn)
        self._client.close()


class Scripts:
    """The backend's Lua scripts, run by their SHA1 and loaded again when a server lacks them."""

    def __init__(self, line: Line, sources: dict[str, str]) -> None:
        import hashlib

        self._line = line
        self._sources = sources
        self._sha = {op: hashlib.sha1(src.encode()).hexdigest() for op, src in sources.items()}
        self._noscript = _redis().exceptions.NoScriptError

    def sha(self, op: str) -> str:
        """The SHA1 a pipeline runs ``op`` by (after ``SCRIPT LOAD`` of ``source(op)``)."""
        return self._sha[op]

    def source(self, op: str) -> str:
        """The Lua source of ``op``."""
        return self._sources[op]

    def run(self, op: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return self._line.call("EVALSHA", self._sha[op], len(keys), *keys, *args)
        except self._noscript:
            # A server restarted, failed over or flushed its script cache: load and retry.
            return self._line.call("EVAL", self._sources[op], len(keys), *keys, *args)

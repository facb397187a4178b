"""Where a registry lives, written as one string, so reports and commands can reopen it.

=====================================================  =====================================
``NAME`` or ``shm://NAME``                             shared memory on this host
``memory://NAME``                                      this process's memory (tests)
``redis://host:port/db#NAME`` (any Redis URL)          Redis; ``#NAME`` defaults to the name
``dual+PRIMARY?secondary=SECONDARY``                   dual-write: PRIMARY and SECONDARY are
                                                       locations; everything after
                                                       ``secondary=`` is the secondary, verbatim
=====================================================  =====================================

So ``Registry("jobs", url="dual+shm://jobs?secondary=redis://db1:6379/0")`` writes to shared
memory ``jobs`` and mirrors every write to the Redis registry ``jobs``.
"""

from __future__ import annotations

from shmreg._errors import InvalidBackendConfig
from shmreg.backends._protocol import Backend
from shmreg.backends._redis_conn import is_url

DUAL = "dual+"
_SECONDARY = "secondary="


def split_dual(location: str) -> tuple[str, str]:
    """``(primary, secondary)`` of a ``dual+`` location."""
    body = location[len(DUAL) :]
    for sep in ("?" + _SECONDARY, "&" + _SECONDARY):
        head, found, secondary = body.partition(sep)
        if found and secondary:
            return head, secondary
    raise InvalidBackendConfig(
        f"{location!r}: a dual-write location is dual+PRIMARY?secondary=SECONDARY"
    )


def open_location(
    location: str, default_name: str | None = None, *, create: bool = True
) -> Backend:
    """The backend ``location`` names (see the module docstring)."""
    if location.startswith(DUAL):
        from shmreg.backends._dualwrite import DualWriteBackend

        primary, secondary = split_dual(location)
        first = open_location(primary, default_name, create=create)
        try:
            second = open_location(secondary, first.name, create=create)
        except BaseException:
            first.close()
            raise
        return DualWriteBackend(first, second)
    if is_url(location):
        from shmreg.backends._redis import RedisBackend

        url, _, name = location.partition("#")
        redis: Backend = RedisBackend(_name(name or default_name, location), url, create=create)
        return redis
    scheme, found, rest = location.partition("://")
    if not found:
        scheme, rest = "shm", location
    if scheme == "shm":
        from shmreg.backends._shm import SharedMemoryBackend

        return SharedMemoryBackend(_name(rest or default_name, location), create=create)
    if scheme == "memory":
        from shmreg.backends._memory import MemoryBackend

        return MemoryBackend.named(_name(rest or default_name, location), create=create)
    raise InvalidBackendConfig(
        f"{location!r}: use NAME, shm://NAME, memory://NAME, a Redis URL or dual+...?secondary=..."
    )


def _name(name: str | None, location: str) -> str:
    if not name:
        raise InvalidBackendConfig(f"{location!r} names no registry")
    return name


def location_of(backend: Backend) -> str:
    """The location string that reopens ``backend`` (what a migration report records)."""
    describe = getattr(backend, "location", None)
    if isinstance(describe, str):
        return describe
    kind = getattr(backend, "kind", "shm")
    if kind == "redis":
        url: str = getattr(backend, "url", "")
        return f"{url}#{backend.name}"
    if kind == "memory":
        return f"memory://{backend.name}"
    return f"shm://{backend.name}"

"""Every error shmreg raises, in one tree with stable numeric codes (a leaf module).

::

    ShmregError
    ├── ConfigurationError ........... 1000
    │   ├── InvalidRegistryName ...... 1001  (ValueError)
    │   ├── IncompatibleRegistry ..... 1002
    │   └── InvalidBackendConfig ..... 1003  (ValueError)
    ├── RegistrySystemError .......... 2000
    │   ├── RegistryNotFound ......... 2001  (LookupError)
    │   │   └── RegistryDestroyed .... 2002
    │   ├── RegistryFull ............. 2003
    │   ├── CorruptRegistry .......... 2004
    │   ├── RegistryTimeout .......... 2005  (TimeoutError)
    │   ├── RegistryClosed ........... 2006
    │   └── RegistryPermissionError .. 2007  (PermissionError)
    ├── DataError .................... 3000
    │   ├── InvalidKey ............... 3001  (ValueError)
    │   ├── InvalidMetadata .......... 3002  (ValueError)
    │   ├── MetadataTooLarge ......... 3003  (ValueError)
    │   ├── AlreadyRegistered ........ 3004
    │   ├── NotRegistered ............ 3005  (LookupError)
    │   ├── ProcessNotAlive .......... 3006
    │   ├── StaleGeneration .......... 3007
    │   └── InvalidArgument .......... 3008  (ValueError)
    ├── BackendError ................. 4000
    │   ├── BackendUnavailable ....... 4001
    │   ├── BackendOperationFailed ... 4002
    │   └── MigrationError ........... 4003
    └── AgentError ................... 5000
        ├── AgentNotFound ............ 5001  (LookupError)
        ├── AgentAlreadyRunning ...... 5002
        ├── AgentNotRunning .......... 5003
        ├── AgentStartFailed ......... 5004
        └── InvalidAgentConfig ....... 5005  (ValueError)

The builtin in parentheses is a second base, so ``except LookupError`` and friends keep
working for callers who never heard of shmreg. Mind that this makes RegistryTimeout and
RegistryPermissionError OSErrors: an ``except OSError`` around shmreg calls catches them too.
Codes are part of the API: the CLI prints them and other processes match on them, so a code
is never reused for a different meaning.

Every error carries ``message``, ``context`` (a dict that also holds its specific fields),
``correlation_id`` and its fields as attributes, and survives pickling with all of them: an
error raised in an agent process arrives in its supervisor intact. Pickles name the class by
its code through ``_error_base._rebuild``, not by ``shmreg.<Class>``, so they load even where the
package ``__init__`` is half imported (inside a spawn child's bootstrap, say). A picklable
``__cause__`` travels along; an unpicklable one is dropped, as are ``__context__`` and
tracebacks, which pickle cannot carry.

A subclass declares its fields as annotated attributes (collected by ``__init_subclass__``)
and takes them keyword-only in ``__init__``, passing them on to ``_init``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

__all__ = [
    "ERROR_CODES",
    "AgentAlreadyRunning",
    "AgentError",
    "AgentNotFound",
    "AgentNotRunning",
    "AgentStartFailed",
    "AlreadyRegistered",
    "BackendError",
    "BackendOperationFailed",
    "BackendUnavailable",
    "ConfigurationError",
    "CorruptRegistry",
    "DataError",
    "IncompatibleRegistry",
    "InvalidAgentConfig",
    "InvalidArgument",
    "InvalidBackendConfig",
    "InvalidKey",
    "InvalidMetadata",
    "InvalidRegistryName",
    "MetadataTooLarge",
    "MigrationError",
    "NotRegistered",
    "ProcessNotAlive",
    "RegistryClosed",
    "RegistryDestroyed",
    "RegistryFull",
    "RegistryNotFound",
    "RegistryPermissionError",
    "RegistrySystemError",
    "RegistryTimeout",
    "RetryStrategy",
    "Severity",
    "ShmregError",
    "StaleGeneration",
    "error_for_code",
]

from shmreg._error_base import (  # noqa: F401  (_rebuild: old pickles name it here)
    RetryStrategy,
    Severity,
    ShmregError,
    _Context,
    _rebuild,
)

# ------------------------------------------------------------------------ 1xxx configuration


class ConfigurationError(ShmregError):
    """The registry or backend was asked for with settings that cannot work."""

    code = 1000
    severity = Severity.HIGH


class InvalidRegistryName(ConfigurationError, ValueError):
    """The registry name cannot be used as a shared memory segment name."""

    code = 1001
    severity = Severity.MEDIUM
    name: str | None
    _template = "invalid registry name {name!r}"

    def __init__(
        self,
        message: str = "",
        *,
        name: str | None = None,
        context: _Context = None,
        correlation_id: str | None = None,
    ) -> None:
        self._init(message, context, correlation_id, name=name)


class IncompatibleRegistry(ConfigurationError):
    """An existing registry was created with other settings than the caller asks for."""

    code = 1002
    setting: str | None
    expected: Any
    actual: Any
    _template = "{setting}: registry has {actual!r}, caller asked for {expected!r}"

    def __init__(
        self,
        message: str = "",
        *,
        setting: str | None = None,
        expected: Any = None,
        actual: Any = None,
        context: _Context = None,
        correlation_id: str | None = None,
    ) -> None:
        self._init(
            message, context, correlation_id, setting=setting, expected=expected, actual=actual
        )

    def _build_message(self, message: str) -> str:
        # Both values always reach the reader: "capacity mismatch" alone sends them hunting
        # for which side holds what.
        filled = self._filled_template()
        if not message:
            return filled or self._default_message()
        if filled is None or all(str(v) in message for v in (self.expected, self.actual)):
            return message
        return f"{message} ({filled})"


class InvalidBackendConfig(ConfigurationError, ValueError):
    """The backend settings are missing, malformed or contradict each other."""

    code = 1003


# ----------------------------------------------------------------------------- 2xxx system


class RegistrySystemError(ShmregError):
    """The shared memory registry itself cannot serve the call."""

    code = 2000
    severity = Severity.HIGH


class RegistryNotFound(RegistrySystemError, LookupError):
    """No registry of that name exists (never created, or already destroyed)."""

    code = 2001
    severity = Severity.MEDIUM
    # Most often a start-order race: the creator has not created it yet.
    retry_strategy = RetryStrategy.BACKOFF
    name: str | None
    _template = "no registry named {name!r}"

    def __init__(
        self,
        message: str = "",
        *,
        name: str | None = None,
        context: _Context = None,
        correlation_id: str | None = None,
    ) -> None:
        self._init(message, context, correlation_id, name=name)


class RegistryDestroyed(RegistryNotFound):
    """The registry was destroyed while this handle was attached to it."""

    code = 2002
    severity = Severity.HIGH
    # The handle is dead for good; opening the name again is a new decision, not a retry.
    retry_strategy = RetryStrategy.NONE
    _template = "registry {name!r} was destroyed"


class RegistryFull(RegistrySystemError):
    """The registry has no room for another entry."""

    code = 2003
    retry_strategy = RetryStrategy.AFTER_CLEANUP
    name: str | None
    capacity: int | None
    _template = (
        "registry {name!r} is full ({capacity} entries): sweep dead entries, unregister "
        "unused ones, or create the registry with a larger capacity; if /dev/shm itself is "
        "full, free space there"
    )

    def __init__(
        self,
        message: str = "",
        *,
        name: str | None = None,
        capacity: int | None = None,
        context: _Context = None,
        correlation_id: str | None = None,
    ) -> None:
        self._init(message, context, correlation_id, name=name, capacity=capacity)


class CorruptRegistry(RegistrySystemError):
    """The registry's bytes fail a consistency check (bad magic, layout, checksum)."""

    code = 2004
    severity = Severity.CRITICAL
    name: str | None
    detail: str | None
    _template = "registry {name!r} is corrupt: {detail}"

    def __init__(
        self,
        message: str = "",
        *,
        name: str | None = None,
        detail: str | None = None,
        context: _Context = None,
        correlation_id: str | None = None,
    ) -> None:
        self._init(message, context, correlation_id, name=name, detail=detail)


class RegistryTimeout(RegistrySystemError, TimeoutError):
    """The registry lock or a consistent read was not obtained in time."""

    code = 2005
    severity = Severity.MEDIUM
    retry_strategy = RetryStrategy.BACKOFF
    timeout: float | None
    _template = "registry operation timed out after {timeout} s"

    def __init__(
        self,
        message: str = "",
        *,
        timeout: float | None = None,
        context: _Context = None,
        correlation_id: str | None = None,
    ) -> None:
        self._init(message, context, correlation_id, timeout=timeout)


class RegistryClosed(RegistrySystemError):
    """The registry handle was used after it was closed."""

    code = 2006
    severity = Severity.MEDIUM
    name: str | None
    _template = "registry {name!r} is closed"

    def __init__(
        self,
        message: str = "",
        *,
        name: str | None = None,
        context: _Context = None,
        correlation_id: str | None = None,
    ) -> None:
        self._init(message, context, correlation_id, name=name)


class RegistryPermissionError(RegistrySystemError, PermissionError):
    """The operating system refuses this process access to the registry's segments."""

    code = 2007
    name: str | None
    _template = "no permission to open registry {name!r}"

    def __init__(
        self,
        message: str = "",
        *,
        name: str | None = None,
        context: _Context = None,
        correlation_id: str | None = None,
    ) -> None:
        self._init(message, context, correlation_id, name=name)


# ------------------------------------------------------------------------------- 3xxx data


class DataError(ShmregError):
    """A key, a value or a registration the call refers to is not acceptable."""

    code = 3000
    severity = Severity.LOW


class InvalidKey(DataError, ValueError):
    """A namespace or service cannot be used as a key."""

    code = 3001
    key: str | None
    _template = "invalid key {key}"

    def __init__(
        self,
        message: str = "",
        *,
        key: str | None = None,
        context: _Context = None,
        correlation_id: str | None = None,
    ) -> None:
        """``key`` is the offending key's repr, truncated: the key itself may be huge."""
        self._init(message, context, correlation_id, key=key)


class InvalidMetadata(DataError, ValueError):
    """Metadata holds a value that cannot be stored."""

    code = 3002
    path: str | None
    _template = "invalid metadata at {path}"

    def __init__(
        self,
        message: str = "",
        *,
        path: str | None = None,
        context: _Context = None,
        correlation_id: str | None = None,
    ) -> None:
        """``path`` locates the value, e.g. ``"metadata['a'][2]"``."""
        self._init(message, context, correlation_id, path=path)


class MetadataTooLarge(DataError, ValueError):
    """Encoded metadata exceeds the registry's per-entry limit."""

    code = 3003
    size: int | None
    limit: int | None
    _template = "metadata is {size} bytes encoded, the limit is {limit}"

    def __init__(
        self,
        message: str = "",
        *,
        size: int | None = None,
        limit: int | None = None,
        context: _Context = None,
        correlation_id: str | None = None,
    ) -> None:
        self._init(message, context, correlation_id, size=size, limit=limit)


class AlreadyRegistered(DataError):
    """The name is held by another live process."""

    code = 3004
    namespace: str | None
    service: Any
    pid: int | None
    _template = "service {service!r} in namespace {namespace!r} is held by live pid {pid}"

    def __init__(
        self,
        message: str = "",
        *,
        namespace: str | None = None,
        service: Any = None,
        pid: int | None = None,
        context: _Context = None,
        correlation_id: str | None = None,
    ) -> None:
        self._init(message, context, correlation_id, namespace=namespace, service=service, pid=pid)


class NotRegistered(DataError, LookupError):
    """No live registration under that name."""

    code = 3005
    namespace: str | None
    service: Any
    _template = "service {service!r} is not registered in namespace {namespace!r}"

    def __init__(
        self,
        message: str = "",
        *,
        namespace: str | None = None,
        service: Any = None,
        context: _Context = None,
        correlation_id: str | None = None,
    ) -> None:
        self._init(message, context, correlation_id, namespace=namespace, service=service)


class ProcessNotAlive(DataError):
    """The process to register on behalf of is not running."""

    code = 3006
    pid: int | None
    _template = "process {pid} is not alive"

    def __init__(
        self,
        message: str = "",
        *,
        pid: int | None = None,
        context: _Context = None,
        correlation_id: str | None = None,
    ) -> None:
        self._init(message, context, correlation_id, pid=pid)


class StaleGeneration(DataError):
    """The registration changed hands since the caller read its generation."""

    code = 3007
    severity = Severity.MEDIUM
    namespace: str | None
    service: Any
    expected: int | None
    actual: int | None
    _template = (
        "service {service!r} in namespace {namespace!r} is at generation {actual}, "
        "caller holds {expected}"
    )

    def __init__(
        self,
        message: str = "",
        *,
        namespace: str | None = None,
        service: Any = None,
        expected: int | None = None,
        actual: int | None = None,
        context: _Context = None,
        correlation_id: str | None = None,
    ) -> None:
        self._init(
            message,
            context,
            correlation_id,
            namespace=namespace,
            service=service,
            expected=expected,
            actual=actual,
        )


class InvalidArgument(DataError, ValueError):
    """An argument other than a key or metadata is out of range or of the wrong type."""

    code = 3008
    severity = Severity.LOW
    argument: str | None
    value: str | None
    _template = "invalid {argument}: {value}"

    def __init__(
        self,
        message: str = "",
        *,
        argument: str | None = None,
        value: str | None = None,
        context: _Context = None,
        correlation_id: str | None = None,
    ) -> None:
        self._init(message, context, correlation_id, argument=argument, value=value)


# ---------------------------------------------------------------------------- 4xxx backend


class BackendError(ShmregError):
    """A storage backend outside the shared memory engine failed."""

    code = 4000
    severity = Severity.HIGH
    retry_strategy = RetryStrategy.BACKOFF


class BackendUnavailable(BackendError):
    """The backend cannot be reached or its library is not installed."""

    code = 4001
    backend: str | None
    _template = "backend {backend!r} is unavailable"

    def __init__(
        self,
        message: str = "",
        *,
        backend: str | None = None,
        context: _Context = None,
        correlation_id: str | None = None,
    ) -> None:
        self._init(message, context, correlation_id, backend=backend)


class BackendOperationFailed(BackendError):
    """The backend was reached but one operation on it failed."""

    code = 4002
    severity = Severity.MEDIUM
    backend: str | None
    operation: str | None
    _template = "backend {backend!r}: {operation} failed"

    def __init__(
        self,
        message: str = "",
        *,
        backend: str | None = None,
        operation: str | None = None,
        context: _Context = None,
        correlation_id: str | None = None,
    ) -> None:
        self._init(message, context, correlation_id, backend=backend, operation=operation)


class MigrationError(BackendError):
    """Copying entries from one backend to another did not complete."""

    code = 4003
    # Half-copied state needs a look before anything is run again.
    retry_strategy = RetryStrategy.NONE


# ------------------------------------------------------------------------------ 5xxx agent


class AgentError(ShmregError):
    """An agent (a supervised worker process) could not be managed as asked."""

    code = 5000


class AgentNotFound(AgentError, LookupError):
    """No agent has that id."""

    code = 5001
    severity = Severity.LOW
    agent_id: str | None
    _template = "no agent {agent_id!r}"

    def __init__(
        self,
        message: str = "",
        *,
        agent_id: str | None = None,
        context: _Context = None,
        correlation_id: str | None = None,
    ) -> None:
        self._init(message, context, correlation_id, agent_id=agent_id)


class AgentAlreadyRunning(AgentError):
    """The agent is already running."""

    code = 5002
    severity = Severity.LOW
    agent_id: str | None
    pid: int | None
    _template = "agent {agent_id!r} is already running as pid {pid}"

    def __init__(
        self,
        message: str = "",
        *,
        agent_id: str | None = None,
        pid: int | None = None,
        context: _Context = None,
        correlation_id: str | None = None,
    ) -> None:
        self._init(message, context, correlation_id, agent_id=agent_id, pid=pid)


class AgentNotRunning(AgentError):
    """The agent is not running."""

    code = 5003
    severity = Severity.LOW
    agent_id: str | None
    _template = "agent {agent_id!r} is not running"

    def __init__(
        self,
        message: str = "",
        *,
        agent_id: str | None = None,
        context: _Context = None,
        correlation_id: str | None = None,
    ) -> None:
        self._init(message, context, correlation_id, agent_id=agent_id)


class AgentStartFailed(AgentError):
    """The agent process did not start or died before it registered."""

    code = 5004
    severity = Severity.HIGH
    retry_strategy = RetryStrategy.BACKOFF
    agent_id: str | None
    reason: str | None
    _template = "agent {agent_id!r} failed to start: {reason}"

    def __init__(
        self,
        message: str = "",
        *,
        agent_id: str | None = None,
        reason: str | None = None,
        context: _Context = None,
        correlation_id: str | None = None,
    ) -> None:
        self._init(message, context, correlation_id, agent_id=agent_id, reason=reason)


class InvalidAgentConfig(AgentError, ValueError):
    """The agent configuration is incomplete or malformed."""

    code = 5005
    missing: list[str]
    detail: str | None

    def __init__(
        self,
        message: str = "",
        *,
        missing: Sequence[str] | None = None,
        detail: str | None = None,
        context: _Context = None,
        correlation_id: str | None = None,
    ) -> None:
        """``missing`` names the required fields that are absent; stored as a list."""
        self._init(message, context, correlation_id, missing=list(missing or ()), detail=detail)

    def _default_message(self) -> str:
        parts = [f"lacks {', '.join(self.missing)}"] if self.missing else []
        parts += [self.detail] if self.detail else []
        return (
            f"invalid agent configuration: {'; '.join(parts)}"
            if parts
            else super()._default_message()
        )


# ------------------------------------------------------------------------------- registry


def _walk(cls: type[ShmregError]) -> Iterator[type[ShmregError]]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _walk(sub)


ERROR_CODES: dict[int, type[ShmregError]] = {}
# Run at import, before anyone can subclass: the walk sees exactly the classes above.
for _cls in _walk(ShmregError):
    if _cls.code in ERROR_CODES:
        raise RuntimeError(f"{_cls.__name__} reuses code {_cls.code}")  # a bug in this file
    ERROR_CODES[_cls.code] = _cls
    # Tracebacks and reprs say ``shmreg.RegistryFull``, the name users import.
    _cls.__module__ = "shmreg"
del _cls


def error_for_code(code: int) -> type[ShmregError]:
    """The class for ``code``; an unknown code maps to its branch (2099 -> RegistrySystemError).

    The fallback lets a process read codes written by a newer shmreg: it still learns the
    branch and with it a sensible severity and retry strategy.
    """
    return ERROR_CODES.get(code) or ERROR_CODES.get(code // 1000 * 1000) or ShmregError

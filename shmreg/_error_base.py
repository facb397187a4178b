"""The machinery under every shmreg error: fields, messages, severities, pickling.

``shmreg._errors`` draws the tree and defines the classes; this module holds what they all
share. ``ShmregError`` keeps its fields in ``context`` and as attributes, builds a default
message from a template or its docstring, and pickles by its numeric code through
``_rebuild`` (see the docstring of ``shmreg._errors`` for why).
"""

from __future__ import annotations

import enum
import inspect
import pickle
import string
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar, TypeAlias

_Context: TypeAlias = Mapping[str, Any] | None


class Severity(str, enum.Enum):
    """How bad an error is for the process that sees it, for logs and alerting."""

    __module__ = "shmreg"

    LOW = "low"  # an expected outcome the caller handles (name taken, not found)
    MEDIUM = "medium"  # the call failed; the registry is fine
    HIGH = "high"  # the registry cannot serve this process until someone acts
    CRITICAL = "critical"  # the shared state itself is damaged

    def __reduce_ex__(self, protocol: object) -> tuple[Any, ...]:
        # By value through this module, for the same reason errors pickle by code.
        return (_enum_member, ("Severity", self.value))


class RetryStrategy(str, enum.Enum):
    """What a caller may do about an error: the same call again, and when."""

    __module__ = "shmreg"

    NONE = "none"  # retrying the same call fails the same way
    IMMEDIATE = "immediate"  # a transient race: retry at once
    BACKOFF = "backoff"  # contention or an unreachable peer: retry with growing delays
    AFTER_CLEANUP = "after_cleanup"  # retry once space or dead entries have been reclaimed

    def __reduce_ex__(self, protocol: object) -> tuple[Any, ...]:
        return (_enum_member, ("RetryStrategy", self.value))


def _enum_member(kind: str, value: str) -> Severity | RetryStrategy:
    return Severity(value) if kind == "Severity" else RetryStrategy(value)


class ShmregError(Exception):
    """Base of every error shmreg raises."""

    code: ClassVar[int] = 0
    severity: ClassVar[Severity] = Severity.MEDIUM
    retry_strategy: ClassVar[RetryStrategy] = RetryStrategy.NONE
    # The keyword fields of the constructor, in order: the annotated attributes of each
    # subclass, collected by __init_subclass__. They are attributes and context keys.
    _fields: ClassVar[tuple[str, ...]] = ()
    # The default message, formatted with the fields when none of those it names is None.
    _template: ClassVar[str] = ""

    message: str
    context: dict[str, Any]
    correlation_id: str

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Annotations are strings here (postponed evaluation); ClassVars are not fields.
        own = inspect.get_annotations(cls)
        added = tuple(name for name, hint in own.items() if not str(hint).startswith("ClassVar"))
        cls._fields = cls._fields + added

    def __init__(
        self, message: str = "", *, context: _Context = None, correlation_id: str | None = None
    ) -> None:
        self._init(message, context, correlation_id)

    def _init(
        self, message: str, context: _Context, correlation_id: str | None, **fields: Any
    ) -> None:
        for field, value in fields.items():
            setattr(self, field, value)
        # The fields go last: they are what the error was built from, a caller's context
        # must not contradict them.
        self.context = {**(context or {}), **fields}
        # 12 hex digits (48 bits) are plenty to find one error in a day of logs.
        self.correlation_id = correlation_id or uuid.uuid4().hex[:12]
        self.message = self._build_message(message)
        # Through the MRO this reaches the builtin base (LookupError, OSError, ...), so
        # ``args`` is ``(message,)`` as every builtin exception expects.
        super().__init__(self.message)

    def _build_message(self, message: str) -> str:
        return message or self._default_message()

    def _default_message(self) -> str:
        filled = self._filled_template()
        if filled is not None:
            return filled
        # Not enough known for the template: the docstring's first line, plus what is known.
        summary = (type(self).__doc__ or type(self).__name__).strip().splitlines()[0]
        summary = summary.rstrip(".")
        given = ", ".join(
            f"{name}={getattr(self, name, None)!r}"
            for name in self._fields
            if getattr(self, name, None) not in (None, [])
        )
        return f"{summary} ({given})" if given else summary

    def _filled_template(self) -> str | None:
        if not self._template:
            return None
        values = {name: getattr(self, name, None) for name in self._fields}
        named = {part[1] for part in string.Formatter().parse(self._template) if part[1]}
        if any(values.get(name) is None for name in named):
            return None
        return self._template.format(**values)

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        parts = [repr(self.message)]
        parts += [f"{name}={getattr(self, name, None)!r}" for name in self._fields]
        parts.append(f"correlation_id={self.correlation_id!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view: what ``shmreg ... --json`` prints and logs can ship."""
        return {
            "code": self.code,
            "name": type(self).__name__,
            "message": self.message,
            "severity": self.severity.value,
            "retry_strategy": self.retry_strategy.value,
            "context": _jsonable(self.context),
            "correlation_id": self.correlation_id,
        }

    def __reduce__(self) -> tuple[Any, ...]:
        # Builtin exceptions pickle as ``cls(*args)``, which would lose the keyword fields,
        # context and correlation id; rebuild from the instance dict instead. A known class
        # goes by its code so the pickle does not need ``shmreg.<Class>`` to import; a
        # subclass defined elsewhere goes by reference, as pickle normally does.
        cls = type(self)
        from shmreg._errors import ERROR_CODES

        target: int | type[ShmregError] = cls.code if ERROR_CODES.get(cls.code) is cls else cls
        state = {key: _portable(value) for key, value in vars(self).items()}
        cause = self.__cause__
        if cause is not None and not _is_picklable(cause):
            cause = None  # best effort: a cause that cannot travel is dropped, not fatal
        return (_rebuild, (target, self.message, state, cause))


def _rebuild(
    target: int | type[ShmregError],
    message: str,
    state: dict[str, Any],
    cause: BaseException | None,
) -> ShmregError:
    """Unpickle an error without calling ``__init__`` (its signature is the class's own)."""
    from shmreg._errors import error_for_code

    cls = error_for_code(target) if isinstance(target, int) else target
    error = cls.__new__(cls, message)
    # OSError subclasses (RegistryTimeout, RegistryPermissionError) fill ``args`` only in
    # ``__init__``, which is skipped here.
    error.args = (message,)
    error.__dict__.update(state)
    if cause is not None:
        error.__cause__ = cause  # also sets __suppress_context__, as ``raise ... from`` does
    return error


def _is_picklable(value: object) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


def _portable(value: object) -> object:
    # Context is caller-supplied; one odd value (a lock, a socket) must not make the whole
    # error unpicklable, since the receiver would then get a PicklingError instead of it.
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if type(value) is dict:
        return {key: _portable(item) for key, item in value.items()}
    return value if _is_picklable(value) else repr(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return repr(value)

"""The error tree: codes, fields, messages, JSON, pickling within and across processes."""

from __future__ import annotations

import inspect
import json
import multiprocessing
import pickle
import re
import sys
import threading
import traceback
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shmreg._errors as errors_module
from shmreg._errors import (
    ERROR_CODES,
    BackendOperationFailed,
    IncompatibleRegistry,
    InvalidAgentConfig,
    NotRegistered,
    RegistryFull,
    RegistryNotFound,
    RegistryTimeout,
    RetryStrategy,
    Severity,
    ShmregError,
    error_for_code,
)


def _walk(cls: type[ShmregError]) -> Iterator[type[ShmregError]]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _walk(sub)


# Collected before any test defines a subclass of its own.
ALL_ERRORS = list(_walk(ShmregError))
BRANCHES = list(ShmregError.__subclasses__())

# The tree as the API fixes it: name -> (parent, code, builtin bases besides Exception).
EXPECTED_TREE: dict[str, tuple[str | None, int, tuple[type[BaseException], ...]]] = {
    "ShmregError": (None, 0, ()),
    "ConfigurationError": ("ShmregError", 1000, ()),
    "InvalidRegistryName": ("ConfigurationError", 1001, (ValueError,)),
    "IncompatibleRegistry": ("ConfigurationError", 1002, ()),
    "InvalidBackendConfig": ("ConfigurationError", 1003, (ValueError,)),
    "RegistrySystemError": ("ShmregError", 2000, ()),
    "RegistryNotFound": ("RegistrySystemError", 2001, (LookupError,)),
    "RegistryDestroyed": ("RegistryNotFound", 2002, (LookupError,)),
    "RegistryFull": ("RegistrySystemError", 2003, ()),
    "CorruptRegistry": ("RegistrySystemError", 2004, ()),
    "RegistryTimeout": ("RegistrySystemError", 2005, (TimeoutError, OSError)),
    "RegistryClosed": ("RegistrySystemError", 2006, ()),
    "RegistryPermissionError": ("RegistrySystemError", 2007, (PermissionError, OSError)),
    "DataError": ("ShmregError", 3000, ()),
    "InvalidKey": ("DataError", 3001, (ValueError,)),
    "InvalidMetadata": ("DataError", 3002, (ValueError,)),
    "MetadataTooLarge": ("DataError", 3003, (ValueError,)),
    "AlreadyRegistered": ("DataError", 3004, ()),
    "NotRegistered": ("DataError", 3005, (LookupError,)),
    "ProcessNotAlive": ("DataError", 3006, ()),
    "StaleGeneration": ("DataError", 3007, ()),
    "InvalidArgument": ("DataError", 3008, (ValueError,)),
    "BackendError": ("ShmregError", 4000, ()),
    "BackendUnavailable": ("BackendError", 4001, ()),
    "BackendOperationFailed": ("BackendError", 4002, ()),
    "MigrationError": ("BackendError", 4003, ()),
    "AgentError": ("ShmregError", 5000, ()),
    "AgentNotFound": ("AgentError", 5001, (LookupError,)),
    "AgentAlreadyRunning": ("AgentError", 5002, ()),
    "AgentNotRunning": ("AgentError", 5003, ()),
    "AgentStartFailed": ("AgentError", 5004, ()),
    "InvalidAgentConfig": ("AgentError", 5005, (ValueError,)),
}

# A plausible value for every field name used anywhere in the tree.
SAMPLE_FIELDS: dict[str, Any] = {
    "name": "orders",
    "capacity": 100_000,
    "setting": "capacity",
    "expected": 5,
    "actual": 100_000,
    "detail": "bad magic",
    "timeout": 0.5,
    "key": "'svc'",
    "path": "metadata['a'][2]",
    "size": 5000,
    "limit": 4096,
    "namespace": "ns",
    "service": ("svc", 1),
    "pid": 4242,
    "agent_id": "agent-1",
    "reason": "exited with status 3",
    "backend": "redis",
    "operation": "register",
    "missing": ["command", "name"],
    "argument": "timeout",
    "value": "-1",
}


def sample(cls: type[ShmregError], **overrides: Any) -> ShmregError:
    fields = {name: SAMPLE_FIELDS[name] for name in cls._fields}
    fields.update(overrides)
    return cls(
        f"{cls.__name__} happened", context={"attempt": 2}, correlation_id="c0ffee", **fields
    )


def assert_same_error(got: BaseException, want: ShmregError) -> None:
    assert type(got) is type(want)
    assert isinstance(got, ShmregError)
    assert got.message == want.message
    assert str(got) == str(want)
    assert got.args == want.args
    assert got.context == want.context
    assert got.correlation_id == want.correlation_id
    for name in type(want)._fields:
        assert getattr(got, name) == getattr(want, name), name


def _tree_ids(cls: type[ShmregError]) -> str:
    return cls.__name__


all_errors = pytest.mark.parametrize("cls", ALL_ERRORS, ids=_tree_ids)


# ---------------------------------------------------------------------------- the tree


def test_tree_matches_the_api() -> None:
    assert {cls.__name__ for cls in ALL_ERRORS} == set(EXPECTED_TREE)
    for cls in ALL_ERRORS:
        parent, code, builtins = EXPECTED_TREE[cls.__name__]
        assert cls.code == code
        if parent is not None:
            shmreg_bases = [base for base in cls.__bases__ if issubclass(base, ShmregError)]
            assert [base.__name__ for base in shmreg_bases] == [parent]
        for builtin in builtins:
            assert issubclass(cls, builtin), (cls, builtin)


def test_codes_are_unique() -> None:
    codes = [cls.code for cls in ALL_ERRORS]
    assert len(codes) == len(set(codes))


def test_codes_sit_in_their_branch_range() -> None:
    assert sorted(branch.code for branch in BRANCHES) == [1000, 2000, 3000, 4000, 5000]
    for branch in BRANCHES:
        for cls in _walk(branch):
            assert branch.code <= cls.code < branch.code + 1000, cls


def test_error_codes_registry() -> None:
    assert {cls.code: cls for cls in ALL_ERRORS} == ERROR_CODES
    for cls in ALL_ERRORS:
        assert error_for_code(cls.code) is cls


def test_unknown_code_falls_back_to_its_branch() -> None:
    assert error_for_code(2099).__name__ == "RegistrySystemError"
    assert error_for_code(5999).__name__ == "AgentError"
    assert error_for_code(9001) is ShmregError
    assert error_for_code(-1) is ShmregError


@all_errors
def test_severity_and_retry_strategy_are_enums(cls: type[ShmregError]) -> None:
    assert isinstance(cls.severity, Severity)
    assert isinstance(cls.retry_strategy, RetryStrategy)


def test_chosen_retry_strategies() -> None:
    assert RegistryTimeout.retry_strategy is RetryStrategy.BACKOFF
    assert RegistryFull.retry_strategy is RetryStrategy.AFTER_CLEANUP
    assert ERROR_CODES[3004].retry_strategy is RetryStrategy.NONE  # AlreadyRegistered
    assert ERROR_CODES[2004].severity is Severity.CRITICAL  # CorruptRegistry


@pytest.mark.parametrize(
    ("name", "builtin"),
    [(name, b) for name, (_, _, builtins) in EXPECTED_TREE.items() for b in builtins],
)
def test_caught_by_builtin_except(name: str, builtin: type[BaseException]) -> None:
    cls = getattr(errors_module, name)
    with pytest.raises(builtin) as info:
        raise sample(cls)
    assert isinstance(info.value, ShmregError)


# ------------------------------------------------------------------------ module naming


@pytest.mark.parametrize("cls", [*ALL_ERRORS, Severity, RetryStrategy], ids=_tree_ids)
def test_public_classes_report_the_package_as_module(cls: type) -> None:
    assert cls.__module__ == "shmreg"


def test_traceback_names_the_package() -> None:
    try:
        raise RegistryFull(name="orders", capacity=8)
    except RegistryFull as exc:
        text = "".join(traceback.format_exception_only(type(exc), exc))
    assert text.startswith("shmreg.RegistryFull: ")


def test_all_lists_every_public_name() -> None:
    exported = set(errors_module.__all__)
    assert len(exported) == len(errors_module.__all__)
    expected = {cls.__name__ for cls in ALL_ERRORS}
    expected |= {"Severity", "RetryStrategy", "ERROR_CODES", "error_for_code"}
    assert exported == expected
    defined_here = {
        name
        for name, obj in vars(errors_module).items()
        if not name.startswith("_")
        and not inspect.ismodule(obj)
        and getattr(obj, "__module__", "shmreg") in ("shmreg", errors_module.__name__)
    }
    assert defined_here == exported


def test_package_reexports_every_error() -> None:
    import shmreg

    for name in errors_module.__all__:
        assert getattr(shmreg, name) is getattr(errors_module, name), name
    assert set(errors_module.__all__) <= set(shmreg.__all__)


# -------------------------------------------------------------------- instances, fields


@all_errors
def test_constructor_takes_its_fields_keyword_only(cls: type[ShmregError]) -> None:
    params = inspect.signature(cls).parameters
    assert next(iter(params)) == "message"
    assert params["message"].default == ""
    keyword = [p.name for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert keyword == [*cls._fields, "context", "correlation_id"]


@all_errors
def test_fields_are_attributes_and_context(cls: type[ShmregError]) -> None:
    err = sample(cls)
    assert err.context["attempt"] == 2
    for name in cls._fields:
        assert getattr(err, name) == SAMPLE_FIELDS[name]
        assert err.context[name] == SAMPLE_FIELDS[name]
    assert err.correlation_id == "c0ffee"
    assert str(err) == err.message
    assert err.message.startswith(f"{cls.__name__} happened")
    assert err.args == (err.message,)


def test_fields_win_over_context_keys() -> None:
    err = NotRegistered(namespace="ns", service="svc", context={"namespace": "other", "x": 1})
    assert err.context == {"namespace": "ns", "service": "svc", "x": 1}


def test_context_is_a_copy() -> None:
    given = {"a": 1}
    err = ShmregError("boom", context=given)
    given["a"] = 2
    assert err.context == {"a": 1}


def test_correlation_id_is_generated_short_hex_and_unique() -> None:
    ids = {ShmregError().correlation_id for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"[0-9a-f]{12}", cid) for cid in ids)


@all_errors
def test_default_message_is_never_empty(cls: type[ShmregError]) -> None:
    bare = cls()
    assert bare.message and str(bare) == bare.message
    filled = cls(**{name: SAMPLE_FIELDS[name] for name in cls._fields})
    assert filled.message
    for name in cls._fields:
        assert getattr(bare, name) in (None, [])


def test_default_message_uses_the_fields() -> None:
    assert str(NotRegistered(namespace="ns", service="svc")) == (
        "service 'svc' is not registered in namespace 'ns'"
    )


def test_default_message_with_partial_fields_names_what_is_known() -> None:
    err = NotRegistered(namespace="ns")
    assert "namespace='ns'" in str(err)


def test_incompatible_registry_names_both_values() -> None:
    err = IncompatibleRegistry(setting="capacity", expected=5, actual=100_000)
    assert str(err) == "capacity: registry has 100000, caller asked for 5"
    custom = IncompatibleRegistry("cannot attach", setting="capacity", expected=5, actual=100_000)
    assert str(custom) == "cannot attach (capacity: registry has 100000, caller asked for 5)"
    # A message that already names both values is kept as written.
    already = IncompatibleRegistry(
        "capacity: registry 'orders' has 100000, caller asked for 5",
        setting="capacity",
        expected=5,
        actual=100_000,
    )
    assert str(already) == "capacity: registry 'orders' has 100000, caller asked for 5"


def test_registry_full_says_what_to_do() -> None:
    text = str(RegistryFull(name="orders", capacity=8))
    assert "larger capacity" in text and "/dev/shm" in text


def test_invalid_agent_config_lists_missing_fields() -> None:
    err = InvalidAgentConfig(missing=("command", "name"))
    assert err.missing == ["command", "name"]
    assert "command, name" in str(err)


@all_errors
def test_repr_shows_class_fields_and_correlation_id(cls: type[ShmregError]) -> None:
    text = repr(sample(cls))
    assert text.startswith(f"{cls.__name__}(")
    assert "correlation_id='c0ffee'" in text
    for name in cls._fields:
        assert f"{name}=" in text


# -------------------------------------------------------------------------------- JSON


@all_errors
def test_to_dict_is_json_ready(cls: type[ShmregError]) -> None:
    err = sample(cls)
    err.context["odd"] = {("t", 1): b"\xff", "obj": object(), "set": {1}}
    data = err.to_dict()
    assert set(data) == {
        "code",
        "name",
        "message",
        "severity",
        "retry_strategy",
        "context",
        "correlation_id",
    }
    assert data["code"] == cls.code and data["name"] == cls.__name__
    assert data["severity"] == cls.severity.value
    assert data["retry_strategy"] == cls.retry_strategy.value
    assert json.loads(json.dumps(data))["correlation_id"] == "c0ffee"


# ---------------------------------------------------------------------------- pickling


@all_errors
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_round_trip(cls: type[ShmregError], protocol: int) -> None:
    err = sample(cls)
    assert_same_error(pickle.loads(pickle.dumps(err, protocol)), err)


@all_errors
def test_pickle_keeps_none_fields(cls: type[ShmregError]) -> None:
    err = cls()
    back = pickle.loads(pickle.dumps(err))
    assert_same_error(back, err)


@all_errors
def test_pickles_do_not_need_the_package_names(
    cls: type[ShmregError], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pickle.dumps(sample(cls))
    # A bare ``shmreg`` module with none of the re-exports: loading must still work.
    monkeypatch.setitem(sys.modules, "shmreg", types.ModuleType("shmreg"))
    assert type(pickle.loads(data)) is cls


def test_enums_pickle() -> None:
    for member in [*Severity, *RetryStrategy]:
        assert pickle.loads(pickle.dumps(member)) is member


def test_subclass_defined_elsewhere_pickles_by_reference() -> None:
    err = _LocalNotRegistered(namespace="ns", service="svc")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is _LocalNotRegistered
    assert_same_error(back, err)


class _LocalNotRegistered(NotRegistered):
    """A third-party refinement: same code, its own class."""


def test_unpicklable_context_value_travels_as_repr() -> None:
    lock = threading.Lock()
    err = ShmregError("boom", context={"lock": lock, "n": 1})
    back = pickle.loads(pickle.dumps(err))
    assert back.context == {"lock": repr(lock), "n": 1}


def test_notes_survive_pickling() -> None:
    if sys.version_info < (3, 11):
        pytest.skip("add_note() arrived in Python 3.11")
    err = NotRegistered(namespace="ns", service="svc")
    err.add_note("while sweeping")
    assert pickle.loads(pickle.dumps(err)).__notes__ == ["while sweeping"]


# ---------------------------------------------------------------------------- chaining


def test_raise_from_sets_cause_and_pickles_it() -> None:
    try:
        try:
            raise FileNotFoundError(2, "No such file", "/dev/shm/orders")
        except FileNotFoundError as exc:
            raise RegistryNotFound(name="orders") from exc
    except ShmregError as err:
        caught = err
    assert isinstance(caught.__cause__, FileNotFoundError)
    back = pickle.loads(pickle.dumps(caught))
    assert isinstance(back.__cause__, FileNotFoundError)
    assert back.__cause__.filename == "/dev/shm/orders"
    assert back.__suppress_context__


def test_cause_chain_of_shmreg_errors_pickles() -> None:
    root = RegistryTimeout(timeout=0.25)
    top = BackendOperationFailed(backend="shm", operation="register")
    top.__cause__ = root
    back = pickle.loads(pickle.dumps(top))
    assert_same_error(back.__cause__, root)


def test_unpicklable_cause_is_dropped_not_fatal() -> None:
    class LocalError(Exception):
        pass

    err = NotRegistered(namespace="ns", service="svc")
    err.__cause__ = LocalError("cannot be pickled: defined in a function")
    back = pickle.loads(pickle.dumps(err))
    assert back.__cause__ is None
    assert_same_error(back, err)


# ------------------------------------------------------------------ across processes


def _raise_everything_in_child(conn: Any) -> None:
    # Runs in a spawned interpreter: raise each error for real, pickle what was caught.
    caught = []
    # ERROR_CODES, not a walk: the child imported this module whole, local subclasses too.
    for cls in errors_module.ERROR_CODES.values():
        try:
            try:
                raise KeyError(cls.__name__)
            except KeyError as exc:
                raise sample(cls) from exc
        except errors_module.ShmregError as err:
            caught.append(err)
    conn.send_bytes(pickle.dumps(caught))
    conn.close()


def test_errors_raised_in_a_spawned_child_arrive_intact() -> None:
    ctx = multiprocessing.get_context("spawn")
    parent_end, child_end = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_raise_everything_in_child, args=(child_end,))
    child.start()
    try:
        child_end.close()
        assert parent_end.poll(60), "child sent nothing"
        received = pickle.loads(parent_end.recv_bytes())
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == 0
    assert [type(err) for err in received] == ALL_ERRORS
    for err in received:
        assert_same_error(err, sample(type(err)))
        assert isinstance(err.__cause__, KeyError)
        assert err.__cause__.args == (type(err).__name__,)


# -------------------------------------------------------------------------------- docs


def test_docs_table_matches_the_classes() -> None:
    docs = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
    if not docs.exists():
        pytest.skip("docs are not shipped with this copy")
    rows = {}
    for line in docs.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0].isdigit():
            rows[int(cells[0])] = cells
    assert set(rows) == set(ERROR_CODES)
    for code, (_, name, bases, _, severity, retry, fields) in rows.items():
        cls = ERROR_CODES[code]
        assert name == f"`{cls.__name__}`"
        assert severity == cls.severity.value, name
        assert retry == cls.retry_strategy.value, name
        named = re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", fields))  # remarks aside
        assert named == list(cls._fields), name
        for builtin in EXPECTED_TREE[cls.__name__][2]:
            assert builtin.__name__ in bases, name

"""The public surface: ``__all__`` matches the exports, public objects name ``shmreg`` as
their module (tracebacks, pickles), and every public class and method has a docstring."""

from __future__ import annotations

import enum
import inspect
import pickle
import types

import shmreg


def _public_classes() -> list[type]:
    # Type aliases such as ``Metadata = dict[str, Any]`` are not classes shmreg defines;
    # Python 3.10's inspect.isclass still says True for them, later versions say False.
    return [
        obj
        for name in shmreg.__all__
        if inspect.isclass(obj := getattr(shmreg, name))
        and not isinstance(obj, types.GenericAlias)
    ]


def test_all_matches_the_exports() -> None:
    exported = {
        name
        for name, obj in vars(shmreg).items()
        if not name.startswith("_") and not inspect.ismodule(obj)
    }
    assert set(shmreg.__all__) - {"__version__"} == exported
    assert len(shmreg.__all__) == len(set(shmreg.__all__))


def test_public_types_report_shmreg_as_their_module() -> None:
    for cls in _public_classes():
        assert cls.__module__ == "shmreg", cls
    for name in ("Event", "Monitor", "MonitorStats", "CleanupReport", "Clock", "Registry"):
        assert name in shmreg.__all__


def test_public_data_types_pickle_by_their_public_name() -> None:
    for value in (
        shmreg.Event(seq=3, kind="lost", lost=2),
        shmreg.CleanupReport("ns", terminated=(1,)),
        shmreg.MonitorStats(watched=2),
    ):
        raw = pickle.dumps(value)
        assert b"shmreg._" not in raw  # the private module stays free to move
        assert pickle.loads(raw) == value


def _undocumented(cls: type) -> list[str]:
    missing = [] if (cls.__doc__ or "").strip() else [cls.__name__]
    if issubclass(cls, (BaseException, enum.Enum)) or cls.__name__ in ("Entry", "ProcessIdentity"):
        return missing  # their methods are Python's own (NamedTuple, enum, exceptions)
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        func = member.fget if isinstance(member, property) else member
        if isinstance(func, (staticmethod, classmethod)):
            func = func.__func__
        documented = (getattr(func, "__doc__", None) or "").strip()
        if (callable(func) or isinstance(member, property)) and not documented:
            missing.append(f"{cls.__name__}.{name}")
    return missing


def test_every_public_class_and_method_has_a_docstring() -> None:
    missing = [m for cls in _public_classes() for m in _undocumented(cls)]
    assert missing == []


def test_stats_and_statistics_tell_one_story(registry: shmreg.Registry) -> None:
    """``stats()`` is the typed snapshot; ``statistics()`` its flat summary, nothing else."""
    registry.register("ns", "a")
    assert registry.statistics() == registry.stats().summary(registry.name)
    assert "statistics()" in (shmreg.Registry.stats.__doc__ or "")
    assert "stats()" in (shmreg.Registry.statistics.__doc__ or "")

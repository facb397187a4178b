"""Feature flags kept in a registry, and opening the registry a flag says (old, dual, new).

A flag is an entry of the reserved namespace ``shmreg.flags``: the service is the flag's
name, the metadata ``{"percent": 0..100, "cutover": bool}``. Every process reading that
registry sees the same state. An entry must have a live owner, and a flag must outlive the
process that set it, so flags are owned by pid 1 (init on this host, or the container's
first process), which outlives every process that reads them. (On Redis, other hosts see a
flag as long as the setting host's lease lives, like any of its entries.)

Bucketing is stable: ``bucket(flag, unit)`` is a hash of the flag name and the unit into
0..99, and a unit is in the rollout while its bucket is below the percentage. The unit is a
key (``enabled(flag, key=...)``) or, by default, the calling process (host, pid and start
time: a restarted process may land elsewhere, the same process never moves).

``open_by_flag`` is the rollout itself: with ``old`` and ``new`` locations, a process opens

==========================  =============================================================
percent 0                   ``old`` alone
in the rollout (0 < p)      dual-write, ``new`` primary, ``old`` secondary
outside it (p < 100)        dual-write, ``old`` primary, ``new`` secondary
``cutover`` (100 only)      ``new`` alone: after ``validate`` says the copy is whole
==========================  =============================================================

so during a rollout every write lands on both sides, reads fall back to the other side,
and turning the flag back to 0 leaves everything written meanwhile in ``old``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from shmreg import _identity
from shmreg._errors import InvalidArgument
from shmreg._registry import Registry
from shmreg.backends._dualwrite import DualWriteBackend
from shmreg.backends._protocol import Backend
from shmreg.migration._copy import as_backend
from shmreg.migration._locations import open_location

FLAGS_NAMESPACE = "shmreg.flags"
_KEEPER_PID = 1  # owner of every flag entry (see the module docstring)


@dataclass(frozen=True)
class FlagState:
    """A flag's rollout: the percentage of units in it, and whether ``new`` stands alone."""

    percent: int = 0
    cutover: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"percent": self.percent, "cutover": self.cutover}


def bucket(flag: str, unit: object) -> int:
    """The unit's bucket in 0..99 for ``flag``: the same on every host, run and version."""
    digest = hashlib.blake2b(f"{flag}\x00{unit!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 100


def process_unit() -> str:
    """This process as a bucketing unit: host, pid and start time."""
    me = _identity.self_identity()
    return f"{_identity.host_id()}:{me.pid}:{me.start_ticks}"


class FeatureFlags:
    """The flags stored in one registry (a ``Registry``, backend or location string)."""

    def __init__(self, where: object) -> None:
        self._backend, self._owned = as_backend(where, create=True)

    def close(self) -> None:
        """Close the registry if this object opened it."""
        if self._owned:
            self._backend.close()

    def __enter__(self) -> FeatureFlags:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, flag: str) -> FlagState:
        """The flag's state; a flag never set is at 0 %."""
        found = self._backend.lookup_with_metadata(FLAGS_NAMESPACE, flag)
        if found is None:
            return FlagState()
        meta = found[1]
        return FlagState(int(meta.get("percent", 0)), bool(meta.get("cutover", False)))

    def all(self) -> dict[str, FlagState]:
        """Every flag that was set, by name."""
        return {
            str(e.service): FlagState(int(e.metadata["percent"]), bool(e.metadata["cutover"]))
            for e in self._backend.list_entries(FLAGS_NAMESPACE)
        }

    def set(self, flag: str, percent: int, *, cutover: bool = False) -> FlagState:
        """Set ``flag`` to ``percent`` (0..100), ``cutover`` only at 100; bad input sets nothing."""
        if type(flag) is not str or not flag:
            raise InvalidArgument(
                "a flag name is a non-empty str", argument="flag", value=repr(flag)
            )
        if type(percent) is not int or not 0 <= percent <= 100:
            raise InvalidArgument(
                f"percent must be an int in 0..100, got {percent!r}",
                argument="percent",
                value=repr(percent),
            )
        if cutover and percent != 100:
            raise InvalidArgument(
                "cutover needs percent 100", argument="cutover", value=repr(percent)
            )
        state = FlagState(percent, cutover)
        keeper = _identity.identity_of(_KEEPER_PID)
        self._backend.register(FLAGS_NAMESPACE, flag, keeper, state.as_json())
        return state

    def enabled(self, flag: str, key: object = None) -> bool:
        """Whether ``key`` (default: this process) is in the flag's rollout."""
        state = self.get(flag)
        unit = process_unit() if key is None else key
        return state.cutover or bucket(flag, unit) < state.percent

    def mode(self, flag: str, key: object = None) -> str:
        """``"old"``, ``"dual-old"`` (old primary), ``"dual-new"`` or ``"new"`` for the unit."""
        state = self.get(flag)
        if state.cutover:
            return "new"
        if state.percent == 0:
            return "old"
        return "dual-new" if self.enabled(flag, key) else "dual-old"


def open_by_flag(
    flag: str,
    old: str,
    new: str,
    *,
    flags: object = None,
    key: object = None,
    name: str | None = None,
) -> Registry:
    """The registry this process should use now, per ``flag`` (see the module docstring).

    ``old`` and ``new`` are locations (``shmreg.migration.open_location``); the flags are
    read from ``flags`` (default: ``old``). ``registry.backend.kind`` says which was opened
    (``dual`` for both), and ``FeatureFlags.mode`` says which way round.
    """
    with FeatureFlags(old if flags is None else flags) as store:
        mode = store.mode(flag, key)
    backend: Backend
    if mode in ("old", "new"):
        backend = open_location(old if mode == "old" else new, name)
    else:
        first, second = (new, old) if mode == "dual-new" else (old, new)
        primary = open_location(first, name)
        try:
            backend = DualWriteBackend(primary, open_location(second, primary.name))
        except BaseException:
            primary.close()
            raise
    return Registry(backend.name, backend=backend)

"""Which engine path runs in this process: compiled (``_speedups``) or pure Python.

The compiled module is optional. ``pip install`` builds it when a C compiler is there and
carries on without it otherwise; both paths read and write the same bytes under the same
lock protocol, so processes with and without it share registries. Environment, read once
at import:

``SHMREG_PUREPYTHON=1``
    use the pure-Python path even when the extension is built (for tests and comparisons).
``SHMREG_REQUIRE_SPEEDUPS=1``
    a missing or unusable extension is an error at import, not a quiet fallback (CI sets it,
    so a broken build cannot pass as a pure-Python run). ``SHMREG_PUREPYTHON`` wins.
"""

from __future__ import annotations

import os
from types import ModuleType

from shmreg._engine import layout as L


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _load() -> tuple[ModuleType | None, str]:
    if _flag("SHMREG_PUREPYTHON"):
        return None, "pure Python (SHMREG_PUREPYTHON=1)"
    try:
        from shmreg._engine import _speedups
    except ImportError as exc:
        return None, f"pure Python (compiled path not built: {exc})"
    built_for = getattr(_speedups, "LAYOUT_VERSION", None)
    if built_for != L.LAYOUT_VERSION:
        # A stale build in a source checkout: its bytes would not be this layout's.
        return None, (
            f"pure Python (compiled path built for layout {built_for}, "
            f"this is {L.LAYOUT_VERSION}: rebuild with `pip install -e .`)"
        )
    return _speedups, "compiled (C extension shmreg._engine._speedups)"


speedups, DESCRIPTION = _load()
ACTIVE = speedups is not None

if not ACTIVE and _flag("SHMREG_REQUIRE_SPEEDUPS") and not _flag("SHMREG_PUREPYTHON"):
    raise ImportError(f"SHMREG_REQUIRE_SPEEDUPS is set but shmreg runs {DESCRIPTION}")


def describe() -> str:
    """One line for ``shmreg info`` and ``--version``: the active path, and why."""
    return DESCRIPTION

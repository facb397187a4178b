"""The shared workload core, ``shmreg._bench``, even when ``import shmreg`` fails.

shmreg's engine is written alongside this harness; a broken ``shmreg/__init__.py`` must not
stop the peers from being measured. ``_bench.py`` needs only the standard library and
msgpack, so it is then loaded from its file as ``_shmreg_bench`` and the shmreg peer is
skipped with the import error as the reason. Spawned workers import the harness's main
module first, which imports this one, so pickled references to either name resolve.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SHMREG_IMPORT_ERROR: str | None = None

try:
    from shmreg import _bench as core
except Exception as exc:
    SHMREG_IMPORT_ERROR = repr(exc)
    if "_shmreg_bench" in sys.modules:
        core = sys.modules["_shmreg_bench"]
    else:
        _path = Path(__file__).resolve().parent.parent / "shmreg" / "_bench.py"
        _spec = importlib.util.spec_from_file_location("_shmreg_bench", _path)
        assert _spec is not None and _spec.loader is not None
        core = importlib.util.module_from_spec(_spec)
        sys.modules["_shmreg_bench"] = core
        _spec.loader.exec_module(core)

__all__ = ["SHMREG_IMPORT_ERROR", "core"]

"""The shared workload core: ``shmreg._bench`` (workloads) and ``shmreg._bench_stores``.

The harness runs from a checkout with shmreg installed (``pip install -e '.[bench]'``);
spawned workers import the harness's main module first, which imports this one, so
pickled references to the store adapters resolve in them too.
"""

from __future__ import annotations

from shmreg import _bench as core

# Kept for bench/peers.py, which skips the shmreg peer with the reason when this is set.
SHMREG_IMPORT_ERROR: str | None = None

__all__ = ["SHMREG_IMPORT_ERROR", "core"]

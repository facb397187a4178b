"""Storage backends behind the ``Registry`` facade.

``Backend`` is the protocol the facade talks to; ``SharedMemoryBackend`` is the default,
``MemoryBackend`` the in-process reference and test double, ``RedisBackend`` (imported on
first use: it needs redis-py) the many-host one, and ``DualWriteBackend`` two of them
written together while moving from one to the other (docs/migration.md).
``shmreg.testing.check_backend`` is the conformance suite every backend passes.
"""

from shmreg.backends._base import BackendBase
from shmreg.backends._dualwrite import DualWriteBackend
from shmreg.backends._memory import MemoryBackend
from shmreg.backends._protocol import Backend
from shmreg.backends._shm import SharedMemoryBackend

# Tracebacks, reprs and pickles name the import path users know, not the private module.
for _public in (Backend, BackendBase, DualWriteBackend, MemoryBackend, SharedMemoryBackend):
    _public.__module__ = "shmreg.backends"
del _public


def __getattr__(name: str) -> object:
    # RedisBackend imports redis-py, an optional dependency: only when asked for.
    if name == "RedisBackend":
        from shmreg.backends._redis import RedisBackend

        RedisBackend.__module__ = "shmreg.backends"
        return RedisBackend
    raise AttributeError(f"module 'shmreg.backends' has no attribute {name!r}")


__all__ = ["Backend", "BackendBase", "DualWriteBackend", "MemoryBackend", "SharedMemoryBackend"]

"""Registry-wide defaults and limits, shared by every backend (a leaf: imports nothing).

They used to live in the shared-memory engine, so the memory backend imported the engine to
learn them; a backend must not need another backend to know its own bounds.
"""

from __future__ import annotations

from typing import Final

DEFAULT_CAPACITY: Final = 16_384
DEFAULT_MAX_METADATA_BYTES: Final = 4096
MAX_METADATA_LIMIT: Final = 16 * 1024 * 1024
# 2**28 entries need 22 GiB of slots alone: past any /dev/shm, and the 32-bit fields of a
# slot (arena offset in 8-byte units) stay far from overflowing.
MAX_CAPACITY: Final = 2**28
# Events kept for readers that fall behind; the shared ring's size, and every backend's default.
RING_EVENTS: Final = 4096

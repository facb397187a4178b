# Types of the compiled fast path (_speedups.c); absent at run time in a pure-Python install.
from array import array
from collections.abc import Callable
from typing import Any

LAYOUT_VERSION: int
LIVENESS_WORDS: int
TYPE_ABSENT: int
TYPE_ANY: int
MAX_METADATA_DEPTH: int
MAX_KEY_BYTES: int
KEY_CACHE_LIMIT: int
EVENT_REGISTERED: int
SCAN_ENTRIES: int
SCAN_SERVICES: int
SCAN_COUNT: int

def pack(value: Any, /) -> bytes | None: ...
def unpack(data: bytes | bytearray | memoryview, use_list: bool = True, /) -> Any: ...
def crc32(data: bytes | bytearray | memoryview, seed: int = 0, /) -> int: ...

class Fast:
    def __init__(
        self,
        store: Any,
        epoch: array[int],
        unpackb: Callable[[bytes], Any],
        crash_point: Callable[[str], None] | None,
        lookup: Callable[..., int | None],
        lookup_with_metadata: Callable[..., tuple[int, dict[str, Any]] | None],
        register: Callable[..., int],
        str_tags: dict[str, int],
        type_tag: Callable[[dict[str, Any]], int],
        capability_mask: Callable[[dict[str, Any]], int],
        max_metadata_bytes: int,
        namespaces: dict[str, tuple[bytes, int, int]],
        self_identity: Callable[[], Any],
        root_path: str,
        backend: Any,
        register_many: Callable[..., list[int]],
    ) -> None: ...
    def lookup(self, namespace: str, service: Any, /) -> int | None: ...
    def lookup_with_metadata(
        self, namespace: str, service: Any, /
    ) -> tuple[int, dict[str, Any]] | None: ...
    def register(self, namespace: str, service: Any, owner: Any, metadata: Any, /) -> int: ...
    def register_many(self, namespace: str, items: list[Any], /) -> list[int]: ...
    def scan(
        self,
        prefix: bytes,
        type_tag: int | None,
        caps: int,
        what: int,
        entry_type: type,
        confirm: tuple[tuple[Any, Any], ...] = (),
        /,
    ) -> Any: ...
    def release(self) -> None: ...
    def counts(self) -> dict[str, int]: ...
    def claim(self, owner: Any, /) -> None: ...
    def life_verdict(self, pid: int, start_ticks: int, /) -> int: ...

class Counted:
    def __init__(
        self, fn: Callable[..., Any], stats: Any, every: int, first_shift: int, nbuckets: int
    ) -> None: ...
    def __call__(self, *args: Any) -> Any: ...
    def pending(self) -> int: ...

"""Keys and metadata to bytes and back, with the validation that guards both.

A key is ``namespace`` (str) plus ``service`` (str, int, or a tuple of those). Its byte form
is what the table compares, so it must be canonical:

    key bytes = namespace as UTF-8 | 0x00 | msgpack(service)

The namespace may not contain NUL, which makes the split unambiguous; msgpack keeps ``1`` and
``"1"`` and ``(1,)`` apart. Metadata is a msgpack map with str keys. It is never pickled: a
registry must not let one local process run code in another.

``query_tags`` pulls the two fields queries use most (``type`` and ``capabilities``) out as
fixed-width numbers, so a vectorised scan over the slot table can discard non-matches without
decoding a single record.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import Any, TypeVar

import msgpack

from shmreg._errors import InvalidKey, InvalidMetadata, MetadataTooLarge
from shmreg._types import Metadata, Service

T = TypeVar("T")

MAX_NAMESPACE_BYTES = 255
MAX_KEY_BYTES = 1024
MAX_METADATA_DEPTH = 32

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1

# Slot columns: "type" hash (0 = the entry has no "type"; ANY = cannot be filtered, decode it).
TYPE_ABSENT = 0
TYPE_ANY = 0xFFFFFFFF

_packb = msgpack.packb
# One reused Packer: building a new one per call (what packb does) costs ~0.4 µs. Packing
# validated values calls back into no Python code, so the GIL keeps it whole per call.
_pack = msgpack.Packer(use_bin_type=True).pack
_unpackb = msgpack.unpackb
_crc32 = zlib.crc32


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------- keys


def check_namespace(namespace: object) -> bytes:
    """UTF-8 bytes of a valid namespace, or ``InvalidKey``."""
    if type(namespace) is not str:
        raise InvalidKey(
            f"namespace must be a str, got {type(namespace).__name__}", key=_short(namespace)
        )
    try:
        raw = namespace.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidKey("namespace is not valid Unicode text", key=_short(namespace)) from exc
    if not raw:
        raise InvalidKey("namespace must not be empty", key="''")
    if b"\x00" in raw:
        raise InvalidKey("namespace must not contain NUL", key=_short(namespace))
    if len(raw) > MAX_NAMESPACE_BYTES:
        raise InvalidKey(
            f"namespace is {len(raw)} bytes, the limit is {MAX_NAMESPACE_BYTES}",
            key=_short(namespace),
        )
    return raw


def _check_service(service: Any, whole: object, part: bool = False) -> None:
    kind = type(service)
    if kind is str:
        # The same rules as the namespace: an empty name or one with NUL is a bug at the
        # caller (NUL also cuts the text in C consumers and in logs), never a real service.
        if not service:
            raise InvalidKey("service must not be an empty str", key=_short(whole))
        if "\x00" in service:
            raise InvalidKey("service must not contain NUL", key=_short(whole))
        try:
            service.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidKey("service is not valid Unicode text", key=_short(whole)) from exc
        return
    if kind is int:
        if not _INT_MIN <= service <= _INT_MAX:
            raise InvalidKey("service int does not fit in 64 bits", key=_short(whole))
        return
    if kind is tuple and not part:
        if not service:
            raise InvalidKey("service tuple must not be empty", key=_short(whole))
        for item in service:
            _check_service(item, whole, part=True)
        return
    if kind is tuple:
        # One level, as documented: ("agent", 3) is a name; a tree of tuples is a data
        # structure that belongs in the metadata.
        raise InvalidKey("service tuples must not nest: use str and int parts", key=_short(whole))
    raise InvalidKey(
        f"service must be a str, an int or a tuple of those, got {kind.__name__}",
        key=_short(whole),
    )


def encode_key(namespace: object, service: object) -> bytes:
    """Canonical key bytes, or ``InvalidKey`` saying what is wrong."""
    return encode_service(check_namespace(namespace) + b"\x00", service)


def encode_service(prefix: bytes, service: object) -> bytes:
    """Key bytes from a checked namespace prefix (namespace + NUL) and a service."""
    if type(service) is not str or not service or "\x00" in service:
        _check_service(service, service)
    try:
        raw: bytes = prefix + _pack(service)
    except UnicodeEncodeError as exc:
        raise InvalidKey("service is not valid Unicode text", key=_short(service)) from exc
    if len(raw) > MAX_KEY_BYTES:
        raise InvalidKey(
            f"key is {len(raw)} bytes encoded, the limit is {MAX_KEY_BYTES}", key=_short(service)
        )
    return raw


def decode_key(raw: bytes) -> tuple[str, Service]:
    """Inverse of ``encode_key``."""
    cut = raw.index(b"\x00")
    service: Service = _unpackb(raw[cut + 1 :], use_list=False, raw=False)
    return raw[:cut].decode("utf-8"), service


def decode_service(raw: bytes, ns_len: int) -> Service:
    """The service part of key bytes whose namespace is ``ns_len`` bytes long."""
    service: Service = _unpackb(raw[ns_len + 1 :], use_list=False, raw=False)
    return service


# ------------------------------------------------------------------------------ metadata

_SCALARS = (type(None), bool, str, bytes)


def _check_value(value: Any, path: str, depth: int) -> None:
    kind = type(value)
    if kind in _SCALARS:
        return
    if kind is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise InvalidMetadata(f"{path}: int does not fit in 64 bits", path=path)
        return
    if kind is float:
        if math.isnan(value):
            raise InvalidMetadata(f"{path}: NaN is not allowed (it never equals itself)", path=path)
        return
    if depth >= MAX_METADATA_DEPTH:
        raise InvalidMetadata(f"{path}: nested deeper than {MAX_METADATA_DEPTH}", path=path)
    if kind is list:
        for index, item in enumerate(value):
            _check_value(item, f"{path}[{index}]", depth + 1)
        return
    if kind is dict:
        _check_map(value, path, depth + 1)
        return
    hint = " (use a list)" if kind is tuple else ""
    raise InvalidMetadata(
        f"{path}: {kind.__name__} values cannot be stored{hint}; allowed are None, bool, int, "
        "float, str, bytes, list and dict",
        path=path,
    )


def _check_map(mapping: dict[Any, Any], path: str, depth: int) -> None:
    for key, value in mapping.items():
        if type(key) is not str:
            raise InvalidMetadata(
                f"{path}: keys must be str, got {type(key).__name__} {_short(key)}", path=path
            )
        _check_value(value, f"{path}[{key!r}]", depth)


def as_metadata(metadata: object) -> Metadata:
    """A plain ``dict`` from what the caller passed (``None`` is an empty dict)."""
    if metadata is None:
        return {}
    if type(metadata) is dict:
        return metadata
    if isinstance(metadata, Mapping):
        return dict(metadata)
    raise InvalidMetadata(
        f"metadata must be a dict, got {type(metadata).__name__}", path="metadata"
    )


_FLAT = frozenset({str, bool, type(None), bytes})


def _fast_ok(value: Any, depth: int) -> bool:
    """True when ``value`` is plainly storable; False sends it to the path-naming check.

    Builds no strings: nearly every metadata dict is valid, and this is on the register path.
    """
    if depth > MAX_METADATA_DEPTH:
        return False
    kind = type(value)
    if kind is dict or kind is list:
        if kind is dict:
            for key in value:
                if type(key) is not str:
                    return False
            value = value.values()
        for item in value:
            sub = type(item)
            if sub in _FLAT:
                continue
            if sub is int:
                if not _INT_MIN <= item <= _INT_MAX:
                    return False
            elif not _fast_ok(item, depth + 1):
                return False
        return True
    if kind is int:
        return bool(_INT_MIN <= value <= _INT_MAX)
    if kind is float:
        return not math.isnan(value)
    return kind in _FLAT


def pack_metadata(metadata: Metadata, limit: int) -> bytes:
    """Validate and encode; ``InvalidMetadata`` names the offending path."""
    if not _fast_ok(metadata, 0):
        _check_map(metadata, "metadata", 0)  # raises with the path
    try:
        packed: bytes = _pack(metadata)
    except (TypeError, ValueError, OverflowError) as exc:  # defensive: the walk should catch all
        raise InvalidMetadata(f"metadata cannot be encoded: {exc}", path="metadata") from exc
    if len(packed) > limit:
        raise MetadataTooLarge(
            f"metadata is {len(packed)} bytes encoded, the limit is {limit}",
            size=len(packed),
            limit=limit,
        )
    return packed


def unpack_metadata(raw: bytes) -> Metadata:
    """Decode validated bytes. Callers copy the bytes out of shared memory first."""
    value: Metadata = _unpackb(raw, raw=False, strict_map_key=True)
    return value


# --------------------------------------------------------------------------- query tags


_STR_TAGS: dict[str, int] = {}


def value_tag(value: Any) -> int:
    """32-bit tag of one scalar value, equal whenever Python's ``==`` says equal.

    Queries compare with ``==``, where ``True == 1 == 1.0``; so bools and integral floats
    are tagged as the int they equal, or a scan would drop entries a decode would keep.
    """
    kind = type(value)
    if kind is bool or (kind is float and value.is_integer()):
        value = int(value)
    elif kind is str:
        # Types and capability names repeat endlessly: remember their tags.
        tag = _STR_TAGS.get(value)
        if tag is None:
            try:
                tag = _crc32(_packb(value, use_bin_type=True))
            except UnicodeEncodeError:
                return TYPE_ANY  # (a lone surrogate) never stored, so never matched
            if len(_STR_TAGS) > 4096:
                _STR_TAGS.clear()
            _STR_TAGS[value] = tag
        return tag
    try:
        return _crc32(_packb(value, use_bin_type=True))
    except (TypeError, ValueError, OverflowError):
        return TYPE_ANY


def type_tag(metadata: Metadata) -> int:
    """Column value for ``metadata["type"]``: ABSENT, a tag, or ANY for lists (membership)."""
    if "type" not in metadata:
        return TYPE_ABSENT
    value = metadata["type"]
    if type(value) in (list, dict):
        return TYPE_ANY
    tag = value_tag(value)
    # Keep the two reserved values for their meaning; the rare clash costs only a decode.
    return tag if tag not in (TYPE_ABSENT, TYPE_ANY) else TYPE_ANY


def capability_bit(value: object) -> int:
    return 1 << (value_tag(value) & 63)


def capability_mask(metadata: Metadata) -> int:
    """A 64-bit Bloom-style mask of ``metadata["capabilities"]`` (all ones: cannot filter)."""
    if "capabilities" not in metadata:
        return 0
    caps = metadata["capabilities"]
    if type(caps) is list:
        mask = 0
        tags = _STR_TAGS
        for cap in caps:
            tag = tags.get(cap) if type(cap) is str else None
            if tag is None:
                if type(cap) in (list, dict):
                    return 0xFFFFFFFFFFFFFFFF
                tag = value_tag(cap)
            mask |= 1 << (tag & 63)
        return mask
    if type(caps) is dict:
        return 0xFFFFFFFFFFFFFFFF
    return capability_bit(caps)


def matches(metadata: Metadata, equals: Mapping[str, Any]) -> bool:
    """Field equality; a stored list field matches a scalar by membership, a list by subset."""
    for field, wanted in equals.items():
        if field not in metadata:
            return False
        stored = metadata[field]
        if type(stored) is list:
            if type(wanted) is list:
                if not all(item in stored for item in wanted):
                    return False
            elif wanted not in stored:
                return False
        elif stored != wanted:
            return False
    return True


_MISSING = object()


def select(entries: list[T], equals: Mapping[str, Any]) -> list[T]:
    """The ``(service, pid, metadata)`` entries whose metadata ``matches`` ``equals``.

    Same rule as ``matches``, applied a field at a time over the whole list (scalar fields,
    the common case, without a call per entry).
    """
    for field, wanted in equals.items():
        if type(wanted) is list:
            one = {field: wanted}
            entries = [e for e in entries if matches(e[2], one)]  # type: ignore[index]
        else:
            entries = [
                e
                for e in entries
                if (v := e[2].get(field, _MISSING)) == wanted  # type: ignore[index]
                or (type(v) is list and wanted in v)
            ]
    return entries

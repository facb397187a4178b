"""Shared-memory segments whose lifetime no process's exit can end.

``multiprocessing.shared_memory`` registers every segment it opens with the resource
tracker (Python <= 3.12), and the tracker unlinks whatever is still registered when the
processes sharing it exit: an independent attacher's exit, or even its SIGKILL, would
destroy the registry for everyone. So every process here stays untracked, the creator
included (``track=False`` on 3.13+, the registration filtered out while constructing
before that), and segments are removed only by ``unlink_segment``, never ``shm.unlink()``
(which would send the tracker an UNREGISTER it never saw and print a KeyError traceback).

Creation allocates the pages with ``posix_fallocate``: a segment that is merely
``ftruncate``d on a full tmpfs kills its first writer with SIGBUS, whereas fallocate turns
that into a clean ENOSPC the caller can report.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Any

from shmreg._errors import RegistryFull, RegistryNotFound, RegistryPermissionError

SHM_DIR = "/dev/shm"
_TRACKER_LOCK = threading.Lock()


def _construct(name: str, create: bool, size: int) -> SharedMemory:
    if sys.version_info >= (3, 13):
        return SharedMemory(name, create=create, size=size, track=False)  # type: ignore[call-arg,unused-ignore]
    with _TRACKER_LOCK:
        register, unregister = resource_tracker.register, resource_tracker.unregister

        def skip_shared_memory(original: Any) -> Any:
            def call(resource_name: str, rtype: str) -> Any:
                if rtype == "shared_memory":
                    return None
                return original(resource_name, rtype)

            return call

        # unregister too: a create that fails after shm_open unlinks itself and would tell
        # the tracker to forget a segment it never saw (a KeyError traceback on stderr).
        resource_tracker.register = skip_shared_memory(register)
        resource_tracker.unregister = skip_shared_memory(unregister)
        try:
            return SharedMemory(name, create=create, size=size)
        finally:
            resource_tracker.register = register
            resource_tracker.unregister = unregister


def segment_fd(shm: SharedMemory) -> int:
    fd: int = getattr(shm, "_fd", -1)
    return fd


_CHECK_MEMORY_FROM = 64 << 20


def _refuse_unaffordable(length: int, registry: str) -> None:
    """Refuse a large allocation the machine cannot hold.

    tmpfs pages are memory. On a machine whose /dev/shm may grow as large as its RAM (the
    common default is half, some set all), fallocate would succeed and the kernel's
    out-of-memory killer would then pick some process to die: ask first.
    """
    if length < _CHECK_MEMORY_FROM:
        return
    import psutil

    available = psutil.virtual_memory().available
    if length > available // 2:  # leave the other half to the processes using it
        raise RegistryFull(
            f"registry {registry!r}: {length} bytes of shared memory asked for, "
            f"{available} bytes of memory available; free memory or use a smaller capacity",
            name=registry,
        )


def allocate(shm: SharedMemory, offset: int, length: int, registry: str) -> None:
    """Back ``[offset, offset+length)`` with real pages now, or raise ``RegistryFull``."""
    fallocate = getattr(os, "posix_fallocate", None)
    fd = segment_fd(shm)
    if fallocate is None or fd < 0 or length <= 0:
        return
    _refuse_unaffordable(length, registry)
    try:
        fallocate(fd, offset, length)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise RegistryFull(
                f"registry {registry!r}: no room in {SHM_DIR} for {length} more bytes "
                f"({os.strerror(exc.errno)}); free space there (df -h {SHM_DIR}), enlarge it "
                "(e.g. docker --shm-size) or destroy unused registries (shmreg ls / destroy)",
                name=registry,
            ) from exc
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


def _create(name: str, size: int, registry: str) -> SharedMemory:
    try:
        return _construct(name, True, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG, errno.EINVAL):
            raise RegistryFull(
                f"registry {registry!r}: cannot create a {size}-byte segment in {SHM_DIR} "
                f"({os.strerror(exc.errno)}); free space there or ask for a smaller capacity",
                name=registry,
            ) from exc
        raise


def create_segment(
    name: str, size: int, registry: str, *, allocate_bytes: int | None = None, mode: int = 0o600
) -> SharedMemory:
    """Create a new untracked segment (fails if it exists) with pages allocated up front."""
    shm = _create(name, size, registry)
    try:
        if mode != 0o600:
            os.fchmod(segment_fd(shm), mode)
        allocate(shm, 0, size if allocate_bytes is None else allocate_bytes, registry)
    except BaseException:
        close_segment(shm)
        unlink_segment(name)
        raise
    return shm


def open_segment(name: str, registry: str) -> SharedMemory:
    try:
        return _construct(name, False, 0)
    except FileNotFoundError as exc:
        raise RegistryNotFound(f"no registry named {registry!r}", name=registry) from exc
    except PermissionError as exc:
        raise RegistryPermissionError(
            f"registry {registry!r} belongs to another user (its segments are private by "
            "default; the creator can pass mode=0o660 or 0o666)",
            name=registry,
        ) from exc


def close_segment(shm: SharedMemory) -> None:
    """Unmap now, or, if views are still exported, as soon as the last one is collected.

    A view can outlive us (a traceback keeping a frame with a numpy column alive, say).
    Then ``close()`` raises BufferError, and ``SharedMemory.__del__`` would raise it again
    at some random later collection ("Exception ignored ..."). Dropping the object's own
    references instead leaves the mapping to the views: it is unmapped with the last one.
    """
    try:
        shm.close()
    except BufferError:
        forget_segment(shm)


def forget_segment(shm: SharedMemory) -> None:
    """Let go of a segment without touching the views other threads may still read through.

    The object drops its references and closes its fd; the mapping itself stays until the
    last view into it is collected. (``SharedMemory.close()`` would release its ``buf``
    first, and every view taken from that very object would fail in a reader's hands.)
    """
    shm._buf = None  # type: ignore[attr-defined]
    shm._mmap = None  # type: ignore[attr-defined]
    fd = segment_fd(shm)
    if fd >= 0:
        os.close(fd)
        shm._fd = -1  # type: ignore[attr-defined]


def unlink_segment(name: str) -> bool:
    """Remove a segment by name without involving the resource tracker; False if not done.

    /dev/shm is sticky: only a segment's creator (or root) may remove it. In a registry
    shared between users (mode 0o660 / 0o666) each generation belongs to whoever grew
    the table, so another user's leftover generation cannot be removed: that is reported
    (False), never raised, because it is harmless (names are never reused) and raising
    after a commit would leave the caller believing the commit failed.
    """
    try:
        import _posixshmem  # type: ignore[import-not-found,unused-ignore]

        _posixshmem.shm_unlink("/" + name)
        return True
    except (FileNotFoundError, PermissionError):
        return False
    except ImportError:  # pragma: no cover - platforms without _posixshmem
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            return True
        except (FileNotFoundError, PermissionError):
            return False


def may_remove(name: str) -> bool:
    """Whether this process may unlink the segment (its owner, or root)."""
    try:
        owner = os.stat(segment_path(name)).st_uid
    except FileNotFoundError:
        return True
    return os.geteuid() in (0, owner)


def segment_path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def link_segment(temp_name: str, final_name: str) -> bool:
    """Publish a fully built segment under its final name; False if that name exists.

    ``link`` is atomic and never replaces, so racing creators cannot both win and no
    attacher ever sees a half-initialised root.
    """
    try:
        os.link(segment_path(temp_name), segment_path(final_name))
    except (FileExistsError, FileNotFoundError):
        return False  # taken, or our temporary was removed by the creator that won
    return True


def list_segments(prefix: str = "shmreg-") -> list[str]:
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []

"""One registry's shared memory as a whole: root segment, writer lock, current generation.

``Store`` opens or creates the segments, keeps the mapping of the current data generation
up to date (another process may have grown the table), and brackets every write:

``begin()``
    takes the writer lock; if the root's owner word is set, the previous writer died inside
    and ``recover()`` repairs first; then records this process as owner and re-attaches if
    the table moved to a new generation.
``end()``
    clears the owner word and releases. If the write raised half-way (a KeyboardInterrupt
    between journal and apply, say) it repairs before releasing, so the next writer never
    inherits a half-applied change.

Growth and compaction (``rebuild``) build generation g+1 in a fresh segment under the lock,
then flip the root's generation word with one store. The old generation is never written
again, so readers still on it keep seeing a consistent (if briefly stale) table.
"""

from __future__ import annotations

import array
import os
import secrets
import threading
import time
import weakref
from multiprocessing.shared_memory import SharedMemory
from typing import Any

from shmreg import _identity, _log
from shmreg._engine import layout as L
from shmreg._engine.crashpoints import ARMED, crash_point
from shmreg._engine.events import Ring
from shmreg._engine.lock import WriterLock, initialise_in
from shmreg._engine.segment import (
    close_segment,
    create_segment,
    forget_segment,
    link_segment,
    list_segments,
    may_remove,
    open_segment,
    unlink_segment,
)
from shmreg._engine.table import Table
from shmreg._errors import (
    CorruptRegistry,
    IncompatibleRegistry,
    RegistryClosed,
    RegistryDestroyed,
    RegistryNotFound,
    RegistryPermissionError,
)
from shmreg._limits import (
    DEFAULT_CAPACITY,
    DEFAULT_MAX_METADATA_BYTES,
    MAX_CAPACITY,
    MAX_METADATA_LIMIT,
)

_ARENA_PER_ENTRY = 256  # virtual arena bytes reserved per entry of capacity (sparse)


class _Closed:
    """Stands in for the root words after close() or destroy(): any use raises a clear error."""

    def __init__(self, name: str, destroyed: bool = False) -> None:
        self.name = name
        self.destroyed = destroyed

    def __getitem__(self, index: int) -> int:
        if self.destroyed:
            raise RegistryDestroyed(f"registry {self.name!r} was destroyed", name=self.name)
        raise RegistryClosed(f"registry {self.name!r} is closed in this process", name=self.name)

    def __setitem__(self, index: int, value: int) -> None:
        self.__getitem__(index)


def _arena_size(capacity: int, max_meta: int) -> int:
    """Arena bytes to reserve (sparse: allocated as it fills), whole pages."""
    size = max(1 << 20, capacity * _ARENA_PER_ENTRY, 4 * (max_meta + 1024))
    return -(-size // L.PAGE) * L.PAGE


class Store:
    def __init__(
        self, name: str, root: SharedMemory, *, created: bool, upgrading: bool = False
    ) -> None:
        self.name = name
        self._upgrading = upgrading  # shmreg upgrade: an older layout may be attached
        self._root = root
        assert root.buf is not None
        self.rq: Any = root.buf.cast("Q")
        self.created = created
        self._check_root()
        self.ring = Ring(root.buf, L.RING_OFFSET)
        self.capacity = int(self.rq[L.R_CAPACITY])
        self.max_metadata_bytes = int(self.rq[L.R_MAX_META])
        self.incarnation = int(self.rq[L.R_INCARNATION])
        self.lock = WriterLock(root.buf, name)
        self._swap_lock = threading.Lock()
        # Bumped whenever this process replaces or unmaps a mapping: the compiled path
        # caches raw pointers and re-reads them when this word changes.
        self.remap_epoch = array.array("Q", [0])
        _LIVE_STORES.add(self)
        self.last_recovery: list[str] = []
        try:
            self.table: Table = self._attach_data()
        except BaseException:
            self.close()  # release the root's views now, not in a finalizer later
            raise
        self.gen = self.table.gen

    # ----------------------------------------------------------------- open / create

    @classmethod
    def open(
        cls,
        name: str,
        *,
        create: bool,
        capacity: int | None,
        max_metadata_bytes: int | None,
        mode: int = 0o600,
        upgrading: bool = False,
    ) -> Store:
        """Attach to ``name``; if absent and ``create``, build it first (race-safe).

        ``upgrading`` (``shmreg._engine.upgrade`` only) also attaches an upgradable older layout.
        """
        for _ in range(50):
            try:
                root = open_segment(L.root_name(name), name)
            except RegistryNotFound:
                if not create:
                    raise
                store = cls._try_create(
                    name,
                    capacity or DEFAULT_CAPACITY,
                    max_metadata_bytes or DEFAULT_MAX_METADATA_BYTES,
                    mode,
                )
                if store is not None:
                    return store
                continue  # another process created it first: attach to theirs
            store = cls(name, root, created=False, upgrading=upgrading)
            store.check_settings(capacity, max_metadata_bytes)
            return store
        raise RegistryNotFound(f"registry {name!r} kept vanishing while attaching", name=name)

    @classmethod
    def _try_create(cls, name: str, capacity: int, max_meta: int, mode: int) -> Store | None:
        incarnation = secrets.randbits(63) | 1
        nslots = L.slots_for(capacity)
        arena_size = _arena_size(capacity, max_meta)
        data_name = L.data_name(name, incarnation, 1)
        data = create_segment(
            data_name,
            L.arena_offset(nslots) + arena_size,
            name,
            allocate_bytes=L.arena_offset(nslots),
            mode=mode,
        )
        Table.initialise(data, 1, nslots, arena_size)
        close_segment(data)
        if ARMED:
            crash_point("create.data_built")
        temp = f"shmreg-{name}.init-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            root = create_segment(temp, L.ROOT_SIZE, name, mode=mode)
        except BaseException:
            unlink_segment(data_name)  # nothing references it yet
            raise
        assert root.buf is not None
        rq = root.buf.cast("Q")
        try:
            rq[L.R_VERSION] = L.LAYOUT_VERSION
            rq[L.R_GEN] = 1
            rq[L.R_CAPACITY] = capacity
            rq[L.R_MAX_META] = max_meta
            rq[L.R_PIDNS] = _identity.pid_namespace()
            rq[L.R_CREATED_NS] = time.time_ns()
            boot = bytes.fromhex(_identity.boot_id().replace("-", "") or "0" * 32)[:16]
            root.buf[L.R_BOOT_ID * 8 : L.R_BOOT_ID * 8 + 16] = boot.ljust(16, b"\0")
            rq[L.R_INCARNATION] = incarnation
            rq[L.R_MODE] = mode
            rq[L.R_LIFE_SLOTS] = L.LIFE_SLOTS
            initialise_in(root.buf)  # before publishing: no process can lock it half-made
            rq[L.R_MAGIC] = L.ROOT_MAGIC
        finally:
            rq.release()
        if ARMED:
            crash_point("create.root_built")
        published = link_segment(temp, L.root_name(name))
        unlink_segment(temp)
        if not published:
            close_segment(root)
            unlink_segment(data_name)
            return None
        # Segments of any other incarnation are leftovers (a creator killed mid-build, or a
        # racing creator that lost the link and is about to remove its own): only the
        # published root's incarnation is ever referenced.
        ours = f"shmreg-{name}.{incarnation:016x}."
        for seg in list_segments(f"shmreg-{name}."):
            if not seg.startswith(ours):
                unlink_segment(seg)
        return cls(name, root, created=True)

    def _check_root(self) -> None:
        rq = self.rq
        if rq[L.R_MAGIC] != L.ROOT_MAGIC:
            self._close_root()
            raise CorruptRegistry(
                f"registry {self.name!r}: root segment has a bad magic word "
                "(not a shmreg registry, or overwritten)",
                name=self.name,
                detail="bad root magic",
            )
        version = int(rq[L.R_VERSION])
        upgradable = version in L.UPGRADABLE_VERSIONS
        if version != L.LAYOUT_VERSION and not (self._upgrading and upgradable):
            self._close_root()
            hint = (
                f" (run `shmreg upgrade {self.name}` to upgrade it in place)"
                if upgradable
                else " (a newer shmreg wrote it: upgrade shmreg)"
                if version > L.LAYOUT_VERSION
                else ""
            )
            raise IncompatibleRegistry(
                f"layout version: registry has {version}, this shmreg reads {L.LAYOUT_VERSION}"
                + hint,
                setting="layout_version",
                expected=L.LAYOUT_VERSION,
                actual=version,
            )
        if rq[L.R_GEN] == L.DESTROYED:
            self._close_root()
            raise RegistryDestroyed(f"registry {self.name!r} was destroyed", name=self.name)
        max_meta = int(rq[L.R_MAX_META])
        if not 0 < max_meta <= MAX_METADATA_LIMIT or not 0 < rq[L.R_CAPACITY] <= MAX_CAPACITY:
            self._close_root()
            raise CorruptRegistry(
                f"registry {self.name!r}: settings out of range",
                name=self.name,
                detail="settings out of range",
            )

    def check_settings(self, capacity: int | None, max_metadata_bytes: int | None) -> None:
        for setting, asked, actual in (
            ("capacity", capacity, self.capacity),
            ("max_metadata_bytes", max_metadata_bytes, self.max_metadata_bytes),
        ):
            if asked is not None and asked != actual:
                self.close()
                raise IncompatibleRegistry(
                    f"{setting}: registry {self.name!r} has {actual}, caller asked for {asked}",
                    setting=setting,
                    expected=asked,
                    actual=actual,
                )

    def _attach_data(self) -> Table:
        last_error: Exception | None = None
        for _ in range(100):
            gen = self.rq[L.R_GEN]
            if gen == L.DESTROYED:
                raise RegistryDestroyed(f"registry {self.name!r} was destroyed", name=self.name)
            try:
                shm = open_segment(L.data_name(self.name, self.incarnation, gen), self.name)
            except RegistryNotFound as exc:
                # Grown (and the old generation unlinked) between the two reads: try again.
                last_error = exc
                if self.rq[L.R_GEN] == gen:
                    time.sleep(0.001)
                continue
            try:
                table = Table(shm, self.name, self.ring)
            except BaseException:
                close_segment(shm)
                raise
            if table.gen != gen:
                table.release()
                close_segment(shm)
                raise CorruptRegistry(
                    f"registry {self.name!r}: data segment says generation {table.gen}, "
                    f"the root {gen}",
                    name=self.name,
                    detail="generation mismatch",
                )
            return table
        raise CorruptRegistry(
            f"registry {self.name!r}: data segment missing",
            name=self.name,
            detail="data segment missing",
        ) from last_error

    def refresh(self) -> None:
        """Follow the root to the current generation (after another process grew the table).

        Threads sharing this object may notice the move together: the swap lock lets one
        re-map while the others find the work done.
        """
        with self._swap_lock:
            if self.rq[L.R_GEN] == self.gen:
                return
            old = self.table
            self.table = self._attach_data()
            self.gen = self.table.gen
            self.remap_epoch[0] += 1
        _retire(old)

    # ---------------------------------------------------------------------- writing

    def begin(self, timeout: float | None = None) -> Table:
        self.rq[L.R_GEN]  # raises RegistryClosed / RegistryDestroyed on a finished handle
        self.lock.acquire(timeout)
        previous = -1
        try:
            rq = self.rq
            # A set owner word means the previous writer died inside: the robust mutex
            # handed it to us with EOWNERDEAD (made consistent by the lock), and this is
            # where the damage it left is repaired. The word only has to stay non-zero
            # until that repair is done, so we record ourselves first: if we die while
            # recovering the next writer recovers, and meanwhile waiters see the mutex
            # held by the recorded writer (the lock's test for a damaged mutex).
            previous = int(rq[L.R_OWNER_PID])
            me = _identity.self_identity()
            rq[L.R_OWNER_START] = me.start_ticks
            rq[L.R_OWNER_PID] = me.pid
            if ARMED:
                crash_point("lock.owner_set")
            if previous != 0 or rq[L.R_GEN] != self.gen:
                self._begin_slow(previous)
        except BaseException:
            if previous == 0 and not isinstance(self.rq, _Closed):
                self.rq[L.R_OWNER_PID] = 0  # nothing was due or done: no recovery for the next
            self.lock.release()
            raise
        return self.table

    def _begin_slow(self, previous: int) -> None:
        rq = self.rq
        if rq[L.R_GEN] == L.DESTROYED:
            raise RegistryDestroyed(f"registry {self.name!r} was destroyed", name=self.name)
        if previous != 0:
            self._recover_locked(previous)
        if rq[L.R_GEN] != self.gen:
            self.refresh()

    def end(self, failed: bool = False) -> None:
        recovered = False
        try:
            if failed:
                self.table.recover()
            recovered = True
        finally:
            rq = self.rq
            # If the repair itself failed, keep the owner word set: the next writer must
            # find it and recover, not overwrite a journal that is still valid.
            if recovered and not isinstance(rq, _Closed):
                rq[L.R_OWNER_PID] = 0
            self.lock.release()

    def _recover_locked(self, dead_writer: int) -> None:
        rq = self.rq
        notes: list[str] = []
        building = rq[L.R_BUILDING]
        if building:
            if building != rq[L.R_GEN]:
                unlink_segment(L.data_name(self.name, self.incarnation, building))
                notes.append(f"dropped half-built generation {building}")
            rq[L.R_BUILDING] = 0
        if rq[L.R_GEN] != self.gen:
            self.refresh()
        self._unlink_stale_generations()
        notes.extend(self.table.recover())
        rq[L.R_RECOVERIES] = (rq[L.R_RECOVERIES] + 1) & L.MASK64  # a statistic: wraps
        self.last_recovery = notes
        _log.store.warning(
            "registry %r: recovered after writer pid %d died holding the lock: %s",
            self.name,
            dead_writer,
            "; ".join(notes) or "nothing to repair",
        )

    def _unlink_stale_generations(self) -> None:
        prefix = f"shmreg-{self.name}.{self.incarnation:016x}.g"
        current = L.data_name(self.name, self.incarnation, self.gen)
        for seg in list_segments(prefix):
            if seg != current:
                unlink_segment(seg)

    def rebuild(self, min_live: int, extra_arena: int) -> Table:
        """Under the lock: copy live entries into generation g+1 sized for ``min_live``."""
        old = self.table
        live, used_bytes = old.live_footprint()
        capacity = min(MAX_CAPACITY, max(self.capacity, 2 * max(live, min_live)))
        nslots = L.slots_for(capacity)
        arena = max(_arena_size(capacity, self.max_metadata_bytes), 2 * (used_bytes + extra_arena))
        arena = -(-arena // L.PAGE) * L.PAGE
        gen = self.gen
        for _ in range(64):
            # Normally g+1. A leftover of that name that we may not remove (another user's
            # half-built generation, see unlink_segment) is skipped, never reused.
            gen += 1
            name = L.data_name(self.name, self.incarnation, gen)
            self.rq[L.R_BUILDING] = gen
            if ARMED:
                crash_point("rebuild.building_marked")
            unlink_segment(name)
            try:
                shm = create_segment(
                    name,
                    L.arena_offset(nslots) + arena,
                    self.name,
                    allocate_bytes=L.arena_offset(nslots),
                    mode=(int(self.rq[L.R_MODE]) & 0o777) or 0o600,
                )
                break
            except FileExistsError:
                continue
            except BaseException:
                self.rq[L.R_BUILDING] = 0  # nothing was built
                raise
        else:
            self.rq[L.R_BUILDING] = 0
            raise CorruptRegistry(
                f"registry {self.name!r}: 64 generation names in a row are taken",
                name=self.name,
                detail="generation names exhausted",
            )
        try:
            if ARMED:
                crash_point("rebuild.segment_created")
            Table.initialise(shm, gen, nslots, arena)
            new = Table(shm, self.name, self.ring)
            old.copy_live_into(new)
            if ARMED:
                crash_point("rebuild.copied")
        except BaseException:
            close_segment(shm)
            unlink_segment(name)
            self.rq[L.R_BUILDING] = 0
            raise
        with self._swap_lock:  # readers in this process must not re-map half-way
            self.rq[L.R_GEN] = gen  # the commit: one store
            old_gen, self.table, self.gen = self.gen, new, gen
            self.remap_epoch[0] += 1
            if ARMED:
                crash_point("rebuild.flipped")
            self.rq[L.R_BUILDING] = 0
            unlink_segment(L.data_name(self.name, self.incarnation, old_gen))
            if ARMED:
                crash_point("rebuild.old_unlinked")
        _retire(old)
        _log.store.info(
            "registry %r: grew to generation %d: %d slots, %d arena bytes, %d live entries",
            self.name,
            gen,
            nslots,
            arena,
            live,
        )
        return new

    # -------------------------------------------------------------------- lifecycle

    def __del__(self) -> None:
        # A handle dropped without close(): release our views before SharedMemory's own
        # finalizer tries to unmap under them (which prints BufferError noise and leaks fds).
        try:
            self.close()
        except Exception:
            pass

    def _close_root(self) -> None:
        epoch = getattr(self, "remap_epoch", None)
        if epoch is not None:
            epoch[0] += 1
        ring = getattr(self, "ring", None)
        if ring is not None:
            ring.release()
        rq = self.rq
        if isinstance(rq, memoryview):
            rq.release()
        self.rq = _Closed(self.name)
        close_segment(self._root)

    def close(self) -> None:
        if isinstance(self.rq, _Closed):
            return
        # First, before any view goes: the compiled path checks this word on entry and
        # stops using its pointers into these mappings.
        self.remap_epoch[0] += 1
        table: Table | None = getattr(self, "table", None)
        if table is not None:
            shm = table.shm
            table.release()
            close_segment(shm)
        lock = getattr(self, "lock", None)
        if lock is not None:
            lock.close()
        self._close_root()

    @property
    def closed(self) -> bool:
        return isinstance(self.rq, _Closed)

    @staticmethod
    def salvage_settings(rq: memoryview, nslots: int) -> list[str]:
        """``fsck --repair`` of root settings that keep a registry from opening.

        Capacity is recomputed from the table's size (``nslots``, 0 if unknown), the
        metadata limit restored to the default. Returns what was rewritten."""
        from shmreg._limits import DEFAULT_MAX_METADATA_BYTES

        fixed = []
        if nslots and not 0 < rq[L.R_CAPACITY] <= MAX_CAPACITY:
            rq[L.R_CAPACITY] = max(1, min(MAX_CAPACITY, int(nslots * L.MAX_LOAD)))
            fixed.append(f"capacity setting reset to {int(rq[L.R_CAPACITY])}")
        if not 0 < rq[L.R_MAX_META] <= MAX_METADATA_LIMIT:
            rq[L.R_MAX_META] = DEFAULT_MAX_METADATA_BYTES
            fixed.append(f"metadata limit reset to {DEFAULT_MAX_METADATA_BYTES}")
        return fixed

    def count_sweep(self, removed: int) -> None:
        """Count a sweep (or a monitor's removal) and the dead entries it found: root
        statistics, written under the writer lock so concurrent sweepers lose no counts."""
        rq = self.rq
        rq[L.R_SWEEPS] = (rq[L.R_SWEEPS] + 1) & L.MASK64  # statistics wrap
        rq[L.R_LAST_SWEEP_NS] = time.time_ns()
        rq[L.R_DEAD_FOUND] = (rq[L.R_DEAD_FOUND] + removed) & L.MASK64

    def set_event_seq(self, seq: int) -> None:
        """Restart the event numbering at ``seq`` (``fsck --repair`` of a damaged word)."""
        self.rq[L.R_EVENT_SEQ] = seq

    def clear_life_slot(self, index: int) -> None:
        """Under the lock (fsck): make liveness slot ``index`` answer "unknown" (readers then
        ask kill()), and free for the next claim. Only for a slot ``liveness.problem``
        found untrustworthy: a slot held by a live process is never cleared."""
        base = L.LIFE_OFFSET + index * L.LIFE_SLOT_SIZE
        w = base // 8
        seq = int(self.rq[w + L.LIFE_SEQ])
        self.rq[w + L.LIFE_SEQ] = seq | 1
        buf = self._root.buf
        assert buf is not None
        buf[base + L.LIFE_MUTEX_AT : base + L.LIFE_SLOT_SIZE] = bytes(
            L.LIFE_SLOT_SIZE - L.LIFE_MUTEX_AT
        )
        self.rq[w + L.LIFE_SEQ] = (seq | 1) + 1

    def stamp_version(self) -> None:
        """Stamp the root with this layout version (``upgrade``, once the data is new)."""
        self.rq[L.R_VERSION] = L.LAYOUT_VERSION

    def destroy(self) -> None:
        """Mark destroyed (other processes' next call fails cleanly) and remove every segment.

        Destroying twice is a no-op; every other call on this handle afterwards raises
        ``RegistryDestroyed``.
        """
        if isinstance(self.rq, _Closed) and self.rq.destroyed:
            return
        if not may_remove(L.root_name(self.name)):
            raise RegistryPermissionError(
                f"registry {self.name!r} can be destroyed only by the user who created it "
                "(or root): /dev/shm lets no one else remove its segments",
                name=self.name,
            )
        self.begin()
        try:
            self.rq[L.R_GEN] = L.DESTROYED
            for seg in list_segments(f"shmreg-{self.name}."):
                unlink_segment(seg)
            unlink_segment(L.root_name(self.name))
        finally:
            self.rq[L.R_OWNER_PID] = 0
            self.lock.release()
        self.close()
        self.rq = _Closed(self.name, destroyed=True)

    def root_info(self) -> dict[str, Any]:
        rq = self.rq
        return {
            "name": self.name,
            "layout_version": int(rq[L.R_VERSION]),
            "generation": int(rq[L.R_GEN]),
            "capacity": self.capacity,
            "max_metadata_bytes": self.max_metadata_bytes,
            "created_ns": int(rq[L.R_CREATED_NS]),
            "pid_namespace": int(rq[L.R_PIDNS]),
            "recoveries": int(rq[L.R_RECOVERIES]),
            "sweeps": int(rq[L.R_SWEEPS]),
            "dead_found": int(rq[L.R_DEAD_FOUND]),
            "writer_pid": int(rq[L.R_OWNER_PID]),
        }


_LIVE_STORES: weakref.WeakSet[Store] = weakref.WeakSet()


def _new_swap_locks_after_fork() -> None:
    # A thread of the parent may have held a swap lock at the fork; that thread does not
    # exist in the child, so the child's copy would stay locked forever.
    for store in list(_LIVE_STORES):
        store._swap_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_swap_locks_after_fork)


def _retire(table: Table) -> None:
    """Unmap a generation this process no longer uses.

    Its views are not released here: another thread may still be reading through them.
    The mapping goes with the last view instead.
    """
    forget_segment(table.shm)


def destroy_by_name(name: str) -> bool:
    """Remove a registry even if it cannot be opened (corrupt root): for the CLI and fsck."""
    try:
        store = Store.open(name, create=False, capacity=None, max_metadata_bytes=None)
    except RegistryNotFound as exc:
        if not isinstance(exc, RegistryDestroyed):
            return False
        # Marked destroyed but still there: a destroy() killed half-way. Finish it.
    except Exception:
        pass  # damaged beyond opening: remove the segments by name
    else:
        try:
            store.destroy()
            return True
        except CorruptRegistry:
            store.close()  # its writer lock is damaged: remove the segments by name
    removed = False
    for seg in list_segments(f"shmreg-{name}."):
        removed = unlink_segment(seg) or removed
    return unlink_segment(L.root_name(name)) or removed

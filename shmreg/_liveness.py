"""Following processes to their death: the monitor thread and namespace cleanup.

The monitor is the BEAM monitor for OS processes. It follows the registry's event ring to
learn every owner as it registers (from any process), opens a pidfd for it, and sleeps in
``epoll`` until one becomes readable, which the kernel does the moment that process exits
(or turns zombie). It then checks the identity (``/proc`` start ticks) and removes that
owner's entries through the same journaled path a sweep uses, with a ``died`` event.

Why pidfd: it names one process, not a pid number, so a pid reused later cannot be mistaken
for the process watched; and the kernel wakes the waiter within tens of microseconds. The
pidfd is opened first and the start ticks checked after, which closes the window in which
the pid could have been reused between reading the registry and opening the fd.

Where pidfds are missing (other systems, an exhausted fd limit) the monitor falls back to
sweeps every ``sweep_interval`` seconds. Idle, it wakes every ``poll_interval`` to read one
word (the newest event number); it touches the table only when something changed.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shmreg import _identity, _log
from shmreg._clock import SYSTEM, Clock
from shmreg._errors import BackendUnavailable
from shmreg._types import Liveness, ProcessIdentity

# How often a monitor renews its host's lease on a many-host backend that does not say
# (``heartbeat_interval``); leases last ~5x this.
HEARTBEAT_INTERVAL = 2.0
# A monitor whose backend is unreachable retries after these waits (doubling), keeping the
# last few errors in its stats.
RETRY_FIRST, RETRY_MAX = 0.05, 2.0
MAX_ERRORS_KEPT = 50
_HAS_PIDFD = hasattr(os, "pidfd_open") and hasattr(select, "epoll")


def _raise_fd_limit() -> None:
    """Watching thousands of processes needs thousands of fds: use the hard limit."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


@dataclass
class MonitorStats:
    """What a ``Monitor`` did so far: owners watched now, deaths seen, entries removed,
    sweeps and rescans run, and the errors it survived (as text)."""

    watched: int = 0
    deaths: int = 0
    removed: int = 0
    sweeps: int = 0
    rescans: int = 0
    errors: list[str] = field(default_factory=list)
    seen: int = 0  # the newest event followed: the metrics' monitor lag is measured from it


class Monitor:
    """A background thread removing entries of dead owners within milliseconds.

    ``backend`` needs ``owners()``, ``remove_dead(verdicts)``, ``last_event_seq()``,
    ``read_events(after)`` and ``sweep()``. ``on_death`` (optional) is called with each
    dead identity, its verdict and the number of entries removed; ``subscribe`` adds more such
    callbacks, so several users of one process (a supervisor, an application) share a monitor.
    """

    def __init__(
        self,
        backend: Any,
        *,
        poll_interval: float = 0.01,
        sweep_interval: float = 1.0,
        rescan_interval: float = 5.0,
        clock: Clock = SYSTEM,
        on_death: Callable[[ProcessIdentity, Liveness, int], None] | None = None,
        use_pidfd: bool = True,
    ) -> None:
        self._backend = backend
        self._poll = poll_interval
        self._sweep_interval = sweep_interval
        self._rescan_interval = rescan_interval
        self._clock = clock
        # Copied on write: the monitor thread iterates a snapshot without a lock.
        self._subscribers: tuple[Callable[[ProcessIdentity, Liveness, int], None], ...] = (
            () if on_death is None else (on_death,)
        )
        self._subscribers_lock = threading.Lock()
        self._use_pidfd = use_pidfd and _HAS_PIDFD
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self.stats = MonitorStats()

    # ------------------------------------------------------------------ control

    def subscribe(
        self, on_death: Callable[[ProcessIdentity, Liveness, int], None]
    ) -> Callable[[], None]:
        """Also call ``on_death(identity, verdict, removed)`` for each death; returns a
        function that removes this subscription (idempotent)."""
        with self._subscribers_lock:
            self._subscribers = (*self._subscribers, on_death)

        def unsubscribe() -> None:
            with self._subscribers_lock:
                subs = list(self._subscribers)
                if on_death in subs:
                    subs.remove(on_death)
                    self._subscribers = tuple(subs)

        return unsubscribe

    @property
    def running(self) -> bool:
        """Whether the monitor's thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Monitor:
        """Start the thread (idempotent); returns ``self``."""
        if self.running:
            return self
        if self._use_pidfd:
            _raise_fd_limit()
        self._stop.clear()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="shmreg-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and close its fds; waits up to ``timeout`` seconds for it."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        thread.join(timeout)
        self._thread = None
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def request_stop(self) -> None:
        """Ask the loop to end; safe from a signal handler: no join, and the loop never
        waits on the stop event itself (see ``_pause``), so ``set`` finds its lock free."""
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def run_forever(self) -> None:
        """Run in the calling thread until ``stop()`` (from a signal handler, say)."""
        self._wake_r, self._wake_w = os.pipe()
        if self._use_pidfd:
            _raise_fd_limit()
        self._run()

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        poller = select.epoll() if self._use_pidfd else None
        by_fd: dict[int, ProcessIdentity] = {}
        watched: dict[ProcessIdentity, int] = {}  # identity -> pidfd (-1: sweep covers it)
        try:
            if poller is not None:
                poller.register(self._wake_r, select.EPOLLIN)
            backoff = RETRY_FIRST
            while not self._stop.is_set():
                began = self._clock.monotonic()
                try:
                    self._session(poller, by_fd, watched)
                    return
                except BackendUnavailable as exc:
                    # A server restarting or a network blip. Dying here would stop the
                    # lease renewals of a many-host backend, and other hosts would then bury
                    # this host's live entries: wait, then start a fresh session (a full
                    # rescan covers whatever happened meanwhile).
                    self._note_error(exc)
                    _log.liveness.warning(
                        "monitor of %r: backend unavailable, retrying in %.2f s: %s",
                        self._backend.name, backoff, exc,
                    )
                    if self._clock.monotonic() - began > RETRY_MAX:
                        backoff = RETRY_FIRST  # it had been healthy: start small again
                    self._pause(backoff)
                    backoff = min(backoff * 2, RETRY_MAX)
        except Exception as exc:  # keep the reason: a monitor that died silently is worse
            self._note_error(exc)
            raise
        finally:
            for fd in by_fd:
                try:
                    os.close(fd)
                except OSError:
                    pass
            if poller is not None:
                poller.close()

    def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` or until a stop is asked for (a byte on the wake pipe).

        Not ``self._stop.wait()``: under ``run_forever`` the loop is the main thread, where
        a signal handler calling ``request_stop`` runs between two bytecodes, possibly while
        ``wait`` holds the event's lock; ``set`` would then wait for that lock forever.
        """
        if not self._stop.is_set():
            select.select([self._wake_r], [], [], seconds)

    def _note_error(self, exc: BaseException) -> None:
        self.stats.errors.append(f"{type(exc).__name__}: {exc}"[:500])
        del self.stats.errors[:-MAX_ERRORS_KEPT]

    def _session(
        self,
        poller: Any,
        by_fd: dict[int, ProcessIdentity],
        watched: dict[ProcessIdentity, int],
    ) -> None:
        """Follow the backend until stopped; a ``BackendUnavailable`` ends the session."""
        seen = self._backend.last_event_seq()
        # A many-host backend keeps this host's lease alive and buries hosts that lost
        # theirs (RedisBackend.heartbeat); one-host backends have no such method.
        beat = getattr(self._backend, "heartbeat", None)
        next_beat = self._clock.monotonic()
        self._reconcile(self._backend.owners(), poller, by_fd, watched)
        next_rescan = self._clock.monotonic() + self._rescan_interval
        next_sweep = self._clock.monotonic() + self._sweep_interval
        while not self._stop.is_set():
            latest = self._backend.last_event_seq()
            if latest < seen:  # another event ring (a dual-write backend switched sides)
                self._reconcile(self._backend.owners(), poller, by_fd, watched)
                seen = latest
            if latest != seen:
                seen = self._follow(seen, poller, by_fd, watched)
            self.stats.seen = seen
            now = self._clock.monotonic()
            if beat is not None and now >= next_beat:
                self.stats.removed += beat()
                next_beat = now + getattr(
                    self._backend, "heartbeat_interval", HEARTBEAT_INTERVAL
                )
            if now >= next_rescan:
                self._reconcile(self._backend.owners(), poller, by_fd, watched)
                self.stats.rescans += 1
                next_rescan = now + self._rescan_interval
            if now >= next_sweep:
                # Owners without a pidfd (none available, or the fd limit reached) are
                # covered by sweeps; with every owner watched there is nothing to do.
                if poller is None or any(fd < 0 for fd in watched.values()):
                    self.stats.removed += self._backend.sweep()
                    self.stats.sweeps += 1
                if getattr(self._backend, "pending", 0):  # dual-write: failed mirrors
                    self._backend.reconcile()
                next_sweep = now + self._sweep_interval
            if poller is None:
                self._pause(self._poll)
                continue
            for fd, _mask in poller.poll(self._poll):
                if fd == self._wake_r:
                    continue
                ident = by_fd.pop(fd, None)
                if ident is None:
                    continue
                poller.unregister(fd)
                os.close(fd)
                watched.pop(ident, None)
                self._bury(ident)

    def _follow(
        self,
        seen: int,
        poller: Any,
        by_fd: dict[int, ProcessIdentity],
        watched: dict[ProcessIdentity, int],
    ) -> int:
        """Watch owners named by events after ``seen``; a lapped ring means a full rescan."""
        while True:
            events, lost = self._backend.read_events(seen)
            if lost:
                self._reconcile(self._backend.owners(), poller, by_fd, watched)
            for event in events:
                seen = event.seq
                if event.kind == "registered" and event.start_ticks:
                    ident = ProcessIdentity(event.pid, event.start_ticks, event.host)
                    if ident not in watched and _identity.is_local(ident):
                        self._watch(ident, poller, by_fd, watched)
            if not events:
                latest: int = self._backend.last_event_seq()
                return max(seen, latest) if lost else seen

    def _reconcile(
        self,
        owners: set[ProcessIdentity],
        poller: Any,
        by_fd: dict[int, ProcessIdentity],
        watched: dict[ProcessIdentity, int],
    ) -> None:
        for ident in owners - set(watched):
            if not _identity.is_local(ident):
                continue  # judged by a monitor on its own host, never by pid here
            self._watch(ident, poller, by_fd, watched)
        for ident in set(watched) - owners:  # no entries left: stop watching
            fd = watched.pop(ident)
            if fd >= 0:
                by_fd.pop(fd, None)
                poller.unregister(fd)
                os.close(fd)
        self.stats.watched = len(watched)

    def _watch(
        self,
        ident: ProcessIdentity,
        poller: Any,
        by_fd: dict[int, ProcessIdentity],
        watched: dict[ProcessIdentity, int],
    ) -> None:
        if poller is None:
            watched[ident] = -1
            return
        try:
            fd = os.pidfd_open(ident.pid)
        except ProcessLookupError:
            self._bury(ident)
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOSYS, errno.EPERM):
                watched[ident] = -1  # periodic sweeps cover it
                return
            raise
        # Opened first, verified second: if the pid was reused before the open, the start
        # ticks differ now and the fd watches a stranger.
        verdict = _identity.check(ident)
        if verdict is not Liveness.SAME and verdict is not Liveness.UNKNOWN:
            os.close(fd)
            self._bury(ident, verdict)
            return
        poller.register(fd, select.EPOLLIN)
        by_fd[fd] = ident
        watched[ident] = fd
        self.stats.watched = len(watched)

    def _bury(self, ident: ProcessIdentity, verdict: Liveness | None = None) -> None:
        verdict = verdict or _identity.check(ident)
        if not verdict.is_dead:
            return
        removed = int(self._backend.remove_dead({ident: verdict}))
        self.stats.deaths += 1
        self.stats.removed += removed
        for notify in self._subscribers:
            try:
                notify(ident, verdict, removed)
            except Exception as exc:  # one failing subscriber must not starve the others
                self.stats.errors.append(f"on_death {notify!r}: {exc!r}"[:500])


# ---------------------------------------------------------------------- cleanup


@dataclass(frozen=True)
class CleanupReport:
    """What ``cleanup_namespace`` did."""

    namespace: str
    terminated: tuple[int, ...] = ()  # pids sent SIGTERM
    killed: tuple[int, ...] = ()  # pids that outlived the grace period: SIGKILL
    removed: int = 0  # entries removed
    skipped: tuple[int, ...] = ()  # pids never signalled (the caller itself)


def signal_identity(ident: ProcessIdentity, signum: int) -> bool:
    """Signal exactly this process, never a later holder of its pid; False if it is gone."""
    if hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal"):
        try:
            fd = os.pidfd_open(ident.pid)
        except (ProcessLookupError, OSError):
            return False
        try:
            if _identity.check(ident) is not Liveness.SAME:
                return False
            signal.pidfd_send_signal(fd, signum)
            return True
        except ProcessLookupError:
            return False
        finally:
            os.close(fd)
    if _identity.check(ident) is not Liveness.SAME:
        return False
    try:
        os.kill(ident.pid, signum)
        return True
    except ProcessLookupError:
        return False


def terminate_owners(
    owners: set[ProcessIdentity], grace: float, clock: Clock = SYSTEM
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """SIGTERM every owner but the caller, SIGKILL those alive after ``grace`` seconds."""
    me = _identity.self_identity()
    # pid 1 is never signalled: it owns records meant to outlive every process (shmreg.agents).
    skipped = tuple(sorted(i.pid for i in owners if i.pid in (me.pid, 1)))
    targets = {i for i in owners if i.pid not in (me.pid, 1)}
    terminated = tuple(sorted(i.pid for i in targets if signal_identity(i, signal.SIGTERM)))
    deadline = clock.monotonic() + grace
    alive = {i for i in targets if i.pid in terminated}
    while alive and clock.monotonic() < deadline:
        alive = {i for i in alive if not _identity.check(i).is_dead}
        if alive:
            clock.sleep(0.01)
    killed = tuple(sorted(i.pid for i in alive if signal_identity(i, signal.SIGKILL)))
    return terminated, killed, skipped

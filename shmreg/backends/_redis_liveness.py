"""Liveness across hosts and events for the Redis backend: leases, sweeps, the stream.

Liveness across hosts. An owner is ``(pid, start ticks, host)``; only its own host can judge
a pid. Each host keeps a lease key alive (a monitor renews it, ``heartbeat``; every
registration renews it too when due). Owners on this host are judged by ``/proc``; an owner
elsewhere is alive while its host's lease lives and dead once it expired: any sweeper then
removes its entries with a ``died`` event whose reason is ``host-lost``. The scripts
themselves refuse to remove an entry of a host whose lease lives.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from shmreg import _codec, _identity, _log
from shmreg._engine.events import Event
from shmreg._types import (
    Liveness,
    ProcessIdentity,
)
from shmreg.backends._base import (
    dead_reasons,
    event_window,
)
from shmreg.backends._redis_base import HOST_LOST, RedisBase
from shmreg.backends._redis_conn import mapped


class RedisLiveness(RedisBase):
    """Who is alive across hosts, removing the dead, and reading the event stream."""

    # ------------------------------------------------------------------ liveness

    def owner_counts(self) -> dict[ProcessIdentity, int]:
        stored, _ = self._scan()
        heads = [self._head(value) for _, _, value in stored]
        return dict(Counter(self._ident(h[0], h[1], h[4]) for h in heads))

    def _verdicts(self, identities: Iterable[ProcessIdentity]) -> dict[ProcessIdentity, Liveness]:
        """Local owners by ``/proc``; remote ones by their host's lease (dead only if expired)."""
        identities = list(identities)
        expired = set(self._run("expired", operation="sweep"))
        local = [i for i in identities if _identity.is_local(i)]
        verdicts = _identity.check_many(local)
        for ident in identities:
            if ident not in verdicts:
                lost = ident.host.encode().hex().encode() in expired
                verdicts[ident] = Liveness.GONE if lost else Liveness.SAME
        return verdicts

    def _remove_dead(self, verdicts: Mapping[ProcessIdentity, Liveness], sweeping: bool) -> int:
        reasons = {
            ident: (reason if _identity.is_local(ident) else HOST_LOST)
            for ident, reason in dead_reasons(verdicts).items()
        }
        # now, ring, here, sweeping, no hosts to forget; then (ns, key, value, reason) each
        args: list[Any] = [time.time(), self.ring_events, self._here, int(sweeping), 0]
        first = len(args)
        if reasons:
            stored, _ = self._scan()
            for ns, key, value in stored:
                head = self._head(value)
                reason = reasons.get(self._ident(head[0], head[1], head[4]))
                if reason is not None:
                    args += [ns, key, value, reason]
        if len(args) == first and not sweeping:
            return 0
        removed = int(self._run("remove", *args, operation="remove_dead"))
        if removed:  # counted per owner as the scan found them (the script drops only those)
            heads = [self._head(value) for value in args[first + 2 :: 4]]
            per_owner = Counter(self._ident(h[0], h[1], h[4]) for h in heads)
            _log.removed_dead(self.name, per_owner, reasons)
        return removed

    @property
    def heartbeat_interval(self) -> float:
        """How often a monitor calls ``heartbeat``: a fifth of the lease (2 s of 10 s)."""
        return self._target.lease / 5

    def heartbeat(self) -> int:
        """Renew this host's lease; remove the entries of hosts whose lease expired. How many.

        A monitor calls it every ``heartbeat_interval`` seconds.
        """
        renewed = time.monotonic()
        expired = set(self._run("heartbeat", self._here, self._lease_ms, operation="heartbeat"))
        self._renewed = renewed
        if not expired:
            return 0
        stored, _ = self._scan()
        # Every entry of an expired host is in this batch, so the hosts can be forgotten
        # with it (the script keeps any whose lease came back meanwhile).
        args: list[Any] = [time.time(), self.ring_events, self._here, 0, len(expired), *expired]
        for ns, key, value in stored:
            if self._head(value)[4] in expired:
                args += [ns, key, value, HOST_LOST]
        return int(self._run("remove", *args, operation="heartbeat"))

    # ------------------------------------------------------------------ events

    def last_event_seq(self) -> int:
        return int(self._run("last", operation="last_event_seq") or 0)

    def read_events(self, after: int, limit: int = 1024) -> tuple[list[Event], int]:
        after = max(after, 0)
        last, raw = self._run(
            "events", after, max(limit, 1), self.ring_events, operation="read_events"
        )
        first, stop, lost = event_window(after, int(last or 0), self.ring_events, limit)
        out = []
        for entry_id, fields in raw:
            seq = int(entry_id.split(b"-")[0])
            if first <= seq <= stop:
                out.append(self._event(seq, fields))
        return out, lost

    def wait_events(self, after: int, timeout: float) -> bool:
        """Block until an event numbered after ``after`` exists (``XREAD BLOCK``), or timeout.

        Blocks in slices shorter than the socket timeout, so a slow wait is never mistaken
        for an unreachable server; between slices it asks whether the registry still exists
        (a destroyed one has no stream to wake the reader: it raises ``RegistryDestroyed``
        then, not when the whole timeout has passed).
        """
        deadline = time.monotonic() + timeout
        stream = self._keys[0] + "ev"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            block = max(1, int(min(left, self._target.timeout * 0.25) * 1000))
            with mapped(self._name, "wait"):
                if self._client.xread({stream: f"{after}-1"}, count=1, block=block):
                    return True
            self._run("last", operation="wait")

    def _event(self, seq: int, fields: list[bytes]) -> Event:
        f = dict(zip(fields[::2], fields[1::2], strict=True))
        ns, key, host = f[b"n"], f[b"s"], f[b"h"]
        return Event(
            seq,
            f[b"k"].decode(),
            ns.decode(),
            _codec.decode_service(key, len(ns)),
            int(f[b"p"]),
            int(f[b"g"]),
            float(f[b"t"]),
            f[b"r"].decode() or None,
            start_ticks=int(f[b"st"]),
            host="" if host == self._here else bytes.fromhex(host.decode()).decode(),
        )

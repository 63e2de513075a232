"""A real `redis-server` for the tests: a free loopback port, its own folder, no persistence.

    server = RedisServer.start_new(tmp_path)
    server.url            # redis://127.0.0.1:PORT/0
    server.stop(); server.start()   # a restart on the same port (data lost, as without persistence)
    server.close()

A missing `redis-server` fails the tests with how to install it; they never skip.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

INSTALL_HINT = ("redis-server is not installed, and the Redis tests need a real one: "
                "`apt-get install -y redis-server` (Debian/Ubuntu), or run `make test`, which installs it")


def redis_server_binary() -> str:
    """The path of `redis-server`; fails the test with how to install it when there is none."""
    path = shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if Path(p).exists()), None)
    if path is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One `redis-server` process on 127.0.0.1, which can be stopped and started again on its port."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @classmethod
    def start_new(cls, folder: Path) -> RedisServer:
        """Start a server on a free port (trying another if one is taken meanwhile)."""
        folder.mkdir(parents=True, exist_ok=True)
        last: Exception | None = None
        for _ in range(5):
            server = cls(folder, _free_port())
            try:
                server.start()
                return server
            except RuntimeError as exc:
                last = exc
        raise AssertionError(f"could not start redis-server: {last}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        """Start the server and wait until it answers PING."""
        assert not self.running, "already running"
        self.starts += 1
        log = self.folder / f"redis-{self.port}-{self.starts}.log"
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder), "--daemonize", "no", "--logfile", str(log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while not _ping(self.port):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                text = log.read_text(errors="replace") if log.exists() else ""
                self.proc = None
                raise RuntimeError(f"redis-server exited at start on port {self.port}: {err}{text[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING on port {self.port} within {timeout} s")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait until it is gone; its data is lost."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()

"""A real `redis-server` (Debian's) on a free loopback port in a temp dir, optionally with a password or TLS; it can
be stopped and started again on the same port (an outage and its end)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests._service_util import free_port

REDIS = shutil.which("redis-server")


class RedisServer:
    def __init__(self, dir: Path, password: str | None = None, tls: tuple[Path, Path, Path] | None = None):
        """`tls`: (certificate, key, CA) makes it serve TLS only (clients need no certificate)."""
        self.dir = dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.tls = tls
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        args = [REDIS, "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "", "--appendonly", "no",
                "--protected-mode", "no", "--daemonize", "no", "--loglevel", "warning"]
        if self.tls:
            cert, key, ca = self.tls
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert), "--tls-key-file",
                     str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        return args

    def start(self) -> "RedisServer":
        log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:  # listening is enough: the tests' clients PING through their own path (password, TLS)
            assert self.proc.poll() is None, (self.dir / "redis.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # an outage, not a clean shutdown
            self.proc.wait(timeout=10)
        self.proc = None

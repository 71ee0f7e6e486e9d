"""A throwaway redis-server on 127.0.0.1 (a free port, no persistence, a temporary directory)
for the distributed tests: found on PATH, else installed from the Debian package. Never
skipped: a broker that cannot start fails the tests that need it.

Import the fixture into a test module as `from .redis_server import redis_url_fixture`; it
is named `redis_url`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

INSTALL_TIMEOUT = 600


def _install_redis() -> str:
    """apt-get install redis-server (after apt-get update when the first try fails)."""
    log = []
    for commands in (
        [["apt-get", "install", "-y", "-q", "redis-server"]],
        [["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "redis-server"]],
    ):
        for command in commands:
            try:
                done = subprocess.run(
                    command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.append(f"{' '.join(command)}: {exc}")
                break
            log.append(f"{' '.join(command)}: exit {done.returncode} {done.stderr[-500:]}")
            if done.returncode != 0:
                break
        found = shutil.which("redis-server")
        if found is not None:
            return found
    raise RuntimeError(
        "redis-server is not installed and apt-get could not install it:\n" + "\n".join(log)
    )


def find_redis_server() -> str:
    return shutil.which("redis-server") or _install_redis()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """redis-server on a free loopback port, no persistence, its files in `data_dir`."""

    def __init__(self, binary: str, data_dir: Path) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        """Start it and wait until it answers PING; its redis:// URL."""
        errors = []
        for _attempt in range(3):  # another process may take the free port before redis
            port = _free_port()
            log = self.data_dir / f"redis-{port}.log"
            self.process = subprocess.Popen(
                [
                    *(self.binary, "--bind", "127.0.0.1", "--port", str(port)),
                    *("--save", "", "--appendonly", "no"),
                    *("--dir", str(self.data_dir), "--logfile", str(log)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.process.poll() is None:
                if _answers_ping(port):
                    return f"redis://127.0.0.1:{port}/0"
                time.sleep(0.05)
            self.stop()
            errors.append(log.read_text(errors="replace")[-500:] if log.exists() else "no log")
        raise RuntimeError("redis-server did not start: " + " | ".join(errors))

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@pytest.fixture(scope="session", name="redis_url")
def redis_url_fixture() -> Iterator[str]:
    """The session's Redis broker URL. Fails loudly when redis-server cannot run."""
    with tempfile.TemporaryDirectory(prefix="s3xfer-redis-") as data_dir:
        try:
            server = RedisServer(find_redis_server(), Path(data_dir))
            url = server.start()
        except RuntimeError as exc:
            pytest.fail(str(exc), pytrace=False)
        try:
            yield url
        finally:
            server.stop()

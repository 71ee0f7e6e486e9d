"""Specification of the path emulator (real sockets on 127.0.0.1) and its unit parsers.

Timing assertions here check behaviour (a delay is added, chunks are pipelined, a cap
holds), with generous upper bounds: they are not speed targets.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import socketserver
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import anyio
import psutil
import pytest
from anyio.abc import SocketAttribute, SocketStream

from s3xfer.bench.netem import (
    READ_CHUNK,
    PathEmulator,
    TokenBucket,
    parse_duration,
    parse_rate,
    start_in_thread,
)
from s3xfer.errors import QuantityError, UsageError

LOOPBACK = "127.0.0.1"
SLACK = 0.5  # upper-bound slack for a loaded CI machine


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _echo(stream: SocketStream) -> None:
    async with stream:
        try:
            async for chunk in stream:
                await stream.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass


@asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    """An echo server on loopback; yields its port. Closes its side after the client's EOF."""
    listener = await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=0)
    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, _echo)
        yield listener.extra(SocketAttribute.local_port)
        tasks.cancel_scope.cancel()


async def receive_exactly(stream: SocketStream, nbytes: int) -> bytes:
    received = bytearray()
    while len(received) < nbytes:
        received += await stream.receive()
    return bytes(received)


async def send_all(stream: SocketStream, chunks: list[bytes]) -> None:
    for chunk in chunks:
        await stream.send(chunk)


async def warm_connection(path: PathEmulator) -> SocketStream:
    """A connection through `path` that has already done one round trip."""
    stream = await anyio.connect_tcp(LOOPBACK, path.port)
    await stream.send(b"hello")
    assert await receive_exactly(stream, 5) == b"hello"
    return stream


def socket_of_this_process_on(port: int) -> list[object]:
    return [
        c
        for c in psutil.Process().net_connections(kind="tcp")
        if c.laddr.port == port or (c.raddr and c.raddr.port == port)
    ]


# --------------------------------------------------------------------------- the proxy


@pytest.mark.anyio
async def test_round_trip_takes_one_rtt() -> None:
    rtt = 0.1
    async with echo_server() as port, PathEmulator(LOOPBACK, port, rtt=rtt) as path:
        stream = await warm_connection(path)
        async with stream:
            started = anyio.current_time()
            await stream.send(b"ping")
            assert await receive_exactly(stream, 4) == b"ping"
            elapsed = anyio.current_time() - started
    assert rtt <= elapsed < rtt + SLACK


@pytest.mark.anyio
async def test_new_connection_pays_one_extra_rtt_for_the_handshake() -> None:
    rtt = 0.1
    async with echo_server() as port, PathEmulator(LOOPBACK, port, rtt=rtt) as path:
        started = anyio.current_time()
        async with await anyio.connect_tcp(LOOPBACK, path.port) as stream:
            await stream.send(b"ping")
            assert await receive_exactly(stream, 4) == b"ping"
        elapsed = anyio.current_time() - started
    assert 2 * rtt <= elapsed < 2 * rtt + SLACK


@pytest.mark.anyio
async def test_bytes_pass_unchanged_and_are_counted() -> None:
    payload = random.Random(42).randbytes(1024 * 1024)
    async with (
        echo_server() as port,
        PathEmulator(LOOPBACK, port, rtt=0.01) as path,
        await anyio.connect_tcp(LOOPBACK, path.port) as stream,
    ):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(send_all, stream, [payload])
            echoed = await receive_exactly(stream, len(payload))
        await stream.send_eof()
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()  # the echo server's close came through the proxy
    stats = path.stats()
    assert echoed == payload
    assert (stats.connections, stats.bytes_up, stats.bytes_down) == (1, len(payload), len(payload))
    assert stats.active_connections == 0


@pytest.mark.anyio
async def test_bandwidth_cap_holds_per_connection() -> None:
    payload = os.urandom(2_000_000)
    bandwidth = 4e6  # 2 MB at 4 MB/s: at least ~0.5 s, less the one-chunk burst
    async with (
        echo_server() as port,
        PathEmulator(LOOPBACK, port, bandwidth=bandwidth) as path,
        await anyio.connect_tcp(LOOPBACK, path.port) as stream,
    ):
        started = anyio.current_time()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(send_all, stream, [payload])
            echoed = await receive_exactly(stream, len(payload))
        elapsed = anyio.current_time() - started
    assert echoed == payload
    assert 0.4 <= elapsed < 0.5 + 2 * SLACK


@pytest.mark.anyio
async def test_the_link_cap_is_shared_by_every_connection() -> None:
    payload = os.urandom(1_000_000)
    link = 4e6  # two connections × 1 MB through one 4 MB/s link: ~0.5 s, not ~0.25 s

    async def echo_once(path: PathEmulator) -> bytes:
        async with (
            await anyio.connect_tcp(LOOPBACK, path.port) as stream,
            anyio.create_task_group() as tasks,
        ):
            tasks.start_soon(send_all, stream, [payload])
            echoed = await receive_exactly(stream, len(payload))
        return echoed

    async with echo_server() as port, PathEmulator(LOOPBACK, port, link_bandwidth=link) as path:
        started = anyio.current_time()
        results: list[bytes] = []

        async def one() -> None:
            results.append(await echo_once(path))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(one)
            tasks.start_soon(one)
        elapsed = anyio.current_time() - started
    assert results == [payload, payload]
    assert 0.4 <= elapsed < 0.5 + 2 * SLACK


@pytest.mark.anyio
async def test_chunks_in_flight_are_pipelined_not_one_per_rtt() -> None:
    rtt = 0.2
    # Ten full-size reads: serialised, they would take 10 x rtt/2 in each direction (2 s).
    chunks = [bytes([i]) * READ_CHUNK for i in range(10)]
    async with echo_server() as port, PathEmulator(LOOPBACK, port, rtt=rtt) as path:
        stream = await warm_connection(path)
        async with stream:
            started = anyio.current_time()
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(send_all, stream, chunks)
                echoed = await receive_exactly(stream, 10 * READ_CHUNK)
            elapsed = anyio.current_time() - started
    assert echoed == b"".join(chunks)
    assert rtt <= elapsed < rtt + SLACK


@pytest.mark.anyio
async def test_shutdown_closes_every_socket_and_task() -> None:
    tasks_before = asyncio.all_tasks()
    async with echo_server() as port:
        async with PathEmulator(LOOPBACK, port, rtt=0.02) as path:
            proxy_port = path.port
            client = await warm_connection(path)
            assert path.stats().active_connections == 1
        # The proxy went away with the connection open: the client sees it closed.
        async with client:
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await client.receive()
        assert path.stats().active_connections == 0
        with pytest.raises(OSError):
            await anyio.connect_tcp(LOOPBACK, proxy_port)
    assert asyncio.all_tasks() <= tasks_before
    assert socket_of_this_process_on(proxy_port) == []
    assert socket_of_this_process_on(port) == []


@pytest.mark.anyio
async def test_refused_upstream_closes_the_client_and_the_proxy_lives_on() -> None:
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind((LOOPBACK, 0))
        dead_port = probe.getsockname()[1]
    async with PathEmulator(LOOPBACK, dead_port) as path:
        for attempt in (1, 2):
            async with await anyio.connect_tcp(LOOPBACK, path.port) as stream:
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await stream.receive()
            assert path.stats().failed_upstream_connects == attempt


@pytest.mark.anyio
async def test_endpoint_url_and_repr() -> None:
    emulator = PathEmulator(LOOPBACK, 9, rtt=0.03)
    assert "not started" in repr(emulator)
    with pytest.raises(RuntimeError, match="not started"):
        _ = emulator.port
    async with emulator as path:
        assert path.endpoint_url == f"http://127.0.0.1:{path.port}"
        assert f"port={path.port}" in repr(path)


@pytest.mark.parametrize(
    "kwargs", [{"rtt": -1.0}, {"rtt": float("inf")}, {"bandwidth": 0.0}, {"buffer_bytes": 0}]
)
def test_emulator_rejects_impossible_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PathEmulator(LOOPBACK, 9, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- thread helper


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@contextmanager
def threaded_echo_server() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer((LOOPBACK, 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_start_in_thread_serves_blocking_callers() -> None:
    with threaded_echo_server() as port:
        url, stop = start_in_thread(LOOPBACK, port, rtt=0.02)
        proxy_port = int(url.rsplit(":", 1)[1])
        assert url == f"http://127.0.0.1:{proxy_port}"
        try:
            with socket.create_connection((LOOPBACK, proxy_port), timeout=5) as conn:
                conn.sendall(b"x" * 1000)
                received = b""
                while len(received) < 1000:
                    received += conn.recv(65536)
                conn.shutdown(socket.SHUT_WR)
                assert conn.recv(1) == b""
        finally:
            stats = stop()
        assert received == b"x" * 1000
        assert (stats.connections, stats.bytes_up, stats.bytes_down) == (1, 1000, 1000)
        assert stop() == stats  # idempotent
        with pytest.raises(OSError):
            socket.create_connection((LOOPBACK, proxy_port), timeout=5).close()


# --------------------------------------------------------------------------- pure pieces


def test_token_bucket_allows_a_burst_then_paces() -> None:
    bucket = TokenBucket(100.0, burst=50.0)
    assert bucket.reserve(50, now=0.0) == 0.0
    assert bucket.reserve(50, now=0.0) == pytest.approx(0.5)
    assert bucket.reserve(100, now=0.5) == pytest.approx(1.0)
    # Idle time refills up to the burst, not beyond.
    assert bucket.reserve(50, now=100.0) == 0.0
    assert bucket.reserve(10, now=100.0) == pytest.approx(0.1)


def test_token_bucket_sends_exactly_rate_times_time_plus_burst() -> None:
    bucket = TokenBucket(1000.0, burst=100.0)
    now = 0.0
    for _ in range(1000):
        now += bucket.reserve(37, now=now)  # `now` becomes the time this chunk may go
    assert 1000.0 * now + 100.0 == pytest.approx(37 * 1000)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30ms", 0.03), ("0.5s", 0.5), ("250us", 250e-6), ("250µs", 250e-6), ("2m", 120.0),
     (" 1.5 ms ", 0.0015), ("0", 0.0), ("1e2ms", 0.1)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [("30", "needs a unit"), ("30 parsecs", "unknown unit"), ("fast", "cannot read"),
     ("-5ms", "cannot read"), ("", "cannot read")],
)  # fmt: skip
def test_parse_duration_rejects_clearly(text: str, message: str) -> None:
    with pytest.raises(QuantityError, match=message):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "rate"),
    [("50MB/s", 50e6), ("50MB", 50e6), ("1.5GB/s", 1.5e9), ("100KB/s", 100e3),
     ("100kB", 100e3), ("64KiB/s", 65536.0), ("8MiB", 8 * 1024**2), ("1GiB/s", 1024.0**3),
     ("100Mbit/s", 12.5e6), ("1Gbit", 125e6), ("512B/s", 512.0)],
)  # fmt: skip
def test_parse_rate(text: str, rate: float) -> None:
    assert parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize(
    ("text", "message"),
    [("50", "unknown unit ''"), ("50mb/s", "MB for bytes or Mbit for bits"),
     ("50Mb/s", "MB for bytes or Mbit for bits"), ("0MB/s", "greater than zero"),
     ("lots", "cannot read"), ("5 MB/h", "cannot read")],
)  # fmt: skip
def test_parse_rate_rejects_clearly(text: str, message: str) -> None:
    with pytest.raises(QuantityError, match=message):
        parse_rate(text)


def test_quantity_errors_are_usage_errors_and_value_errors() -> None:
    assert issubclass(QuantityError, UsageError)
    assert issubclass(QuantityError, ValueError)

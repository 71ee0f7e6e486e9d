"""A loopback TCP proxy that makes a local S3 server look far away: added round-trip time
and a per-connection bandwidth cap, for `s3xfer bench`. Also parses "30ms" and "50MB/s".

Only the proxy's own event loop and sockets live here; nothing reads a real network path.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import deque
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from anyio.from_thread import start_blocking_portal

from ..errors import QuantityError

READ_CHUNK = 64 * 1024  # largest piece read from a socket at once
DEFAULT_BUFFER_BYTES = 16 * 1024 * 1024  # per direction per connection


# --------------------------------------------------------------------------- parsing

_NUMBER = r"(?P<number>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
_DURATION = re.compile(rf"^\s*{_NUMBER}\s*(?P<unit>[a-zµ]*)\s*$")
_RATE = re.compile(rf"^\s*{_NUMBER}\s*(?P<unit>[A-Za-z]*)\s*(?P<per>/s)?\s*$")
_DURATION_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0}
_RATE_UNITS = {
    "B": 1.0,
    "kB": 1e3,
    "KB": 1e3,
    "MB": 1e6,
    "GB": 1e9,
    "KiB": 1024.0,
    "MiB": 1024.0**2,
    "GiB": 1024.0**3,
    "kbit": 1e3 / 8,
    "Kbit": 1e3 / 8,
    "Mbit": 1e6 / 8,
    "Gbit": 1e9 / 8,
}


def parse_duration(text: str) -> float:
    """Seconds from "30ms", "0.5s", "250us", "2m". A unit is required (except for 0),
    because a bare "30" could mean 30 ms or 30 s."""
    match = _DURATION.match(text)
    if match is None:
        raise QuantityError(f"cannot read duration {text!r}: expected a number and a unit, as 30ms")
    value = float(match["number"])
    unit = match["unit"]
    if not unit:
        if value == 0:
            return 0.0
        raise QuantityError(f"duration {text!r} needs a unit: {text.strip()}ms or {text.strip()}s")
    if unit not in _DURATION_UNITS:
        raise QuantityError(
            f"unknown unit {unit!r} in duration {text!r}; use one of {', '.join(_DURATION_UNITS)}"
        )
    return value * _DURATION_UNITS[unit]


def parse_rate(text: str) -> float:
    """Bytes per second from "50MB/s", "100MiB", "1Gbit/s" (the "/s" is optional).
    MB is 10**6 bytes, MiB 2**20; bits only with an explicit "bit" unit."""
    match = _RATE.match(text)
    if match is None:
        raise QuantityError(f"cannot read rate {text!r}: expected a number and a unit, as 50MB/s")
    unit = match["unit"]
    if unit not in _RATE_UNITS:
        hint = ""
        if unit.lower() in {"kb", "mb", "gb"}:
            hint = f" (write {unit[0].upper()}B for bytes or {unit[0].upper()}bit for bits)"
        raise QuantityError(
            f"unknown unit {unit!r} in rate {text!r}{hint}; "
            f"use one of {', '.join(_RATE_UNITS)}, optionally followed by /s"
        )
    rate = float(match["number"]) * _RATE_UNITS[unit]
    if not rate > 0 or math.isinf(rate):
        raise QuantityError(f"rate {text!r} must be greater than zero")
    return rate


# --------------------------------------------------------------------------- pure pieces


class TokenBucket:
    """Paces a byte stream to `rate` bytes/s, allowing bursts of `burst` bytes.

    Pure: the caller passes the time and sleeps for the delay returned, so tests need no
    clock. Kept as the time at which everything reserved so far would have drained at
    `rate` (GCRA's "theoretical arrival time"), equivalent to counting tokens without a
    refill step.
    """

    __slots__ = ("_burst_seconds", "_drained_at", "_rate")

    def __init__(self, rate: float, *, burst: float) -> None:
        if not rate > 0 or not burst >= 0:
            raise ValueError(f"token bucket needs rate > 0 and burst >= 0, got {rate}, {burst}")
        self._rate = rate
        self._burst_seconds = burst / rate
        self._drained_at = -math.inf

    def reserve(self, nbytes: int, *, now: float) -> float:
        """Take `nbytes` and return how long to wait before sending them (0 if none)."""
        # Idle time is not banked beyond `burst`: the backlog never drains below "now".
        self._drained_at = max(self._drained_at, now) + nbytes / self._rate
        return max(0.0, self._drained_at - now - self._burst_seconds)


class _DelayLine:
    """One direction's chunks in flight, each with the time it is due at the far end.

    Bounded in bytes so a stalled reader pushes back on the writer (as a TCP window would)
    instead of growing memory. Single producer, single consumer.
    """

    def __init__(self, *, capacity: int) -> None:
        self._chunks: deque[tuple[float, bytes]] = deque()
        self._buffered = 0
        self._capacity = capacity
        self._closed = False
        self._readable = anyio.Event()
        self._writable = anyio.Event()

    async def put(self, due: float, data: bytes) -> None:
        while self._buffered >= self._capacity:
            self._writable = anyio.Event()
            await self._writable.wait()
        self._chunks.append((due, data))
        self._buffered += len(data)
        self._readable.set()

    def close(self) -> None:
        """No more chunks: the consumer sees None once the line is drained."""
        self._closed = True
        self._readable.set()

    async def get(self) -> tuple[float, bytes] | None:
        while not self._chunks:
            if self._closed:
                return None
            self._readable = anyio.Event()
            await self._readable.wait()
        due, data = self._chunks.popleft()
        self._buffered -= len(data)
        self._writable.set()
        return due, data


# --------------------------------------------------------------------------- the proxy


@dataclass(frozen=True, slots=True)
class PathStats:
    """Counters of a PathEmulator. "Up" is client to server, "down" server to client."""

    connections: int
    active_connections: int
    failed_upstream_connects: int
    bytes_up: int
    bytes_down: int


Direction = Literal["up", "down"]


class PathEmulator:
    """A TCP proxy on loopback adding `rtt` seconds of round-trip time and, if `bandwidth`
    is set, capping each connection at that many bytes/s in each direction.

    Each direction forwards a chunk read at time t at t + rtt/2, with chunks in flight
    pipelined (propagation delay, not one chunk per round trip). Pacing happens where
    bytes are read, so a capped connection pushes back on its sender like a slow link.
    The client's connection is accepted at once, so each new connection instead waits one
    rtt before its upstream is opened: the TCP handshake a real path would have cost.
    Use as `async with PathEmulator(...) as path:` then point clients at `path.endpoint_url`.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        rtt: float = 0.0,
        bandwidth: float | None = None,
        link_bandwidth: float | None = None,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    ) -> None:
        if not rtt >= 0 or math.isinf(rtt):
            raise ValueError(f"rtt must be finite and >= 0 seconds, got {rtt!r}")
        if bandwidth is not None and (not bandwidth > 0 or math.isinf(bandwidth)):
            raise ValueError(f"bandwidth must be > 0 bytes/s, got {bandwidth!r}")
        if link_bandwidth is not None and (not link_bandwidth > 0 or math.isinf(link_bandwidth)):
            raise ValueError(f"link bandwidth must be > 0 bytes/s, got {link_bandwidth!r}")
        if buffer_bytes < 1:
            raise ValueError(f"buffer_bytes must be >= 1, got {buffer_bytes}")
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.rtt = rtt
        self.bandwidth = bandwidth
        # The link every connection shares, each direction paced on its own: the capacity
        # that makes throughput stop growing with concurrency, as a real path's does.
        self.link_bandwidth = link_bandwidth
        self._links = (
            {
                "up": TokenBucket(link_bandwidth, burst=min(READ_CHUNK, link_bandwidth)),
                "down": TokenBucket(link_bandwidth, burst=min(READ_CHUNK, link_bandwidth)),
            }
            if link_bandwidth is not None
            else {}
        )
        self.listen_host = listen_host
        self._listen_port = listen_port
        self._buffer_bytes = buffer_bytes
        self._listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._port: int | None = None
        self._connections = 0
        self._active = 0
        self._failed_connects = 0
        self._bytes = {"up": 0, "down": 0}

    def __repr__(self) -> str:
        state = f"port={self._port}" if self._port is not None else "not started"
        return (
            f"<PathEmulator {state} -> {self.upstream_host}:{self.upstream_port} "
            f"rtt={self.rtt}s bandwidth={self.bandwidth} active={self._active}>"
        )

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("PathEmulator is not started")
        return self._port

    @property
    def endpoint_url(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"http://{host}:{self.port}"

    def stats(self) -> PathStats:
        return PathStats(
            connections=self._connections,
            active_connections=self._active,
            failed_upstream_connects=self._failed_connects,
            bytes_up=self._bytes["up"],
            bytes_down=self._bytes["down"],
        )

    async def __aenter__(self) -> Self:
        if self._task_group is not None:
            raise RuntimeError("PathEmulator is already running")
        listener = await anyio.create_tcp_listener(
            local_host=self.listen_host, local_port=self._listen_port
        )
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._listener, self._task_group = listener, task_group
        self._port = listener.extra(SocketAttribute.local_port)
        task_group.start_soon(listener.serve, self._handle)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        task_group, listener = self._task_group, self._listener
        assert task_group is not None and listener is not None
        self._task_group = self._listener = None
        task_group.cancel_scope.cancel()
        try:
            return await task_group.__aexit__(exc_type, exc, tb)
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        self._connections += 1
        self._active += 1
        try:
            if self.rtt > 0:
                await anyio.sleep(self.rtt)
            try:
                upstream = await anyio.connect_tcp(self.upstream_host, self.upstream_port)
            except OSError:
                # The client sees its connection closed, as with a refused far end.
                self._failed_connects += 1
                return
            try:
                async with anyio.create_task_group() as connection:
                    connection.start_soon(self._pump, client, upstream, "up", connection)
                    connection.start_soon(self._pump, upstream, client, "down", connection)
            finally:
                with anyio.CancelScope(shield=True):
                    await upstream.aclose()
        finally:
            self._active -= 1
            with anyio.CancelScope(shield=True):
                await client.aclose()

    async def _pump(
        self,
        source: anyio.abc.SocketStream,
        sink: anyio.abc.SocketStream,
        direction: Direction,
        connection: anyio.abc.TaskGroup,
    ) -> None:
        """Forward one direction; a broken socket on either side resets the whole connection."""
        line = _DelayLine(capacity=self._buffer_bytes)
        try:
            async with anyio.create_task_group() as pump:
                pump.start_soon(self._read_into, source, line, direction)
                pump.start_soon(self._send_from, line, sink, direction)
        except* (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, RuntimeError):
            # RuntimeError: uvloop's "handler is closed" for a transport that went away.
            connection.cancel_scope.cancel()

    async def _read_into(
        self, source: anyio.abc.SocketStream, line: _DelayLine, direction: Direction
    ) -> None:
        delay = self.rtt / 2
        link = self._links.get(direction)
        bucket = None
        if self.bandwidth is not None:
            # A burst of one read keeps pacing smooth without letting a connection run ahead.
            bucket = TokenBucket(self.bandwidth, burst=min(READ_CHUNK, self.bandwidth))
        try:
            while True:
                try:
                    data = await source.receive(READ_CHUNK)
                except anyio.EndOfStream:
                    return
                now = anyio.current_time()
                wait = 0.0
                if bucket is not None:
                    wait = bucket.reserve(len(data), now=now)
                if link is not None:
                    wait = max(wait, link.reserve(len(data), now=now))
                if wait > 0:
                    await anyio.sleep(wait)
                await line.put(anyio.current_time() + delay, data)
        finally:
            line.close()

    async def _send_from(
        self, line: _DelayLine, sink: anyio.abc.SocketStream, direction: Direction
    ) -> None:
        while (item := await line.get()) is not None:
            due, data = item
            wait = due - anyio.current_time()
            if wait > 0:
                await anyio.sleep(wait)
            await sink.send(data)
            self._bytes[direction] += len(data)
        # Half-close, so request/response protocols that read to EOF still work. The far side
        # may be gone already; uvloop then raises RuntimeError where asyncio raises OSError.
        with contextlib.suppress(
            anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, RuntimeError
        ):
            await sink.send_eof()


# --------------------------------------------------------------------------- thread helper


def start_in_thread(
    upstream_host: str,
    upstream_port: int,
    *,
    rtt: float = 0.0,
    bandwidth: float | None = None,
    link_bandwidth: float | None = None,
    listen_host: str = "127.0.0.1",
    listen_port: int = 0,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
) -> tuple[str, Callable[[], PathStats]]:
    """Run a PathEmulator on its own event loop in a background thread, for callers that are
    not async (the benchmark runner driving subprocess tools such as s5cmd).

    Returns the endpoint URL and a `stop` function that shuts the proxy down, joins the
    thread and returns the final counters; calling it again returns the same counters.
    """
    emulator = PathEmulator(
        upstream_host,
        upstream_port,
        rtt=rtt,
        bandwidth=bandwidth,
        link_bandwidth=link_bandwidth,
        listen_host=listen_host,
        listen_port=listen_port,
        buffer_bytes=buffer_bytes,
    )
    portal_cm = start_blocking_portal(backend="asyncio")
    portal = portal_cm.__enter__()
    running: AbstractAsyncContextManager[PathEmulator] = emulator
    try:
        emulator_cm = portal.wrap_async_context_manager(running)
        emulator_cm.__enter__()
    except BaseException as exc:
        portal_cm.__exit__(type(exc), exc, exc.__traceback__)
        raise
    final: list[PathStats] = []

    def stop() -> PathStats:
        if not final:
            try:
                emulator_cm.__exit__(None, None, None)
            finally:
                portal_cm.__exit__(None, None, None)
            final.append(emulator.stats())
        return final[0]

    return emulator.endpoint_url, stop

"""A loopback HTTP/1.1 proxy in front of a local S3 server that injects the faults real S3
gives (SlowDown bursts, 500s, connection resets, truncated bodies, stalls), seeded, so tests
can prove that transfers survive them. Run with `python -m tests.faultproxy --help`.

Bytes pass through unmodified (SigV4 signatures stay valid) except the `Expect` request
header, which the proxy answers itself. Nothing here reaches beyond 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import re
import signal
import socket
import struct
import threading
import urllib.parse
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from email.utils import formatdate
from types import TracebackType
from typing import Literal, Self
from xml.sax.saxutils import escape

import click

LOOPBACK = "127.0.0.1"
READ_CHUNK = 64 * 1024  # largest piece read from a socket at once
HEAD_LIMIT = 64 * 1024  # longest request or response head accepted
FLUSH_TIMEOUT = 2.0  # seconds to let bytes already written reach a client before a reset

FaultKind = Literal[
    "slowdown", "error500", "reset_request", "stall_request", "reset_response", "truncate", "stall"
]
# Checked in this order, so one uniform draw per request picks at most one of them.
FAULT_KINDS: tuple[FaultKind, ...] = (
    "slowdown",
    "error500",
    "reset_request",
    "stall_request",
    "reset_response",
    "truncate",
    "stall",
)

REDACTED = "<redacted>"
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "x-amz-security-token"})
_SECRET_QUERY_KEYS = frozenset({"x-amz-signature", "x-amz-security-token"})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class FaultPlan:
    """Which faults to inject and how often. Probabilities are per request and exclusive
    (at most one fault per request), so their sum may not exceed 1."""

    seed: int = 0
    slowdown: float = 0.0  # answer 503 SlowDown, not forwarded
    error500: float = 0.0  # answer 500 InternalError, not forwarded
    reset_request: float = 0.0  # read part of the request body, then reset the connection
    # read part of the request body, stop reading for stall_seconds (the sender's buffers
    # fill and its writes block), then reset the connection
    stall_request: float = 0.0
    reset_response: float = 0.0  # forward, send the head and part of the body, then reset
    truncate: float = 0.0  # forward, send the full Content-Length but part of the body, then FIN
    stall: float = 0.0  # forward, hold the response for stall_seconds first
    stall_seconds: float = 5.0
    slowdown_burst: int = 0  # an injected SlowDown also throttles the next N eligible requests
    max_faults: int | None = None  # stop injecting after this many (burst ones included)
    skip_first: int = 0  # never fault the first N requests
    methods: frozenset[str] | None = None  # only fault these HTTP methods; None = all
    targets: str | None = None  # only fault requests whose target (path?query) matches this regex

    def __post_init__(self) -> None:
        for kind in FAULT_KINDS:
            probability = getattr(self, kind)
            if not 0.0 <= probability <= 1.0:
                raise ValueError(f"{kind} must be a probability in [0, 1], got {probability!r}")
        total = math.fsum(getattr(self, kind) for kind in FAULT_KINDS)
        if total > 1.0 + 1e-9:
            raise ValueError(
                f"fault probabilities add up to {total:g}; at most one fault is injected "
                "per request, so they must add up to at most 1"
            )
        if not 0.0 <= self.stall_seconds < math.inf:
            raise ValueError(f"stall_seconds must be finite and >= 0, got {self.stall_seconds!r}")
        for name in ("slowdown_burst", "skip_first"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.max_faults is not None and self.max_faults < 0:
            raise ValueError(f"max_faults must be >= 0 or None, got {self.max_faults!r}")


class FaultSchedule:
    """The fault (or None) of each request, in order of arrival. Pure: one seeded draw per
    request whatever happens to it, so filters and limits never shift later decisions."""

    def __init__(self, plan: FaultPlan) -> None:
        self._plan = plan
        self._random = random.Random(plan.seed)
        self._methods = None if plan.methods is None else frozenset(m.upper() for m in plan.methods)
        self._arrivals = 0
        self._faults = 0
        self._burst_left = 0

    def next(self, method: str, target: str = "") -> FaultKind | None:
        plan = self._plan
        index = self._arrivals
        self._arrivals += 1
        draw = self._random.random()
        if index < plan.skip_first:
            return None
        if self._methods is not None and method.upper() not in self._methods:
            return None
        if plan.targets is not None and not re.search(plan.targets, target):
            return None
        if plan.max_faults is not None and self._faults >= plan.max_faults:
            return None
        kind: FaultKind | None
        if self._burst_left > 0:
            self._burst_left -= 1
            kind = "slowdown"
        else:
            kind = _pick(plan, draw)
            if kind == "slowdown":
                self._burst_left = plan.slowdown_burst
        if kind is not None:
            self._faults += 1
        return kind


def _pick(plan: FaultPlan, draw: float) -> FaultKind | None:
    threshold = 0.0
    for kind in FAULT_KINDS:
        threshold += getattr(plan, kind)
        if draw < threshold:
            return kind
    return None


@dataclass
class RequestLog:
    """One request as the proxy saw it; credentials are never stored."""

    method: str
    target: str  # as received, with presigned-URL signatures and tokens redacted
    headers: dict[str, str]  # lower-case names, secrets redacted
    body_bytes: int  # request payload read from the client (chunk framing excluded)
    status: int | None  # status sent to the client; None if the connection was cut before
    fault: str | None  # the fault injected, or None


def parse_upstream(url: str) -> tuple[str, int]:
    """Host and port of an `http://127.0.0.1[:port]` URL; anything else is refused, so the
    proxy can never be pointed at a real endpoint."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"upstream {url!r} has an invalid port") from exc
    if (
        parts.scheme != "http"
        or parts.hostname != LOOPBACK
        or parts.username is not None
        or parts.password is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise ValueError(f"upstream must be an http://{LOOPBACK}:<port> URL, got {url!r}")
    return LOOPBACK, 80 if port is None else port


class Hold:
    """Requests whose target (path?query) matches `targets` wait at the proxy, before anything
    of them is forwarded, until `release()`: a test holds one request (a chosen part) while it
    changes the world, then lets it go. `arrived` is set when the first one starts waiting.
    Thread-safe: the proxy may run in its own thread (FaultProxy.running)."""

    def __init__(self, targets: str) -> None:
        self.targets = re.compile(targets)
        self.arrived = threading.Event()
        self._released = False
        self._wakers: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def matches(self, target: str) -> bool:
        return self.targets.search(target) is not None

    def release(self) -> None:
        """Let every waiting request (and any later one) through."""
        with self._lock:
            self._released = True
            wakers, self._wakers = self._wakers, []
        for wake in wakers:
            wake()

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        released = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the proxy's loop is already closed
                loop.call_soon_threadsafe(released.set)

        with self._lock:
            if self._released:
                return
            self._wakers.append(wake)
        self.arrived.set()
        await released.wait()


# --------------------------------------------------------------------------- HTTP pieces


class _ProtocolError(Exception):
    """A peer sent something that is not HTTP/1.1 as this proxy understands it."""


@dataclass(frozen=True, slots=True)
class _Head:
    """A request or response head: its first line, its fields, and its bytes as received."""

    first_line: str
    fields: tuple[tuple[str, str], ...]  # (lower-case name, value)
    raw: bytes  # including the final blank line

    @classmethod
    def parse(cls, raw: bytes) -> _Head:
        lines = raw[:-4].split(b"\r\n")
        fields = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise _ProtocolError(f"malformed header line {line[:80]!r}")
            fields.append((name.decode("latin-1").lower(), value.strip().decode("latin-1")))
        return cls(lines[0].decode("latin-1"), tuple(fields), raw)

    def get(self, name: str) -> str | None:
        values = [value for field_name, value in self.fields if field_name == name]
        return ", ".join(values) if values else None

    def has_token(self, name: str, token: str) -> bool:
        value = self.get(name) or ""
        return token in {part.strip().lower() for part in value.split(",")}

    def without(self, name: str) -> bytes:
        """The head as received minus every `name` field."""
        lines = self.raw[:-4].split(b"\r\n")
        kept = [lines[0]] + [
            line for line in lines[1:] if line.partition(b":")[0].decode("latin-1").lower() != name
        ]
        return b"\r\n".join(kept) + b"\r\n\r\n"


@dataclass(frozen=True, slots=True)
class _Framing:
    """How a message body is delimited: not at all, by length, by chunks, or by EOF."""

    kind: Literal["none", "length", "chunked", "eof"]
    length: int = 0


def _body_framing(head: _Head, *, is_request: bool) -> _Framing:
    if head.has_token("transfer-encoding", "chunked"):
        return _Framing("chunked")
    length = head.get("content-length")
    if length is not None:
        try:
            value = int(length)
        except ValueError:
            raise _ProtocolError(f"bad Content-Length {length!r}") from None
        if value < 0:
            raise _ProtocolError(f"bad Content-Length {length!r}")
        return _Framing("length", value)
    # A request without either has no body; a response runs until the connection closes.
    return _Framing("none") if is_request else _Framing("eof")


def _response_framing(head: _Head, status: int, request_method: str) -> _Framing:
    if request_method == "HEAD" or 100 <= status < 200 or status in (204, 304):
        return _Framing("none")
    return _body_framing(head, is_request=False)


async def _read_head(reader: asyncio.StreamReader) -> _Head | None:
    """The next head, or None at a clean end of stream between messages."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise _ProtocolError("connection closed in the middle of a message head") from exc
        return None
    except asyncio.LimitOverrunError as exc:
        raise _ProtocolError(f"message head longer than {HEAD_LIMIT} bytes") from exc
    # Empty lines before a request line are allowed (RFC 9112, 2.2).
    return _Head.parse(raw.lstrip(b"\r\n"))


async def _length_pieces(
    reader: asyncio.StreamReader, nbytes: int
) -> AsyncGenerator[tuple[bytes, int], None]:
    remaining = nbytes
    while remaining > 0:
        data = await reader.read(min(READ_CHUNK, remaining))
        if not data:
            raise asyncio.IncompleteReadError(b"", remaining)
        remaining -= len(data)
        yield data, len(data)


async def _body_pieces(
    reader: asyncio.StreamReader, framing: _Framing
) -> AsyncGenerator[tuple[bytes, int], None]:
    """A body as received, piece by piece (bytes on the wire, payload bytes among them), so
    multi-MiB bodies stream through and chunk framing is forwarded as it is."""
    if framing.kind == "length":
        async with contextlib.aclosing(_length_pieces(reader, framing.length)) as pieces:
            async for piece in pieces:
                yield piece
    elif framing.kind == "eof":
        while data := await reader.read(READ_CHUNK):
            yield data, len(data)
    elif framing.kind == "chunked":
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line[:-2].split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _ProtocolError(f"bad chunk size line {size_line[:80]!r}") from None
            if size < 0:
                raise _ProtocolError(f"bad chunk size line {size_line[:80]!r}")
            yield size_line, 0
            if size == 0:
                break
            async with contextlib.aclosing(_length_pieces(reader, size)) as pieces:
                async for piece in pieces:
                    yield piece
            if (end := await reader.readexactly(2)) != b"\r\n":
                raise _ProtocolError(f"chunk not followed by CRLF but {end!r}")
            yield end, 0
        while True:  # trailer fields, up to the blank line
            line = await reader.readuntil(b"\r\n")
            yield line, 0
            if line == b"\r\n":
                break


async def _part_of_body(
    reader: asyncio.StreamReader, framing: _Framing
) -> AsyncGenerator[tuple[bytes, int], None]:
    """The first part of a body: half of its payload when the length is known (at least one
    byte of two or more), else half of the first piece of payload."""
    if framing.kind == "length":
        async with contextlib.aclosing(_length_pieces(reader, framing.length // 2)) as pieces:
            async for piece in pieces:
                yield piece
        return
    async with contextlib.aclosing(_body_pieces(reader, framing)) as pieces:
        async for data, payload in pieces:
            if payload:
                keep = max(1, len(data) // 2)
                yield data[:keep], keep
                return
            yield data, 0


@dataclass(frozen=True, slots=True)
class _S3Error:
    status: int
    reason: str
    code: str
    message: str


_INJECTED_ERRORS: dict[str, _S3Error] = {
    "slowdown": _S3Error(503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "error500": _S3Error(
        500,
        "Internal Server Error",
        "InternalError",
        "We encountered an internal error. Please try again.",
    ),
}
_BAD_GATEWAY = _S3Error(
    502, "Bad Gateway", "BadGateway", "The fault proxy could not reach its upstream S3 server."
)


def s3_error_response(
    error: _S3Error, *, resource: str, request_id: str, head_only: bool, close: bool
) -> bytes:
    """A complete S3-style error response, as botocore parses it (Code, Message)."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{error.code}</Code><Message>{escape(error.message)}</Message>"
        f"<Resource>{escape(resource)}</Resource><RequestId>{request_id}</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {error.status} {error.reason}\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"x-amz-request-id: {request_id}\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n"
        "Server: s3xfer-faultproxy\r\n" + ("Connection: close\r\n" if close else "") + "\r\n"
    ).encode()
    # A response to HEAD announces its length but carries no body.
    return head if head_only else head + body


def _loggable_headers(head: _Head) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in head.fields:
        shown = REDACTED if name in _SECRET_HEADERS else value
        headers[name] = f"{headers[name]}, {shown}" if name in headers else shown
    return headers


def _loggable_target(target: str) -> str:
    path, question, query = target.partition("?")
    if not question:
        return target
    params = []
    for param in query.split("&"):
        key, equals, _ = param.partition("=")
        secret = urllib.parse.unquote(key).lower() in _SECRET_QUERY_KEYS
        params.append(f"{key}={REDACTED}" if equals and secret else param)
    return f"{path}?{'&'.join(params)}"


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST, as a crashed server or a middlebox would, not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# --------------------------------------------------------------------------- the proxy


class FaultProxy:
    """A loopback HTTP/1.1 proxy to `upstream` (an http://127.0.0.1 URL) injecting the
    faults of `plan`. Use as `async with FaultProxy(url, plan) as proxy:` and point clients
    at `proxy.endpoint_url`, or `with proxy.running() as url:` from synchronous code.

    Each client connection gets its own upstream connection, opened at its first forwarded
    request and kept alive with it; a fault that cuts the connection ends both.
    """

    def __init__(self, upstream: str, plan: FaultPlan = FaultPlan()) -> None:
        self.upstream_host, self.upstream_port = parse_upstream(upstream)
        self.plan = plan
        self.injected: Counter[str] = Counter()
        self.requests = 0
        self.connections = 0
        self.log: list[RequestLog] = []
        self._schedule = FaultSchedule(plan)
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        # asyncio.Server starts connection handlers on its own, and start() and stop() may
        # run in different tasks (running()), so no task group can own them: they are kept
        # here and cancelled on stop.
        self._tasks: set[asyncio.Task[None]] = set()
        self._holds: list[Hold] = []

    def hold(self, targets: str) -> Hold:
        """Hold the requests whose target matches the regex `targets` until released."""
        hold = Hold(targets)
        self._holds.append(hold)
        return hold

    def __repr__(self) -> str:
        state = f"port={self._port}" if self._server is not None else "not running"
        return (
            f"<FaultProxy {state} -> {self.upstream_host}:{self.upstream_port} "
            f"requests={self.requests} injected={dict(self.injected)} active={len(self._tasks)}>"
        )

    @property
    def endpoint_url(self) -> str:
        if self._port is None:
            raise RuntimeError("FaultProxy is not started")
        return f"http://{LOOPBACK}:{self._port}"

    def summary(self) -> dict[str, object]:
        return {"requests": self.requests, "injected": dict(sorted(self.injected.items()))}

    async def start(self) -> str:
        if self._server is not None:
            raise RuntimeError("FaultProxy is already running")
        self._server = await asyncio.start_server(self._accept, LOOPBACK, 0, limit=HEAD_LIMIT)
        self._port = self._server.sockets[0].getsockname()[1]
        return self.endpoint_url

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @contextlib.contextmanager
    def running(self) -> Iterator[str]:
        """Run on a private event loop in a daemon thread, for callers that are not async
        (tests driving the CLI as a subprocess). Yields the endpoint URL."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="faultproxy", daemon=True)
        thread.start()
        try:
            yield asyncio.run_coroutine_threadsafe(self.start(), loop).result()
        finally:
            try:
                asyncio.run_coroutine_threadsafe(self.stop(), loop).result()
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join()
                loop.close()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, not a coroutine: Python 3.11's server logs an error for a
        # cancelled handler task, and these tasks are cancelled at every stop.
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection = _Connection(self, reader, writer)
        try:
            await connection.serve()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, _ProtocolError):
            # A peer went away or spoke broken HTTP: this connection ends, the proxy goes on.
            pass
        finally:
            connection.abort()

    def _arrive(self, method: str, target: str, head: _Head) -> RequestLog:
        """Record a request and decide its fault, in order of arrival."""
        fault = self._schedule.next(method, target)
        entry = RequestLog(
            method=method,
            target=_loggable_target(target),
            headers=_loggable_headers(head),
            body_bytes=0,
            status=None,
            fault=fault,
        )
        self.requests += 1
        self.log.append(entry)
        if fault is not None:
            self.injected[fault] += 1
        return entry


class _Connection:
    """One client connection and the upstream connection that serves it."""

    def __init__(
        self, proxy: FaultProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._proxy = proxy
        self._plan = proxy.plan
        self._client_reader = reader
        self._client_writer = writer
        self._upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def serve(self) -> None:
        while (head := await _read_head(self._client_reader)) is not None:
            if not await self._exchange(head):
                return

    def abort(self) -> None:
        self._drop_upstream()
        self._client_writer.transport.abort()

    async def _exchange(self, head: _Head) -> bool:
        """Answer one request; False when the client connection must end."""
        try:
            method, target, version = head.first_line.split(" ", 2)
        except ValueError:
            raise _ProtocolError(f"bad request line {head.first_line[:80]!r}") from None
        framing = _body_framing(head, is_request=True)
        expects_continue = head.has_token("expect", "100-continue")
        client_closes = head.has_token("connection", "close") or (
            version == "HTTP/1.0" and not head.has_token("connection", "keep-alive")
        )
        entry = self._proxy._arrive(method, target, head)
        for hold in self._proxy._holds:
            if hold.matches(target):
                await hold.wait()
        resource = target.partition("?")[0]
        request_id = f"FAULTPROXY{self._proxy.requests:08d}"

        error = _INJECTED_ERRORS.get(entry.fault or "")
        if error is not None:
            # A client waiting for 100 Continue has not sent its body: answer at once and
            # close, as S3 does. Otherwise read the body first, so the connection lives on.
            close = client_closes or expects_continue
            if not expects_continue:
                await self._discard(_body_pieces(self._client_reader, framing), entry)
            await self._send_error(error, entry, method, resource, request_id, close=close)
            return not close

        if entry.fault in ("reset_request", "stall_request"):
            if expects_continue:
                await self._send(_CONTINUE)
            await self._discard(_part_of_body(self._client_reader, framing), entry)
            if entry.fault == "stall_request":
                await asyncio.sleep(self._proxy.plan.stall_seconds)
            await self._reset_client()
            return False

        try:
            upstream_reader, upstream_writer = await self._open_upstream()
        except OSError:
            if not expects_continue:
                await self._discard(_body_pieces(self._client_reader, framing), entry)
            await self._send_error(_BAD_GATEWAY, entry, method, resource, request_id, close=True)
            return False
        if expects_continue:
            await self._send(_CONTINUE)
        upstream_intact = await self._forward_request(head, framing, entry, upstream_writer)

        response = await self._read_response_head(upstream_reader)
        if response is None:
            self._drop_upstream()
            await self._send_error(_BAD_GATEWAY, entry, method, resource, request_id, close=True)
            return False
        try:
            status = int(response.first_line.split(" ", 2)[1])
        except (IndexError, ValueError):
            raise _ProtocolError(f"bad status line {response.first_line[:80]!r}") from None
        response_framing = _response_framing(response, status, method)

        if entry.fault == "stall":
            await asyncio.sleep(self._plan.stall_seconds)
            if self._client_reader.at_eof():  # the client gave up waiting
                return False
        if entry.fault in ("truncate", "reset_response"):
            await self._send_part(response, status, response_framing, upstream_reader, entry)
            self._drop_upstream()
            if entry.fault == "truncate":
                await self._close_client()
            else:
                await self._reset_client()
            return False

        await self._send(response.raw)
        entry.status = status
        async with contextlib.aclosing(_body_pieces(upstream_reader, response_framing)) as body:
            async for data, _ in body:
                await self._send(data)
        upstream_closes = response_framing.kind == "eof" or response.has_token(
            "connection", "close"
        )
        if upstream_closes or not upstream_intact:
            self._drop_upstream()
        return not (client_closes or upstream_closes)

    async def _forward_request(
        self, head: _Head, framing: _Framing, entry: RequestLog, upstream: asyncio.StreamWriter
    ) -> bool:
        """Send the request upstream; False if upstream broke on the way. The client's body is
        read to its end either way, so an upstream answer can still reach the client."""
        intact = True
        try:
            upstream.write(head.without("expect"))
        except OSError:
            intact = False
        async with contextlib.aclosing(_body_pieces(self._client_reader, framing)) as body:
            async for data, payload in body:
                entry.body_bytes += payload
                if intact:
                    try:
                        upstream.write(data)
                        await upstream.drain()
                    except OSError:
                        intact = False
        return intact

    async def _read_response_head(self, upstream: asyncio.StreamReader) -> _Head | None:
        """The final response head from upstream (interim 1xx ones go to the client), or None
        if upstream closed or reset instead of answering."""
        while True:
            try:
                head = await _read_head(upstream)
            except (OSError, _ProtocolError):
                return None
            if head is None:
                return None
            status = head.first_line.split(" ", 2)[1:2]
            if not (status and status[0].startswith("1") and status[0] != "101"):
                return head
            await self._send(head.raw)

    async def _send_part(
        self,
        response: _Head,
        status: int,
        framing: _Framing,
        upstream: asyncio.StreamReader,
        entry: RequestLog,
    ) -> None:
        if framing.kind == "none" or (framing.kind == "length" and framing.length < 2):
            # Nothing to cut in the body, so cut the status line: http.client takes a head
            # cut after it for a whole response (EOF ends the headers), silently losing
            # fields such as Content-Length, where a cut status line fails loudly.
            await self._send(response.raw[: max(1, len(response.first_line) // 2)])
            return
        await self._send(response.raw)
        entry.status = status
        async with contextlib.aclosing(_part_of_body(upstream, framing)) as part:
            async for data, _ in part:
                await self._send(data)

    async def _send_error(
        self,
        error: _S3Error,
        entry: RequestLog,
        method: str,
        resource: str,
        request_id: str,
        *,
        close: bool,
    ) -> None:
        await self._send(
            s3_error_response(
                error,
                resource=resource,
                request_id=request_id,
                head_only=method == "HEAD",
                close=close,
            )
        )
        entry.status = error.status
        if close:
            await self._close_client()

    async def _discard(
        self, pieces: AsyncGenerator[tuple[bytes, int], None], entry: RequestLog
    ) -> None:
        async with contextlib.aclosing(pieces):
            async for _, payload in pieces:
                entry.body_bytes += payload

    async def _send(self, data: bytes) -> None:
        self._client_writer.write(data)
        await self._client_writer.drain()

    async def _close_client(self) -> None:
        writer = self._client_writer
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()
            writer.close()
            await writer.wait_closed()

    async def _reset_client(self) -> None:
        # Let what was written reach the client first: a reset discards unsent bytes.
        writer = self._client_writer
        writer.transport.set_write_buffer_limits(high=0)
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(FLUSH_TIMEOUT):
                await writer.drain()
        _reset(writer)

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._upstream is not None:
            reader, writer = self._upstream
            if not (reader.at_eof() or writer.is_closing()):
                return self._upstream
            self._drop_upstream()
        self._upstream = await asyncio.open_connection(
            self._proxy.upstream_host, self._proxy.upstream_port, limit=HEAD_LIMIT
        )
        return self._upstream

    def _drop_upstream(self) -> None:
        if self._upstream is not None:
            self._upstream[1].transport.abort()
            self._upstream = None


# --------------------------------------------------------------------------- command line


async def _serve_until_signalled(proxy: FaultProxy) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with proxy:
        click.echo(proxy.endpoint_url)
        await stop.wait()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--upstream", required=True, help="The S3 server, an http://127.0.0.1:<port> URL.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the fault draws.")
@click.option("--slowdown", type=click.FloatRange(0, 1), default=0.0, help="P(503 SlowDown).")
@click.option("--error500", type=click.FloatRange(0, 1), default=0.0, help="P(500 InternalError).")
@click.option(
    "--reset-request", type=click.FloatRange(0, 1), default=0.0, help="P(reset mid-request)."
)
@click.option(
    "--stall-request",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="P(stop reading the request body for --stall-seconds, then reset).",
)
@click.option(
    "--reset-response", type=click.FloatRange(0, 1), default=0.0, help="P(reset mid-body)."
)
@click.option(
    "--truncate", type=click.FloatRange(0, 1), default=0.0, help="P(half the body, then FIN)."
)
@click.option("--stall", type=click.FloatRange(0, 1), default=0.0, help="P(held response).")
@click.option("--stall-seconds", type=click.FloatRange(0), default=5.0, show_default=True)
@click.option(
    "--slowdown-burst", type=click.IntRange(0), default=0, help="SlowDowns after a SlowDown."
)
@click.option("--max-faults", type=click.IntRange(0), default=None, help="Then pass through.")
@click.option("--skip-first", type=click.IntRange(0), default=0, help="Requests never faulted.")
@click.option("--methods", default=None, help="Only fault these methods, as PUT,GET.")
def main(
    upstream: str,
    seed: int,
    slowdown: float,
    error500: float,
    reset_request: float,
    stall_request: float,
    reset_response: float,
    truncate: float,
    stall: float,
    stall_seconds: float,
    slowdown_burst: int,
    max_faults: int | None,
    skip_first: int,
    methods: str | None,
) -> None:
    """Run a fault-injecting proxy in front of a local S3 server. Prints the endpoint URL,
    serves until SIGINT or SIGTERM, then prints a one-line JSON summary."""
    try:
        plan = FaultPlan(
            seed=seed,
            slowdown=slowdown,
            error500=error500,
            reset_request=reset_request,
            stall_request=stall_request,
            reset_response=reset_response,
            truncate=truncate,
            stall=stall,
            stall_seconds=stall_seconds,
            slowdown_burst=slowdown_burst,
            max_faults=max_faults,
            skip_first=skip_first,
            methods=None
            if methods is None
            else frozenset(m.strip().upper() for m in methods.split(",") if m.strip()),
        )
        proxy = FaultProxy(upstream, plan)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    asyncio.run(_serve_until_signalled(proxy))
    click.echo(json.dumps(proxy.summary(), separators=(",", ":")))


if __name__ == "__main__":
    main()

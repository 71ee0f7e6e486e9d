"""Blocking HTTP/1.1 GETs run in worker threads, their bodies handed to a sink piece by piece:
the path of the transport's streamed GETs (large objects, shard ranges), kept by measurement
(docs/architecture.md): awscrt hands a body to Python in 16 KiB callbacks, which cost a 1 GiB
download twice the client CPU and, on a busy machine, a quarter of its speed.

Each GET is one thread that receives into a small reused buffer with the GIL released and
passes each piece on while it is still in the CPU cache (the caller checksums it and writes it
at its offset), so several ranges move in parallel and nothing is ever joined. Connections go
through the environment's proxy when there is one (a CONNECT tunnel for HTTPS, the whole URL
in the request line for HTTP) and trust the configured CA bundle. Signing and the translation
of errors stay with the transport.
"""

from __future__ import annotations

import base64
import contextlib
import re
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import Cancelled, ConnectError, ProtocolError
from .network import Proxy

_DIGITS = re.compile(r"[0-9]{3}")
_LENGTH = re.compile(r"[0-9]{1,19}")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_MAX_HEAD = 64 * 1024  # status line and headers; S3's are a few hundred bytes
_MAX_ERROR_BODY = 64 * 1024  # an error document; more is cut (the connection is then closed)
PIECE_SIZE = 256 * 1024  # bytes per receive: small enough to stay in the CPU cache until written
_CONNECT_TIMEOUT = 10.0  # seconds, as for the aiohttp and botocore clients


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: Mapping[str, str]  # names in lower case
    length: int  # body bytes passed to the sink (2xx only)
    error_text: str  # the body of a non-2xx answer, else ""


# Called, in the worker thread, with a 2xx answer's status and headers before any of its body;
# raising refuses the body (the connection is then closed, not drained).
OnHead = Callable[[int, Mapping[str, str]], None]
# Called with each piece of a 2xx body, in order; the view is reused once the call returns.
OnData = Callable[[memoryview], None]
# Where a 2xx body goes: a callable given each piece (streamed through a reused receive
# buffer), or a buffer the body is received straight into, from its start.
Sink = OnData | memoryview

_scratch = threading.local()


def _piece_buffer() -> memoryview:
    """This thread's receive buffer: reused, so no GET pays page faults for a fresh one."""
    buffer: memoryview | None = getattr(_scratch, "buffer", None)
    if buffer is None:
        buffer = _scratch.buffer = memoryview(bytearray(PIECE_SIZE))
    return buffer


class CancelToken:
    """Lets the event loop stop a GET that a worker thread is blocked in: the socket is shut
    down, so the thread's receive returns at once and the call raises Cancelled."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self.cancelled = False

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            if self._socket is not None:
                with contextlib.suppress(OSError):
                    self._socket.shutdown(socket.SHUT_RDWR)

    def _attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            if self.cancelled and sock is not None:
                raise Cancelled("cancelled")
            self._socket = sock


class _Connection:
    def __init__(self, sock: socket.socket, *, timeout: float, waitall: bool) -> None:
        self.sock = sock
        self.timeout = timeout
        # Plain TCP: one receive call fills a whole piece (MSG_WAITALL), however the bytes
        # trickle in; TLS sockets take no flags and fill it in a loop.
        self.flags = socket.MSG_WAITALL if waitall else 0
        self.pending = b""  # bytes received past the end of the previous read
        self.reused = False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _read_until(self, marker: bytes, what: str) -> bytes:
        """Bytes up to and including marker (the rest stays pending)."""
        data = self.pending
        while marker not in data:
            if len(data) > _MAX_HEAD:
                raise ProtocolError(f"{what} too long")
            chunk = self._recv(65536)
            if not chunk:
                raise ConnectionResetError(f"connection closed in the {what}")
            data += chunk
        end = data.index(marker) + len(marker)
        self.pending = data[end:]
        return data[:end]

    def _recv(self, size: int) -> bytes:
        try:
            return self.sock.recv(size)
        except BlockingIOError as exc:  # SO_RCVTIMEO ran out
            raise TimeoutError(f"no response for {self.timeout:g} s") from exc

    def _fill(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            try:
                n = self.sock.recv_into(view[got:], len(view) - got, self.flags)
            except BlockingIOError as exc:  # SO_RCVTIMEO ran out
                raise TimeoutError(f"no data for {self.timeout:g} s") from exc
            if n == 0:
                raise ConnectionResetError(f"connection closed {len(view) - got:,} bytes early")
            got += n

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except BlockingIOError as exc:  # SO_SNDTIMEO ran out
            raise TimeoutError(f"request not taken for {self.timeout:g} s") from exc

    def read_head(self) -> bytes:
        return self._read_until(b"\r\n\r\n", "response head")

    def read_line(self) -> bytes:
        return self._read_until(b"\r\n", "chunk header")

    def stream(self, length: int, sink: Sink) -> None:
        """Pass exactly `length` body bytes to the sink."""
        if isinstance(sink, memoryview):
            if length > len(sink):
                raise ProtocolError(
                    f"a {length:,}-byte body does not fit the {len(sink):,} bytes asked for"
                )
            target = sink[:length]
            got = min(len(self.pending), length)
            target[:got] = self.pending[:got]
            self.pending = self.pending[got:]
            self._fill(target[got:])
            return
        on_data = sink
        got = 0
        if self.pending:
            first, self.pending = self.pending[:length], self.pending[length:]
            on_data(memoryview(first))
            got = len(first)
        buffer = _piece_buffer()
        while got < length:
            piece = buffer[: min(len(buffer), length - got)]
            try:
                self._fill(piece)
            except ConnectionResetError as exc:
                raise ConnectionResetError(
                    f"connection closed before the end of a {length:,}-byte body"
                ) from exc
            on_data(piece)
            got += len(piece)


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not _DIGITS.fullmatch(parts[1]):
        raise ProtocolError(f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(f"malformed header line: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


class HttpPool:
    """Keep-alive connections to one origin (scheme, host, port), shared by worker threads."""

    def __init__(
        self,
        origin: str,
        *,
        verify_ssl: bool,
        timeout: float,
        size: int,
        ca_bundle: str | None = None,
        proxy: Proxy | None = None,
    ) -> None:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) origin: {origin!r}")
        if proxy is not None and proxy.scheme != "http":
            raise ValueError("only a plain-HTTP proxy")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.netloc = parts.netloc
        self.timeout = timeout
        self.size = size
        self.proxy = proxy
        # Through a proxy, a plain-HTTP request names the whole URL (the proxy forwards it).
        self.target_prefix = f"http://{self.netloc}" if proxy and parts.scheme == "http" else ""
        self._tls: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._tls = ssl.create_default_context(cafile=ca_bundle if verify_ssl else None)
            if not verify_ssl:
                self._tls.check_hostname = False
                self._tls.verify_mode = ssl.CERT_NONE
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"<HttpPool {self.netloc} idle={len(self._idle)}>"

    def _connect(self) -> _Connection:
        address = (self.proxy.host, self.proxy.port) if self.proxy else (self.host, self.port)
        via = f" through proxy {self.proxy.host}:{self.proxy.port}" if self.proxy else ""
        try:
            sock = socket.create_connection(address, timeout=_CONNECT_TIMEOUT)
        except OSError as exc:
            raise ConnectError(f"cannot connect to {self.netloc}{via}: {exc}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.proxy is not None and self._tls is not None:
                self._tunnel(sock)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
                sock.settimeout(self.timeout)
            else:
                # Blocking, with the kernel's own timeouts: MSG_WAITALL then works.
                sock.settimeout(None)
                # (at least 1 ms: a zero timeval would mean no timeout at all)
                seconds, fraction = divmod(max(self.timeout, 0.001), 1)
                timeval = struct.pack("ll", int(seconds), int(fraction * 1e6))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        except OSError as exc:
            sock.close()
            raise ConnectError(f"cannot connect to {self.netloc}{via}: {exc}") from exc
        return _Connection(sock, timeout=self.timeout, waitall=self._tls is None)

    def _proxy_authorization(self) -> str:
        proxy = self.proxy
        if proxy is None or not proxy.username:
            return ""
        secret = f"{proxy.username}:{proxy.password or ''}".encode()
        return f"proxy-authorization: Basic {base64.b64encode(secret).decode()}\r\n"

    def _tunnel(self, sock: socket.socket) -> None:
        """Ask the proxy for a tunnel to the origin (HTTP CONNECT); TLS then goes through it."""
        request = (
            f"CONNECT {self.host}:{self.port} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
            + self._proxy_authorization()
            + "\r\n"
        )
        sock.sendall(request.encode("latin-1"))
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk or len(answer) > _MAX_HEAD:
                raise OSError("the proxy closed the connection instead of opening a tunnel")
            answer += chunk
        status, _headers = _parse_head(answer[: answer.index(b"\r\n\r\n") + 4])
        if status != 200:
            raise OSError(f"the proxy refused a tunnel to {self.host}:{self.port} ({status})")

    def _take(self) -> _Connection:
        with self._lock:
            if self._idle:
                connection = self._idle.pop()
                connection.reused = True
                return connection
        return self._connect()

    def _give_back(self, connection: _Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.size:
                self._idle.append(connection)
                return
        connection.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def get(
        self,
        target: str,
        headers: Mapping[str, str],
        *,
        on_head: OnHead,
        sink: Sink,
        cancel: CancelToken | None = None,
        method: str = "GET",
    ) -> Response:
        """GET target (path and query, percent-encoded) with headers; a 2xx answer goes to
        on_head and its body to the sink (see their types). Blocking: call it in a worker
        thread. With method="HEAD" no body is read (an answer to HEAD has none).

        Raises OSError subclasses (TimeoutError when no byte arrives for `timeout` seconds,
        ConnectionError when the connection fails or the answer is malformed)."""
        request = (
            f"{method} {self.target_prefix}{target} HTTP/1.1\r\nhost: {self.netloc}\r\n"
            + (self._proxy_authorization() if self.target_prefix else "")
            + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            + "\r\n"
        ).encode("latin-1")
        while True:
            connection = self._take()
            try:
                if cancel is not None:
                    cancel._attach(connection.sock)
                try:
                    connection.send(request)
                    head = connection.read_head()
                except (ConnectionError, BrokenPipeError) as exc:
                    # A kept-alive connection the server closed while idle: GET is idempotent,
                    # so it is sent once more on a new connection (as aiohttp and browsers do).
                    if connection.reused and not (cancel is not None and cancel.cancelled):
                        connection.close()
                        continue
                    raise exc
                response, keep = _read_response(
                    connection, head, on_head, sink, has_body=method != "HEAD"
                )
            except BaseException as exc:
                connection.close()
                if cancel is not None and cancel.cancelled:
                    raise Cancelled("cancelled") from exc
                raise
            finally:
                if cancel is not None:
                    cancel._attach(None)
            if cancel is not None and cancel.cancelled:  # its socket may be shut down already
                connection.close()
                raise Cancelled("cancelled")
            if keep:
                self._give_back(connection)
            else:
                connection.close()
            return response


def _read_response(
    connection: _Connection, head: bytes, on_head: OnHead, sink: Sink, *, has_body: bool = True
) -> tuple[Response, bool]:
    """The answer after its head: (response, whether the connection can be reused). Without
    a body (the answer to a HEAD), the head is all there is."""
    status, headers = _parse_head(head)
    keep = headers.get("connection", "").lower() != "close"
    if not has_body:
        return Response(status, headers, 0, ""), keep
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    length_header = headers.get("content-length")
    if not chunked and length_header is None and status not in (204, 304):
        raise ProtocolError("response without Content-Length or chunked encoding")
    if length_header is not None and not _LENGTH.fullmatch(length_header):
        raise ProtocolError(f"bad Content-Length {length_header[:40]!r}")
    if 200 <= status < 300:
        on_head(status, headers)
        if chunked:
            length = _read_chunked(connection, sink)
        else:
            length = int(length_header or 0)
            connection.stream(length, sink)
        return Response(status, headers, length, ""), keep
    document = bytearray()

    def keep_start(piece: memoryview) -> None:
        document.extend(piece[: max(0, _MAX_ERROR_BODY - len(document))])

    if chunked:
        _read_chunked(connection, keep_start)
    elif int(length_header or 0) <= _MAX_ERROR_BODY:
        connection.stream(int(length_header or 0), keep_start)
    else:  # not worth draining: the connection is dropped instead
        connection.stream(_MAX_ERROR_BODY, keep_start)
        keep = False
    return Response(status, headers, 0, document.decode("utf-8", errors="replace")), keep


def _read_chunked(connection: _Connection, sink: Sink) -> int:
    """A chunked body, passed to the sink; its length."""
    total = 0
    while True:
        size_line = connection.read_line()
        digits = size_line.split(b";")[0].strip()
        if not _CHUNK_SIZE.fullmatch(digits):
            raise ProtocolError(f"bad chunk size line {size_line[:40]!r}")
        size = int(digits, 16)
        if size == 0:
            while connection.read_line() != b"\r\n":  # trailers
                pass
            return total
        connection.stream(size, sink[total:] if isinstance(sink, memoryview) else sink)
        total += size
        if connection.read_line() != b"\r\n":
            raise ProtocolError("chunk not followed by CRLF")

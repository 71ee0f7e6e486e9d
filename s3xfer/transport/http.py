"""The data path: one HTTP request to S3 (PUT, UploadPart, GET, ranged GET, HEAD), signed by
awscrt's SigV4 signer, with keep-alive connections per origin.

Requests go out on awscrt's HTTP client, which does the network work in C on its own
event-loop threads: connecting (through a proxy when the environment names one), TLS with the
configured CAs, HTTP/1.1. A GET whose body goes to a sink (large objects, shard ranges) goes
out on rawhttp.py instead, in a worker thread that receives straight into 256 KiB pieces:
awscrt hands a body to Python in 16 KiB callbacks, which doubled a large download's CPU
(docs/architecture.md). Both take the same address, signature, proxy and CA bundle from here.

Cancelling the awaiting task closes the request's connection (or shuts its socket down) and
waits for its callbacks or thread to end: a cancelled GET never outlives the file it writes to.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import ssl
import threading
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio

from ..errors import ConnectError, EndpointError, TransientError, UnreachableError
from . import rawhttp
from .endpoints import BucketAddress, Endpoints
from .network import NetworkSettings, Proxy, environment_proxy
from .rawhttp import PIECE_SIZE

_MAX_ERROR_BODY = 64 * 1024  # of an error document; the rest is dropped
_REDIRECT_STATUSES = (301, 307, 400)  # answers that may name the bucket's real region


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key: str
    secret_key: str = field(repr=False)
    token: str | None = field(default=None, repr=False)


# Accepts or refuses (by raising) a 2xx answer before its body: status, Content-Range,
# Content-Length (-1 when not given). Called on an awscrt thread.
BodyCheck = Callable[[int, str | None, int], None]
# Where a 2xx body goes: a callable given each piece in order (on an awscrt thread or a
# worker thread; the view is reused once the call returns), or a buffer the body is copied
# into from its start.
Sink = Callable[[memoryview], None] | memoryview
# A request body: sent from the buffer itself, never copied (a shard part is filled in a
# bytearray; a bytes copy of it for the request doubled the parts in flight).
Body = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: Mapping[str, str]  # names in lower case
    length: int  # body bytes passed to the sink, or kept (2xx only)
    error_text: str  # the body of a non-2xx answer, else ""
    body: bytes = b""  # a 2xx body asked to be kept (collect=True)


class _Runtime:
    """awscrt's event-loop threads and DNS resolver: one set per process, made on first use.
    A forked child has none of its parent's threads, so it makes its own (and never touches
    the parent's, or their connections)."""

    _lock = threading.Lock()
    _bootstrap: Any = None
    _pid = 0

    @classmethod
    def bootstrap(cls) -> Any:
        with cls._lock:
            if cls._bootstrap is None or cls._pid != os.getpid():
                from awscrt.io import ClientBootstrap, DefaultHostResolver, EventLoopGroup

                group = EventLoopGroup()  # one thread per core
                cls._bootstrap = ClientBootstrap(group, DefaultHostResolver(group))
                cls._pid = os.getpid()
            return cls._bootstrap


def _notify(future: Future[Any]) -> anyio.Event:
    """An event set, on the calling loop, once the awscrt future is done."""
    event = anyio.Event()
    loop = asyncio.get_running_loop()

    def settled(_: Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(event.set)

    future.add_done_callback(settled)
    return event


def _settled(future: Future[Any], loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    """An asyncio future of `loop`, done once the awscrt future is (its outcome is read from
    the awscrt future itself)."""
    settled: asyncio.Future[None] = loop.create_future()

    def resolve() -> None:
        if not settled.done():
            settled.set_result(None)

    def on_done(_: Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(resolve)

    future.add_done_callback(on_done)
    return settled


def _crt_error_name(exc: BaseException) -> str:
    return str(getattr(exc, "name", "") or type(exc).__name__)


class _Exchange:
    """One request's answer as awscrt delivers it, on its threads: status and headers, then
    the body into the sink (2xx) or kept as the error text."""

    def __init__(self, on_head: BodyCheck | None, sink: Sink | None, *, collect: bool) -> None:
        self.on_head = on_head
        self.sink = sink
        self.kept: bytearray | None = bytearray() if collect else None
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.length = 0
        self.progress = 0  # bytes moved either way: a stall is no progress for a while
        self.error: BaseException | None = None
        self.error_text = bytearray()
        self.pending: bytearray | None = None  # a callable sink's piece being gathered
        self.connection: Any = None

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        if self.connection is not None:
            self.connection.close()  # ends the stream; its completion follows

    def on_response(self, status_code: int, headers: list[tuple[str, str]], **_: Any) -> None:
        self.status = status_code
        self.headers = {name.lower(): value for name, value in headers}
        if 200 <= status_code < 300 and self.on_head is not None:
            try:
                length = self.headers.get("content-length", "")
                self.on_head(
                    status_code,
                    self.headers.get("content-range"),
                    int(length) if length.isdigit() else -1,
                )
            except BaseException as error:
                self._fail(error)

    def on_body(self, chunk: bytes, **_: Any) -> None:
        self.progress += len(chunk)
        if self.error is not None:
            return
        if self.status is None or not 200 <= self.status < 300:
            room = _MAX_ERROR_BODY - len(self.error_text)
            self.error_text += chunk[: max(room, 0)]
            return
        sink = self.sink
        try:
            if sink is None:
                if self.kept is not None:
                    self.kept += chunk
            elif isinstance(sink, memoryview):
                end = self.length + len(chunk)
                if end > len(sink):
                    raise TransientError(f"more bytes answered than the {len(sink):,} asked for")
                sink[self.length : end] = chunk
            else:
                pending = self.pending
                if pending is None:
                    pending = self.pending = bytearray()
                pending += chunk
                if len(pending) >= PIECE_SIZE:
                    sink(memoryview(pending))
                    del pending[:]
            self.length += len(chunk)
        except BaseException as error:
            self._fail(error)

    def finish(self) -> None:
        """The last gathered piece to a callable sink (in a worker thread)."""
        if self.pending and callable(self.sink) and not isinstance(self.sink, memoryview):
            self.sink(memoryview(self.pending))
        self.pending = None


class _CountingBody(io.RawIOBase):
    """A request body read by awscrt straight from the caller's buffer (io.BytesIO would copy
    a bytearray), counting what it has read (progress while sending)."""

    def __init__(self, data: Body, exchange: _Exchange) -> None:
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._position = 0
        self._exchange = exchange

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}
        self._position = max(0, base[whence] + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        chunk = self._view[self._position : self._position + len(buffer)]
        n = len(chunk)
        memoryview(buffer).cast("B")[:n] = chunk
        self._position += n
        self._exchange.progress += n
        return n


class _Pool:
    """Idle keep-alive connections to one origin, and how to open a new one."""

    def __init__(self, transport: Transport, origin: str) -> None:
        parts = urlsplit(origin)
        self.transport = transport
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.tls else 80)
        self.netloc = parts.netloc
        self.proxy = environment_proxy(origin)
        self.idle: list[Any] = []
        self.lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<_Pool {self.netloc} idle={len(self.idle)} proxy={self.proxy!r}>"

    def take(self) -> Any | None:
        with self.lock:
            while self.idle:
                connection = self.idle.pop()
                if connection.is_open():
                    return connection
        return None

    def give_back(self, connection: Any) -> None:
        with self.lock:
            if len(self.idle) < self.transport.settings.pool_size and connection.is_open():
                self.idle.append(connection)
                return
        connection.close()

    def close(self) -> None:
        with self.lock:
            idle, self.idle = self.idle, []
        for connection in idle:
            connection.close()

    async def connect(self) -> Any:
        from awscrt.http import HttpClientConnection

        transport = self.transport
        tls = transport.tls_options(self.host) if self.tls else None
        future = HttpClientConnection.new(
            host_name=self.host,
            port=self.port,
            bootstrap=_Runtime.bootstrap(),
            socket_options=transport.socket_options(),
            tls_connection_options=tls,
            proxy_options=transport.proxy_options(self.proxy, tunnel=self.tls),
        )
        done = _notify(future)
        try:
            await done.wait()
        except anyio.get_cancelled_exc_class():
            # The connection may still open later: closed at once then, never leaked.
            future.add_done_callback(lambda f: f.exception() is None and f.result().close())
            raise
        try:
            return future.result()
        except Exception as exc:
            raise self._connect_error(exc) from exc

    def _connect_error(self, exc: BaseException) -> Exception:
        name = _crt_error_name(exc)
        via = f" through proxy {self.proxy.host}:{self.proxy.port}" if self.proxy else ""
        if "TLS" in name or "X509" in name or "CERT" in name or "PKI" in name:
            return EndpointError(
                f"TLS negotiation with {self.netloc}{via} failed ({name}): is its certificate "
                "signed by a CA you trust? Set AWS_CA_BUNDLE (or ca_bundle in the profile) to "
                "its CA, or --no-verify-ssl for an endpoint you trust"
            )
        return UnreachableError(f"cannot connect to {self.netloc}{via}: {name}")


class Transport:
    """Requests to S3 on awscrt: addresses from `endpoints`, credentials (botocore's, fresh
    for each signature, so a refreshed credential is used as soon as botocore has it) from
    `credentials`, or none when `unsigned` (public buckets). `ca_bundle` names the CAs to
    trust (asked once, on the first TLS connection)."""

    def __init__(
        self,
        endpoints: Endpoints,
        settings: NetworkSettings,
        *,
        credentials: Callable[[], Awaitable[Credentials | None]],
        ca_bundle: Callable[[], str | None] = lambda: None,
        unsigned: bool = False,
    ) -> None:
        self.endpoints = endpoints
        self.settings = settings
        self._ca_bundle = ca_bundle
        self._credentials = credentials
        self._unsigned = unsigned
        self._pools: dict[str, _Pool] = {}
        self._bulk_pools: dict[str, rawhttp.HttpPool | None] = {}
        self._tls_context: Any = None
        self._signing: dict[tuple[Credentials, str, str], Any] = {}

    def __repr__(self) -> str:
        return f"<Transport pools={list(self._pools.values())!r}>"

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        for bulk in self._bulk_pools.values():
            if bulk is not None:
                bulk.close()
        self._bulk_pools.clear()

    # -- awscrt options, made once -------------------------------------------------------

    def socket_options(self) -> Any:
        from awscrt.io import SocketOptions

        options = SocketOptions()
        options.connect_timeout_ms = int(self.settings.connect_timeout * 1000)
        options.keep_alive = True
        return options

    def tls_options(self, host: str) -> Any:
        from awscrt.io import ClientTlsContext, TlsContextOptions

        if self._tls_context is None:
            options = TlsContextOptions()
            options.verify_peer = self.settings.verify
            options.alpn_list = ["http/1.1"]
            ca_bundle = self._ca_bundle() if self.settings.verify else None
            if ca_bundle:
                try:
                    options.override_default_trust_store_from_path(ca_filepath=ca_bundle)
                except Exception as exc:
                    raise EndpointError(
                        f"cannot use the CA bundle {ca_bundle} (AWS_CA_BUNDLE or ca_bundle): "
                        f"{_crt_error_name(exc)}"
                    ) from exc
            self._tls_context = ClientTlsContext(options)
        connection_options = self._tls_context.new_connection_options()
        connection_options.set_server_name(host)
        return connection_options

    def proxy_options(self, proxy: Proxy | None, *, tunnel: bool) -> Any:
        if proxy is None:
            return None
        from awscrt.http import (
            HttpProxyAuthenticationType,
            HttpProxyConnectionType,
            HttpProxyOptions,
        )

        return HttpProxyOptions(
            host_name=proxy.host,
            port=proxy.port,
            tls_connection_options=self.tls_options(proxy.host)
            if proxy.scheme == "https"
            else None,
            auth_type=HttpProxyAuthenticationType.Basic
            if proxy.username
            else HttpProxyAuthenticationType.Nothing,
            auth_username=proxy.username,
            auth_password=proxy.password,
            connection_type=HttpProxyConnectionType.Tunneling
            if tunnel
            else HttpProxyConnectionType.Forwarding,
        )

    def _pool(self, origin: str) -> _Pool:
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = _Pool(self, origin)
        return pool

    async def _sign(self, request: Any, address: BucketAddress) -> None:
        from awscrt import auth

        credentials = await self._credentials()
        if credentials is None:
            import botocore.exceptions as bx

            raise bx.NoCredentialsError()
        slot = (credentials, address.region, address.service)
        config = self._signing.get(slot)
        if config is None:
            if len(self._signing) > 16:  # old credentials, once refreshed, are never used again
                self._signing.clear()
            provider = auth.AwsCredentialsProvider.new_static(
                credentials.access_key, credentials.secret_key, credentials.token
            )
            config = self._signing[slot] = auth.AwsSigningConfig(
                algorithm=auth.AwsSigningAlgorithm.V4,
                signature_type=auth.AwsSignatureType.HTTP_REQUEST_HEADERS,
                credentials_provider=provider,
                region=address.region,
                service=address.service,
                # S3's rules: no double encoding, no path normalisation; the payload is not
                # hashed (its CRC32 header, which S3 checks, protects it).
                use_double_uri_encode=False,
                should_normalize_uri_path=False,
                signed_body_value=auth.AwsSignedBodyValue.UNSIGNED_PAYLOAD,
                signed_body_header_type=auth.AwsSignedBodyHeaderType.X_AMZ_CONTENT_SHA_256,
            )
        future = auth.aws_sign_request(request, config)
        if not future.done():
            await _notify(future).wait()
        future.result()

    # -- requests ------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        bucket: str,
        key: str | None,
        *,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: Body | None = None,
        on_head: BodyCheck | None = None,
        sink: Sink | None = None,
        collect: bool = False,
    ) -> Response:
        """One request to the bucket's endpoint; a 2xx body goes to the sink, or is kept in
        the response (collect), or dropped. An answer naming the bucket's region
        (x-amz-bucket-region on a 301, 307 or 400) is followed once, to that region's
        endpoint, as botocore does."""
        address = await self.endpoints.address(bucket)
        send = (method, key, query, headers, body, on_head, sink, collect)
        response = await self._route(address, *send)
        region = response.headers.get("x-amz-bucket-region")
        if (
            response.status in _REDIRECT_STATUSES
            and region
            and self.endpoints.learn_region(bucket, region)
        ):
            address = await self.endpoints.address(bucket)
            response = await self._route(address, *send)
        return response

    async def _route(
        self,
        address: BucketAddress,
        method: str,
        key: str | None,
        query: Mapping[str, str] | None,
        headers: Mapping[str, str] | None,
        body: Body | None,
        on_head: BodyCheck | None,
        sink: Sink | None,
        collect: bool,
    ) -> Response:
        """A streamed GET on rawhttp (unless its proxy speaks TLS, which only awscrt does),
        everything else on awscrt."""
        if method == "GET" and sink is not None:
            pool = self._bulk_pool(address.origin)
            if pool is not None:
                return await self._send_bulk(pool, address, key, query, headers, on_head, sink)
        return await self._send(address, method, key, query, headers, body, on_head, sink, collect)

    def _bulk_pool(self, origin: str) -> rawhttp.HttpPool | None:
        if origin not in self._bulk_pools:
            proxy = environment_proxy(origin)
            self._bulk_pools[origin] = (
                None
                if proxy is not None and proxy.scheme != "http"
                else rawhttp.HttpPool(
                    origin,
                    verify_ssl=self.settings.verify,
                    timeout=self.settings.response_timeout,
                    size=self.settings.pool_size,
                    ca_bundle=self._ca_bundle() if origin.startswith("https:") else None,
                    proxy=proxy,
                )
            )
        return self._bulk_pools[origin]

    async def _send_bulk(
        self,
        pool: rawhttp.HttpPool,
        address: BucketAddress,
        key: str | None,
        query: Mapping[str, str] | None,
        headers: Mapping[str, str] | None,
        on_head: BodyCheck | None,
        sink: Sink,
    ) -> Response:
        from awscrt.http import HttpHeaders, HttpRequest

        target = address.target(key, query)
        request = HttpRequest(
            "GET", target, HttpHeaders([("host", pool.netloc), *(headers or {}).items()])
        )
        if not self._unsigned:
            await self._sign(request, address)
        signed = {name: value for name, value in request.headers if name.lower() != "host"}
        token = rawhttp.CancelToken()

        def check(status: int, answered: Mapping[str, str]) -> None:
            if on_head is not None:
                length = answered.get("content-length", "")
                on_head(
                    status, answered.get("content-range"), int(length) if length.isdigit() else -1
                )

        try:
            answer = await _cancellable_in_thread(
                lambda: pool.get(target, signed, on_head=check, sink=sink, cancel=token), token
            )
        except ConnectError as exc:
            via = f" through proxy {pool.proxy.host}:{pool.proxy.port}" if pool.proxy else ""
            if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
                raise EndpointError(
                    f"TLS certificate verification failed for {pool.netloc}{via}: "
                    f"{exc.__cause__.verify_message}: set AWS_CA_BUNDLE (or ca_bundle in the "
                    "profile) to its CA, or --no-verify-ssl for an endpoint you trust"
                ) from exc
            raise UnreachableError(str(exc)) from exc
        return Response(answer.status, answer.headers, answer.length, answer.error_text)

    async def _send(
        self,
        address: BucketAddress,
        method: str,
        key: str | None,
        query: Mapping[str, str] | None,
        headers: Mapping[str, str] | None,
        body: Body | None,
        on_head: BodyCheck | None,
        sink: Sink | None,
        collect: bool,
    ) -> Response:
        from awscrt.http import HttpHeaders, HttpRequest

        pool = self._pool(address.origin)
        for attempt in range(2):
            exchange = _Exchange(on_head, sink, collect=collect)
            pairs = [("host", pool.netloc), *(headers or {}).items()]
            if body is not None or method == "PUT":
                pairs.append(("content-length", str(len(body or b""))))
            request = HttpRequest(
                method,
                address.target(key, query),
                HttpHeaders(pairs),
                _CountingBody(body, exchange) if body else None,
            )
            if not self._unsigned:
                await self._sign(request, address)
            connection = pool.take()
            reused = connection is not None
            if connection is None:
                connection = await pool.connect()
            exchange.connection = connection
            try:
                await self._exchange(connection, request, exchange)
            except _ClosedWhileIdle as closed:
                # A kept-alive connection the server had closed: sent once more on a new one
                # (nothing of the answer was seen), as HTTP clients do.
                if reused and attempt == 0:
                    continue
                raise TransientError(f"connection failed: {closed}") from closed.__cause__
            status = exchange.status or 0
            if 200 <= status < 300 and exchange.pending:
                await anyio.to_thread.run_sync(exchange.finish)
            if exchange.headers.get("connection", "").lower() == "close":
                connection.close()
            else:
                pool.give_back(connection)
            ok = 200 <= status < 300
            return Response(
                status,
                exchange.headers,
                exchange.length if ok else 0,
                exchange.error_text.decode("utf-8", errors="replace"),
                bytes(exchange.kept) if ok and exchange.kept else b"",
            )
        raise AssertionError("unreachable")

    async def _exchange(self, connection: Any, request: Any, exchange: _Exchange) -> None:
        """Run the request on the connection until its answer is complete."""
        try:
            stream = connection.request(request, exchange.on_response, exchange.on_body)
            stream.activate()
        except Exception as exc:
            connection.close()
            raise _ClosedWhileIdle(_crt_error_name(exc)) from exc
        # A bare asyncio future and a timer, not an anyio event and cancel scope: this runs
        # for every request, and those cost a small GET a tenth of its client CPU.
        loop = asyncio.get_running_loop()
        done = _settled(stream.completion_future, loop)
        stall = self.settings.response_timeout
        timer: list[asyncio.TimerHandle] = []

        def check(progress: int) -> None:
            if done.done():
                return
            if exchange.progress != progress:
                timer[:] = [loop.call_later(stall, check, exchange.progress)]
                return
            what = "response" if exchange.status is None else "progress"
            exchange._fail(TransientError(f"no {what} for {stall:g} s", timed_out=True))

        timer.append(loop.call_later(stall, check, exchange.progress))
        try:
            await done
        except asyncio.CancelledError:
            connection.close()  # the stream ends, and with it every callback
            with anyio.CancelScope(shield=True):
                await _settled(stream.completion_future, loop)
            raise
        finally:
            timer[0].cancel()
        if exchange.error is not None:
            connection.close()
            raise exchange.error
        error = stream.completion_future.exception()
        if error is not None:
            connection.close()
            if exchange.status is None:
                raise _ClosedWhileIdle(_crt_error_name(error)) from error
            raise TransientError(f"connection failed: {_crt_error_name(error)}") from error


async def _cancellable_in_thread(
    call: Callable[[], rawhttp.Response], token: rawhttp.CancelToken
) -> rawhttp.Response:
    """Run a blocking GET in a worker thread. When the caller is cancelled, the GET's socket is
    shut down and a GET already started is waited for (it ends at once): it must not outlive
    the file it writes to. One not started yet never starts: anyio drops it, and were it
    picked up anyway, the cancelled token stops it before it sends anything."""
    started = threading.Event()
    finished = threading.Event()

    def run() -> rawhttp.Response:
        started.set()
        try:
            return call()
        finally:
            finished.set()

    try:
        return await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        token.cancel()
        if started.is_set():
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(finished.wait)
        raise


# Private, not in errors.py: control flow inside one request (send once more on a new
# connection); it never leaves _send, which turns it into a TransientError.
class _ClosedWhileIdle(Exception):
    """The connection failed before any byte of the answer."""

"""Specification of transport/rawhttp.py, the blocking HTTP/1.1 GET client of worker threads:
real sockets on 127.0.0.1, each answer scripted byte by byte by a small server thread.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping

import anyio
import pytest

from s3xfer.errors import Cancelled, ConnectError, ProtocolError
from s3xfer.transport.http import _cancellable_in_thread
from s3xfer.transport.rawhttp import PIECE_SIZE, CancelToken, HttpPool, Response

LOOPBACK = "127.0.0.1"
WAIT = 10.0  # seconds: bounds the waits on the server thread; never reached when all is well
PROMPT = 5.0  # seconds: "at once" for a cancelled GET whose pool timeout is 30 s


# --- a scripted server --------------------------------------------------------------------------


class Peer:
    """The server's side of one accepted connection, as a script drives it."""

    def __init__(self, sock: socket.socket, index: int, server: ScriptedServer) -> None:
        self.sock = sock
        self.index = index  # 0 for the first connection the server accepted
        self._server = server
        self._buffer = b""

    def read_request(self) -> bytes:
        """The next request head (the server records it), or b"" once the client has gone."""
        while b"\r\n\r\n" not in self._buffer:
            try:
                received = self.sock.recv(65536)
            except OSError:
                return b""
            if not received:
                return b""
            self._buffer += received
        end = self._buffer.index(b"\r\n\r\n") + 4
        head, self._buffer = self._buffer[:end], self._buffer[end:]
        self._server.record(head)
        return head

    def send(self, *parts: bytes) -> None:
        """Each part in a send of its own."""
        for part in parts:
            self.sock.sendall(part)

    def stall(self) -> None:
        """Send nothing more: wait until the client closes or shuts down the connection."""
        with contextlib.suppress(OSError):
            while self.sock.recv(65536):
                pass


Script = Callable[[Peer], None]


class ScriptedServer:
    """Listens on 127.0.0.1 (a free port) and runs `script` for each accepted connection, in a
    daemon thread of its own; the connection is closed when the script returns."""

    def __init__(self, script: Script) -> None:
        self._script = script
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port: int = self._listener.getsockname()[1]
        self.origin = f"http://{LOOPBACK}:{self.port}"
        self._condition = threading.Condition()
        self._accepts = 0
        self._finished = 0
        self._requests: list[bytes] = []
        self._peers: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self.errors: list[BaseException] = []  # raised by scripts, other than OSError
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    @property
    def accepts(self) -> int:
        with self._condition:
            return self._accepts

    @property
    def requests(self) -> list[bytes]:
        with self._condition:
            return list(self._requests)

    def record(self, head: bytes) -> None:
        with self._condition:
            self._requests.append(head)
            self._condition.notify_all()

    def wait_requests(self, count: int) -> None:
        """Until `count` requests have arrived."""
        self._wait(lambda: len(self._requests) >= count)

    def wait_finished(self, count: int) -> None:
        """Until the scripts of `count` connections have returned (those are closed)."""
        self._wait(lambda: self._finished >= count)

    def _wait(self, predicate: Callable[[], bool]) -> None:
        with self._condition:
            assert self._condition.wait_for(predicate, WAIT), "the scripted server never got there"

    def _accept(self) -> None:
        while True:
            sock, _ = self._listener.accept()
            with self._condition:
                if self._stopping:
                    sock.close()
                    return
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = Peer(sock, self._accepts, self)
                self._accepts += 1
                self._peers.append(sock)
                thread = threading.Thread(target=self._run, args=(peer,), daemon=True)
                self._threads.append(thread)
                thread.start()

    def _run(self, peer: Peer) -> None:
        try:
            self._script(peer)
        except OSError:
            pass  # the client went away in the middle of an answer: ordinary for a server
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            peer.sock.close()
            with self._condition:
                self._finished += 1
                self._condition.notify_all()

    def close(self) -> None:
        with self._condition:
            self._stopping = True
        with socket.create_connection((LOOPBACK, self.port)):  # wakes the blocked accept
            pass
        self._acceptor.join(WAIT)
        self._listener.close()
        with self._condition:
            peers, threads = list(self._peers), list(self._threads)
        for sock in peers:  # unblocks scripts still waiting on a client
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(WAIT)
        assert not self._acceptor.is_alive() and not any(t.is_alive() for t in threads)


Serve = Callable[[Script], ScriptedServer]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Starts scripted servers; at teardown closes them and re-raises a script's failure."""
    servers: list[ScriptedServer] = []

    def start(script: Script) -> ScriptedServer:
        server = ScriptedServer(script)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
    for server in servers:
        for error in server.errors:
            raise error


class Pools:
    """Opens HttpPools on scripted servers and closes them all at teardown."""

    def __init__(self) -> None:
        self._pools: list[HttpPool] = []

    def open(self, server: ScriptedServer, *, timeout: float = 30.0) -> HttpPool:
        pool = HttpPool(server.origin, verify_ssl=True, timeout=timeout, size=4)
        self._pools.append(pool)
        return pool

    def close(self) -> None:
        for pool in self._pools:
            pool.close()


@pytest.fixture
def pools(serve: Serve) -> Iterator[Pools]:  # after `serve`, so closed before the servers
    opened = Pools()
    yield opened
    opened.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- answers and a recording client -------------------------------------------------------------


def head(status: int, *lines: str, reason: str = "Whatever") -> bytes:
    return "\r\n".join((f"HTTP/1.1 {status} {reason}", *lines, "", "")).encode("latin-1")


def answer(status: int, body: bytes, *lines: str) -> bytes:
    """A complete answer with a Content-Length."""
    return head(status, f"Content-Length: {len(body)}", *lines) + body


def chunked(*chunks: bytes, extension: str = "", trailers: tuple[str, ...] = ()) -> bytes:
    """The chunked encoding of chunks; the extension goes on the first chunk's size line."""
    encoded = b""
    for number, chunk in enumerate(chunks):
        size_line = f"{len(chunk):x}{extension if number == 0 else ''}\r\n".encode()
        encoded += size_line + chunk + b"\r\n"
    return encoded + b"0\r\n" + "".join(t + "\r\n" for t in trailers).encode() + b"\r\n"


def keep_alive(*answers: bytes, sends_per_answer: int = 1) -> Script:
    """Answers the requests on each connection with answers in turn (each in one send, or in
    `sends_per_answer` consecutive ones), then waits for the client."""

    def script(peer: Peer) -> None:
        for start in range(0, len(answers), sends_per_answer):
            if not peer.read_request():
                return
            peer.send(*answers[start : start + sends_per_answer])
        peer.stall()

    return script


def idle_connections(pool: HttpPool) -> int:
    return len(pool._idle)


def pseudo_random(size: int, seed: int = 7) -> bytes:
    """Bytes without a period, so that a piece out of place cannot compare equal."""
    return random.Random(seed).randbytes(size)


class Recorder:
    """on_head and on_data that record what they receive, and in which order."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.pieces: list[bytes] = []

    def on_head(self, status: int, headers: Mapping[str, str]) -> None:
        self.events.append("head")
        self.status = status
        self.headers = dict(headers)

    def on_data(self, piece: memoryview) -> None:
        self.events.append("data")
        self.pieces.append(bytes(piece))  # the view is reused once the call returns

    @property
    def body(self) -> bytes:
        return b"".join(self.pieces)

    def get(
        self,
        pool: HttpPool,
        target: str = "/bucket/key",
        headers: Mapping[str, str] | None = None,
        cancel: CancelToken | None = None,
    ) -> Response:
        return pool.get(
            target, headers or {}, on_head=self.on_head, sink=self.on_data, cancel=cancel
        )


# --- bodies -------------------------------------------------------------------------------------

BIG = pseudo_random(4 * PIECE_SIZE + 7)  # 1 MiB + 7 bytes: more than one piece


@pytest.mark.parametrize("sends", ["with the head in one send", "in sends after the head"])
def test_a_206_body_reaches_on_data_in_order_after_on_head(
    serve: Serve, pools: Pools, sends: str
) -> None:
    lines = ("Content-Range: bytes 0-1048582/9999999", 'ETag: "abc"', "X-Amz-Request-Id: R1")
    whole = answer(206, BIG, *lines)
    split = len(whole) - len(BIG) + 1000
    parts = (whole,) if sends.startswith("with") else (whole[:split], whole[split:])
    server = serve(keep_alive(*parts, sends_per_answer=len(parts)))
    recorder = Recorder()

    response = recorder.get(pools.open(server))

    assert response.status == 206 and response.length == len(BIG) and response.error_text == ""
    assert recorder.body == BIG
    assert recorder.events[0] == "head" and recorder.events.count("head") == 1
    assert recorder.status == 206
    assert recorder.headers["content-range"] == "bytes 0-1048582/9999999"
    assert recorder.headers["etag"] == '"abc"'
    assert recorder.headers["x-amz-request-id"] == "R1"
    assert response.headers["content-length"] == str(len(BIG))
    assert len(recorder.pieces) >= 5 and max(map(len, recorder.pieces)) <= PIECE_SIZE


def test_a_body_that_arrives_with_its_head_is_passed_on_whole(serve: Serve, pools: Pools) -> None:
    body = b"the whole body, in the head's segment"
    server = serve(keep_alive(answer(200, body)))
    recorder = Recorder()

    response = recorder.get(pools.open(server))

    assert (response.status, response.length, recorder.body) == (200, len(body), body)


def test_an_empty_204_without_a_length_is_an_empty_body(serve: Serve, pools: Pools) -> None:
    server = serve(keep_alive(head(204), answer(200, b"next")))
    pool = pools.open(server)
    recorder = Recorder()

    assert recorder.get(pool).length == 0 and recorder.events == ["head"]
    assert Recorder().get(pool).length == 4 and server.accepts == 1


def test_the_request_carries_its_target_the_host_and_the_headers(
    serve: Serve, pools: Pools
) -> None:
    server = serve(keep_alive(answer(200, b"x")))

    Recorder().get(pools.open(server), "/b/k%20ey?partNumber=2", {"range": "bytes=0-0"})

    lines = server.requests[0].decode("latin-1").split("\r\n")
    assert lines[0] == "GET /b/k%20ey?partNumber=2 HTTP/1.1"
    assert f"host: {LOOPBACK}:{server.port}" in lines and "range: bytes=0-0" in lines


@pytest.mark.parametrize("sends", ["with the head in one send", "in sends after the head"])
def test_a_body_is_received_straight_into_a_buffer_sink(
    serve: Serve, pools: Pools, sends: str
) -> None:
    whole = answer(206, BIG)
    split = len(whole) - len(BIG) + 1000
    parts = (whole,) if sends.startswith("with") else (whole[:split], whole[split:])
    server = serve(keep_alive(*parts, sends_per_answer=len(parts)))
    buffer = bytearray(len(BIG) + 10)

    response = pools.open(server).get("/b/k", {}, on_head=lambda *_: None, sink=memoryview(buffer))

    assert response.length == len(BIG) and bytes(buffer[: len(BIG)]) == BIG
    assert buffer[len(BIG) :] == bytes(10)  # nothing past the body


def test_a_chunked_body_is_received_into_a_buffer_sink_chunk_after_chunk(
    serve: Serve, pools: Pools
) -> None:
    body = [b"first,", pseudo_random(PIECE_SIZE + 3), b"last"]
    server = serve(keep_alive(head(200, "Transfer-Encoding: chunked") + chunked(*body)))
    buffer = bytearray(sum(map(len, body)))

    response = pools.open(server).get("/b/k", {}, on_head=lambda *_: None, sink=memoryview(buffer))

    assert response.length == len(buffer) and bytes(buffer) == b"".join(body)


def test_a_body_larger_than_its_buffer_sink_is_refused(serve: Serve, pools: Pools) -> None:
    server = serve(keep_alive(answer(200, b"0123456789")))
    pool = pools.open(server)

    with pytest.raises(ProtocolError, match="does not fit"):
        pool.get("/b/k", {}, on_head=lambda *_: None, sink=memoryview(bytearray(9)))
    assert idle_connections(pool) == 0


# --- keep-alive ---------------------------------------------------------------------------------


def test_two_gets_on_one_pool_reuse_one_kept_alive_connection(serve: Serve, pools: Pools) -> None:
    server = serve(keep_alive(answer(200, b"first"), answer(200, b"second")))
    pool = pools.open(server)
    first, second = Recorder(), Recorder()

    first.get(pool)
    second.get(pool)

    assert (first.body, second.body) == (b"first", b"second")
    assert server.accepts == 1 and len(server.requests) == 2


def test_connection_close_makes_the_next_get_open_a_new_connection(
    serve: Serve, pools: Pools
) -> None:
    def script(peer: Peer) -> None:
        peer.read_request()
        peer.send(answer(200, f"on {peer.index}".encode(), "Connection: close"))

    server = serve(script)
    pool = pools.open(server)
    first, second = Recorder(), Recorder()

    first.get(pool)
    assert idle_connections(pool) == 0
    second.get(pool)

    assert (first.body, second.body) == (b"on 0", b"on 1") and server.accepts == 2


def test_a_kept_alive_connection_the_server_closed_while_idle_is_replaced(
    serve: Serve, pools: Pools
) -> None:
    def script(peer: Peer) -> None:  # one answer per connection, then closed
        peer.read_request()
        peer.send(answer(200, f"on {peer.index}".encode()))

    server = serve(script)
    pool = pools.open(server)
    first, second = Recorder(), Recorder()
    first.get(pool)
    server.wait_finished(1)  # the server has closed the connection the pool keeps

    response = second.get(pool)

    assert response.status == 200 and (first.body, second.body) == (b"on 0", b"on 1")
    assert server.accepts == 2


def test_the_get_is_sent_again_only_once_when_the_new_connection_fails_too(
    serve: Serve, pools: Pools
) -> None:
    def script(peer: Peer) -> None:  # the first connection answers once; the others never
        peer.read_request()
        if peer.index == 0:
            peer.send(answer(200, b"ok"))

    server = serve(script)
    pool = pools.open(server)
    Recorder().get(pool)
    server.wait_finished(1)

    with pytest.raises(ConnectionResetError):
        Recorder().get(pool)
    assert server.accepts == 2 and idle_connections(pool) == 0


# --- chunked ------------------------------------------------------------------------------------

CHUNKS = (b"hello ", pseudo_random(PIECE_SIZE + 1000, seed=3), b"!", b"tail")


@pytest.mark.parametrize("sends", ["in one send", "in sends of 1000 bytes"])
def test_a_chunked_body_is_decoded_with_its_extension_and_trailer(
    serve: Serve, pools: Pools, sends: str
) -> None:
    encoded = head(200, "Transfer-Encoding: chunked") + chunked(
        *CHUNKS, extension=";name=value", trailers=("x-amz-checksum-crc32: AAAAAA==",)
    )
    step = len(encoded) if sends == "in one send" else 1000
    parts = [encoded[start : start + step] for start in range(0, len(encoded), step)]

    def script(peer: Peer) -> None:
        peer.read_request()
        peer.send(*parts)
        peer.read_request()  # the framing was consumed exactly: the connection still serves
        peer.send(answer(200, b"after"))
        peer.stall()

    server = serve(script)
    pool = pools.open(server)
    recorder, after = Recorder(), Recorder()

    response = recorder.get(pool)
    after.get(pool)

    assert recorder.body == b"".join(CHUNKS) and response.length == len(recorder.body)
    assert recorder.events[0] == "head" and after.body == b"after" and server.accepts == 1


# --- error answers ------------------------------------------------------------------------------

ERROR_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message><RequestId>R2</RequestId></Error>"
)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_non_2xx_answer_returns_its_error_document_and_keeps_the_connection(
    serve: Serve, pools: Pools, framing: str
) -> None:
    if framing == "chunked":
        refusal = head(403, "Transfer-Encoding: chunked") + chunked(ERROR_XML[:50], ERROR_XML[50:])
    else:
        refusal = answer(403, ERROR_XML, "Content-Type: application/xml")
    server = serve(keep_alive(refusal, answer(200, b"granted")))
    pool = pools.open(server)
    refused, granted = Recorder(), Recorder()

    response = refused.get(pool)

    assert response.status == 403 and response.length == 0
    assert ERROR_XML.decode() in response.error_text
    assert refused.events == []  # neither on_head nor on_data: the body is not the object's
    assert granted.get(pool).status == 200 and granted.body == b"granted"
    assert server.accepts == 1


def test_an_error_document_over_64_kib_is_cut_and_its_connection_dropped(
    serve: Serve, pools: Pools
) -> None:
    document = b"<Error>" + b"x" * (100 * 1024) + b"</Error>"
    server = serve(keep_alive(answer(500, document)))
    pool = pools.open(server)

    response = Recorder().get(pool)

    assert response.status == 500 and response.error_text == document[: 64 * 1024].decode()
    assert idle_connections(pool) == 0


# --- failures -----------------------------------------------------------------------------------


def test_a_cut_short_body_raises_connection_reset_and_the_connection_is_not_kept(
    serve: Serve, pools: Pools
) -> None:
    body = pseudo_random(200_000)

    def script(peer: Peer) -> None:
        peer.read_request()
        peer.send(answer(200, body)[: -len(body) // 2])  # closed after half the body

    server = serve(script)
    pool = pools.open(server)
    recorder = Recorder()

    with pytest.raises(ConnectionResetError) as raised:
        recorder.get(pool)

    assert isinstance(raised.value, ConnectionError)
    assert recorder.body == body[: len(recorder.body)] and len(recorder.body) < len(body)
    assert idle_connections(pool) == 0


def test_a_reused_connection_cut_short_in_the_body_is_not_sent_again(
    serve: Serve, pools: Pools
) -> None:
    body = pseudo_random(10_000)

    def script(peer: Peer) -> None:
        peer.read_request()
        peer.send(answer(200, b"first"))
        peer.read_request()
        peer.send(answer(200, body)[:-5000])  # part of the body is passed on: no retry

    server = serve(script)
    pool = pools.open(server)
    Recorder().get(pool)
    recorder = Recorder()

    with pytest.raises(ConnectionResetError):
        recorder.get(pool)
    assert server.accepts == 1 and recorder.events.count("head") == 1


@pytest.mark.parametrize(
    "status_line",
    [b"HTTP/2 200 OK", b"ICY 200 OK", b"HTTP/1.1 OK", b"HTTP/1.1 2x0 OK", b"200 OK", b"junk"],
)
def test_a_malformed_status_line_raises_protocol_error(
    serve: Serve, pools: Pools, status_line: bytes
) -> None:
    server = serve(keep_alive(status_line + b"\r\nContent-Length: 2\r\n\r\nhi"))
    recorder = Recorder()

    with pytest.raises(ProtocolError):
        recorder.get(pools.open(server))
    assert recorder.events == []


def test_a_header_line_without_a_colon_raises_protocol_error(serve: Serve, pools: Pools) -> None:
    server = serve(keep_alive(head(200, "Content-Length: 2", "no colon here") + b"hi"))

    with pytest.raises(ProtocolError):
        Recorder().get(pools.open(server))


@pytest.mark.parametrize("status", [200, 404])
def test_an_answer_without_content_length_or_chunked_raises_protocol_error(
    serve: Serve, pools: Pools, status: int
) -> None:
    def script(peer: Peer) -> None:  # a body delimited by the close: not what S3 sends
        peer.read_request()
        peer.send(head(status, "Content-Type: text/plain") + b"until the close")

    server = serve(script)
    pool = pools.open(server)
    recorder = Recorder()

    with pytest.raises(ProtocolError):
        recorder.get(pool)
    assert recorder.events == [] and idle_connections(pool) == 0


def test_an_exception_in_on_head_propagates_and_no_body_is_passed_on(
    serve: Serve, pools: Pools
) -> None:
    server = serve(keep_alive(answer(206, BIG, "Content-Range: bytes 5-1048586/2000000")))
    pool = pools.open(server)
    pieces: list[bytes] = []

    def refuse(status: int, headers: Mapping[str, str]) -> None:
        raise RuntimeError(f"unexpected {headers['content-range']}")

    with pytest.raises(RuntimeError, match="unexpected bytes 5-"):
        pool.get("/b/k", {}, on_head=refuse, sink=lambda piece: pieces.append(bytes(piece)))
    assert pieces == [] and idle_connections(pool) == 0


def test_connecting_to_a_closed_port_raises_connect_error() -> None:
    with socket.socket() as bound:  # bound but not listening: connections are refused
        bound.bind((LOOPBACK, 0))
        port = bound.getsockname()[1]
        pool = HttpPool(f"http://{LOOPBACK}:{port}", verify_ssl=True, timeout=30.0, size=4)
        recorder = Recorder()

        with pytest.raises(ConnectError) as raised:
            recorder.get(pool)

    assert isinstance(raised.value, ConnectionError) and recorder.events == []
    pool.close()


# --- cancellation and timeouts ------------------------------------------------------------------


def stalls(where: str) -> Script:
    """Reads the request, then sends nothing (or only the head and 10 body bytes) ever more."""

    def script(peer: Peer) -> None:
        peer.read_request()
        if where == "in the body":
            peer.send(head(206, "Content-Length: 1000000") + b"0123456789")
        peer.stall()

    return script


@pytest.mark.timeout(20)
@pytest.mark.parametrize("where", ["before the head", "in the body"])
def test_cancel_from_another_thread_stops_a_blocked_get_at_once(
    serve: Serve, pools: Pools, where: str
) -> None:
    server = serve(stalls(where))
    pool = pools.open(server, timeout=30.0)  # only the cancellation can end the GET
    token = CancelToken()
    head_seen = threading.Event()
    recorder = Recorder()

    def on_head(status: int, headers: Mapping[str, str]) -> None:
        recorder.on_head(status, headers)
        head_seen.set()

    def cancel_when_blocked() -> None:
        if where == "in the body":
            assert head_seen.wait(WAIT)
        else:
            server.wait_requests(1)
        token.cancel()

    canceller = threading.Thread(target=cancel_when_blocked)
    started = time.monotonic()
    canceller.start()
    try:
        with pytest.raises(Cancelled):
            pool.get("/b/k", {}, on_head=on_head, sink=recorder.on_data, cancel=token)
    finally:
        canceller.join(WAIT)
    elapsed = time.monotonic() - started

    assert elapsed < PROMPT and token.cancelled and idle_connections(pool) == 0
    assert recorder.events == ([] if where == "before the head" else ["head", "data"])


def test_a_token_cancelled_beforehand_sends_no_request(serve: Serve, pools: Pools) -> None:
    server = serve(keep_alive(answer(200, b"never")))
    token = CancelToken()
    token.cancel()
    recorder = Recorder()

    with pytest.raises(Cancelled):
        recorder.get(pools.open(server), cancel=token)
    server.wait_finished(server.accepts)
    assert server.requests == [] and recorder.events == []


@pytest.mark.anyio
@pytest.mark.timeout(20)
async def test_cancelling_the_awaiting_task_ends_the_worker_thread_before_returning(
    serve: Serve, pools: Pools
) -> None:
    server = serve(stalls("in the body"))
    pool = pools.open(server, timeout=30.0)  # only the cancellation can end the GET
    token = CancelToken()
    recorder = Recorder()
    ended = threading.Event()
    outcome: list[BaseException] = []

    def call() -> Response:
        try:
            return recorder.get(pool, cancel=token)
        except BaseException as exc:
            outcome.append(exc)
            raise
        finally:
            ended.set()

    started = time.monotonic()
    with anyio.move_on_after(0.3) as scope:
        await _cancellable_in_thread(call, token)
    elapsed = time.monotonic() - started

    assert scope.cancel_called and elapsed < PROMPT
    assert ended.is_set()  # the worker thread was waited for: it cannot outlive the caller
    assert len(outcome) == 1 and isinstance(outcome[0], Cancelled)
    assert recorder.events[0] == "head" and token.cancelled


@pytest.mark.timeout(20)
@pytest.mark.parametrize("where", ["before the head", "in the body"])
def test_no_byte_for_the_timeout_raises_timeout_error(
    serve: Serve, pools: Pools, where: str
) -> None:
    server = serve(stalls(where))
    pool = pools.open(server, timeout=0.2)

    with pytest.raises(TimeoutError):
        Recorder().get(pool)
    assert server.accepts == 1 and idle_connections(pool) == 0


# --- malformed answers and late cancels ---------------------------------------------------------


def test_a_non_numeric_content_length_raises_protocol_error(serve: Serve, pools: Pools) -> None:
    server = serve(keep_alive(head(200, "Content-Length: twelve") + b"twelve bytes"))

    with pytest.raises(ProtocolError):
        Recorder().get(pools.open(server))


def test_a_negative_content_length_raises_protocol_error(serve: Serve, pools: Pools) -> None:
    server = serve(keep_alive(head(200, "Content-Length: -1") + b"abc"))
    recorder = Recorder()

    with pytest.raises(ProtocolError):
        recorder.get(pools.open(server))
    assert recorder.body == b""


def test_a_status_in_non_ascii_digits_raises_protocol_error(serve: Serve, pools: Pools) -> None:
    server = serve(keep_alive(b"HTTP/1.1 \xb200 OK\r\nContent-Length: 0\r\n\r\n"))

    with pytest.raises(ProtocolError):
        Recorder().get(pools.open(server))


def test_a_get_cancelled_during_its_last_piece_does_not_keep_its_shut_down_connection(
    serve: Serve, pools: Pools
) -> None:
    server = serve(keep_alive(answer(200, b"last piece")))
    pool = pools.open(server)
    token = CancelToken()

    def cancel_on_data(piece: memoryview) -> None:  # the caller gives up as the body ends
        token.cancel()

    with pytest.raises(Cancelled):
        pool.get("/b/k", {}, on_head=lambda *_: None, sink=cancel_on_data, cancel=token)
    assert idle_connections(pool) == 0


@pytest.mark.timeout(20)
@pytest.mark.anyio
async def test_a_get_cancelled_before_any_thread_took_it_never_runs() -> None:
    # Every worker thread busy: the GET is still waiting for one when its caller gives up.
    # It must return at once, and the GET must never run afterwards.
    limiter = anyio.to_thread.current_default_thread_limiter()
    total = limiter.total_tokens
    release = threading.Event()
    taken = anyio.Event()
    ran: list[bool] = []
    token = CancelToken()

    def hold_the_only_thread() -> None:
        anyio.from_thread.run_sync(taken.set)
        release.wait()

    def never_started() -> Response:
        ran.append(True)
        return Response(200, {}, 0, "")

    limiter.total_tokens = 1
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(anyio.to_thread.run_sync, hold_the_only_thread)
            await taken.wait()
            with anyio.move_on_after(0.2) as scope:
                await _cancellable_in_thread(never_started, token)
            release.set()
    finally:
        limiter.total_tokens = total
    assert scope.cancel_called and token.cancelled and not ran

"""Specification of the fault proxy: real sockets on 127.0.0.1, a tiny aiohttp upstream, and
each fault as an aiohttp client (what s3xfer uses) or botocore sees it.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import random
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anyio
import anyio.to_thread
import botocore.session
import pytest
from aiohttp import web
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.faultproxy import (
    FAULT_KINDS,
    REDACTED,
    FaultPlan,
    FaultProxy,
    FaultSchedule,
    parse_upstream,
)

LOOPBACK = "127.0.0.1"
BIG = bytes(range(256)) * 4096  # 1 MiB, the body of GET /bucket/big
CHUNK = BIG[: 64 * 1024]
CHUNKED_PIECES = 4  # GET /bucket/chunked sends BIG's first CHUNKED_PIECES x 64 KiB, chunked
RECEIVED = "x-received-bytes"  # the upstream's answer to PUT and POST: the body's byte count
SIGNED = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20250101/us-east-1/s3/aws4_request, " + (
    "SignedHeaders=host, Signature=" + "5ec2e7" * 8
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Upstream:
    """The stand-in S3 server and what reached it."""

    url: str
    seen: list[tuple[str, dict[str, str], int]] = field(default_factory=list)
    peers: set[object] = field(default_factory=set)  # distinct connections from the proxy
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set at the first request

    def record(self, request: web.Request, body_bytes: int) -> None:
        headers = {name.lower(): value for name, value in request.headers.items()}
        self.seen.append((request.method, headers, body_bytes))
        assert request.transport is not None
        self.peers.add(request.transport.get_extra_info("peername"))
        self.arrived.set()


@asynccontextmanager
async def upstream_server() -> AsyncIterator[Upstream]:
    """GET/HEAD /bucket/big (1 MiB), GET /bucket/chunked, PUT or POST anything (answers the
    byte count in a header), DELETE anything (204)."""
    upstream = Upstream(url="")

    async def get_big(request: web.Request) -> web.StreamResponse:
        upstream.record(request, 0)
        return web.Response(body=BIG)

    async def get_chunked(request: web.Request) -> web.StreamResponse:
        upstream.record(request, 0)
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(CHUNKED_PIECES):
            await response.write(CHUNK)
        await response.write_eof()
        return response

    async def put(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        upstream.record(request, len(body))
        # An empty body, as S3's: botocore takes a 200 with a body that is not XML for an error.
        return web.Response(headers={RECEIVED: str(len(body)), "ETag": '"0"'})

    async def delete(request: web.Request) -> web.StreamResponse:
        upstream.record(request, 0)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/bucket/big", get_big)
    app.router.add_get("/bucket/chunked", get_chunked)
    app.router.add_put("/{key:.*}", put)
    app.router.add_post("/{key:.*}", put)
    app.router.add_delete("/{key:.*}", delete)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    upstream.url = f"http://{LOOPBACK}:{runner.addresses[0][1]}"
    try:
        yield upstream
    finally:
        await runner.cleanup()


@asynccontextmanager
async def proxied(
    plan: FaultPlan | None = None, *, sock_read: float | None = None
) -> AsyncIterator[tuple[FaultProxy, Upstream, aiohttp.ClientSession]]:
    """Upstream, proxy, and a client session that keeps one connection alive at a time."""
    timeout = aiohttp.ClientTimeout(total=30, sock_read=sock_read)
    async with (
        upstream_server() as upstream,
        FaultProxy(upstream.url, plan or FaultPlan()) as proxy,
        aiohttp.ClientSession(
            base_url=proxy.endpoint_url,
            connector=aiohttp.TCPConnector(limit=1),
            timeout=timeout,
        ) as session,
    ):
        yield proxy, upstream, session


async def status_of(session: aiohttp.ClientSession, method: str, path: str, **kw: Any) -> int:
    async with session.request(method, path, **kw) as response:
        await response.read()
        return response.status


async def read_until_failure(response: aiohttp.ClientResponse) -> tuple[int, BaseException]:
    """How many body bytes arrived before reading failed, and the failure."""
    received = 0
    try:
        async for data in response.content.iter_any():
            received += len(data)
    except aiohttp.ClientError as exc:
        return received, exc
    raise AssertionError(f"the body was read to its end ({received} bytes)")


def plan_of(probabilities: dict[str, float], **settings: Any) -> FaultPlan:
    """A plan from fault kinds named at run time."""
    fields: dict[str, Any] = {**probabilities, **settings}
    return FaultPlan(**fields)


def seed_where(predicate: Callable[[list[float]], bool], draws: int) -> int:
    """The first seed whose first `draws` per-request draws satisfy `predicate`."""
    for seed in range(10_000):
        generator = random.Random(seed)
        if predicate([generator.random() for _ in range(draws)]):
            return seed
    raise AssertionError("no such seed")


# --------------------------------------------------------------------------- pass-through


@pytest.mark.anyio
async def test_requests_pass_through_unchanged_on_one_kept_alive_connection() -> None:
    async with proxied() as (proxy, upstream, session):
        headers = {"Authorization": SIGNED, "x-amz-security-token": "token-secret"}
        for _ in range(2):
            async with session.get("/bucket/big", headers=headers) as response:
                assert response.status == 200
                assert await response.read() == BIG
        async with session.put("/bucket/k", data=BIG[:300_000], headers=headers) as response:
            assert response.headers[RECEIVED] == "300000"
        async with session.head("/bucket/big") as response:
            assert response.headers["Content-Length"] == str(len(BIG))
        async with session.get("/bucket/chunked?X-Amz-Signature=cafe&x-id=Get") as response:
            assert await response.read() == CHUNK * CHUNKED_PIECES
        assert await status_of(session, "DELETE", "/bucket/k") == 204

    assert proxy.connections == 1
    assert len(upstream.peers) == 1
    assert proxy.requests == 6
    assert not proxy.injected
    assert [(e.method, e.target, e.body_bytes, e.status, e.fault) for e in proxy.log] == [
        ("GET", "/bucket/big", 0, 200, None),
        ("GET", "/bucket/big", 0, 200, None),
        ("PUT", "/bucket/k", 300_000, 200, None),
        ("HEAD", "/bucket/big", 0, 200, None),
        ("GET", f"/bucket/chunked?X-Amz-Signature={REDACTED}&x-id=Get", 0, 200, None),
        ("DELETE", "/bucket/k", 0, 204, None),
    ]
    first = proxy.log[0].headers
    assert first["authorization"] == REDACTED
    assert first["x-amz-security-token"] == REDACTED
    assert first["host"] == proxy.endpoint_url.removeprefix("http://")
    assert "5ec2e7" not in repr(proxy.log) and "secret" not in repr(proxy.log)
    # The upstream gets the headers as signed: the signature stays valid.
    assert upstream.seen[0][1]["authorization"] == SIGNED
    assert upstream.seen[0][1]["host"] == proxy.endpoint_url.removeprefix("http://")


@pytest.mark.anyio
async def test_chunked_request_bodies_are_forwarded_and_their_payload_counted() -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield CHUNK

    async with (
        proxied() as (proxy, upstream, session),
        session.put("/bucket/k", data=pieces()) as response,
    ):
        assert response.headers[RECEIVED] == str(3 * len(CHUNK))
    assert upstream.seen[0][1]["transfer-encoding"] == "chunked"
    assert proxy.log[0].body_bytes == 3 * len(CHUNK)


@pytest.mark.anyio
async def test_expect_100_continue_is_answered_by_the_proxy_and_not_forwarded() -> None:
    async with proxied() as (proxy, upstream, session):
        for _ in range(2):
            async with session.put("/bucket/k", data=BIG, expect100=True) as response:
                assert response.headers[RECEIVED] == str(len(BIG))
    assert "expect" not in upstream.seen[0][1]
    assert proxy.log[0].headers["expect"] == "100-continue"
    assert [e.body_bytes for e in proxy.log] == [len(BIG), len(BIG)]
    assert proxy.connections == 1


# --------------------------------------------------------------------------- each fault


@pytest.mark.anyio
async def test_slowdown_is_an_s3_503_and_the_connection_lives_on() -> None:
    async with proxied(FaultPlan(slowdown=1.0, max_faults=1)) as (proxy, upstream, session):
        async with session.get("/bucket/big") as response:
            assert response.status == 503
            assert response.headers["Content-Type"] == "application/xml"
            body = await response.text()
        assert "<Code>SlowDown</Code>" in body
        assert "<Resource>/bucket/big</Resource>" in body
        assert await status_of(session, "GET", "/bucket/big") == 200
    assert proxy.connections == 1
    assert len(upstream.seen) == 1  # the faulted request never reached upstream
    assert proxy.injected == {"slowdown": 1}
    assert [(e.status, e.fault) for e in proxy.log] == [(503, "slowdown"), (200, None)]


@pytest.mark.anyio
async def test_error500_reads_the_body_first_so_the_connection_lives_on() -> None:
    async with proxied(FaultPlan(error500=1.0, max_faults=2)) as (proxy, upstream, session):
        async with session.put("/bucket/k", data=BIG[:200_000]) as response:
            assert response.status == 500
            assert "<Code>InternalError</Code>" in await response.text()
        async with session.head("/bucket/big") as response:  # no body after a HEAD
            assert response.status == 500
        assert await status_of(session, "PUT", "/bucket/k", data=b"x") == 200
    assert proxy.connections == 1
    assert [(e.body_bytes, e.status, e.fault) for e in proxy.log] == [
        (200_000, 500, "error500"),
        (0, 500, "error500"),
        (1, 200, None),
    ]
    assert [method for method, _, _ in upstream.seen] == ["PUT"]


@pytest.mark.anyio
async def test_an_error_to_an_expect_100_request_is_sent_before_the_body_and_closes() -> None:
    async with proxied(FaultPlan(slowdown=1.0, max_faults=1)) as (proxy, upstream, session):
        async with session.put("/bucket/k", data=BIG, expect100=True) as response:
            assert response.status == 503
            assert response.headers["Connection"] == "close"
            assert "<Code>SlowDown</Code>" in await response.text()
        async with session.put("/bucket/k", data=BIG, expect100=True) as response:
            assert response.headers[RECEIVED] == str(len(BIG))
    assert [(e.body_bytes, e.status) for e in proxy.log] == [(0, 503), (len(BIG), 200)]
    assert proxy.connections == 2
    assert len(upstream.seen) == 1


@pytest.mark.anyio
async def test_reset_request_cuts_the_upload_part_way_and_nothing_reaches_upstream() -> None:
    async with proxied(FaultPlan(reset_request=1.0)) as (proxy, upstream, session):
        with pytest.raises(aiohttp.ClientOSError, match="reset"):
            await status_of(session, "POST", "/bucket/k?uploads", data=BIG)
    assert [(e.body_bytes, e.status, e.fault) for e in proxy.log] == [
        (len(BIG) // 2, None, "reset_request")
    ]
    assert upstream.seen == []


@pytest.mark.anyio
async def test_aiohttp_retries_an_idempotent_request_once_after_a_reset() -> None:
    """aiohttp resends GET, HEAD, PUT and DELETE once when the connection fails before a
    response: one reset_request is invisible to the caller, two in a row are not."""
    async with proxied(FaultPlan(reset_request=1.0, max_faults=3)) as (proxy, upstream, session):
        with pytest.raises((aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)):
            await status_of(session, "PUT", "/bucket/k", data=BIG)
        assert await status_of(session, "GET", "/bucket/big") == 200
    assert [(e.method, e.status, e.fault) for e in proxy.log] == [
        ("PUT", None, "reset_request"),
        ("PUT", None, "reset_request"),
        ("GET", None, "reset_request"),
        ("GET", 200, None),
    ]
    assert [method for method, _, _ in upstream.seen] == ["GET"]


@pytest.mark.anyio
async def test_reset_request_after_100_continue_reads_half_the_body() -> None:
    async with proxied(FaultPlan(reset_request=1.0)) as (proxy, upstream, session):
        with pytest.raises((aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)):
            await status_of(session, "PUT", "/bucket/k", data=BIG, expect100=True)
    assert {e.body_bytes for e in proxy.log} == {len(BIG) // 2}
    assert upstream.seen == []


@pytest.mark.anyio
async def test_reset_response_cuts_the_body_with_a_reset() -> None:
    async with proxied(FaultPlan(reset_response=1.0, max_faults=1)) as (proxy, _, session):
        async with session.get("/bucket/big") as response:
            assert response.status == 200
            received, error = await read_until_failure(response)
        assert isinstance(error, aiohttp.ClientPayloadError)
        assert "ConnectionResetError" in repr(error) or "reset" in str(error).lower()
        assert 0 < received <= len(BIG) // 2
        assert await status_of(session, "GET", "/bucket/big") == 200
    assert [(e.status, e.fault) for e in proxy.log] == [(200, "reset_response"), (200, None)]


@pytest.mark.anyio
async def test_truncate_sends_half_the_body_then_closes_cleanly() -> None:
    async with proxied(FaultPlan(truncate=1.0, max_faults=2)) as (proxy, _, session):
        async with session.get("/bucket/big") as response:
            assert response.headers["Content-Length"] == str(len(BIG))
            received, error = await read_until_failure(response)
        assert isinstance(error, aiohttp.ClientPayloadError)
        assert received == len(BIG) // 2
        async with session.get("/bucket/chunked") as response:
            received, error = await read_until_failure(response)
        assert isinstance(error, aiohttp.ClientPayloadError)
        assert 0 < received < len(CHUNK) * CHUNKED_PIECES
    assert proxy.injected == {"truncate": 2}


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["truncate", "reset_response"])
async def test_a_response_without_body_is_cut_in_its_status_line(kind: str) -> None:
    """Cut after its status line, a head would pass for whole with http.client (botocore):
    EOF ends the fields, and some would be silently missing."""

    def head_with_http_client(url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            connection.request("HEAD", "/bucket/big")
            connection.getresponse()
        finally:
            connection.close()

    async with proxied(plan_of({kind: 1.0})) as (proxy, _, session):
        with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
            await status_of(session, "HEAD", "/bucket/big")
        with pytest.raises((http.client.BadStatusLine, ConnectionResetError)):
            await anyio.to_thread.run_sync(head_with_http_client, proxy.endpoint_url)
    # aiohttp sent its HEAD twice: it retries once when a connection dies before a response.
    assert [(e.status, e.fault) for e in proxy.log] == [(None, kind)] * 3


@pytest.mark.anyio
async def test_stall_outlasts_a_client_read_timeout() -> None:
    plan = FaultPlan(stall=1.0, stall_seconds=30.0)
    async with proxied(plan, sock_read=0.2) as (proxy, upstream, session):
        with pytest.raises(TimeoutError):
            await status_of(session, "GET", "/bucket/big")
    assert len(upstream.seen) == 1  # forwarded, then held
    assert [(e.status, e.fault) for e in proxy.log] == [(None, "stall")]


@pytest.mark.anyio
async def test_a_short_stall_delivers_the_whole_response() -> None:
    async with (
        proxied(FaultPlan(stall=1.0, stall_seconds=0.01)) as (proxy, _, session),
        session.get("/bucket/big") as response,
    ):
        assert await response.read() == BIG
    assert proxy.injected == {"stall": 1}


# --------------------------------------------------------------------------- the schedule


@pytest.mark.anyio
async def test_a_slowdown_starts_a_burst_over_the_next_requests() -> None:
    seed = seed_where(lambda d: d[0] < 0.5 <= min(d[1:]), draws=5)
    statuses = {}
    for burst in (0, 2):
        plan = FaultPlan(seed=seed, slowdown=0.5, slowdown_burst=burst)
        async with proxied(plan) as (_, _, session):
            statuses[burst] = [await status_of(session, "GET", "/bucket/big") for _ in range(5)]
    assert statuses == {0: [503, 200, 200, 200, 200], 2: [503, 503, 503, 200, 200]}


@pytest.mark.anyio
async def test_max_faults_skip_first_and_methods_limit_what_is_faulted() -> None:
    plan = FaultPlan(error500=1.0, skip_first=1, max_faults=2, methods=frozenset({"PUT"}))
    async with proxied(plan) as (proxy, _, session):
        statuses = [
            await status_of(session, "PUT", "/bucket/k", data=b"1"),  # skipped: first
            await status_of(session, "GET", "/bucket/big"),  # not a PUT
            await status_of(session, "PUT", "/bucket/k", data=b"2"),
            await status_of(session, "PUT", "/bucket/k", data=b"3"),
            await status_of(session, "PUT", "/bucket/k", data=b"4"),  # max_faults reached
        ]
    assert statuses == [200, 200, 500, 500, 200]
    assert proxy.injected == {"error500": 2}


def test_the_same_seed_gives_the_same_faults_in_the_same_order() -> None:
    plan = plan_of(dict.fromkeys(FAULT_KINDS, 0.1), seed=7, slowdown_burst=1)
    methods = ["GET", "PUT", "HEAD"] * 100

    def faults(plan: FaultPlan) -> list[str | None]:
        schedule = FaultSchedule(plan)
        return [schedule.next(method) for method in methods]

    first = faults(plan)
    assert faults(plan) == first
    assert faults(FaultPlan(seed=8, slowdown=0.1)) != faults(FaultPlan(seed=7, slowdown=0.1))
    assert set(first) == {None, *FAULT_KINDS}


def test_probabilities_are_exclusive_so_their_sum_is_the_fault_rate() -> None:
    schedule = FaultSchedule(FaultPlan(slowdown=0.25, error500=0.25, truncate=0.5))
    faults = [schedule.next("GET") for _ in range(2000)]
    assert None not in faults
    assert 400 < faults.count("slowdown") < 600
    assert 800 < faults.count("truncate") < 1200


@pytest.mark.anyio
async def test_every_fault_kind_through_the_proxy_follows_the_schedule() -> None:
    plan = plan_of(
        dict.fromkeys(FAULT_KINDS, 1 / (len(FAULT_KINDS) + 1)), seed=3, stall_seconds=0.0
    )
    async with proxied(plan) as (proxy, _, session):
        for _ in range(30):
            with anyio.fail_after(5):
                try:
                    async with session.get("/bucket/big") as response:
                        await response.read()
                except aiohttp.ClientError:
                    pass
    schedule = FaultSchedule(plan)
    expected = [schedule.next("GET") for _ in proxy.log]
    assert [entry.fault for entry in proxy.log] == expected
    assert set(expected) == {None, *FAULT_KINDS}
    assert sum(proxy.injected.values()) == sum(kind is not None for kind in expected)
    intact = [entry.status for entry in proxy.log if entry.fault in (None, "stall")]
    assert set(intact) == {200}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"slowdown": 1.5},
        {"error500": -0.1},
        {"slowdown": 0.6, "truncate": 0.6},
        {"stall_seconds": -1.0},
        {"slowdown_burst": -1},
        {"max_faults": -1},
        {"skip_first": -2},
    ],
)
def test_impossible_plans_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FaultPlan(**kwargs)


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:8333",
        "https://127.0.0.1:8333",
        "http://10.0.0.1:8333",
        "http://127.0.0.1.nip.io:8333",
        "http://user:pw@127.0.0.1:8333",
        "http://127.0.0.1:8333/bucket",
        "http://127.0.0.1:99999",
        "127.0.0.1:8333",
    ],
)
def test_only_a_loopback_upstream_is_accepted(url: str) -> None:
    with pytest.raises(ValueError):
        FaultProxy(url)


def test_upstream_url_parsing() -> None:
    assert parse_upstream("http://127.0.0.1:8333") == (LOOPBACK, 8333)
    assert parse_upstream("http://127.0.0.1:8333/") == (LOOPBACK, 8333)
    assert parse_upstream("http://127.0.0.1") == (LOOPBACK, 80)


@pytest.mark.anyio
async def test_an_unreachable_upstream_is_a_502() -> None:
    async with upstream_server() as upstream:
        dead = upstream.url
    async with (
        FaultProxy(dead) as proxy,
        aiohttp.ClientSession() as session,
        session.get(f"{proxy.endpoint_url}/bucket/big") as response,
    ):
        assert response.status == 502
    assert proxy.log[0].status == 502


@pytest.mark.anyio
async def test_stop_ends_open_connections_and_stalled_responses() -> None:
    tasks_before = asyncio.all_tasks()
    async with upstream_server() as upstream:
        proxy = FaultProxy(upstream.url, FaultPlan(stall=1.0, stall_seconds=600))
        port = int((await proxy.start()).rsplit(":", 1)[1])
        with pytest.raises(RuntimeError):
            await proxy.start()
        idle = await anyio.connect_tcp(LOOPBACK, port)
        stalled = await anyio.connect_tcp(LOOPBACK, port)
        await stalled.send(b"GET /bucket/big HTTP/1.1\r\nHost: proxy\r\n\r\n")
        with anyio.fail_after(5):
            await upstream.arrived.wait()  # forwarded: the stall has begun
        assert "active=2" in repr(proxy)
        await proxy.stop()
        await proxy.stop()  # a second stop is harmless
        for stream in (idle, stalled):
            async with stream:
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await stream.receive()
        with pytest.raises(OSError):
            await anyio.connect_tcp(LOOPBACK, port)
    assert "not running" in repr(proxy) and "active=0" in repr(proxy)
    assert asyncio.all_tasks() <= tasks_before


# --------------------------------------------------------------------------- thread and CLI


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.anyio
async def test_running_serves_blocking_callers_from_a_daemon_thread() -> None:
    async with upstream_server() as upstream:
        proxy = FaultProxy(upstream.url, FaultPlan(slowdown=1.0, max_faults=1))
        with proxy.running() as url:
            assert url == proxy.endpoint_url
            threads = [t for t in threading.enumerate() if t.name == "faultproxy"]
            assert len(threads) == 1 and threads[0].daemon
            first = await anyio.to_thread.run_sync(fetch, f"{url}/bucket/big")
            second = await anyio.to_thread.run_sync(fetch, f"{url}/bucket/big")
        assert not threads[0].is_alive()
    assert first[0] == 503 and b"<Code>SlowDown</Code>" in first[1]
    assert second == (200, BIG)
    assert proxy.requests == 2


@pytest.mark.anyio
async def test_a_held_request_waits_unforwarded_until_released() -> None:
    async with upstream_server() as upstream:
        proxy = FaultProxy(upstream.url)
        held = proxy.hold(r"^/bucket/big\?partNumber=2&")
        with proxy.running() as url:
            part = f"{url}/bucket/big?partNumber=%d&x=1"
            passed = await anyio.to_thread.run_sync(fetch, part % 12)
            answers: list[tuple[int, bytes]] = []

            async def fetch_held() -> None:
                answers.append(await anyio.to_thread.run_sync(fetch, part % 2))

            async with anyio.create_task_group() as group:
                group.start_soon(fetch_held)
                assert await anyio.to_thread.run_sync(held.arrived.wait, 10)
                assert len(upstream.seen) == 1 and not answers  # only the first one went on
                held.release()
            later = await anyio.to_thread.run_sync(fetch, part % 2)
    assert passed == answers[0] == later == (200, BIG)
    assert len(upstream.seen) == 3


@pytest.mark.anyio
async def test_botocore_sees_slowdown_before_sending_its_body_then_succeeds() -> None:
    """botocore sends `Expect: 100-continue` with file-like bodies: an injected error is
    answered before the body, which botocore then does not send."""
    async with upstream_server() as upstream:
        proxy = FaultProxy(upstream.url, FaultPlan(slowdown=1.0, max_faults=1))
        with proxy.running() as url:
            client: Any = botocore.session.get_session().create_client(
                "s3",
                endpoint_url=url,
                region_name="us-east-1",
                aws_access_key_id="AKIDEXAMPLE",
                aws_secret_access_key="not-a-secret",
                config=Config(retries={"total_max_attempts": 1}),
            )

            def put() -> None:
                client.put_object(Bucket="bucket", Key="k", Body=io.BytesIO(BIG))

            with pytest.raises(ClientError) as caught:
                await anyio.to_thread.run_sync(put)
            await anyio.to_thread.run_sync(put)
            client.close()
    assert caught.value.response["Error"]["Code"] == "SlowDown"
    assert [(e.headers.get("expect"), e.body_bytes, e.status) for e in proxy.log] == [
        ("100-continue", 0, 503),
        ("100-continue", len(BIG), 200),
    ]
    assert "not-a-secret" not in repr(proxy.log)


@contextmanager
def cli_proxy(*args: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    with subprocess.Popen(
        [sys.executable, "-m", "tests.faultproxy", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            yield process.stdout.readline().strip(), process
        finally:
            if process.poll() is None:
                process.kill()


@pytest.mark.anyio
async def test_the_command_line_prints_its_url_then_a_json_summary() -> None:
    async with upstream_server() as upstream:
        args = ("--upstream", upstream.url, "--error500", "1", "--max-faults", "1", "--seed", "4")
        with cli_proxy(*args) as (url, process):
            assert url.startswith(f"http://{LOOPBACK}:")
            first = await anyio.to_thread.run_sync(fetch, f"{url}/bucket/big")
            second = await anyio.to_thread.run_sync(fetch, f"{url}/bucket/big")
            process.send_signal(signal.SIGINT)
            out, err = await anyio.to_thread.run_sync(process.communicate, None, 10)
    assert (first[0], second[0]) == (500, 200)
    assert process.returncode == 0, err
    assert json.loads(out) == {"requests": 2, "injected": {"error500": 1}}


def test_the_command_line_refuses_a_remote_upstream() -> None:
    with cli_proxy("--upstream", "http://192.0.2.1:80") as (first_line, process):
        assert first_line == ""
        assert process.wait(timeout=10) == 2

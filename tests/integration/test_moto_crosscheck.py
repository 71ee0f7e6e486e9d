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

from .helpers import read_object, write_tree


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


def test_upload_to_moto_matches_byte_for_byte(
    tmp_path: Path, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "moto",
        "AWS_SECRET_ACCESS_KEY": "moto",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client: Any = botocore.session.Session().create_client(
        "s3", endpoint_url=moto_endpoint, region_name="us-east-1"
    )
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

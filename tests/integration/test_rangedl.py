"""Large-object downloads against the real local S3 server: identical bytes, checksum and
If-Match enforced, and a download killed with SIGKILL continues where it stopped."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import anyio
import pytest

from s3xfer.budget import ByteBudget
from s3xfer.checksums import crc32_to_base64
from s3xfer.config import MiB
from s3xfer.errors import IntegrityError
from s3xfer.locals3 import LocalS3Info
from s3xfer.read.rangedl import (
    DownloadResult,
    PartialState,
    RangedDownload,
    download_ranges,
    sidecar_path,
)
from s3xfer.transport.retry import RetryPolicy
from s3xfer.transport.s3 import open_s3

from .helpers import connection

RANGE = 5 * MiB
KEY = "data/big.bin"


def put(client: Any, bucket: str, data: bytes) -> str:
    etag: str = client.put_object(Bucket=bucket, Key=KEY, Body=data)["ETag"]
    return etag


def partial_of(dest: Path) -> Path:
    """The test's partial file, in a staging directory of its own (download.py uses the
    destination's, destination.Staging)."""
    return dest.parent / ".staging" / f"{dest.name}.part"


def job(
    bucket: str, data: bytes, etag: str, dest: Path, *, crc: str | None = None
) -> RangedDownload:
    partial_of(dest).parent.mkdir(parents=True, exist_ok=True)
    return RangedDownload(
        bucket=bucket,
        key=KEY,
        size=len(data),
        etag=etag,
        dest=dest,
        partial=partial_of(dest),
        mtime_ns=1_500_000_000_000_000_000,
        mode=0o600,
        expected_crc32=crc if crc is not None else crc32_to_base64(zlib.crc32(data)),
    )


def download(info: LocalS3Info, target: RangedDownload, *, concurrency: int = 4) -> DownloadResult:
    async def main() -> DownloadResult:
        async with open_s3(connection(info), max_pool_connections=8) as s3:
            return await download_ranges(
                s3,
                target,
                range_size=RANGE,
                limiter=anyio.CapacityLimiter(concurrency),
                budget=ByteBudget(4 * RANGE),
                policy=RetryPolicy(max_attempts=3),
            )

    return anyio.run(main)


@pytest.fixture(scope="module")
def data() -> bytes:
    return random.Random(5).randbytes(23 * MiB)


def test_download_gives_identical_verified_bytes(
    local_s3: LocalS3Info, bucket: str, sync_s3_client: Any, data: bytes, tmp_path: Path
) -> None:
    etag = put(sync_s3_client, bucket, data)
    dest = tmp_path / "big.bin"
    result = download(local_s3, job(bucket, data, etag, dest))
    assert dest.read_bytes() == data
    assert result.crc32 == crc32_to_base64(zlib.crc32(data))
    assert (result.ranges_fetched, result.ranges_reused, result.bytes_fetched) == (5, 0, len(data))
    assert dest.stat().st_mtime_ns == 1_500_000_000_000_000_000
    assert dest.stat().st_mode & 0o7777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [".staging", "big.bin"]
    assert list((tmp_path / ".staging").iterdir()) == []


def test_a_wrong_expected_checksum_fails_and_leaves_no_file(
    local_s3: LocalS3Info, bucket: str, sync_s3_client: Any, data: bytes, tmp_path: Path
) -> None:
    etag = put(sync_s3_client, bucket, data)
    wrong = crc32_to_base64(zlib.crc32(data) ^ 0x80000000)
    with pytest.raises(IntegrityError, match=f"s3://{bucket}/{KEY}"):
        download(local_s3, job(bucket, data, etag, tmp_path / "big.bin", crc=wrong))
    assert list((tmp_path / ".staging").iterdir()) == [] and not (tmp_path / "big.bin").exists()


def test_an_object_replaced_after_it_was_listed_is_refused_then_downloaded_afresh(
    local_s3: LocalS3Info, bucket: str, sync_s3_client: Any, data: bytes, tmp_path: Path
) -> None:
    old_etag = put(sync_s3_client, bucket, data)
    dest = tmp_path / "big.bin"
    new = data[: 12 * MiB][::-1]
    new_etag = put(sync_s3_client, bucket, new)
    assert new_etag != old_etag
    # The listing (or catalog) still says the old ETag: S3 answers 412, nothing is kept.
    with pytest.raises(IntegrityError, match="replaced"):
        download(local_s3, job(bucket, data, old_etag, dest))
    assert list((tmp_path / ".staging").iterdir()) == [] and not dest.exists()
    result = download(local_s3, job(bucket, new, new_etag, dest))
    assert dest.read_bytes() == new and result.ranges_reused == 0


CHILD = """
import json, sys, time
import anyio
from pathlib import Path
from s3xfer.budget import ByteBudget
from s3xfer.read.rangedl import RangedDownload, download_ranges
from s3xfer.transport.retry import RetryPolicy
from s3xfer.transport.s3 import Connection, open_s3

args = json.loads(sys.argv[1])

async def main() -> None:
    async with open_s3(Connection(**args["connection"]), max_pool_connections=2) as s3:
        await download_ranges(
            s3,
            RangedDownload(
                **{
                    **args["job"],
                    "dest": Path(args["job"]["dest"]),
                    "partial": Path(args["job"]["partial"]),
                }
            ),
            range_size=args["range_size"],
            limiter=anyio.CapacityLimiter(1),
            budget=ByteBudget(2 * args["range_size"]),
            # A slow disk or link: gives the test time to kill mid-download.
            on_progress=lambda n: time.sleep(0.5),
            policy=RetryPolicy(max_attempts=3),
        )

anyio.run(main)
"""


def test_a_download_killed_with_sigkill_resumes_from_the_ranges_written(
    local_s3: LocalS3Info, bucket: str, sync_s3_client: Any, data: bytes, tmp_path: Path
) -> None:
    etag = put(sync_s3_client, bucket, data)
    dest = tmp_path / "big.bin"
    target = job(bucket, data, etag, dest)
    info = connection(local_s3)
    args = {
        "connection": {
            "endpoint_url": info.endpoint_url,
            "region": info.region,
            "access_key": info.access_key,
            "secret_key": info.secret_key,
        },
        "job": {
            "bucket": bucket,
            "key": KEY,
            "size": len(data),
            "etag": etag,
            "dest": str(dest),
            "partial": str(target.partial),
            "mtime_ns": None,
            "mode": None,
            "expected_crc32": target.expected_crc32,
        },
        "range_size": RANGE,
    }
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        done: frozenset[int] = frozenset()
        while not done and child.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):  # not written yet
                done = PartialState.from_json(sidecar_path(partial_of(dest)).read_text()).done
            time.sleep(0.01)
        assert child.poll() is None, f"finished before the kill: {child.communicate()}"
        assert done, "no range was recorded in time"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    assert not dest.exists() and partial_of(dest).exists()

    result = download(local_s3, target)
    assert dest.read_bytes() == data
    assert result.ranges_reused >= 1
    assert result.ranges_reused + result.ranges_fetched == 5
    assert result.bytes_fetched < len(data)
    assert not sidecar_path(partial_of(dest)).exists() and not partial_of(dest).exists()

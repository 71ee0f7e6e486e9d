"""Uploads and downloads through a proxy that injects faults (tests/faultproxy.py): 503
SlowDown bursts, 500s, connections reset mid-request and mid-response, truncated bodies and
stalled responses. Every byte must arrive verified, every fault must be retried and counted,
throttling must lower the request window, and a file out of attempts fails alone."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio

from s3xfer.config import MiB, TransferConfig
from s3xfer.dataset.keys import S3Url
from s3xfer.limits import RunLimits
from s3xfer.locals3 import LocalS3Info
from s3xfer.planning.plan import make_plan
from s3xfer.planning.survey import survey
from s3xfer.read.download import DownloadReport, download
from s3xfer.transport.s3 import Connection
from s3xfer.write.upload import UploadReport, upload
from tests.faultproxy import FaultPlan, FaultProxy

from ..integration.helpers import connection, write_tree

TREE: dict[str, int] = {
    **{f"big/{n}.bin": 11 * MiB + n for n in range(2)},
    **{f"loose/{n}.dat": 1200 * 1024 + n for n in range(12)},
    **{f"small/{n // 50}/{n}.txt": 2000 + n for n in range(400)},
}
CONFIG = TransferConfig(
    part_size=5 * MiB, multipart_threshold=8 * MiB, shard_size=5 * MiB, max_memory=64 * MiB
)
LIMITS = RunLimits(concurrency=8, max_memory=64 * MiB, max_attempts=10)
EVERY_FAULT = FaultPlan(
    seed=3,
    slowdown=0.06,
    slowdown_burst=2,
    error500=0.04,
    reset_request=0.04,
    reset_response=0.04,
    truncate=0.04,
    stall=0.02,
    stall_seconds=6.0,
    skip_first=1,  # the bucket check: its failure is reported at once, by design
)
# A download sends fewer, larger requests: fault more kinds of response bodies.
DOWNLOAD_FAULTS = dataclasses.replace(
    EVERY_FAULT, seed=5, slowdown=0.05, error500=0.03, reset_request=0.03,
    reset_response=0.06, truncate=0.06, stall=0.02,
)  # fmt: skip
STALL_TIMEOUT = 2.5  # the client gives up on a silent response after this long


def through(proxy: FaultProxy, info: LocalS3Info) -> Connection:
    return dataclasses.replace(
        connection(info), endpoint_url=proxy.endpoint_url, stall_timeout=STALL_TIMEOUT
    )


async def upload_through(
    plan: FaultPlan,
    src: Path,
    url: str,
    info: LocalS3Info,
    config: TransferConfig = CONFIG,
    limits: RunLimits = LIMITS,
) -> tuple[UploadReport, Counter[str]]:
    async with FaultProxy(info.endpoint_url, plan) as proxy:
        report = await upload(
            make_plan(survey(src), S3Url.parse(url), config), through(proxy, info), limits=limits
        )
        return report, proxy.injected


async def download_through(
    plan: FaultPlan, url: str, dest: Path, info: LocalS3Info
) -> tuple[DownloadReport, Counter[str]]:
    async with FaultProxy(info.endpoint_url, plan) as proxy:
        report = await download(
            S3Url.parse(url),
            dest,
            connection=through(proxy, info),
            limits=RunLimits(concurrency=8),
            range_size=1 * MiB,  # more requests to fault
        )
        return report, proxy.injected


def assert_same_tree(src: Path, out: Path) -> None:
    for rel in TREE:
        assert (out / rel).read_bytes() == (src / rel).read_bytes(), rel


def test_an_upload_and_a_download_survive_every_kind_of_fault(
    tmp_path: Path, local_s3: LocalS3Info, bucket: str
) -> None:
    src = tmp_path / "src"
    write_tree(src, TREE, seed=11)
    url = f"s3://{bucket}/ds"

    report, injected = anyio.run(upload_through, EVERY_FAULT, src, url, local_s3)

    assert report.ok, report.failures
    assert report.files_uploaded == len(TREE)
    assert set(injected) == {
        "slowdown", "error500", "reset_request", "reset_response", "truncate", "stall",
    }  # fmt: skip
    # An error answer or a stalled response fails its request for sure: one retry each. A
    # connection cut before the response may instead be resent at once by aiohttp itself
    # (RFC 9112 allows it for idempotent requests), unseen.
    certain = injected["slowdown"] + injected["error500"] + injected["stall"]
    assert certain <= report.retries <= sum(injected.values())
    assert report.throttled == injected["slowdown"]
    assert report.lowest_concurrency < LIMITS.concurrency  # the window came down

    out = tmp_path / "out"
    restored, injected = anyio.run(download_through, DOWNLOAD_FAULTS, url, out, local_s3)
    assert restored.ok, restored.failures
    assert restored.files_downloaded == len(TREE)
    assert injected["truncate"] + injected["reset_response"] > 0  # bodies cut short
    assert restored.retries >= injected["slowdown"] + injected["error500"] + injected["stall"]
    assert_same_tree(src, out)


def test_a_file_out_of_attempts_fails_alone_with_a_clear_message(
    tmp_path: Path, local_s3: LocalS3Info, bucket: str
) -> None:
    src = tmp_path / "src"
    write_tree(src, {f"f{n:02d}.bin": 1100 * 1024 for n in range(30)}, seed=5)
    config = dataclasses.replace(CONFIG, pack=False)
    limits = dataclasses.replace(LIMITS, max_attempts=3)
    # Five files answered 500 on every attempt; the rest of the run is not faulted.
    plan = FaultPlan(error500=1.0, targets=r"/p/f0[0-4]\.bin")

    report, injected = anyio.run(
        upload_through, plan, src, f"s3://{bucket}/p", local_s3, config, limits
    )

    assert report.files_failed == 5 and report.files_uploaded == 25
    assert sorted(path for path, _ in report.failures) == [f"f0{n}.bin" for n in range(5)]
    for _path, error in report.failures:
        assert "InternalError" in error and "\n" not in error
    assert injected["error500"] == 5 * 3  # each used all its attempts
    assert report.manifest_written  # what did arrive is catalogued


def test_throttling_alone_lowers_the_window_then_completes(
    tmp_path: Path, local_s3: LocalS3Info, bucket: str
) -> None:
    src = tmp_path / "src"
    write_tree(src, {f"f{n:03d}": 3000 for n in range(300)}, seed=2)
    config = dataclasses.replace(CONFIG, pack=False)
    limits = dataclasses.replace(LIMITS, concurrency=32)
    plan = FaultPlan(seed=4, slowdown=0.1, slowdown_burst=3, skip_first=2)

    report, injected = anyio.run(
        upload_through, plan, src, f"s3://{bucket}/t", local_s3, config, limits
    )

    assert report.ok and report.files_uploaded == 300
    assert report.throttled == injected["slowdown"] > 0
    assert report.lowest_concurrency <= 8  # halved at least twice from 32


def test_a_body_the_server_stops_taking_is_cut_and_sent_again(
    tmp_path: Path, local_s3: LocalS3Info, bucket: str
) -> None:
    # The proxy takes half of the first part, then stops reading for a minute: the client's
    # writes block (no read timeout can see that) until the body watchdog gives up on it.
    src = tmp_path / "src"
    contents = write_tree(src, {"big.bin": 100 * MiB}, seed=9)
    config = dataclasses.replace(CONFIG, part_size=64 * MiB, max_memory=128 * MiB)
    limits = RunLimits(concurrency=2, max_memory=128 * MiB)
    stall = FaultPlan(stall_request=1.0, stall_seconds=60.0, max_faults=1, targets=r"partNumber=1&")
    started = time.monotonic()

    report, injected = anyio.run(
        upload_through, stall, src, f"s3://{bucket}/w", local_s3, config, limits
    )

    assert injected == {"stall_request": 1}
    assert report.ok and report.files_uploaded == 1 and report.retries == 1
    assert time.monotonic() - started < 60  # cut by the watchdog, not by the proxy's reset
    out = tmp_path / "out"
    restored, _ = anyio.run(download_through, FaultPlan(), f"s3://{bucket}/w", out, local_s3)
    assert restored.ok and (out / "big.bin").read_bytes() == contents["big.bin"]


def test_a_listing_that_fails_is_asked_again(
    tmp_path: Path, local_s3: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    """Every listing (ListObjectsV2) answered 500 twice: the upload's look at the catalog
    pieces and the download of a plain prefix ask for the page again instead of failing."""
    src = tmp_path / "src"
    write_tree(src, {f"f{n}.txt": 100 + n for n in range(5)}, seed=8)
    url = f"s3://{bucket}/lists"
    first, _ = anyio.run(upload_through, FaultPlan(), src, url, local_s3)
    assert first.ok
    (src / "f0.txt").write_bytes(b"changed")  # the re-upload lists the catalog's pieces
    listings = FaultPlan(error500=1.0, max_faults=2, targets=r"list-type=2")

    again, injected = anyio.run(upload_through, listings, src, url, local_s3)

    assert again.ok, again.failures
    assert injected == {"error500": 2} and again.retries >= 2
    for n in range(3):
        sync_s3_client.put_object(Bucket=bucket, Key=f"plain/o{n}", Body=b"x" * n)
    out = tmp_path / "out"
    restored, injected = anyio.run(
        download_through, listings, f"s3://{bucket}/plain", out, local_s3
    )
    assert injected == {"error500": 2}
    assert restored.ok and restored.files_downloaded == 3 and restored.retries >= 2
    assert sorted(p.name for p in out.iterdir()) == ["o0", "o1", "o2"]

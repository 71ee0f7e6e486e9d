"""Requests in flight found during the transfer (issue 14): without --concurrency an upload
tunes them and says what it chose and why in --json; --concurrency N keeps N; a SlowDown
burst makes the tuner back off; the reads an upload starts with overlap. Through the real
CLI and the local server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from s3xfer.bench.netem import start_in_thread
from s3xfer.config import AUTO_CONCURRENCY_START
from s3xfer.locals3 import LocalS3Info
from tests.faultproxy import FaultPlan, FaultProxy

from .helpers import run_cli, write_tree

# Small files, one PUT each (--no-pack): what the requests in flight decide over a long path.
TREE = {f"d{n % 10}/f{n:04}.bin": 1024 for n in range(1500)}


@pytest.fixture
def env(s3_env: LocalS3Info, tmp_path: Path) -> dict[str, str]:
    return {"S3XFER_STATE_DIR": str(tmp_path / "state")}


@pytest.fixture
def long_path(local_s3: LocalS3Info) -> Iterator[str]:
    """The local server 500 ms of round trip away: AUTO_CONCURRENCY_START requests in flight
    move about 130 a second, twice as many 260, four times 520: within the server's reach
    even on a loaded machine."""
    host, port = local_s3.endpoint_url.removeprefix("http://").split(":")
    url, stop = start_in_thread(host, int(port), rtt=0.500)
    try:
        yield url
    finally:
        stop()


def upload(src: Path, dest: str, endpoint: str, env: dict[str, str], *flags: str) -> dict[str, Any]:
    result = run_cli(
        "upload",
        str(src),
        dest,
        "--no-pack",
        "--endpoint-url",
        endpoint,
        "--json",
        *flags,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["files_uploaded"] == len(TREE)
    return report


def test_without_concurrency_a_long_path_raises_requests_in_flight(
    long_path: str, env: dict[str, str], bucket: str, tmp_path: Path
) -> None:
    write_tree(tmp_path / "src", TREE)
    report = upload(tmp_path / "src", f"s3://{bucket}/auto", long_path, env)
    chosen = report["concurrency"]
    assert chosen["mode"] == "auto" and chosen["start"] == AUTO_CONCURRENCY_START
    # The first measured round doubles what it started with; a second step up is taken only
    # when throughput grew with it (500 ms away, twice as many in flight move twice as much).
    assert 2 * AUTO_CONCURRENCY_START < chosen["peak"] <= chosen["ceiling"], chosen
    assert chosen["reason"]
    assert "large" not in chosen  # no large request was sent: nothing tuned for them


def test_an_explicit_concurrency_stays_fixed(
    local_s3: LocalS3Info, env: dict[str, str], bucket: str, tmp_path: Path
) -> None:
    write_tree(tmp_path / "src", TREE)
    report = upload(tmp_path / "src", f"s3://{bucket}/fixed", local_s3.endpoint_url, env, "-c", "8")
    chosen = report["concurrency"]
    assert chosen["mode"] == "fixed"
    assert chosen["final"] == chosen["peak"] == chosen["lowest"] == 8 and chosen["backoffs"] == 0


def test_a_slowdown_burst_makes_the_tuner_back_off(
    local_s3: LocalS3Info, env: dict[str, str], bucket: str, tmp_path: Path
) -> None:
    write_tree(tmp_path / "src", TREE)
    plan = FaultPlan(
        seed=3,
        slowdown=0.02,
        slowdown_burst=10,
        skip_first=100,
        max_faults=40,
        methods=frozenset({"PUT"}),
    )
    with FaultProxy(local_s3.endpoint_url, plan).running() as endpoint:
        report = upload(tmp_path / "src", f"s3://{bucket}/throttled", endpoint, env)
    chosen = report["concurrency"]
    assert report["throttled"] > 0
    assert chosen["mode"] == "auto" and chosen["backoffs"] >= 1, chosen
    # Halved at least once, from wherever it had grown to by then.
    assert chosen["lowest"] < chosen["peak"] and chosen["lowest"] <= chosen["peak"] // 2


def test_an_upload_reads_the_manifest_and_the_catalog_state_at_once(
    local_s3: LocalS3Info, bucket: str, tmp_path: Path
) -> None:
    # The reads an upload starts with (the bucket check, the manifest, the catalog's root and
    # the listing of its pieces) overlap: over a long path they cost one round trip, not four.
    # The proxy holds the manifest's GET; the catalog root's GET must arrive meanwhile.
    write_tree(tmp_path / "src", {"a.txt": 10, "b/c.txt": 20})
    proxy = FaultProxy(local_s3.endpoint_url)
    manifest = proxy.hold(r"/\.s3xfer/manifest\.json\.gz$")
    root = proxy.hold(r"/\.s3xfer/catalog\.json$")
    env = {**os.environ, **local_s3.env(), "S3XFER_STATE_DIR": str(tmp_path / "state")}
    with proxy.running() as endpoint:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "s3xfer",
                "upload",
                str(tmp_path / "src"),
                f"s3://{bucket}/ds",
                "--endpoint-url",
                endpoint,
                "--json",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert manifest.arrived.wait(timeout=120), "the upload never read its manifest"
            overlapped = root.arrived.wait(timeout=30)  # an event, not a measured time
        finally:
            manifest.release()
            root.release()
            stdout, stderr = process.communicate(timeout=120)
    assert overlapped, "the catalog's root was read only after the manifest"
    assert process.returncode == 0, stderr
    assert json.loads(stdout)["files_uploaded"] == 2


def test_a_download_tunes_its_gets_too_and_keeps_an_explicit_concurrency(
    local_s3: LocalS3Info,
    long_path: str,
    env: dict[str, str],
    bucket: str,
    sync_s3_client: Any,
    tmp_path: Path,
) -> None:
    # A plain prefix (no manifest), one GET per object, as another tool leaves it.
    for name in TREE:
        sync_s3_client.put_object(Bucket=bucket, Key=f"plain/{name}", Body=b"x" * 1024)
    url = f"s3://{bucket}/plain"
    tuned = run_cli(
        "download", url, str(tmp_path / "tuned"), "--endpoint-url", long_path, "--json", env=env
    )
    assert tuned.returncode == 0, tuned.stderr
    report = json.loads(tuned.stdout)
    assert report["files_downloaded"] == len(TREE)
    chosen = report["concurrency"]
    assert chosen["mode"] == "auto"
    assert 2 * AUTO_CONCURRENCY_START < chosen["peak"] <= chosen["ceiling"], chosen
    fixed = run_cli(
        "download", url, str(tmp_path / "fixed"), "--endpoint-url", local_s3.endpoint_url,
        "--json", "-c", "8", env=env,
    )  # fmt: skip
    assert fixed.returncode == 0, fixed.stderr
    chosen = json.loads(fixed.stdout)["concurrency"]
    assert chosen["mode"] == "fixed" and chosen["final"] == chosen["peak"] == 8

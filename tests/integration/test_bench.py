"""`s3xfer bench` against the real local S3 server: the JSON it reports, that it leaves no
object or upload behind (also when interrupted), profiles, and the emulated round trip."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner

from s3xfer.bench.profiles import load_profile, profile_settings
from s3xfer.bench.settings import FULL, QUICK, BenchSettings
from s3xfer.bench.stats import MIB, Point, Recommendation
from s3xfer.bench.sweep import run_sweep
from s3xfer.cli import bench as benchcli
from s3xfer.dataset.keys import S3Url
from s3xfer.errors import NoSuchBucketError
from s3xfer.locals3 import LocalS3Info
from s3xfer.transport.s3 import open_s3

from .helpers import connection, list_keys

POINT_KEYS = {
    "op", "object_size", "concurrency", "seconds", "bytes", "objects", "errors", "retries",
    "latency", "ttfb", "mb_per_s", "objects_per_s", "stop", "last_error",
}  # fmt: skip
LATENCY_KEYS = {"p50", "p90", "p99", "max", "mean", "count"}


def bench(*args: str) -> dict[str, Any]:
    """Run the command in-process (s3_env points it at the local server); its JSON report."""
    result = CliRunner().invoke(benchcli.bench_command, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def nothing_left(client: Any, bucket: str) -> bool:
    uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return list_keys(client, bucket) == [] and uploads == []


def test_a_short_sweep_reports_every_point_cleans_up_and_saves_a_profile(
    s3_env: LocalS3Info,
    bucket: str,
    sync_s3_client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("S3XFER_HOME", str(tmp_path / "home"))
    csv_path = tmp_path / "points.csv"
    data = bench(
        f"s3://{bucket}/bench",
        "--ops", "put,get,range,multipart",
        "--sizes", "16KiB,5MiB",
        "--concurrency", "1,2,4",
        "--point-seconds", "0.3",
        "--max-seconds", "600",  # every point measured, however loaded the machine
        "--csv", str(csv_path),
        "--save", "lab",
    )  # fmt: skip

    assert data["format"] == 1 and data["kind"] == "s3xfer-bench"
    assert data["settings"]["sizes"] == [16 * 1024, 5 * MIB]
    assert data["emulated_path"] is None and data["skipped"] == []
    assert data["plan"]["estimate_seconds"] > 0 and data["seconds"] > 0
    points = data["points"]
    # put, get and range at both sizes; multipart only at 5 MiB (S3's smallest part).
    expected = {(op, size, c) for op in ("put", "get", "range") for size in (16384, 5 * MIB)
                for c in (1, 2, 4)} | {("multipart", 5 * MIB, c) for c in (1, 2, 4)}  # fmt: skip
    assert {(p["op"], p["object_size"], p["concurrency"]) for p in points} == expected
    for p in points:
        assert set(p) == POINT_KEYS
        assert set(p["latency"]) == LATENCY_KEYS
        assert p["errors"] == 0, p["last_error"]
        # Time-weighted: a request counts for the part of it inside the interval.
        assert (
            p["objects"] > 0
            and abs(p["bytes"] - p["objects"] * p["object_size"]) <= p["object_size"]
        )
        assert p["mb_per_s"] > 0 and p["latency"]["p50"] <= p["latency"]["p99"]
        assert p["stop"] in ("stable", "time")
        if p["op"] in ("get", "range"):
            assert set(p["ttfb"]) == LATENCY_KEYS
            assert 0 < p["ttfb"]["p50"] <= p["latency"]["max"]
        else:
            assert p["ttfb"] is None
        Point.from_json(p)  # the library reads back what the command wrote

    cleanup = data["cleanup"]
    assert cleanup["left_behind"] == 0 and cleanup["error"] is None
    assert cleanup["objects_deleted"] > 0
    assert nothing_left(sync_s3_client, bucket)

    assert len(csv_path.read_text().splitlines()) == 1 + len(points)
    recommendation = Recommendation.from_json(data["recommendation"])
    assert set(recommendation.concurrency) == {"put", "get", "range", "multipart"}
    assert data["profile"] == str(tmp_path / "home" / "profiles" / "lab.json")
    assert load_profile("lab") == recommendation
    upload = profile_settings("lab", command="upload")
    assert upload["concurrency"] in (1, 2, 4) and upload["part_size"] == 5 * MIB


def test_the_emulated_round_trip_shows_in_every_request(
    s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    data = bench(
        f"s3://{bucket}/far",
        "--ops", "put,get",
        "--sizes", "16KiB",
        "--concurrency", "1,4",
        "--point-seconds", "0.4",
        "--emulate-rtt", "20ms",
    )  # fmt: skip
    assert data["emulated_path"] == {
        "rtt_seconds": 0.02,
        "bandwidth_bytes_per_s": None,
        "link_bytes_per_s": None,
    }
    assert data["endpoint"] == s3_env.endpoint_url  # the server, not the proxy
    assert len(data["points"]) == 4
    for p in data["points"]:
        # Every request costs at least one round trip; without the proxy these take ~2 ms.
        assert p["latency"]["p50"] >= 0.020, p
        assert p["ttfb"] is None or p["ttfb"]["p50"] >= 0.020
    assert nothing_left(sync_s3_client, bucket)


def test_an_interrupted_sweep_still_deletes_its_objects_and_aborts_its_uploads(
    local_s3: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    settings = BenchSettings(
        url=S3Url(bucket, "interrupted"),
        ops=("multipart", "put"),
        sizes=(5 * MIB,),
        concurrencies=(4, 8),
        point_seconds=5.0,
    )

    async def main() -> bool:
        async with open_s3(connection(local_s3), max_pool_connections=8) as s3:
            # Cancelled in the middle of the first point, with parts and uploads in flight.
            with anyio.move_on_after(1.0) as scope:
                await run_sweep(s3, settings)
            return scope.cancelled_caught

    assert anyio.run(main)
    assert nothing_left(sync_s3_client, bucket)


def test_a_missing_bucket_is_one_clear_error_before_measuring(s3_env: LocalS3Info) -> None:
    result = CliRunner().invoke(
        benchcli.bench_command, ["s3://no-such-bucket-for-bench/x", "--ops", "put"]
    )
    assert isinstance(result.exception, NoSuchBucketError)
    assert "point" not in result.stdout  # no table was started


def test_an_emulated_link_caps_the_sum_of_every_connection(
    s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    data = bench(
        f"s3://{bucket}/link",
        "--ops", "put",
        "--sizes", "256KiB",
        "--concurrency", "1,8",
        "--point-seconds", "1.5",
        "--emulate-link", "4MB/s",
    )  # fmt: skip
    assert data["emulated_path"]["link_bytes_per_s"] == 4e6
    rates = {p["concurrency"]: p["mb_per_s"] for p in data["points"]}
    # Loopback alone gives hundreds of MB/s; through the link, 8 connections share 4 MB/s.
    assert rates[8] < 4.0 * 1.25 and rates[1] < 4.0 * 1.25
    assert nothing_left(sync_s3_client, bucket)


def test_the_default_run_is_the_one_minute_sweep_and_leaves_nothing(
    s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    data = bench(f"s3://{bucket}/default")
    settings = data["settings"]
    assert settings["max_seconds"] == QUICK.max_seconds == 60
    assert data["plan"]["estimate_seconds"] <= QUICK.max_seconds
    assert {p["concurrency"] for p in data["points"]} <= set(QUICK.concurrencies)
    assert data["points"] and data["recommendation"] is not None
    assert data["cleanup"]["left_behind"] == 0
    assert nothing_left(sync_s3_client, bucket)


def test_full_sweeps_every_concurrency_and_explicit_options_still_win(
    s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    data = bench(f"s3://{bucket}/full", "--full", "--ops", "put", "--sizes", "16KiB",
                 "--point-seconds", "0.3")  # fmt: skip
    assert data["settings"]["max_seconds"] == FULL.max_seconds
    assert data["settings"]["point_seconds"] == 0.3
    assert [p["concurrency"] for p in data["points"]] == list(FULL.concurrencies)
    assert nothing_left(sync_s3_client, bucket)


def burn_cpu(stop: Any) -> None:
    while not stop.is_set():
        sum(range(10_000))


def test_twenty_short_sweeps_under_cpu_load_each_leave_nothing(
    s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    # The cleanup once raced a write still in flight when a point ended, and a loaded machine
    # is where a late write comes latest: every sweep here runs beside two busy processes (as
    # many as this CI machine has cores), and each must leave no object and no upload.
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    burners = [context.Process(target=burn_cpu, args=(stop,), daemon=True) for _ in range(2)]
    for burner in burners:
        burner.start()
    try:
        for run in range(20):
            data = bench(
                f"s3://{bucket}/loop-{run}",
                "--ops", "put,multipart",  # the writes, whose late ones the cleanup must see
                "--sizes", "5MiB",
                "--concurrency", "4,16",
                "--point-seconds", "0.2",
                "--max-seconds", "600",  # every point measured, however loaded the machine
            )  # fmt: skip
            assert data["cleanup"]["left_behind"] == 0, run
            assert nothing_left(sync_s3_client, bucket), run
    finally:
        stop.set()
        for burner in burners:
            burner.join(timeout=10)

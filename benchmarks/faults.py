"""Reliability figures: faults injected, retries made, bytes re-sent after crashes, data lost.

    python benchmarks/faults.py [--no-write-docs]

Against a local SeaweedFS on 127.0.0.1, with a seeded mixed tree (large multipart files, loose
files, small packed files):

1. fault runs: the tree is uploaded, then downloaded, through tests/faultproxy.py injecting
   SlowDown bursts, 500s, resets, truncated bodies and stalls; every byte is compared;
2. crash runs: an upload is interrupted (SIGKILL during a multipart upload, during a shard,
   in the middle of a journal line; SIGTERM) through a slow path, then run again; the bytes
   the second run sends are compared with a fresh upload's, every byte is compared, and the
   bucket is checked for incomplete multipart uploads.

The results replace the section between the markers in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from docs_section import write_section

from s3xfer.bench.netem import start_in_thread
from s3xfer.config import MiB, TransferConfig
from s3xfer.dataset.keys import S3Url
from s3xfer.limits import RunLimits
from s3xfer.locals3 import LocalS3, LocalS3Info, sync_client
from s3xfer.planning.plan import make_plan
from s3xfer.planning.survey import survey
from s3xfer.read.download import download
from s3xfer.transport.s3 import Connection
from s3xfer.write.journal import journal_path
from s3xfer.write.upload import upload
from tests.faultproxy import FaultPlan, FaultProxy
from tests.faults.helpers import (
    Events,
    finished,
    interrupt_upload,
    part_of_a_large_file_sent,
    shard_in_flight_after_another_is_done,
)
from tests.integration.helpers import write_tree

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
START_MARKER = "<!-- fault-figures:start -->"
END_MARKER = "<!-- fault-figures:end -->"

TREE: dict[str, int] = {
    **{f"big/{n}.bin": 24 * MiB + n for n in range(2)},
    **{f"loose/{n}.dat": 1536 * 1024 + n for n in range(20)},
    **{f"small/{n // 200:02d}/{n:05d}.txt": 4000 + n % 8000 for n in range(3000)},
}
CONFIG = TransferConfig(part_size=5 * MiB, multipart_threshold=8 * MiB, shard_size=5 * MiB)
LIMITS = RunLimits(concurrency=8)
CLI_SIZES = ["--part-size", "5MiB", "--multipart-threshold", "8MiB", "--shard-size", "5MiB"]
FAULTS = FaultPlan(
    seed=2026,
    slowdown=0.05,
    slowdown_burst=2,
    error500=0.03,
    reset_request=0.03,
    reset_response=0.04,
    truncate=0.04,
    stall=0.01,
    stall_seconds=6.0,
    skip_first=1,
)
STALL_TIMEOUT = 2.5  # the client gives up on a silent response after this long


def connection(info: LocalS3Info, endpoint: str) -> Connection:
    return Connection(
        endpoint_url=endpoint,
        region=info.region,
        access_key=info.access_key,
        secret_key=info.secret_key,
        stall_timeout=STALL_TIMEOUT,
    )


def same_tree(src: Path, out: Path) -> int:
    """Files whose bytes differ or are missing (data lost)."""
    lost = 0
    for rel in TREE:
        target = out / rel
        lost += not target.exists() or target.read_bytes() != (src / rel).read_bytes()
    return lost


def fault_runs(info: LocalS3Info, src: Path, work: Path, client: Any) -> list[dict[str, Any]]:
    rows = []
    for name, plan in (("no faults", FaultPlan()), ("faults", FAULTS)):
        bucket = f"faults-{'clean' if plan == FaultPlan() else 'injected'}"
        client.create_bucket(Bucket=bucket)
        url = S3Url.parse(f"s3://{bucket}/ds")

        async def run(
            plan: FaultPlan = plan, url: S3Url = url, bucket: str = bucket, name: str = name
        ) -> dict[str, Any]:
            async with FaultProxy(info.endpoint_url, plan) as proxy:
                started = time.perf_counter()
                up = await upload(
                    make_plan(survey(src), url, CONFIG),
                    connection(info, proxy.endpoint_url),
                    state_dir=work / "state",
                    limits=LIMITS,
                )
                up_seconds = time.perf_counter() - started
                up_faults = dict(proxy.injected)
                proxy.injected.clear()
                started = time.perf_counter()
                down = await download(
                    url,
                    work / f"out-{bucket}",
                    connection=connection(info, proxy.endpoint_url),
                    limits=LIMITS,
                    range_size=4 * MiB,
                )
                return {
                    "run": name,
                    "upload_seconds": round(up_seconds, 2),
                    "upload_faults": up_faults,
                    "upload_retries": up.retries,
                    "throttled": up.throttled,
                    "lowest_concurrency": up.lowest_concurrency,
                    "upload_failed": up.files_failed,
                    "download_seconds": round(time.perf_counter() - started, 2),
                    "download_faults": dict(proxy.injected),
                    "download_retries": down.retries,
                    "download_failed": down.files_failed,
                }

        row = anyio.run(run)
        row["data_lost"] = same_tree(src, work / f"out-{bucket}")
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def crash_runs(info: LocalS3Info, src: Path, work: Path, client: Any) -> list[dict[str, Any]]:
    points: list[tuple[str, Callable[[Events], bool], signal.Signals, bool]] = [
        ("SIGKILL during a multipart upload", part_of_a_large_file_sent, signal.SIGKILL, False),
        ("SIGKILL during a shard", shard_in_flight_after_another_is_done, signal.SIGKILL, False),
        ("SIGKILL mid journal line", lambda events: finished(events) >= 2, signal.SIGKILL, True),
        ("SIGTERM during a multipart upload", part_of_a_large_file_sent, signal.SIGTERM, False),
    ]
    env = {**info.env(), "S3XFER_STATE_DIR": str(work / "crash-state")}
    host, port = info.endpoint_url.removeprefix("http://").split(":")

    def upload_json(dest: str) -> dict[str, Any]:
        result = subprocess.run(
            [sys.executable, "-m", "s3xfer", "upload", str(src), dest, *CLI_SIZES, "--json"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        report: dict[str, Any] = json.loads(result.stdout)
        return report

    client.create_bucket(Bucket="crash-fresh")
    fresh = upload_json("s3://crash-fresh/ds")["bytes_uploaded"]
    rows = []
    slow, stop = start_in_thread(host, int(port), bandwidth=4e6)
    try:
        for n, (name, condition, how, tear) in enumerate(points):
            bucket = f"crash-{n}"
            client.create_bucket(Bucket=bucket)
            dest = f"s3://{bucket}/ds"
            journal = journal_path(src, dest, state_dir=work / "crash-state")
            before = interrupt_upload(
                ["upload", str(src), dest, *CLI_SIZES, "--quiet"],
                env={**env, "AWS_ENDPOINT_URL": slow},
                journal=journal,
                condition=condition,
                how=how,
            )
            if tear:  # the last line cut in half, as a kill in the middle of its write leaves it
                raw = journal.read_bytes()
                last = raw.rstrip(b"\n").rfind(b"\n") + 1
                journal.write_bytes(raw[: last + (len(raw) - last) // 2])
            report = upload_json(dest)
            out = work / f"restored-{n}"
            subprocess.run(
                [sys.executable, "-m", "s3xfer", "download", dest, str(out), "--quiet"],
                env={**os.environ, **env},
                check=True,
            )
            left = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
            row = {
                "crash": name,
                "journal_events_at_crash": len(before),
                "fresh_bytes": fresh,
                "resent_bytes": report["bytes_uploaded"],
                "reused_part_bytes": report["bytes_reused"],
                "files_from_journal": report["files_from_journal"],
                "incomplete_uploads_left": len(left),
                "data_lost": same_tree(src, out),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        stop()
    return rows


def mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def render(faults: list[dict[str, Any]], crashes: list[dict[str, Any]]) -> str:
    files = len(TREE)
    total = sum(TREE.values())
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `python benchmarks/faults.py` on "
        f"{platform.machine()}, {os.cpu_count()} cores, SeaweedFS on 127.0.0.1. Tree: "
        f"{files:,} files, {mb(total)} (2 multipart files, 20 loose, 3,000 packed).",
        "",
        "**Injected faults** (tests/faultproxy.py, seed "
        f"{FAULTS.seed}; stall timeout {STALL_TIMEOUT:g} s):",
        "",
        "| run | upload s | faults injected (upload) | retries | throttled | lowest window "
        "| download s | faults injected (download) | retries | failed | data lost |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in faults:
        up = ", ".join(f"{k} {v}" for k, v in sorted(r["upload_faults"].items())) or "none"
        down = ", ".join(f"{k} {v}" for k, v in sorted(r["download_faults"].items())) or "none"
        lines.append(
            f"| {r['run']} | {r['upload_seconds']} | {up} | {r['upload_retries']} "
            f"| {r['throttled']} | {r['lowest_concurrency']} of {LIMITS.concurrency} "
            f"| {r['download_seconds']} | {down} | {r['download_retries']} "
            f"| {r['upload_failed'] + r['download_failed']} | {r['data_lost']} files |"
        )
    lines += [
        "",
        "**Crashes** (the upload interrupted through a 4 MB/s-per-connection path, then run "
        "again at full speed):",
        "",
        "| crash point | bytes re-sent | of a fresh upload | parts reused in place "
        "| files kept from the journal | incomplete uploads left | data lost |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in crashes:
        share = r["resent_bytes"] / r["fresh_bytes"]
        lines.append(
            f"| {r['crash']} | {mb(r['resent_bytes'])} | {share:.0%} "
            f"| {mb(r['reused_part_bytes'])} | {r['files_from_journal']:,} "
            f"| {r['incomplete_uploads_left']} | {r['data_lost']} files |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write-docs", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="s3xfer-faults-") as tmp:
        work = Path(tmp)
        src = work / "src"
        write_tree(src, TREE, seed=2026)
        server = LocalS3()
        info = server.start()
        try:
            client = sync_client(info)
            faults = fault_runs(info, src, work, client)
            crashes = crash_runs(info, src, work, client)
        finally:
            server.stop()
    section = render(faults, crashes)
    print(section)
    if not args.no_write_docs:
        write_section(DOC, section, start=START_MARKER, end=END_MARKER)


if __name__ == "__main__":
    main()

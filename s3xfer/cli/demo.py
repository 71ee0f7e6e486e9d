"""The end-to-end demo: a throwaway local S3, a generated dataset, survey → plan → upload,
a re-run that sends nothing, one file fetched out of its tar shard by one ranged GET, and a
short benchmark of the (emulated) network path.

Every step is a library call; this module only prints what each one returns.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import anyio

from ..bench.results import BenchResult, EmulatedPath
from ..bench.settings import BenchSettings
from ..bench.sweep import bench
from ..config import MiB, TransferConfig
from ..dataset.keys import S3Url
from ..locals3 import LocalS3
from ..planning.plan import Plan, make_plan
from ..planning.survey import survey
from ..read.reader import Dataset
from ..transport.s3 import Connection
from ..write.upload import UploadReport
from .render import render_plan, render_report, render_survey

BUCKET = "demo"


def make_dataset(root: Path, *, seed: int = 7) -> None:
    """Labels and thumbnails (small), a few medium files and one video (multipart)."""
    rng = random.Random(seed)
    for shard in range(20):
        for n in range(100):
            stem = root / "images" / f"{shard:02d}" / f"img_{shard * 100 + n:05d}"
            stem.parent.mkdir(parents=True, exist_ok=True)
            stem.with_suffix(".jpg").write_bytes(rng.randbytes(int(rng.lognormvariate(9, 0.8))))
            stem.with_suffix(".json").write_text(f'{{"label": {rng.randrange(10)}}}\n')
    (root / "models").mkdir(parents=True, exist_ok=True)
    for n in range(3):
        (root / "models" / f"checkpoint-{n}.bin").write_bytes(rng.randbytes(3 * MiB))
    (root / "video").mkdir(parents=True, exist_ok=True)
    (root / "video" / "drive.mp4").write_bytes(rng.randbytes(48 * MiB))


async def fetch_one(connection: Connection, dest: S3Url, path: str) -> tuple[bytes, str, int]:
    """Fetch one file: one small GET of its catalog piece (found from the path alone) and one
    ranged GET of its bytes inside a tar shard, CRC-checked."""
    async with Dataset(dest, connection=connection) as ds:
        record = await ds.stat(path)
        data = await ds.read(path)
        where = f"bytes {record.offset}-{record.offset + record.size - 1} of {record.key}"
        return data, where, ds.s3.requests


async def short_bench(connection: Connection, dest: S3Url) -> BenchResult:
    """A short `s3xfer bench`: 1 MiB PUTs and GETs at growing concurrency, behind a 20 ms
    emulated round trip so the curve has the shape a real path gives."""
    settings = BenchSettings(
        url=dest,
        ops=("put", "get"),
        sizes=(MiB,),
        concurrencies=(1, 4, 16),
        point_seconds=1.0,
        max_seconds=30,
    )
    return await bench(connection, settings, emulate=EmulatedPath(rtt=0.020))


def run_demo(
    print_line: Callable[[str], None],
    *,
    upload_with_progress: Callable[[Plan, Connection], UploadReport],
) -> None:
    """Run every step; `upload_with_progress` is the CLI's upload with its progress bar."""
    with tempfile.TemporaryDirectory(prefix="s3xfer-demo-") as tmp:
        workdir = Path(tmp)
        print_line("1. starting a local S3 server (SeaweedFS) on 127.0.0.1 …")
        with LocalS3(workdir / "s3", buckets=[BUCKET]) as info:
            print_line(f"   endpoint {info.endpoint_url}, bucket s3://{BUCKET}")
            connection = Connection(endpoint_url=info.endpoint_url, region=info.region)
            os.environ.update(info.env())  # the AWS_* credentials of this throwaway server
            src = workdir / "dataset"
            make_dataset(src)

            print_line("\n2. survey")
            result = survey(src)
            print_line(render_survey(result))

            print_line("\n3. plan")
            dest = S3Url(BUCKET, "dataset")
            plan = make_plan(result, dest, TransferConfig())
            print_line(render_plan(plan))

            print_line("\n4. upload")
            report = upload_with_progress(plan, connection)
            print_line(render_report(report))

            print_line("\n5. upload again: nothing changed, so nothing is sent")
            again = upload_with_progress(plan, connection)
            print_line(render_report(again))

            print_line(
                "\n6. fetch one file out of its tar shard with one ranged GET (CRC32-checked)"
            )
            path = "images/07/img_00742.jpg"
            started = time.perf_counter()
            data, where, requests = anyio.run(fetch_one, connection, dest, path)
            elapsed = (time.perf_counter() - started) * 1000
            same = data == (src / path).read_bytes()
            print_line(f"   {path}: {len(data):,} bytes = {where}")
            print_line(
                f"   {requests} requests (its catalog piece, then its bytes), {elapsed:.0f} ms, "
                f"identical to the source: {same}"
            )

            print_line("\n7. a short benchmark of the path (20 ms emulated round trip)")
            measured_path = anyio.run(short_bench, connection, S3Url(BUCKET, "bench"))
            for measured in measured_path.points:
                point = measured.point
                print_line(
                    f"   {point.op:<4} 1 MiB  concurrency {point.concurrency:>2}: "
                    f"{point.mb_per_s:7.1f} MB/s, p50 {point.latency.p50 * 1000:5.1f} ms, "
                    f"p99 {point.latency.p99 * 1000:5.1f} ms"
                )
            if measured_path.recommendation is not None:
                knees = measured_path.recommendation.concurrency
                print_line(
                    f"   recommended concurrency (knee + headroom): {knees}  — "
                    "`s3xfer bench --save NAME` keeps it for --bench-profile"
                )
            print_line("\ndone: the server and its data are removed.")

"""The end-to-end demo: a throwaway local S3, a generated dataset, survey → plan → upload,
a re-run that sends nothing, one file fetched by a ranged GET, and a short throughput probe.

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

from .checksums import crc32, crc32_to_base64
from .config import MiB, TransferConfig
from .errors import IntegrityError
from .keys import S3Url, manifest_key
from .locals3 import LocalS3
from .manifest import Manifest
from .plan import Plan, make_plan
from .render import render_plan, render_report, render_survey
from .s3 import Connection, open_s3
from .survey import survey
from .upload import UploadReport, upload

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


async def fetch_range(connection: Connection, dest: S3Url, path: str) -> tuple[bytes, int]:
    """One ranged GET of a file's bytes, checked against the manifest CRC32."""
    async with open_s3(connection, max_pool_connections=2) as s3:
        raw = await s3.get_object(dest.bucket, manifest_key(dest))
        record = Manifest.from_bytes(raw, where=str(dest)).records[path]
        data = await s3.get_object(dest.bucket, record.key, byte_range=f"bytes=0-{record.size - 1}")
        if crc32_to_base64(crc32(data)) != record.crc32:
            raise IntegrityError(f"{path}: CRC32 mismatch")
        return data, s3.requests


async def throughput_probe(connection: Connection, dest: S3Url, workdir: Path,
                           print_line: Callable[[str], None]) -> None:  # fmt: skip
    """PUT 1 MiB objects at growing concurrency: the shape of the curve `s3xfer bench` measures."""
    src = workdir / "probe"
    src.mkdir()
    for n in range(48):
        (src / f"obj{n:03d}").write_bytes(random.Random(n).randbytes(MiB))
    for concurrency in (1, 4, 16):
        config = TransferConfig(concurrency=concurrency)
        plan = make_plan(survey(src), S3Url(dest.bucket, f"{dest.prefix}/c{concurrency}"), config)
        report = await upload(plan, connection)
        rate = report.bytes_uploaded / 1e6 / report.seconds
        print_line(f"  concurrency {concurrency:>2}: {rate:7.1f} MB/s "
                   f"({report.files_uploaded / report.seconds:6.0f} objects/s)")  # fmt: skip


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

            print_line("\n6. fetch one file with one ranged GET, verified against its CRC32")
            path = "images/07/img_00742.jpg"
            started = time.perf_counter()
            data, requests = anyio.run(fetch_range, connection, dest, path)
            elapsed = (time.perf_counter() - started) * 1000
            same = data == (src / path).read_bytes()
            print_line(f"   {path}: {len(data):,} bytes in {requests} requests, {elapsed:.0f} ms, "
                       f"identical to the source: {same}")  # fmt: skip

            print_line("\n7. a short throughput probe (1 MiB PUTs)")
            anyio.run(throughput_probe, connection, S3Url(BUCKET, "probe"), workdir, print_line)
            print_line("\ndone: the server and its data are removed.")

"""Throughput against parallelism over an emulated 30 ms path, and whether `upload` at the
recommended concurrency gets what the sweep says the path can do.

    .venv/bin/python benchmarks/curve.py                  # writes docs/bench-curve.{md,png}
    .venv/bin/python benchmarks/curve.py --point-seconds 2 --repeat 1     # a quicker run

A local SeaweedFS on 127.0.0.1 sits behind the path emulator (s3xfer.bench.netem: 30 ms round
trip, and a link of 40 MB/s each way shared by every connection, so that throughput stops
growing with concurrency where the path, not this 2-core machine's CPU, is full). The
emulator runs in a process of its own, so the sweep (in this
process) and the `s3xfer upload` child go through the same path and neither shares its
interpreter with the proxy. The sweep is `s3xfer bench`'s engine: PUT of 1 MiB
objects at concurrency 1..64. Then `s3xfer upload --no-pack` sends 400 files of 1 MiB
through the path, with `--concurrency <knee>`, `--concurrency <best point>` and without
`--concurrency` (the tuner finds its own: issue 14; its choice is taken from the report), and
its own MB/s (bytes over the seconds in its report, which include checking the bucket,
reading the manifest and writing the catalog) is compared with the best point of the sweep.
The target is at least 90 %; the result is reported as measured, met or not.

    # the latency-only path, small objects: where requests in flight decide
    .venv/bin/python benchmarks/curve.py --link-mbps 0 --object-kib 16 --files 3000 \
        --concurrencies 16,32,64,128,256,512 --png docs/bench-curve-small.png --append
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import psutil

from s3xfer.bench.netem import PathEmulator
from s3xfer.bench.results import BenchResult, write_plot
from s3xfer.bench.settings import BenchSettings
from s3xfer.bench.stats import MIB, OP_PUT, Point, find_knee
from s3xfer.bench.sweep import bench
from s3xfer.config import format_size
from s3xfer.dataset.keys import S3Url
from s3xfer.locals3 import LocalS3, LocalS3Info
from s3xfer.transport.s3 import Connection

REPO = Path(__file__).resolve().parent.parent
DOCS_MD = REPO / "docs" / "bench-curve.md"
DOCS_PNG = REPO / "docs" / "bench-curve.png"
BUCKET = "curve"
SEED = 20240611
OBJECT_SIZE = 1 * MIB
CONCURRENCIES = (1, 2, 4, 8, 16, 32, 64)
TARGET = 0.90  # upload at the recommended concurrency vs the best point of the sweep


@dataclass(frozen=True)
class UploadRun:
    concurrency: int | None  # None: not given, tuned during the upload
    seconds: float  # as the upload report gives them
    wall_seconds: float  # the whole child process, start-up included
    bytes: int
    files: int
    choice: dict[str, Any]  # the report's `concurrency`: what was chosen and why

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def serve_proxy(upstream_port: int, rtt: float, link: float | None) -> None:
    """The emulator process: prints its endpoint URL, then relays until stdin closes."""

    async def main() -> None:
        async with PathEmulator("127.0.0.1", upstream_port, rtt=rtt, link_bandwidth=link) as path:
            print(path.endpoint_url, flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read)

    anyio.run(main, backend="asyncio")


def start_proxy(
    upstream_port: int, rtt: float, link_mbps: float
) -> tuple[str, subprocess.Popen[str]]:
    argv = [sys.executable, __file__, "--serve-proxy", str(upstream_port)]
    argv += ["--rtt-ms", str(rtt * 1000), "--link-mbps", str(link_mbps)]
    proxy = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proxy.stdout is not None
    endpoint_url = proxy.stdout.readline().strip()
    if not endpoint_url.startswith("http://127.0.0.1:"):
        proxy.kill()
        raise SystemExit(f"the path emulator did not start (it said {endpoint_url!r})")
    return endpoint_url, proxy


def stop_proxy(proxy: subprocess.Popen[str]) -> None:
    assert proxy.stdin is not None
    proxy.stdin.close()
    try:
        proxy.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proxy.kill()
        proxy.wait()


def run_sweep(
    endpoint_url: str,
    info: LocalS3Info,
    point_seconds: float,
    *,
    object_size: int,
    concurrencies: tuple[int, ...],
) -> BenchResult:
    settings = BenchSettings(
        url=S3Url(BUCKET, "sweep"),
        ops=(OP_PUT,),
        sizes=(object_size,),
        concurrencies=concurrencies,
        point_seconds=point_seconds,
        max_seconds=len(concurrencies) * (point_seconds * 4 + 5),
        seed=SEED,
    )
    connection = Connection(
        endpoint_url=endpoint_url,
        region=info.region,
        access_key=info.access_key,
        secret_key=info.secret_key,
    )

    async def main() -> BenchResult:
        return await bench(connection, settings)

    return anyio.run(main, backend="asyncio")


def make_files(root: Path, count: int, size: int) -> None:
    rng = random.Random(SEED)
    root.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        (root / f"f{n:04d}.bin").write_bytes(rng.randbytes(size))


def upload_once(
    source: Path, endpoint_url: str, info: LocalS3Info, *, concurrency: int | None, prefix: str
) -> UploadRun:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(info.env())
    env["AWS_ENDPOINT_URL"] = endpoint_url  # through the emulated path
    missing = source.parent / "no-aws-config"
    env["AWS_CONFIG_FILE"] = str(missing / "config")
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(missing / "credentials")
    argv = [
        sys.executable, "-m", "s3xfer", "upload", str(source), f"s3://{BUCKET}/{prefix}",
        "--no-pack", "--json",
    ]  # fmt: skip
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"s3xfer upload failed ({done.returncode}): {done.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(done.stdout)
    if report["files_failed"] or report["files_uploaded"] == 0:
        raise SystemExit(f"s3xfer upload did not upload every file: {report}")
    return UploadRun(
        concurrency=concurrency,
        seconds=float(report["seconds"]),
        wall_seconds=wall,
        bytes=int(report["bytes_uploaded"]),
        files=int(report["files_uploaded"]),
        choice=report.get("concurrency", {}),
    )


def median_run(runs: list[UploadRun]) -> UploadRun:
    return sorted(runs, key=lambda r: r.mb_per_s)[len(runs) // 2]


def machine() -> str:
    memory = psutil.virtual_memory().total / 2**30
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB "
        f"memory, Python {platform.python_version()}; load average at the start: {load}"
    )


def markdown(
    result: BenchResult,
    uploads: dict[int | None, UploadRun],
    *,
    recommended: int,
    best: Point,
    rtt_ms: float,
    link_mbps: float,
    object_size: int,
    files: int,
    repeat: int,
    machine_text: str,
    command: str,
    fixed_seconds: float,
    png_name: str,
    heading: str,
) -> str:
    size = format_size(object_size)
    ratio = uploads[None].mb_per_s / best.mb_per_s
    verdict = "met" if ratio >= TARGET else "NOT met"
    lines = [
        heading,
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `{command}` (benchmarks/curve.py).",
        f"Machine: {machine_text}.",
        "",
        f"SeaweedFS on 127.0.0.1 behind the s3xfer path emulator: {rtt_ms:g} ms round trip, "
        + (
            f"a {link_mbps:g} MB/s link each way shared by every connection (no cap per "
            "connection). "
            if link_mbps
            else "no bandwidth cap. "
        )
        + f"`s3xfer bench` engine, PUT of {size} objects; each point runs "
        f"until stable or {result.plan.point_seconds:g} s (warm-up excluded). "
        f"Knee: smallest concurrency within {result.settings.tolerance:.0%} of the best.",
        "",
        "| concurrency | MB/s | objects/s | p50 ms | p99 ms | stop |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    knee = find_knee([m.point for m in result.points], tolerance=result.settings.tolerance)
    for measured in result.points:
        p = measured.point
        labels = ((knee.concurrency, "knee"), (recommended, "recommended"))
        marks = [name for concurrency, name in labels if concurrency == p.concurrency]
        mark = f" **({', '.join(marks)})**" if marks else ""
        lines.append(
            f"| {p.concurrency}{mark} | {p.mb_per_s:.1f} | {p.objects_per_s:.1f} | "
            f"{p.latency.p50 * 1000:.1f} | {p.latency.p99 * 1000:.1f} | {measured.stop} |"
        )
    lines += [
        "",
        f"![throughput and p99 latency against concurrency]({png_name})",
        "",
        f"Knee: {knee.concurrency}. Recommended concurrency: **{recommended}** (the knee plus "
        "one measured step while still within the tolerance of the best: a real upload has "
        "gaps between requests that the sweep's steady stream has not; see docs/bench.md). "
        f"Best point of the sweep: {best.mb_per_s:.1f} MB/s at concurrency {best.concurrency}.",
        "",
        f"`s3xfer upload --no-pack` of {files} files × {size} through the same path "
        f"(median of {repeat}; MB/s = bytes over the seconds in the upload's report, which "
        "include checking the bucket, reading the manifest and writing the catalog); "
        "without `--concurrency` the upload tunes it (issue 14), and its report says what it "
        "chose (the median run's):",
        "",
        "| --concurrency | MB/s | vs best sweep point | seconds | wall seconds (with start-up) "
        "| MB/s without the fixed part |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for concurrency, run in sorted(uploads.items(), key=lambda item: item[0] or 10**6):
        if concurrency is None:
            c = run.choice
            label = (
                f"not given: tuned, {c.get('final')} at the end ({c.get('peak')} at most, "
                f"{c.get('backoffs')} backoffs; {c.get('reason')})"
            )
            large = c.get("large")
            if large:  # objects of 1 MiB or more: the large requests' tuner decides
                label += (
                    f"; large requests {large.get('final')} at the end ({large.get('peak')} at "
                    f"most; {large.get('reason')})"
                )
        elif concurrency == recommended:
            label = f"{concurrency} (recommended)"
        else:
            label = str(concurrency)
        moving = run.bytes / max(run.seconds - fixed_seconds, 1e-9) / 1e6
        lines.append(
            f"| {label} | {run.mb_per_s:.1f} | {run.mb_per_s / best.mb_per_s:.0%} | "
            f"{run.seconds:.2f} | {run.wall_seconds:.2f} | {moving:.1f} |"
        )
    lines += [
        "",
        f"The fixed part: an upload of one 1-byte file takes {fixed_seconds:.2f} s through the "
        "same path (checking the bucket, reading the manifest, writing the catalog: serial "
        "round trips that any upload pays, whatever its size). The last column subtracts it; "
        "it is context, not the measure of the target.",
        "",
        f"Target: upload with the concurrency it tunes itself reaches at least {TARGET:.0%} of "
        f"the best sweep throughput. Result: **{ratio:.0%} — {verdict}**.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rtt-ms", type=float, default=30.0)
    parser.add_argument("--point-seconds", type=float, default=5.0)
    parser.add_argument(
        "--link-mbps",
        type=float,
        default=40.0,
        help="capacity of the emulated link in MB/s each way, shared by all connections (0: none)",
    )
    parser.add_argument("--files", type=int, default=400)
    parser.add_argument("--object-kib", type=int, default=OBJECT_SIZE // 1024)
    parser.add_argument(
        "--concurrencies", default=",".join(map(str, CONCURRENCIES)), help="of the sweep"
    )
    parser.add_argument(
        "--append", action="store_true", help="add this path's section to --md, keep the rest"
    )
    parser.add_argument("--repeat", type=int, default=5, help="upload runs per concurrency")
    parser.add_argument("--serve-proxy", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--md", type=Path, default=DOCS_MD)
    parser.add_argument("--png", type=Path, default=DOCS_PNG)
    args = parser.parse_args()
    if args.serve_proxy is not None:
        serve_proxy(args.serve_proxy, args.rtt_ms / 1000, args.link_mbps * 1e6 or None)
        return
    command = "python benchmarks/curve.py " + " ".join(sys.argv[1:])
    machine_text = machine()
    object_size = args.object_kib * 1024
    concurrencies = tuple(int(c) for c in args.concurrencies.split(","))

    with tempfile.TemporaryDirectory(prefix="s3xfer-curve-") as work_dir:
        work = Path(work_dir)
        make_files(work / "files", args.files, object_size)
        with LocalS3(work / "server", buckets=[BUCKET]) as info:
            upstream_port = urlsplit(info.endpoint_url).port
            assert upstream_port is not None
            endpoint_url, proxy = start_proxy(upstream_port, args.rtt_ms / 1000, args.link_mbps)
            try:
                log(f"sweep: PUT {args.object_kib} KiB at {concurrencies}, {args.rtt_ms:g} ms RTT")
                result = run_sweep(
                    endpoint_url,
                    info,
                    args.point_seconds,
                    object_size=object_size,
                    concurrencies=concurrencies,
                )
                for measured in result.points:
                    p = measured.point
                    log(f"  c={p.concurrency:<3} {p.mb_per_s:8.1f} MB/s  {measured.stop}")
                if result.recommendation is None:
                    raise SystemExit("the sweep measured nothing")
                recommended = result.recommendation.concurrency[OP_PUT]
                best = max((m.point for m in result.points), key=lambda p: p.mb_per_s)
                # What any upload pays whatever its size (bucket check, manifest read,
                # catalog writes: serial round trips), to read the result below.
                (work / "one").mkdir()
                (work / "one" / "byte").write_bytes(b"x")
                fixed = statistics.median(
                    upload_once(
                        work / "one", endpoint_url, info, concurrency=recommended, prefix=f"one-{n}"
                    ).seconds
                    for n in range(args.repeat)
                )
                log(f"upload of one 1-byte file: {fixed:.2f} s")
                uploads: dict[int | None, UploadRun] = {}
                # The best point's concurrency too, to tell a knee set too low from upload's
                # own overhead when the target is missed; None: tuned by the upload itself.
                settings: list[int | None] = [*sorted({recommended, best.concurrency}), None]
                for concurrency in settings:
                    runs = [
                        upload_once(
                            work / "files",
                            endpoint_url,
                            info,
                            concurrency=concurrency,
                            prefix=f"upload-c{concurrency or 'auto'}-{n}",
                        )
                        for n in range(args.repeat)
                    ]
                    uploads[concurrency] = median_run(runs)
                    log(
                        f"upload --concurrency {concurrency or 'tuned'}: "
                        + ", ".join(f"{r.mb_per_s:.1f}" for r in runs)
                        + f" MB/s (median {statistics.median(r.mb_per_s for r in runs):.1f})"
                        + "".join(f"\n    {r.choice}" for r in runs if concurrency is None)
                    )
            finally:
                stop_proxy(proxy)
    args.png.parent.mkdir(parents=True, exist_ok=True)
    write_plot(
        [m.point for m in result.points],
        args.png,
        title=f"PUT {format_size(object_size)} over an emulated {args.rtt_ms:g} ms, "
        + (f"{args.link_mbps:g} MB/s path" if args.link_mbps else "uncapped path"),
        tolerance=result.settings.tolerance,
    )
    text = markdown(
        result,
        uploads,
        recommended=recommended,
        best=best,
        rtt_ms=args.rtt_ms,
        link_mbps=args.link_mbps,
        object_size=object_size,
        files=args.files,
        repeat=args.repeat,
        machine_text=machine_text,
        command=command.strip(),
        fixed_seconds=fixed,
        png_name=args.png.name,
        heading=(
            f"## {args.rtt_ms:g} ms, "
            + (f"{args.link_mbps:g} MB/s link" if args.link_mbps else "no bandwidth cap")
            + f": PUT of {format_size(object_size)}"
        ),
    )
    title = "# Throughput against parallelism over an emulated path\n\n"
    if args.append and args.md.exists():
        args.md.write_text(args.md.read_text().rstrip("\n") + "\n\n" + text)
    else:
        args.md.write_text(title + text)
    print(text)


if __name__ == "__main__":
    main()

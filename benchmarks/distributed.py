"""Distributed upload: one `s3xfer worker` against two and four, and a plain upload.

    python benchmarks/distributed.py [--repeat 2] [--no-write-docs]

A seeded ~300 MB mixed tree (large multipart files, loose single PUTs, small files packed
into shards) is uploaded to a local SeaweedFS on 127.0.0.1, each run to a fresh prefix:

- `single`: a plain `s3xfer upload` (no broker), for reference;
- `N workers` (1, 2, 4): N `s3xfer worker` processes on a local redis-server, already
  started and idle; the time is the producer's (`s3xfer upload ... --broker`), from start to
  exit: survey, plan, enqueue, the workers' uploads, the catalog.

Every run is checked: its report counts every file uploaded and none failed, and every
planned object is in the bucket at its size. Seconds are medians over --repeat runs (the
configurations take turns). CPU seconds are user + system of each process (producer,
workers, SeaweedFS, Redis) over the run. The results replace the section between the
markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from docs_section import write_section

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from s3xfer.config import MiB, TransferConfig
from s3xfer.dataset.keys import S3Url
from s3xfer.locals3 import LocalS3, sync_client
from s3xfer.planning.plan import FileUnit, ShardUnit, make_plan, work_units
from s3xfer.planning.survey import survey
from tests.integration.helpers import write_tree
from tests.integration.redis_server import RedisServer, find_redis_server

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
START_MARKER = "<!-- distributed-benchmarks:start -->"
END_MARKER = "<!-- distributed-benchmarks:end -->"
SECTION_TITLE = "## Distributed upload (Celery over Redis)"

TREE: dict[str, int] = {
    **{f"large/{n}.bin": 32 * MiB + n for n in range(6)},
    **{f"loose/{n:02d}.dat": 1536 * 1024 + n for n in range(40)},
    **{f"small/{n // 250:02d}/{n:05d}.txt": 4000 + (n * 7919) % 40000 for n in range(2000)},
}
# Shards of 16 MiB instead of 256 MiB: the small files make a few units, not one.
OPTIONS = ["--shard-size", "16MiB"]
CONFIG = TransferConfig(shard_size=16 * MiB)
WORKER_COUNTS = (1, 2, 4)


def log(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def cpu_seconds(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.Error:
        return float("nan")
    return float(times.user + times.system)


@dataclass
class Run:
    name: str
    seconds: float
    producer_cpu: float
    workers_cpu: float
    server_cpu: float
    redis_cpu: float
    report: dict[str, Any] = field(default_factory=dict)


class Bench:
    def __init__(self, work: Path, *, server: LocalS3, redis_server: RedisServer) -> None:
        self.work = work
        self.src = work / "src"
        self.server = server
        self.redis_server = redis_server
        self.info = server.start()
        self.broker = redis_server.start()
        self.client = sync_client(self.info)
        self.bucket = "bench"
        self.client.create_bucket(Bucket=self.bucket)
        self.env = {**os.environ, **self.info.env()}
        assert server.pid is not None and redis_server.process is not None
        self.server_process = psutil.Process(server.pid)
        self.redis_process = psutil.Process(redis_server.process.pid)
        self.runs = 0
        self.plan_units = 0

    def dataset(self) -> int:
        write_tree(self.src, TREE, seed=2026)
        total = 0
        for path in sorted(self.src.rglob("*")):
            if path.is_file():
                total += len(path.read_bytes())  # warm the page cache
        self.plan_units = len(work_units(*self._plan("x")))
        return total

    def _plan(self, prefix: str) -> tuple[list[FileUnit], list[ShardUnit]]:
        plan = make_plan(survey(self.src), S3Url(self.bucket, prefix), CONFIG)
        return plan.units, plan.shards

    def verify(self, prefix: str, report: dict[str, Any]) -> None:
        if report.get("files_failed") or report.get("files_uploaded") != len(TREE):
            raise SystemExit(f"{prefix}: bad report {json.dumps(report)[:500]}")
        units, shards = self._plan(prefix)
        expected = {u.key: u.size for u in units}
        expected |= {s.key: s.layout().size for s in shards}
        found: dict[str, int] = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix + "/"
        )
        for page in pages:
            found |= {o["Key"]: o["Size"] for o in page.get("Contents", [])}
        missing = {k: v for k, v in expected.items() if found.get(k) != v}
        if missing:
            raise SystemExit(f"{prefix}: {len(missing)} objects missing or of a wrong size")

    def upload(self, name: str, extra: list[str], workers: list[subprocess.Popen[bytes]]) -> Run:
        self.runs += 1
        prefix = f"run{self.runs:02d}-{name.replace(' ', '-')}"
        argv = [sys.executable, "-m", "s3xfer", "upload", str(self.src)]
        argv += [f"s3://{self.bucket}/{prefix}", *OPTIONS, *extra, "--json"]
        watched = [psutil.Process(w.pid) for w in workers]
        before = (
            sum(cpu_seconds(p) for p in watched),
            cpu_seconds(self.server_process),
            cpu_seconds(self.redis_process),
        )
        out = self.work / f"{prefix}.json"
        err = self.work / f"{prefix}.err"
        started = time.perf_counter()
        with out.open("wb") as stdout, err.open("wb") as stderr:
            producer = subprocess.Popen(argv, env=self.env, stdout=stdout, stderr=stderr)
            _pid, status, usage = os.wait4(producer.pid, 0)
        seconds = time.perf_counter() - started
        producer.returncode = os.waitstatus_to_exitcode(status)
        if producer.returncode != 0:
            raise SystemExit(f"{name}: exit {producer.returncode}: {err.read_text()[-2000:]}")
        report = json.loads(out.read_text())
        self.verify(prefix, report)
        return Run(
            name,
            seconds,
            usage.ru_utime + usage.ru_stime,
            sum(cpu_seconds(p) for p in watched) - before[0],
            cpu_seconds(self.server_process) - before[1],
            cpu_seconds(self.redis_process) - before[2],
            report,
        )

    def start_workers(self, count: int) -> list[subprocess.Popen[bytes]]:
        processes = []
        logs = []
        for n in range(count):
            path = self.work / f"worker-{count}-{n}.out"
            logs.append(path)
            with path.open("wb") as out, (self.work / f"worker-{count}-{n}.err").open("wb") as err:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "s3xfer", "worker", "--broker", self.broker],
                        env=self.env,
                        stdout=out,
                        stderr=err,
                    )
                )
        deadline = time.monotonic() + 60
        while not all(" ready: " in p.read_text() for p in logs):
            if time.monotonic() > deadline or any(w.poll() is not None for w in processes):
                raise SystemExit("the workers did not start")
            time.sleep(0.05)
        return processes

    def stop_workers(self, processes: list[subprocess.Popen[bytes]]) -> None:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)

    def run(self, name: str) -> Run:
        if name == "single":
            return self.upload(name, [], [])
        count = int(name.split()[0])
        workers = self.start_workers(count)
        try:
            return self.upload(name, ["--broker", self.broker], workers)
        finally:
            self.stop_workers(workers)


def render(
    runs: dict[str, list[Run]], *, total_bytes: int, units: int, repeat: int, seconds: float
) -> str:
    def median(name: str, attribute: str) -> float:
        return float(statistics.median(getattr(r, attribute) for r in runs[name]))

    memory = psutil.virtual_memory().total / 2**30
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    one = median("1 worker", "seconds")
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `python benchmarks/distributed.py` "
        f"(median of {repeat} runs each; {seconds:.0f} s in all).",
        "",
        f"- Machine: {os.cpu_count()} cores ({cpu_model}), {memory:.1f} GiB RAM, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        "- Everything on this one machine: SeaweedFS (`weed mini`) and redis-server on "
        "127.0.0.1, the producer and the workers (`s3xfer worker`, default settings: "
        "32 requests in flight per unit)",
        f"- Tree: {len(TREE):,} files, {total_bytes / 1e6:.0f} MB: 6 × 32 MiB (multipart), "
        "40 × 1.5 MiB (single PUTs), 2,000 small files of 4–44 KB (packed; `--shard-size "
        f"16MiB`); {units} work units",
        "",
        "| run | seconds | MB/s | speed-up over 1 worker | producer CPU s "
        "| workers CPU s | SeaweedFS CPU s | Redis CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ["single", *(f"{n} worker{'s' if n > 1 else ''}" for n in WORKER_COUNTS)]:
        secs = median(name, "seconds")
        speed_up = f"{one / secs:.2f}×" if name != "single" else "—"
        lines.append(
            f"| {name} | {secs:.2f} | {total_bytes / 1e6 / secs:.0f} | {speed_up} "
            f"| {median(name, 'producer_cpu'):.1f} | {median(name, 'workers_cpu'):.1f} "
            f"| {median(name, 'server_cpu'):.1f} | {median(name, 'redis_cpu'):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="runs of each configuration")
    parser.add_argument("--no-write-docs", action="store_true", help="print only")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="s3xfer-bench-distributed-") as tmp:
        work = Path(tmp)
        server = LocalS3(work / "s3")
        redis_dir = work / "redis"
        redis_dir.mkdir()
        redis_server = RedisServer(find_redis_server(), redis_dir)
        try:
            bench = Bench(work, server=server, redis_server=redis_server)
            total = bench.dataset()
            log(f"tree: {len(TREE):,} files, {total / 1e6:.0f} MB, {bench.plan_units} units")
            names = ["single", *(f"{n} worker{'s' if n > 1 else ''}" for n in WORKER_COUNTS)]
            runs: dict[str, list[Run]] = {name: [] for name in names}
            for round_ in range(args.repeat):
                order = names if round_ % 2 == 0 else names[::-1]
                for name in order:
                    run = bench.run(name)
                    runs[name].append(run)
                    log(
                        f"{name}: {run.seconds:.2f} s, workers "
                        f"{run.report.get('workers', '-')}, CPU producer {run.producer_cpu:.1f} "
                        f"workers {run.workers_cpu:.1f} server {run.server_cpu:.1f} "
                        f"redis {run.redis_cpu:.2f}"
                    )
        finally:
            redis_server.stop()
            server.stop()
    section = render(
        runs,
        total_bytes=total,
        units=bench.plan_units,
        repeat=args.repeat,
        seconds=time.perf_counter() - started,
    )
    print(section)
    if not args.no_write_docs:
        write_section(DOC, section, start=START_MARKER, end=END_MARKER, heading=SECTION_TITLE)
        log(f"written to {DOC}")


if __name__ == "__main__":
    main()

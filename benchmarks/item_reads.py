"""Per-item reads, as a training loop's `__getitem__` makes them: `SyncDataset.read(path)`
against a plain boto3 ranged GET of the same bytes of the same shard, from the same process,
one request at a time, interleaved so both see the same server and machine load.

    python benchmarks/item_reads.py s3://bench/PREFIX --reads 2000 [--emulate-rtt 30ms]

PREFIX is a packed s3xfer upload. The catalog pieces of the files read are fetched first
(warm, as in any epoch after the first few reads); then each round reads one random file
both ways, in an order that alternates which goes first. The endpoint and credentials come
from the environment (AWS_ENDPOINT_URL and the keys). `--emulate-rtt` puts the local delay
proxy (s3xfer/bench/netem.py, in a process of its own) in front of a loopback endpoint for both
readers.

Prints a markdown table of latency percentiles (ms) and reads per second, and with --json
the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from multiprocessing.connection import Connection as Connection_
from typing import Any
from urllib.parse import urlsplit

import boto3  # type: ignore[import-untyped]
from botocore.config import Config

from s3xfer import Connection, SyncDataset
from s3xfer.bench.netem import parse_duration, start_in_thread
from s3xfer.dataset.keys import S3Url


def serve_path(endpoint: str, rtt: str, ready: Connection_, stop: Any) -> None:
    upstream = urlsplit(endpoint)
    url, finish = start_in_thread(
        upstream.hostname or "127.0.0.1", upstream.port or 80, rtt=parse_duration(rtt)
    )
    ready.send(url)
    stop.wait()
    finish()


@contextmanager
def path_in_a_process(endpoint: str, rtt: str) -> Iterator[str]:
    """The delay proxy in a process of its own: in this one it would share the GIL with the
    readers, and its wake-ups would land in their latencies."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    stop = context.Event()
    proxy = context.Process(target=serve_path, args=(endpoint, rtt, send, stop), daemon=True)
    proxy.start()
    try:
        yield str(receive.recv())
    finally:
        stop.set()
        proxy.join(timeout=10)


def percentile(sorted_ms: list[float], fraction: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(fraction * len(sorted_ms)))]


def summary(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {
        "p50_ms": round(percentile(ms, 0.50), 3),
        "p90_ms": round(percentile(ms, 0.90), 3),
        "p99_ms": round(percentile(ms, 0.99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "reads_per_s": round(len(ms) / (sum(ms) / 1000), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--emulate-rtt", default=None, help="e.g. 30ms (loopback endpoint only)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    with ExitStack() as stack:
        if args.emulate_rtt:
            endpoint = stack.enter_context(path_in_a_process(endpoint, args.emulate_rtt))
        url = S3Url.parse(args.url)
        dataset = stack.enter_context(
            SyncDataset(url, connection=Connection(endpoint_url=endpoint))
        )
        client: Any = boto3.client(
            "s3", endpoint_url=endpoint, config=Config(max_pool_connections=4)
        )
        records = [r for r in dataset.ls() if r.packed]
        if not records:
            print(f"{args.url}: no packed files to read", file=sys.stderr)
            return 2
        picks = random.Random(args.seed).choices(records, k=args.reads)
        for record in {r.path: r for r in picks}.values():  # warm: catalog pieces cached
            dataset.stat(record.path)
        dataset.read(picks[0].path)
        client.get_object(Bucket=url.bucket, Key=picks[0].key, Range="bytes=0-0")["Body"].read()
        timings: dict[str, list[float]] = {"s3xfer": [], "boto3": []}

        def s3xfer_read(record: Any) -> None:
            start = time.perf_counter()
            body = dataset.read(record.path)
            timings["s3xfer"].append(time.perf_counter() - start)
            assert len(body) == record.size

        def boto3_read(record: Any) -> None:
            last = record.offset + record.size - 1
            start = time.perf_counter()
            answer = client.get_object(
                Bucket=url.bucket, Key=record.key, Range=f"bytes={record.offset}-{last}"
            )
            body = answer["Body"].read()
            timings["boto3"].append(time.perf_counter() - start)
            assert len(body) == record.size

        for n, record in enumerate(picks):
            first, second = (s3xfer_read, boto3_read) if n % 2 else (boto3_read, s3xfer_read)
            first(record)
            second(record)
    result = {
        "url": args.url,
        "reads": args.reads,
        "emulated_rtt": args.emulate_rtt,
        **{name: summary(values) for name, values in timings.items()},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        path = args.emulate_rtt or "loopback"
        print(f"{args.reads:,} warm reads of random packed files, round trip {path}")
        print("| reader | p50 ms | p90 ms | p99 ms | mean ms | reads/s |")
        print("|---|---:|---:|---:|---:|---:|")
        for name in ("s3xfer", "boto3"):
            s = result[name]
            print(
                f"| {name} | {s['p50_ms']} | {s['p90_ms']} | {s['p99_ms']} | {s['mean_ms']} "
                f"| {s['reads_per_s']} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One shuffled epoch read by N worker processes, as a DataLoader would: the loader that
benchmarks/run.py times for its epoch rows.

    python benchmarks/epoch_loader.py s3xfer s3://bench/PREFIX --workers 4 --seed 1
    python benchmarks/epoch_loader.py boto3 s3://bench/PREFIX --keys KEYS --workers 4 --seed 1

`s3xfer`: each worker (forked, as DataLoader's workers are on Linux, from a SyncDataset made
in the parent) iterates its share of `iter_epoch(seed, rank=worker, world_size=workers)` at
the defaults: blocks of neighbouring shard members, one GET each, shuffled in a buffer.

`boto3`: the relative paths in KEYS (one per line), shuffled with the seed and dealt to the
workers in turn, as DataLoader's map-style sampler does; each worker makes a boto3 client and
GETs one object per file, one after the other (a `__getitem__` that reads its object).

The endpoint and credentials come from the environment (AWS_ENDPOINT_URL and the keys).
Prints one JSON object: the files, with size and CRC32 (zlib) for the caller to check, and
the seconds from starting the workers to the last file (interpreter start-up not counted).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import time
import zlib
from collections.abc import Callable
from multiprocessing.queues import Queue
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from s3xfer.read.sync import SyncDataset

Seen = list[tuple[str, int, int]]  # (path, size, crc32) in the order read


def s3xfer_worker(dataset: SyncDataset, seed: int, worker: int, workers: int) -> Seen:
    seen: Seen = []
    with dataset:  # made in the parent, opened here on first use
        for path, data in dataset.iter_epoch(seed, rank=worker, world_size=workers):
            seen.append((path, len(data), zlib.crc32(data)))
    return seen


def boto3_worker(url: str, keys: list[str], worker: int, workers: int) -> Seen:
    import boto3  # type: ignore[import-untyped]  # (loaded by the parent already)

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    client = boto3.client("s3")  # per worker: a client does not survive fork
    seen: Seen = []
    for path in keys[worker::workers]:
        data = client.get_object(Bucket=bucket, Key=f"{prefix}/{path}")["Body"].read()
        seen.append((path, len(data), zlib.crc32(data)))
    return seen


def run_worker(target: Any, args: tuple[Any, ...], results: Queue[Any]) -> None:
    """In the worker: its files, or why it failed (the parent never waits for a dead one)."""
    try:
        results.put(target(*args))
    except BaseException as exc:
        results.put(f"{type(exc).__name__}: {exc}")
        raise


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("loader", choices=["s3xfer", "boto3"])
    parser.add_argument("url")
    parser.add_argument("--keys", type=Path, help="boto3: relative paths, one per line")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    context: Any = multiprocessing.get_context("fork")
    results: Queue[Any] = context.Queue()
    jobs: list[tuple[Callable[..., Seen], tuple[Any, ...]]]
    # Each loader's modules are imported in the parent, as a DataLoader's dataset is made
    # there before its workers fork.
    if args.loader == "s3xfer":
        from s3xfer.read.sync import SyncDataset
        from s3xfer.transport.s3 import Connection

        # As the CLI does (--endpoint-url, env AWS_ENDPOINT_URL): Connection() alone would not
        # know the endpoint, and would read through botocore instead of the lean GETs.
        dataset = SyncDataset(
            args.url, connection=Connection(endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
        )
        jobs = [(s3xfer_worker, (dataset, args.seed)) for _ in range(args.workers)]
    else:
        import boto3  # noqa: F401

        keys = args.keys.read_text().split("\n")
        keys = [k for k in keys if k]
        random.Random(args.seed).shuffle(keys)
        jobs = [(boto3_worker, (args.url, keys)) for _ in range(args.workers)]
    started = time.perf_counter()
    processes = [
        context.Process(target=run_worker, args=(target, (*fixed, n, args.workers), results))
        for n, (target, fixed) in enumerate(jobs)
    ]
    for process in processes:
        process.start()
    got = [results.get() for _ in processes]
    seconds = time.perf_counter() - started
    for process in processes:
        process.join()
    errors = [item for item in got if isinstance(item, str)]
    if errors:
        print(f"{len(errors)} worker(s) failed: {errors[0]}", file=sys.stderr)
        return 1
    shares: list[Seen] = got
    json.dump(
        {
            "loader": args.loader,
            "workers": args.workers,
            "seconds": round(seconds, 3),
            "files": sum(len(share) for share in shares),
            "bytes": sum(size for share in shares for _, size, _ in share),
            "seen": [item for share in shares for item in share],
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What per-file coding costs and saves (issue 16), against the local SeaweedFS server, runs
interleaved round by round so all see the same machine load:

- `encryption`: `s3xfer upload` and `download` of the `mixed` dataset (benchmarks/run.py's,
  random bytes) with and without `--encryption-key`, on loopback: client CPU.
- `compression`: a generated text dataset (JSON lines and CSV) uploaded over the 30 ms /
  40 MB/s path emulator by s3xfer (`--compress none`, `--compress auto`) and s5cmd: wall time
  and bytes stored; and `mixed` on loopback with `--compress auto` against `none`.

    python benchmarks/coding.py {encryption,compression} [--quick] [--rounds 3] [--work DIR]

Prints markdown tables of medians, and the load average before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (
    BUCKET,
    PATH_LINK,
    PATH_RTT,
    Measured,
    dataset_specs,
    ensure_dataset,
    find_binary,
    run_measured,
    s3_client,
    tool_env,
)

from s3xfer.bench.netem import start_in_thread
from s3xfer.locals3 import LocalS3, LocalS3Info


def s3xfer(*args: str) -> list[str]:
    return [sys.executable, "-m", "s3xfer", *args]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["encryption", "compression"])
    parser.add_argument("--quick", action="store_true", help="a tenth of the datasets")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "s3xfer-bench")
    options = parser.parse_args()
    work: Path = options.work
    work.mkdir(parents=True, exist_ok=True)
    if options.what == "compression":
        return compression(options.quick, options.rounds, work)
    spec = next(s for s in dataset_specs(quick=options.quick) if s.name == "mixed")
    dataset = ensure_dataset(spec, work)
    key = work / "coding-bench.key"
    key.write_bytes(os.urandom(32))
    load_before = os.getloadavg()
    results: dict[str, list[Measured]] = {}
    server_dir = Path(tempfile.mkdtemp(prefix="seaweedfs-", dir=work))
    try:
        with LocalS3(server_dir / "data", buckets=[BUCKET]) as info:
            env = tool_env(info, work)
            for round_ in range(options.rounds):
                for name, extra in (("plain", []), ("encrypted", ["--encryption-key", str(key)])):
                    url = f"s3://{BUCKET}/coding-{name}-{round_}"
                    logs = work / "logs" / f"coding-{name}-{round_}"
                    up = run_measured(
                        s3xfer("upload", str(dataset.root), url, "--quiet", "--json", *extra),
                        env=env,
                        log_dir=logs / "upload",
                    )
                    if up.returncode != 0:
                        raise SystemExit(f"{name} upload failed: {up.stderr[-500:]}")
                    dest = work / "coding-restore"
                    shutil.rmtree(dest, ignore_errors=True)
                    down = run_measured(
                        s3xfer("download", url, str(dest), "--quiet", "--json", *extra),
                        env=env,
                        log_dir=logs / "download",
                    )
                    if down.returncode != 0:
                        raise SystemExit(f"{name} download failed: {down.stderr[-500:]}")
                    shutil.rmtree(dest, ignore_errors=True)
                    results.setdefault(f"upload {name}", []).append(up)
                    results.setdefault(f"download {name}", []).append(down)
    finally:
        shutil.rmtree(server_dir, ignore_errors=True)
    load_after = os.getloadavg()
    size_mb = dataset.total_bytes / 1e6
    print(f"`mixed`: {dataset.count:,} files, {size_mb:,.0f} MB; {options.rounds} rounds, medians")
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f}\n")
    print("| run | wall s | client CPU s | CPU vs plain |")
    print("|---|---|---|---|")
    for op in ("upload", "download"):
        plain_cpu = statistics.median(m.cpu_seconds for m in results[f"{op} plain"])
        for name in ("plain", "encrypted"):
            runs = results[f"{op} {name}"]
            wall = statistics.median(m.seconds for m in runs)
            cpu = statistics.median(m.cpu_seconds for m in runs)
            print(f"| {op} {name} | {wall:.2f} | {cpu:.2f} | {cpu / plain_cpu:.2f}× |")
    return 0


def text_dataset(work: Path, *, total: int) -> tuple[Path, int, int]:
    """Seeded JSON lines and CSV files of 4 KiB to 2 MiB, `total` bytes in all (made once)."""
    root = work / "datasets" / f"text-{total}"
    marker = root.with_name(root.name + ".complete")
    rng = random.Random(16)
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        written = index = 0
        while written < total:
            size = min(int(rng.lognormvariate(10.5, 1.3)), 2 * 1024 * 1024, total - written)
            lines: list[str] = []
            length = 0
            csv = index % 4 == 0
            while length < size:
                n = rng.randrange(10**9)
                line = (
                    f"{n},{rng.choice(WORDS)},{rng.random():.6f},{n % 97}\n"
                    if csv
                    else json.dumps({"id": n, "user": rng.choice(WORDS), "score": rng.random(),
                                     "tags": rng.sample(WORDS, 3), "ok": n % 3 == 0}) + "\n"
                )  # fmt: skip
                lines.append(line)
                length += len(line)
            path = root / f"d{index % 20:02d}" / f"part-{index:05d}.{'csv' if csv else 'jsonl'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            data = "".join(lines).encode()[:size]
            path.write_bytes(data)
            written += len(data)
            index += 1
        marker.touch()
    files = [p for p in root.rglob("*") if p.is_file()]
    return root, len(files), sum(p.stat().st_size for p in files)


WORDS = [f"word{n}" for n in range(500)] + ["alpha", "beta", "gamma", "delta", "ünïcødé"]


def stored_bytes(info: LocalS3Info, prefix: str) -> int:
    """What the server holds for a dataset: files' objects and shards, not s3xfer's index."""
    client = s3_client(info)
    total = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            key = item["Key"]
            if "/.s3xfer/" not in key or key.endswith(".tar"):
                total += int(item["Size"])
    return total


def compression(quick: bool, rounds: int, work: Path) -> int:
    root, count, size = text_dataset(work, total=(100 if quick else 1000) * 1000 * 1000)
    spec = next(s for s in dataset_specs(quick=quick) if s.name == "mixed")
    mixed = ensure_dataset(spec, work)
    s5cmd = find_binary("s5cmd")
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    stored: dict[str, int] = {}
    server_dir = Path(tempfile.mkdtemp(prefix="seaweedfs-", dir=work))
    try:
        with LocalS3(server_dir / "data", buckets=[BUCKET]) as info:
            host, port = info.endpoint_url.removeprefix("http://").split(":")
            far_url, stop = start_in_thread(host, int(port), rtt=PATH_RTT, link_bandwidth=PATH_LINK)
            far = tool_env(dataclasses.replace(info, endpoint_url=far_url), work)
            near = tool_env(info, work)
            try:
                for round_ in range(rounds):
                    runs: list[tuple[str, list[str], dict[str, str], str]] = []
                    for mode in ("none", "auto"):
                        prefix = f"text-{mode}-{round_}"
                        argv = s3xfer("upload", str(root), f"s3://{BUCKET}/{prefix}", "--quiet",
                                      "--compress", mode)  # fmt: skip
                        runs.append((f"text, s3xfer --compress {mode}", argv, far, prefix))
                        prefix = f"mixed-{mode}-{round_}"
                        argv = s3xfer("upload", str(mixed.root), f"s3://{BUCKET}/{prefix}",
                                      "--quiet", "--compress", mode)  # fmt: skip
                        runs.append((f"mixed, s3xfer --compress {mode}", argv, near, prefix))
                    if s5cmd is not None:
                        prefix = f"text-s5cmd-{round_}"
                        argv = [str(s5cmd), "--endpoint-url", far_url, "cp", f"{root}/",
                                f"s3://{BUCKET}/{prefix}/"]  # fmt: skip
                        runs.append(("text, s5cmd", argv, far, prefix))
                    for name, argv, env, prefix in runs:
                        logs = work / "logs" / f"coding-{prefix}"
                        measured = run_measured(argv, env=env, log_dir=logs)
                        if measured.returncode != 0:
                            raise SystemExit(f"{name} failed: {measured.stderr[-500:]}")
                        times.setdefault(name, []).append(measured.seconds)
                        cpu.setdefault(name, []).append(measured.cpu_seconds)
                        stored[name] = stored_bytes(info, prefix + "/")
            finally:
                stop()
    finally:
        shutil.rmtree(server_dir, ignore_errors=True)
    load_after = os.getloadavg()
    print(f"text: {count:,} files, {size / 1e6:,.0f} MB, over {PATH_RTT * 1e3:g} ms and "
          f"{PATH_LINK / 1e6:g} MB/s; mixed: {mixed.count:,} files, "
          f"{mixed.total_bytes / 1e6:,.0f} MB on loopback; {rounds} rounds, medians")  # fmt: skip
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f}\n")
    print("| upload | wall s | client CPU s | stored MB |")
    print("|---|---|---|---|")
    for name in times:
        wall = statistics.median(times[name])
        print(f"| {name} | {wall:.2f} | {statistics.median(cpu[name]):.2f} | "
              f"{stored[name] / 1e6:,.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What client-side encryption costs (issue 16): `s3xfer upload` and `download` of the `mixed`
dataset (benchmarks/run.py's, random bytes) with and without `--encryption-key`, against the
local SeaweedFS server, interleaved round by round so both see the same machine load.

    python benchmarks/coding.py [--quick] [--rounds 3] [--work DIR]

Prints a markdown table: median wall seconds and client CPU seconds (user + system of the
s3xfer process, from wait4), each side's ratio, and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (
    BUCKET,
    Measured,
    dataset_specs,
    ensure_dataset,
    run_measured,
    tool_env,
)

from s3xfer.locals3 import LocalS3


def s3xfer(*args: str) -> list[str]:
    return [sys.executable, "-m", "s3xfer", *args]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the dataset")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "s3xfer-bench")
    options = parser.parse_args()
    work: Path = options.work
    work.mkdir(parents=True, exist_ok=True)
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


if __name__ == "__main__":
    raise SystemExit(main())

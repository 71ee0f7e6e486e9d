"""Benchmark: survey a tree of N small files, reporting wall time and the child's peak RSS.

    .venv/bin/python benchmarks/survey_million.py --files 1000000 --dir /tmp/survey-million

The tree (N / 1000 directories of up to 1000 files, a few bytes each) is created only when
absent, so reruns measure the walk with a warm page cache. Each survey runs in a fresh child
process so its peak RSS is the survey's alone; the result is printed as a markdown snippet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

FILES_PER_DIR = 1000
MARKER = ".survey-million-complete"


def build_tree(root: Path, files: int) -> float:
    """Create `files` small files under `root` unless a complete tree is already there."""
    if (root / MARKER).exists() and (root / MARKER).read_text() == str(files):
        return 0.0
    if root.exists():
        shutil.rmtree(root)
    started = time.perf_counter()
    root.mkdir(parents=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for first in range(0, files, FILES_PER_DIR):
        directory = root / f"d{first // FILES_PER_DIR:05d}"
        directory.mkdir()
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for index in range(first, min(first + FILES_PER_DIR, files)):
                fd = os.open(f"f{index:07d}", flags, 0o644, dir_fd=dir_fd)
                try:
                    # Sizes 0..63 bytes: a few histogram bins, some empty files.
                    os.write(fd, b"x" * (index % 64))
                finally:
                    os.close(fd)
        finally:
            os.close(dir_fd)
    # A dot-file sorts first and is one more file in the survey; the count accounts for it.
    (root / MARKER).write_text(str(files))
    return time.perf_counter() - started


def child(root: Path, *, keep_files: bool) -> None:
    """Run in the child process: survey and print one JSON line."""
    from s3xfer.planning.survey import survey  # imported here so the parent stays small

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    result = survey(root, keep_files=keep_files)
    seconds = time.perf_counter() - started
    # Read while `result` is alive: ru_maxrss is this process's peak (KiB on Linux).
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "files": result.stats.count,
                "kept": len(result.files),
                "bytes": result.stats.total_bytes,
                "problems": len(result.problems),
                "baseline_rss_kib": rss_before,
                "peak_rss_kib": usage.ru_maxrss,
                "cpu_seconds": usage.ru_utime + usage.ru_stime,
            }
        )
    )


def measure(root: Path, *, keep_files: bool) -> dict[str, float]:
    """Survey `root` in a fresh child process, so the peak RSS it reports is the survey's."""
    command = [sys.executable, __file__, "--child", "--dir", str(root)]
    if not keep_files:
        command.append("--no-keep-files")
    started = time.perf_counter()
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    report: dict[str, float] = json.loads(completed.stdout)
    report["wall_seconds"] = wall
    return report


def markdown(files: int, build_seconds: float, runs: dict[str, dict[str, float]]) -> str:
    lines = [
        f"Survey of {files:,} files ({files // FILES_PER_DIR:,} dirs × {FILES_PER_DIR:,}), "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, warm page cache"
        + (f"; tree built in {build_seconds:.1f} s" if build_seconds else "")
        + ".",
        "",
        "| keep_files | files | survey time (s) | process wall (s) | CPU (s) | peak RSS (MiB) "
        "| RSS before survey (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, run in runs.items():
        lines.append(
            f"| {label} | {int(run['files']):,} | {run['seconds']:.2f} | "
            f"{run['wall_seconds']:.2f} | {run['cpu_seconds']:.2f} | "
            f"{run['peak_rss_kib'] / 1024:.0f} | {run['baseline_rss_kib'] / 1024:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/s3xfer-survey-million"))
    parser.add_argument("--cleanup", action="store_true", help="delete the tree afterwards")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-keep-files", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        child(args.dir, keep_files=not args.no_keep_files)
        return

    build_seconds = build_tree(args.dir, args.files)
    runs = {
        "False": measure(args.dir, keep_files=False),
        "True": measure(args.dir, keep_files=True),
    }
    for run in runs.values():
        expected = args.files + 1  # the marker file
        if int(run["files"]) != expected:
            raise SystemExit(f"expected {expected} files, surveyed {int(run['files'])}")
    print(markdown(args.files, build_seconds, runs))
    if args.cleanup:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()

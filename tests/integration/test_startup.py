"""Start-up: the commands that read a dataset through the lean paths (an endpoint and
credentials in the environment) never import botocore's client machinery or aiohttp, which
cost about 0.3 s before the first byte, nor the planner, the upload engine, the benchmark,
anyio's blocking portal (SyncDataset's) or tqdm (with no terminal to draw on); the commands
that need them still work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from s3xfer.config import MiB
from s3xfer.locals3 import LocalS3Info

from .helpers import run_cli, write_tree

HEAVY = (
    "aiobotocore",
    "botocore.client",
    "aiohttp",
    "s3xfer.planning.plan",
    "s3xfer.write.engine",
    "s3xfer.write.upload",
    "s3xfer.bench.sweep",
    "tqdm",
    "anyio.from_thread",
)

# Runs the CLI in this interpreter, then reports which of HEAVY it imported.
CHILD = """
import sys
from s3xfer.cli.main import main
sys.argv = ["s3xfer", *sys.argv[1:]]
try:
    main()
except SystemExit as exit:
    code = exit.code
else:
    code = 0
heavy = [name for name in {heavy!r} if name in sys.modules]
print("HEAVY=" + ",".join(heavy), "CODE=" + str(code), file=sys.stderr)
"""


def run_and_report(*args: str) -> tuple[subprocess.CompletedProcess[bytes], str, str]:
    """The finished child, the HEAVY modules it imported (comma-separated), its exit code."""
    result = subprocess.run(
        [sys.executable, "-c", CHILD.format(heavy=HEAVY), *args],
        capture_output=True,
        timeout=120,
    )
    last = result.stderr.decode(errors="replace").strip().splitlines()[-1]
    heavy, code = last.split(" ")
    return result, heavy.removeprefix("HEAVY="), code.removeprefix("CODE=")


def test_cat_ls_get_and_a_restore_of_large_objects_load_only_what_they_use(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    contents = write_tree(tmp_path / "src", {"big.bin": 20 * MiB, "small/a.txt": 300})
    url = f"s3://{bucket}/lean"
    uploaded = run_cli("upload", str(tmp_path / "src"), url, "--quiet")
    assert uploaded.returncode == 0, uploaded.stderr

    cat, heavy, code = run_and_report("cat", url, "small/a.txt")
    assert (code, heavy) == ("0", ""), cat.stderr
    assert cat.stdout == contents["small/a.txt"]

    listed, heavy, code = run_and_report("ls", url)
    assert (code, heavy) == ("0", ""), listed.stderr
    assert b"big.bin" in listed.stdout and b"small/a.txt" in listed.stdout

    got, heavy, code = run_and_report("get", url, "small/*", str(tmp_path / "got"))
    assert (code, heavy) == ("0", ""), got.stderr
    assert (tmp_path / "got/small/a.txt").read_bytes() == contents["small/a.txt"]

    restored, heavy, code = run_and_report(
        "download", url, str(tmp_path / "out"), "--include", "big.bin", "--quiet"
    )
    assert (code, heavy) == ("0", ""), restored.stderr
    assert (tmp_path / "out/big.bin").read_bytes() == contents["big.bin"]


def test_a_plain_prefix_lists_and_downloads_without_botocore(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    sync_s3_client.put_object(Bucket=bucket, Key="plain/x.txt", Body=b"x")
    restored, heavy, code = run_and_report(
        "download", f"s3://{bucket}/plain", str(tmp_path / "out"), "--quiet"
    )
    assert (code, heavy) == ("0", ""), restored.stderr  # ListObjectsV2 goes through the transport
    assert (tmp_path / "out/x.txt").read_bytes() == b"x"

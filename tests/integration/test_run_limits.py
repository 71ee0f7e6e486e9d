"""The run limits of the commands that transfer (upload, download, cat, get): the same
--concurrency and --max-memory with the same defaults, honoured, and a budget raised to hold
one range or file whole is said on stderr (once) and in --json, never silently."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from s3xfer.config import DEFAULT_CONCURRENCY, DEFAULT_MAX_MEMORY, MiB, format_size
from s3xfer.locals3 import LocalS3Info
from tests.faultproxy import FaultPlan, FaultProxy

from .helpers import run_cli, write_tree

WARNING = "s3xfer: warning: --max-memory"


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(WARNING)]


def cat(*args: str) -> subprocess.CompletedProcess[bytes]:
    """The real `s3xfer cat`, its output as bytes."""
    return subprocess.run(
        [sys.executable, "-m", "s3xfer", "cat", *args],
        env=dict(os.environ),
        capture_output=True,
        timeout=120,
    )


@pytest.mark.parametrize("command", ["upload", "download", "cat", "get"])
def test_every_transfer_command_shows_the_same_default_limits(command: str) -> None:
    shown = " ".join(run_cli(command, "--help").stdout.split())
    assert "--max-memory SIZE Hard budget for file bytes held in memory" in shown
    assert f"[default: {format_size(DEFAULT_MAX_MEMORY)}]" in shown
    if command in ("upload", "download"):  # found during the transfer unless given
        assert "-c, --concurrency INTEGER RANGE" in shown
        assert "[default: (tuned from 64 to 512); 1<=x<=1024]" in shown
    elif command != "cat":  # one request at a time
        assert "-c, --concurrency INTEGER RANGE" in shown
        assert f"[default: {DEFAULT_CONCURRENCY}; 1<=x<=1024]" in shown


def test_get_fetches_in_batches_that_fit_max_memory(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str
) -> None:
    # Six files of 1 MiB in one shard: one merged GET fits the default budget; under 5 MiB,
    # five files, then one.
    files = {f"f{n}.bin": MiB for n in range(6)}
    contents = write_tree(tmp_path / "src", files)
    url = f"s3://{bucket}/batched"
    packed = ["--pack-threshold", "2MiB", "--quiet"]
    assert run_cli("upload", str(tmp_path / "src"), url, *packed).returncode == 0

    default = run_cli("get", url, "*", str(tmp_path / "all"), "--json")
    assert default.returncode == 0, default.stderr
    assert json.loads(default.stdout)["gets"] == 1

    small = run_cli("get", url, "*", str(tmp_path / "small"), "--max-memory", "5MiB", "--json")
    assert small.returncode == 0, small.stderr
    report = json.loads(small.stdout)
    assert (report["gets"], report["max_memory"], report["warnings"]) == (2, 5 * MiB, [])
    assert warnings(small.stderr) == []
    for name, data in contents.items():
        assert (tmp_path / "small" / name).read_bytes() == data


def test_get_says_when_a_file_is_larger_than_max_memory(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str
) -> None:
    contents = write_tree(tmp_path / "src", {"big.bin": 6 * MiB, "small.txt": 10})
    url = f"s3://{bucket}/large"
    assert run_cli("upload", str(tmp_path / "src"), url, "--no-pack", "--quiet").returncode == 0

    got = run_cli("get", url, "*", str(tmp_path / "out"), "--max-memory", "5MiB", "--json")
    assert got.returncode == 0, got.stderr
    notice = "--max-memory 5 MiB raised to 6 MiB: the file 'big.bin', checked before it is "
    notice += "written, is held whole"
    assert warnings(got.stderr) == [f"s3xfer: warning: {notice}"]
    report = json.loads(got.stdout)
    assert (report["max_memory"], report["warnings"]) == (6 * MiB, [notice])
    assert (tmp_path / "out/big.bin").read_bytes() == contents["big.bin"]


def test_cat_says_when_a_file_is_larger_than_max_memory(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str
) -> None:
    contents = write_tree(tmp_path / "src", {"big.bin": 6 * MiB, "small.txt": 10})
    url = f"s3://{bucket}/catted"
    assert run_cli("upload", str(tmp_path / "src"), url, "--no-pack", "--quiet").returncode == 0

    small = cat(url, "small.txt", "--max-memory", "5MiB")
    assert (small.returncode, small.stdout, small.stderr) == (0, contents["small.txt"], b"")

    big = cat(url, "big.bin", "--max-memory", "5MiB")
    assert big.returncode == 0, big.stderr
    assert big.stdout == contents["big.bin"]
    assert big.stderr.decode().splitlines() == [
        "s3xfer: warning: --max-memory 5 MiB raised to 6 MiB: the file 'big.bin', checked "
        "before it is written, is held whole"
    ]


def test_cat_streams_a_plain_object_in_ranges_that_fit_max_memory(
    local_s3: LocalS3Info, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    data = os.urandom(12 * MiB)
    sync_s3_client.put_object(Bucket=bucket, Key="plain/video.bin", Body=data)
    url = f"s3://{bucket}/plain/video.bin"
    proxy = FaultProxy(local_s3.endpoint_url, FaultPlan())
    with proxy.running() as endpoint:
        default = cat(url, "--endpoint-url", endpoint)
        default_ranges = [e.headers.get("range") for e in proxy.log if e.method == "GET"]
        proxy.log.clear()
        bounded = cat(url, "--endpoint-url", endpoint, "--max-memory", "5MiB")
        bounded_ranges = [e.headers.get("range") for e in proxy.log if e.method == "GET"]
    assert (default.returncode, bounded.returncode) == (0, 0), (default.stderr, bounded.stderr)
    assert default.stdout == data and bounded.stdout == data
    assert default_ranges == [f"bytes=0-{8 * MiB - 1}", f"bytes={8 * MiB}-{12 * MiB - 1}"]
    assert bounded_ranges == [
        f"bytes=0-{5 * MiB - 1}",
        f"bytes={5 * MiB}-{10 * MiB - 1}",
        f"bytes={10 * MiB}-{12 * MiB - 1}",
    ]
    assert bounded.stderr == b""


def test_download_says_when_max_memory_is_raised_to_hold_one_range(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str
) -> None:
    contents = write_tree(tmp_path / "src", {"big.bin": 20 * MiB})
    url = f"s3://{bucket}/ranged"
    assert run_cli("upload", str(tmp_path / "src"), url, "--quiet").returncode == 0

    options = ["--max-memory", "6MiB", "--range-size", "8MiB", "--json"]
    restored = run_cli("download", url, str(tmp_path / "out"), *options)
    assert restored.returncode == 0, restored.stderr
    notice = "--max-memory 6 MiB raised to 8 MiB: one range of 8 MiB (--range-size 8 MiB) is "
    notice += "held whole"
    assert warnings(restored.stderr) == [f"s3xfer: warning: {notice}"]
    report = json.loads(restored.stdout)
    assert (report["max_memory"], report["warnings"]) == (8 * MiB, [notice])
    assert 0 < report["peak_buffered_bytes"] <= 8 * MiB
    assert (tmp_path / "out/big.bin").read_bytes() == contents["big.bin"]

    # A budget that holds a range is kept as given, and nothing is said.
    again = run_cli("download", url, str(tmp_path / "again"), "--max-memory", "16MiB", "--json")
    assert again.returncode == 0, again.stderr
    assert warnings(again.stderr) == []
    assert json.loads(again.stdout)["max_memory"] == 16 * MiB


def test_a_plan_keeps_no_run_limits_and_an_old_plans_are_ignored(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str
) -> None:
    write_tree(tmp_path / "src", {"a.txt": 100, "b.txt": 200})
    plan_path = tmp_path / "plan.json"
    url = f"s3://{bucket}/old"
    planned = run_cli("plan", str(tmp_path / "src"), url, "-o", str(plan_path), "--json")
    assert planned.returncode == 0, planned.stderr
    config = json.loads(planned.stdout)["config"]
    assert "concurrency" not in config and "max_attempts" not in config
    # `plan` has no --concurrency to ignore.
    refused = run_cli("plan", str(tmp_path / "src"), url, "--concurrency", "4")
    assert refused.returncode == 2 and "--concurrency" in refused.stderr

    # A plan written by an earlier s3xfer, with its concurrency and attempts: the run's own.
    saved = json.loads(plan_path.read_text())
    saved["config"] |= {"concurrency": 3, "auto_concurrency": False, "max_attempts": 6}
    plan_path.write_text(json.dumps(saved))
    result = run_cli("upload", "--plan", str(plan_path), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["concurrency"]["mode"] == "auto"


def test_a_saved_plan_runs_under_a_smaller_budget_than_its_parts_and_says_so(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str
) -> None:
    contents = write_tree(tmp_path / "src", {"big.bin": 20 * MiB})
    plan_path = tmp_path / "plan.json"
    url = f"s3://{bucket}/budget"
    planned = run_cli("plan", str(tmp_path / "src"), url, "-o", str(plan_path), "--quiet")
    assert planned.returncode == 0, planned.stderr  # parts of 16 MiB

    result = run_cli("upload", "--plan", str(plan_path), "--max-memory", "8MiB", "--json")
    assert result.returncode == 0, result.stderr
    notice = "--max-memory 8 MiB raised to 16 MiB: one part of 16 MiB of the plan is held whole"
    assert warnings(result.stderr) == [f"s3xfer: warning: {notice}"]
    report = json.loads(result.stdout)
    assert notice in report["warnings"] and report["files_uploaded"] == 1
    assert 0 < report["peak_buffered_bytes"] <= 16 * MiB
    restored = run_cli("download", url, str(tmp_path / "out"), "--quiet")
    assert restored.returncode == 0, restored.stderr
    assert (tmp_path / "out/big.bin").read_bytes() == contents["big.bin"]


def test_slices_run_with_their_own_concurrency_are_found_by_finalize(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str
) -> None:
    # The limits of a slice are not part of the plan's identity (they once were: finalize
    # then found no result of a slice run with --concurrency).
    write_tree(tmp_path / "src", {f"f{n}.txt": 100 + n for n in range(4)})
    plan_path = tmp_path / "plan.json"
    url = f"s3://{bucket}/sliced"
    planned = run_cli("plan", str(tmp_path / "src"), url, "-o", str(plan_path), "--quiet")
    assert planned.returncode == 0, planned.stderr
    env = {"S3XFER_STATE_DIR": str(tmp_path / "state")}
    for index, options in (("1/2", ["--concurrency", "3"]), ("2/2", [])):
        sliced = run_cli(
            "upload", "--plan", str(plan_path), "--slice", index, *options, "--quiet", env=env
        )
        assert sliced.returncode == 0, sliced.stderr
    finalized = run_cli("finalize", "--plan", str(plan_path), "--json", env=env)
    assert finalized.returncode == 0, finalized.stderr
    assert json.loads(finalized.stdout)["files_uploaded"] == 4

"""A prefix where an s3xfer upload has not finished is not a plain prefix (issue 12, case 10).

Before, `download` of a sliced upload before `finalize` exited 0 with the slices' large files
only (taken for a plain prefix), though nothing is meant to be visible until `finalize`. Now
`download`, `ls`, `cat` and `get` refuse it, exit 2, one line naming `s3xfer finalize`;
`--unfinished` takes what is there.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from s3xfer.dataset import catalog
from s3xfer.dataset.keys import S3Url, manifest_key, unfinished_upload
from s3xfer.locals3 import LocalS3Info
from tests.faults.test_bad_input import assert_one_clear_line
from tests.integration.helpers import list_keys, run_cli, write_tree

FILES = {"a.txt": 10, "b/c.txt": 20, "big.bin": 2 * 1024 * 1024, "huge.bin": 3 * 1024 * 1024}
LARGE = {"big.bin", "huge.bin"}  # their own objects; the others are packed into a shard


def sliced_not_finalized(tmp_path: Path, bucket: str) -> tuple[S3Url, Path, dict[str, bytes]]:
    src = tmp_path / "src"
    tree = write_tree(src, FILES)
    url = S3Url(bucket, "sliced")
    plan = tmp_path / "plan.json"
    assert run_cli("plan", str(src), str(url), "-o", str(plan)).returncode == 0
    for k in (1, 2):
        result = run_cli("upload", "--plan", str(plan), "--slice", f"{k}/2", "--quiet")
        assert result.returncode == 0, result.stderr
    return url, plan, tree


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


NOT_FINALIZED = ("holds a sliced upload that is not finalized", "s3xfer finalize --plan")


@pytest.mark.parametrize(
    "argv",
    [
        ("download", "{url}", "{out}"),
        ("ls", "{url}"),
        ("cat", "{url}", "big.bin"),
        ("get", "{url}", "*", "{out}"),
    ],
    ids=lambda argv: argv[0],
)
def test_a_sliced_upload_is_not_read_before_finalize(
    argv: tuple[str, ...], tmp_path: Path, s3_env: LocalS3Info, bucket: str
) -> None:
    url, _plan, _tree = sliced_not_finalized(tmp_path, bucket)
    out = tmp_path / "out"
    result = run_cli(*(a.format(url=url, out=out) for a in argv))
    assert_one_clear_line(result, 2, *NOT_FINALIZED, "--unfinished")
    assert result.stdout == ""
    assert not out.exists() or files_under(out) == {}


def test_unfinished_takes_what_is_there_and_finalize_makes_it_whole(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str
) -> None:
    url, plan, tree = sliced_not_finalized(tmp_path, bucket)
    partial = tmp_path / "partial"
    result = run_cli("download", str(url), str(partial), "--unfinished", "--quiet")
    assert result.returncode == 0, result.stderr
    assert files_under(partial) == {p: tree[p] for p in LARGE}  # the packed files need it
    listed = run_cli("ls", str(url), "--unfinished")
    assert listed.returncode == 0 and "big.bin" in listed.stdout, listed.stderr
    cat = subprocess.run(
        [sys.executable, "-m", "s3xfer", "cat", str(url), "big.bin", "--unfinished"],
        capture_output=True,
    )
    assert cat.returncode == 0 and cat.stdout == tree["big.bin"]

    assert run_cli("finalize", "--plan", str(plan)).returncode == 0
    whole = tmp_path / "whole"
    result = run_cli("download", str(url), str(whole), "--quiet")
    assert result.returncode == 0, result.stderr
    assert files_under(whole) == tree


def test_an_upload_killed_before_its_manifest_is_not_a_plain_prefix(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    """Its shards and objects are there, its manifest and catalog not (as a kill just before
    the catalog would leave it)."""
    write_tree(tmp_path / "src", FILES)
    url = S3Url(bucket, "killed")
    assert run_cli("upload", str(tmp_path / "src"), str(url), "--quiet").returncode == 0
    for key in list_keys(sync_s3_client, bucket, url.key(".s3xfer/catalog")):
        sync_s3_client.delete_object(Bucket=bucket, Key=key)
    sync_s3_client.delete_object(Bucket=bucket, Key=manifest_key(url))
    result = run_cli("download", str(url), str(tmp_path / "out"))
    assert_one_clear_line(
        result, 2, "holds an s3xfer upload that has not finished", "run the upload again"
    )
    assert catalog.root_key(url) not in list_keys(sync_s3_client, bucket, "killed/")


def test_a_plain_prefix_stays_plain() -> None:
    url = S3Url("b", "p")
    assert unfinished_upload(url, ["a.txt", "x/.s3xfer/y", ".s3xferx"]) is None
    assert unfinished_upload(url, [".s3xfer/lease.json", "a.txt"]) is None  # wrote nothing
    sliced = unfinished_upload(url, [".s3xfer/slices/0123/00001-of-00002.json.gz"])
    assert sliced is not None and "s3xfer finalize --plan PLAN" in sliced
    other = unfinished_upload(url, [".s3xfer/shards/ab12/ab12.tar"])
    assert other is not None and "run the upload again" in other

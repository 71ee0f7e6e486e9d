"""`ls` and `cat` on prefixes that hold no s3xfer dataset: objects written by another tool."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from s3xfer.locals3 import LocalS3Info

from .helpers import run_cli, write_tree

LARGE = 20 * 1024 * 1024 + 17  # three 8 MiB ranges, the last one short


@pytest.fixture
def plain_prefix(s3_env: LocalS3Info, bucket: str, sync_s3_client: Any) -> dict[str, bytes]:
    rng = random.Random(5)
    objects = {
        "a.txt": b"alpha\n",
        "img/cat.jpg": rng.randbytes(3000),
        "img/dog.jpg": rng.randbytes(4000),
        "odd\nname.txt": b"odd",
        "large.bin": rng.randbytes(LARGE),
    }
    for path, body in objects.items():
        sync_s3_client.put_object(Bucket=bucket, Key=f"other/{path}", Body=body)
    sync_s3_client.put_object(Bucket=bucket, Key="otherwise.txt", Body=b"not under other/")
    return objects


def test_ls_of_a_plain_prefix_lists_every_object_with_date_size_and_total(
    plain_prefix: dict[str, bytes], bucket: str
) -> None:
    result = run_cli("ls", f"s3://{bucket}/other")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(plain_prefix)  # the name with a newline stays one line
    by_path = {line.split()[-1]: line.split() for line in lines}
    assert set(by_path) == {"a.txt", "img/cat.jpg", "img/dog.jpg", "odd\\x0aname.txt", "large.bin"}
    date, time_of_day, size, _ = by_path["large.bin"]
    assert len(date) == 10 and len(time_of_day) == 8 and size == f"{LARGE:,}"
    assert result.stderr.startswith("5 objects, 20.0 MiB") and "plain prefix" in result.stderr


def test_ls_json_and_a_pattern(plain_prefix: dict[str, bytes], bucket: str) -> None:
    result = run_cli("ls", f"s3://{bucket}/other", "img/*", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [item["path"] for item in listed] == ["img/cat.jpg", "img/dog.jpg"]
    assert listed[0]["key"] == "other/img/cat.jpg" and listed[0]["size"] == 3000
    assert listed[0]["last_modified"] and listed[0]["etag"]


def test_ls_of_an_empty_prefix_is_one_clear_line(s3_env: LocalS3Info, bucket: str) -> None:
    result = run_cli("ls", f"s3://{bucket}/nothing-here")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"s3xfer: error: no s3xfer dataset at s3://{bucket}/nothing-here, and no objects under it"
    ]


def cat(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "s3xfer", "cat", *args],
        env=dict(os.environ),
        capture_output=True,
        timeout=120,
    )


@pytest.mark.parametrize("path", ["a.txt", "large.bin"])
def test_cat_writes_a_plain_object_named_whole_or_below_the_prefix(
    plain_prefix: dict[str, bytes], bucket: str, path: str
) -> None:
    whole = cat(f"s3://{bucket}/other/{path}")
    below = cat(f"s3://{bucket}/other", path)
    for result in (whole, below):
        assert result.returncode == 0, result.stderr
    assert whole.stdout == below.stdout == plain_prefix[path]


def test_cat_of_a_missing_object_is_one_clear_line(
    plain_prefix: dict[str, bytes], bucket: str
) -> None:
    result = run_cli("cat", f"s3://{bucket}/other/no-such.txt")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such.txt" in lines[0], result.stderr


def test_get_takes_the_matching_objects_of_a_plain_prefix(
    plain_prefix: dict[str, bytes], bucket: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = run_cli("get", f"s3://{bucket}/other", "img/*", "a.txt", str(out), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["files_downloaded"] == 3
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["a.txt", "img/cat.jpg", "img/dog.jpg"]
    for path in written:
        assert (out / path).read_bytes() == plain_prefix[path]
    nothing = run_cli("get", f"s3://{bucket}/other", "no/*", str(tmp_path / "none"))
    assert nothing.returncode == 2 and "no file of" in nothing.stderr


def test_one_url_names_a_file_inside_a_dataset_as_it_names_an_object(
    s3_env: LocalS3Info, bucket: str, tmp_path: Path
) -> None:
    contents = write_tree(tmp_path / "src", {"img/07/cat.jpg": 3000, "labels.json": 200})
    uploaded = run_cli("upload", str(tmp_path / "src"), f"s3://{bucket}/sets/ds", "--quiet")
    assert uploaded.returncode == 0, uploaded.stderr
    for path in contents:  # both are packed: no object has these keys
        result = cat(f"s3://{bucket}/sets/ds/{path}")
        assert result.returncode == 0, result.stderr
        assert result.stdout == contents[path]
    missing = run_cli("cat", f"s3://{bucket}/sets/ds/img/07/dog.jpg")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"s3xfer: error: 'img/07/dog.jpg' is not in the dataset s3://{bucket}/sets/ds"
    ]

"""Slices without a broker: `upload --plan P --slice K/N` on every job of an array, then
`finalize`, gives the same manifest and catalog as one machine uploading the plan."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from s3xfer.locals3 import LocalS3Info

from .helpers import comparable_metadata, list_keys, read_object, run_cli, write_tree

MiB = 1024 * 1024
TREE = {
    **{f"big/{n}.bin": 9 * MiB + n for n in range(2)},
    **{f"loose/{n}.dat": 1200 * 1024 + n for n in range(5)},
    **{f"small/{n // 100}/{n}.txt": 3000 + n for n in range(600)},
}
SIZES = ["--part-size", "5MiB", "--multipart-threshold", "8MiB", "--shard-size", "5MiB"]


def metadata(client: Any, bucket: str) -> dict[str, bytes]:
    """Manifest, catalog, shards and indexes, without the slice results, bucket name out."""
    out = {}
    for key in list_keys(client, bucket, "ds/.s3xfer/"):
        if "/.s3xfer/slices/" in key:
            continue
        raw = read_object(client, bucket, key)
        data = comparable_metadata(
            key, gzip.decompress(raw) if key.endswith(".gz") else raw, bucket
        )
        if data is not None:
            out[key] = data
    return out


def make_plan(src: Path, dest: str, path: Path, env: dict[str, str]) -> Path:
    result = run_cli("plan", str(src), dest, *SIZES, "--output", str(path), env=env)
    assert result.returncode == 0, result.stderr
    return path


def run_json(*args: str, env: dict[str, str], code: int = 0) -> dict[str, Any]:
    result = run_cli(*args, "--json", env=env)
    assert result.returncode == code, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_slices_then_finalize_equal_one_upload(
    tmp_path: Path, local_s3: LocalS3Info, sync_s3_client: Any, bucket: str
) -> None:
    env = local_s3.env()
    src = tmp_path / "src"
    write_tree(src, TREE, seed=4)
    other = f"{bucket}-one"
    sync_s3_client.create_bucket(Bucket=other)
    single = make_plan(src, f"s3://{other}/ds", tmp_path / "one.json", env)
    assert run_json("upload", "--plan", str(single), env=env)["files_uploaded"] == len(TREE)

    plan = make_plan(src, f"s3://{bucket}/ds", tmp_path / "plan.json", env)
    sent = 0
    for k in (1, 2, 3):
        report = run_json("upload", "--plan", str(plan), "--slice", f"{k}/3", env=env)
        assert report["files_failed"] == 0
        sent += report["files_uploaded"]
        if k == 2:  # not all there yet: finalize refuses, naming what is missing
            early = run_cli("finalize", "--plan", str(plan), env=env)
            assert early.returncode == 1 and "1 of 3 slices have no result: 3" in early.stderr
            assert "ds/.s3xfer/manifest.json.gz" not in list_keys(sync_s3_client, bucket)
    assert sent == len(TREE)  # each file in exactly one slice

    # A slice run again sends nothing: its stored result says what it did.
    again = run_json("upload", "--plan", str(plan), "--slice", "2/3", env=env)
    assert again["files_uploaded"] == 0 and again["files_unchanged"] > 0

    final = run_json("finalize", "--plan", str(plan), env=env)
    assert final["files_failed"] == 0 and final["manifest_written"]
    assert metadata(sync_s3_client, bucket) == metadata(sync_s3_client, other)

    out = tmp_path / "restored"
    assert run_cli("download", f"s3://{bucket}/ds", str(out), "--quiet", env=env).returncode == 0
    for rel in TREE:
        assert (out / rel).read_bytes() == (src / rel).read_bytes(), rel


def test_a_slice_needs_a_saved_plan(tmp_path: Path, local_s3: LocalS3Info) -> None:
    write_tree(tmp_path / "src", {"a": 1})
    result = run_cli(
        "upload", str(tmp_path / "src"), "s3://bucket/x", "--slice", "1/2", env=local_s3.env()
    )
    assert result.returncode == 2 and "--slice needs --plan" in result.stderr

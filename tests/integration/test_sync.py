"""Re-uploads make the dataset equal the uploaded tree, and every record describes what is on
the server now: through the real CLI against the local server."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from s3xfer.dataset.catalog import bucket_of, piece_key
from s3xfer.dataset.keys import S3Url, manifest_key
from s3xfer.errors import PartialReadError
from s3xfer.locals3 import LocalS3Info
from s3xfer.read.reader import Dataset

from .helpers import (
    connection,
    list_keys,
    read_object,
    run_cli,
    without_file_permission_override,
    write_tree,
)

SMALL_PACK = ["--part-size", "5MiB", "--pack-threshold", "1MiB"]


def upload(src: Path, url: str, *options: str) -> dict[str, Any]:
    result = run_cli("upload", str(src), url, "--json", *SMALL_PACK, *options)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def tree_of(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under root: bytes, mtime_ns, permission bits."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            stat = path.stat()
            found[path.relative_to(root).as_posix()] = (
                path.read_bytes(),
                stat.st_mtime_ns,
                stat.st_mode & 0o7777,
            )
    return found


def letters(src: Path) -> None:
    src.mkdir()
    for name in "abcd":
        (src / f"{name}.txt").write_text(f"{name}\n")


def test_a_packed_file_deleted_then_uploaded_again_leaves_the_rest_restorable(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str
) -> None:
    src, url = tmp_path / "src", f"s3://{bucket}/p"
    letters(src)
    upload(src, url)
    (src / "b.txt").unlink()
    upload(src, url)

    restored = run_cli("download", url, str(tmp_path / "out"))
    assert restored.returncode == 0, restored.stderr
    assert tree_of(tmp_path / "out") == tree_of(src)

    (tmp_path / "got").mkdir()
    fetched = run_cli("get", url, "*", str(tmp_path / "got"))
    assert fetched.returncode == 0, fetched.stderr + fetched.stdout
    assert tree_of(tmp_path / "got") == tree_of(src)


def test_a_file_replaced_by_a_directory_of_the_same_name(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str
) -> None:
    src, url = tmp_path / "src", f"s3://{bucket}/d"
    letters(src)
    upload(src, url)
    (src / "b.txt").unlink()
    (src / "b.txt").mkdir()
    (src / "b.txt" / "inside.txt").write_text("now a directory\n")
    upload(src, url)

    restored = run_cli("download", url, str(tmp_path / "out"))
    assert restored.returncode == 0, restored.stderr
    assert tree_of(tmp_path / "out") == tree_of(src)
    (tmp_path / "got").mkdir()
    fetched = run_cli("get", url, "*", str(tmp_path / "got"))
    assert fetched.returncode == 0, fetched.stderr + fetched.stdout
    assert tree_of(tmp_path / "got") == tree_of(src)


def spoil_crc32(sync_s3_client: Any, bucket: str, prefix: str, path: str) -> None:
    """Record a wrong CRC32 for one file, in the manifest and in its catalog piece."""
    dest = S3Url(bucket, prefix)
    for key in (manifest_key(dest), piece_key(dest, bucket_of(path))):
        data = json.loads(gzip.decompress(read_object(sync_s3_client, bucket, key)))
        for row in data["files"]:
            if row[0] == path:
                row[5] = "AAAAAA=="
        body = gzip.compress(json.dumps(data).encode())
        sync_s3_client.put_object(Bucket=bucket, Key=key, Body=body)


def test_one_bad_record_fails_alone_not_its_neighbours_in_the_same_range(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    src, url = tmp_path / "src", f"s3://{bucket}/m"
    letters(src)
    upload(src, url)
    spoil_crc32(sync_s3_client, bucket, "m", "b.txt")
    expected = {p: v for p, v in tree_of(src).items() if p != "b.txt"}

    restored = run_cli("download", url, str(tmp_path / "out"), "--json")
    assert restored.returncode == 1
    report = json.loads(restored.stdout)
    assert [f["path"] for f in report["failures"]] == ["b.txt"]
    assert "checksum mismatch" in report["failures"][0]["error"]
    assert tree_of(tmp_path / "out") == expected

    (tmp_path / "got").mkdir()
    fetched = run_cli("get", url, "*", str(tmp_path / "got"), "--json")
    assert fetched.returncode == 1
    assert [f["path"] for f in json.loads(fetched.stdout)["failures"]] == ["b.txt"]
    assert tree_of(tmp_path / "got") == expected

    async def read_all() -> None:
        async with Dataset(url, connection=connection(s3_env)) as ds:
            with pytest.raises(PartialReadError) as caught:
                await ds.read_many(["a.txt", "b.txt", "c.txt", "d.txt"])
        assert list(caught.value.failures) == ["b.txt"]
        assert caught.value.results == {p: v[0] for p, v in expected.items()}
        assert ds.stats.gets == 1  # one merged GET, failed for one member only

    anyio.run(read_all)
    assert os.listdir(tmp_path / "out")


def keys_under(client: Any, bucket: str, prefix: str) -> set[str]:
    return set(list_keys(client, bucket, f"{prefix}/"))


def referenced_keys(client: Any, bucket: str, prefix: str) -> set[str]:
    """What the manifest refers to (objects, shards, shard indexes), plus the manifest, the
    catalog (root and pieces) and the lease: everything a dataset should hold, nothing more."""
    manifest = json.loads(
        gzip.decompress(read_object(client, bucket, manifest_key(S3Url(bucket, prefix))))
    )
    files = {row[1] for row in manifest["files"]}
    shards = {row[1] for row in manifest["files"] if row[7] >= 0}
    meta = {
        k
        for k in keys_under(client, bucket, prefix)
        if "/.s3xfer/catalog" in k or k == f"{prefix}/.s3xfer/lease.json"
    }
    return (
        files | {f"{s}.index.json" for s in shards} | meta | {f"{prefix}/.s3xfer/manifest.json.gz"}
    )


def mixed_tree(src: Path) -> None:
    """Packed small files and loose files of more than 1 MiB."""
    write_tree(
        src,
        {
            **{f"small/{n}.txt": 100 + n for n in range(6)},
            "loose/one.bin": 1536 * 1024,
            "loose/two.bin": 1200 * 1024,
            "loose/three.bin": 1100 * 1024,
        },
        seed=5,
    )


def test_deleted_and_renamed_files_leave_the_dataset_and_their_objects_are_deleted(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    src, url = tmp_path / "src", f"s3://{bucket}/s"
    mixed_tree(src)
    upload(src, url)
    before = keys_under(sync_s3_client, bucket, "s")
    (src / "small/1.txt").unlink()
    (src / "small/2.txt").rename(src / "small/renamed.txt")
    (src / "loose/one.bin").unlink()
    (src / "loose/two.bin").rename(src / "loose/moved.bin")

    report = upload(src, url)

    assert report["files_removed"] == 4
    assert report["files_kept_deleted"] == 0
    after = keys_under(sync_s3_client, bucket, "s")
    assert after == referenced_keys(sync_s3_client, bucket, "s")  # no object left behind
    gone = before - after
    assert {"s/loose/one.bin", "s/loose/two.bin"} <= gone
    assert len([k for k in gone if k.endswith(".tar")]) == 1  # the old shard, and its index
    assert len([k for k in gone if k.endswith(".tar.index.json")]) == 1
    assert report["objects_deleted"] == 4
    listed = run_cli("ls", url, "--json")
    assert sorted(r["path"] for r in json.loads(listed.stdout)) == sorted(tree_of(src))
    assert run_cli("cat", url, "small/1.txt").returncode == 2
    restored = run_cli("download", url, str(tmp_path / "out"))
    assert restored.returncode == 0, restored.stderr
    assert tree_of(tmp_path / "out") == tree_of(src)

    again = upload(src, url)  # the tree is the dataset: nothing to do
    assert (again["write_requests"], again["files_removed"], again["objects_deleted"]) == (0, 0, 0)
    text = run_cli("upload", str(src), url, *SMALL_PACK)
    assert "nothing changed since the last upload" in text.stdout


def test_keep_deleted_keeps_deleted_files_restorable_even_when_their_shard_changes(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    src, url = tmp_path / "src", f"s3://{bucket}/k"
    mixed_tree(src)
    upload(src, url)
    original = tree_of(src)
    (src / "small/1.txt").unlink()
    (src / "small/2.txt").write_text("its shard is written again\n")  # b's neighbour
    (src / "loose/one.bin").unlink()

    kept = upload(src, url, "--keep-deleted")

    assert (kept["files_removed"], kept["files_kept_deleted"]) == (0, 2)
    assert kept["objects_deleted"] == 0
    restored = run_cli("download", url, str(tmp_path / "kept"))
    assert restored.returncode == 0, restored.stderr
    expected = tree_of(src)
    expected |= {p: original[p] for p in ("small/1.txt", "loose/one.bin")}
    assert tree_of(tmp_path / "kept") == expected
    assert keys_under(sync_s3_client, bucket, "k") == referenced_keys(sync_s3_client, bucket, "k")

    synced = upload(src, url)  # without the flag: the dataset becomes the tree
    assert (synced["files_removed"], synced["files_kept_deleted"]) == (2, 0)
    assert synced["objects_deleted"] == 3  # the loose file, the kept shard and its index
    assert keys_under(sync_s3_client, bucket, "k") == referenced_keys(sync_s3_client, bucket, "k")
    restored = run_cli("download", url, str(tmp_path / "synced"))
    assert restored.returncode == 0, restored.stderr
    assert tree_of(tmp_path / "synced") == tree_of(src)


def test_files_under_a_directory_that_cannot_be_read_stay_in_the_dataset(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str
) -> None:
    src, url = tmp_path / "src", f"s3://{bucket}/u"
    mixed_tree(src)
    upload(src, url)
    original = tree_of(src)
    (src / "small/0.txt").unlink()
    (src / "loose").chmod(0o000)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "s3xfer", "upload", str(src), url, "--json", *SMALL_PACK],
            capture_output=True,
            text=True,
            preexec_fn=without_file_permission_override if os.geteuid() == 0 else None,
            timeout=120,
        )
    finally:
        (src / "loose").chmod(0o755)
    assert result.returncode == 1  # an unreadable directory fails the upload, as before
    report = json.loads(result.stdout)
    assert [p["path"] for p in report["problems"]] == ["loose"]
    assert (report["files_removed"], report["files_kept_deleted"]) == (1, 3)
    restored = run_cli("download", url, str(tmp_path / "out"))
    assert restored.returncode == 0, restored.stderr
    assert tree_of(tmp_path / "out") == {p: v for p, v in original.items() if p != "small/0.txt"}


def test_keep_deleted_is_given_to_finalize_not_to_a_slice(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str
) -> None:
    result = run_cli(
        "upload", "--plan", str(tmp_path / "p.json"), "--slice", "1/2", "--keep-deleted"
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "s3xfer: error: --keep-deleted applies where the manifest is written: "
        "give it to `s3xfer finalize`"
    )


def test_finalize_of_a_sliced_upload_makes_the_dataset_equal_the_plan(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    src, url = tmp_path / "src", f"s3://{bucket}/f"
    mixed_tree(src)
    upload(src, url)
    (src / "small/3.txt").unlink()
    (src / "loose/three.bin").unlink()
    (src / "small/4.txt").write_text("changed\n")
    plan = tmp_path / "plan.json"
    made = run_cli("plan", str(src), url, *SMALL_PACK, "--output", str(plan))
    assert made.returncode == 0, made.stderr
    for k in ("1/2", "2/2"):
        sliced = run_cli("upload", "--plan", str(plan), "--slice", k, "--quiet")
        assert sliced.returncode == 0, sliced.stderr

    done = run_cli("finalize", "--plan", str(plan), "--json")

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["files_removed"], report["objects_deleted"]) == (2, 3)
    dataset = {k for k in keys_under(sync_s3_client, bucket, "f") if "/.s3xfer/slices/" not in k}
    assert dataset == referenced_keys(sync_s3_client, bucket, "f")
    restored = run_cli("download", url, str(tmp_path / "out"))
    assert restored.returncode == 0, restored.stderr
    assert tree_of(tmp_path / "out") == tree_of(src)


def make_stale(sync_s3_client: Any, bucket: str, prefix: str, path: str) -> None:
    """What an earlier s3xfer left: the record of `path` pointing into its shard with an ETag
    the shard no longer has (it was written over, without or with other bytes for it)."""
    dest = S3Url(bucket, prefix)
    for key in (manifest_key(dest), piece_key(dest, bucket_of(path))):
        data = json.loads(gzip.decompress(read_object(sync_s3_client, bucket, key)))
        for row in data["files"]:
            if row[0] == path:
                row[8] = '"an-older-shard"'
        body = gzip.compress(json.dumps(data).encode())
        sync_s3_client.put_object(Bucket=bucket, Key=key, Body=body)


def test_a_stale_record_never_skips_its_file_and_a_rerun_repairs_the_dataset(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    src, url = tmp_path / "src", f"s3://{bucket}/st"
    letters(src)
    upload(src, url)
    make_stale(sync_s3_client, bucket, "st", "c.txt")  # still in the tree
    make_stale(sync_s3_client, bucket, "st", "b.txt")
    (src / "b.txt").unlink()

    result = run_cli("upload", str(src), url, "--json", "--keep-deleted", *SMALL_PACK)

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["files_uploaded"] == 3  # the shard of c.txt, sent again: not "unchanged"
    assert result.stderr.strip() == (
        "s3xfer: warning: 1 files no longer in the tree could not be kept, their shard "
        "having been rewritten by an earlier s3xfer: b.txt"
    )
    restored = run_cli("download", url, str(tmp_path / "out"))
    assert restored.returncode == 0, restored.stderr
    assert tree_of(tmp_path / "out") == tree_of(src)

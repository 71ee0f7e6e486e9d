"""Re-uploads make the dataset equal the uploaded tree, and every record describes what is on
the server now: through the real CLI against the local server."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from s3xfer.catalog import bucket_of, piece_key
from s3xfer.errors import PartialReadError
from s3xfer.keys import S3Url, manifest_key
from s3xfer.locals3 import LocalS3Info
from s3xfer.reader import Dataset

from .helpers import connection, read_object, run_cli

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

"""Packing small files into tar shards while uploading, and reading any file back with one
ranged GET, against the real local S3 server."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import anyio
import pytest

from s3xfer import S3Url, TransferConfig, make_plan, survey, upload
from s3xfer.config import MiB
from s3xfer.dataset.catalog import bucket_of, piece_key, root_key
from s3xfer.dataset.tarpack import INDEX_MEMBER_NAME, index_from_bytes
from s3xfer.errors import IntegrityError, NotInDatasetError
from s3xfer.locals3 import LocalS3Info
from s3xfer.read.reader import Dataset
from s3xfer.read.sync import SyncDataset
from s3xfer.write.upload import UploadReport

from .helpers import connection, list_keys, read_object, run_cli, write_tree

PACKED = TransferConfig(
    max_memory=64 * MiB,
    part_size=5 * MiB,
    multipart_threshold=8 * MiB,
    pack_threshold=256 * 1024,
    shard_size=6 * MiB,
)


def dataset_tree(root: Path, *, files: int = 2000, seed: int = 3) -> dict[str, bytes]:
    rng = random.Random(seed)
    sizes = {
        f"img/{n // 100:02d}/ünï {n:05d}.jpg": int(rng.lognormvariate(8, 1.2)) for n in range(files)
    }
    sizes |= {
        "labels/" + "l" * 120 + ".json": 77,
        "empty.txt": 0,
        "big/video.bin": 9 * MiB,
        "medium.bin": 700 * 1024,
    }
    return write_tree(root, sizes, seed=seed)


def do_upload(
    src: Path, url: str, info: LocalS3Info, config: TransferConfig = PACKED
) -> UploadReport:
    plan = make_plan(survey(src), S3Url.parse(url), config)

    async def main() -> UploadReport:
        return await upload(plan, connection(info))

    return anyio.run(main)


@pytest.fixture(scope="module")
def packed_dataset(
    tmp_path_factory: pytest.TempPathFactory, local_s3: LocalS3Info, sync_s3_client: Any
) -> tuple[Path, dict[str, bytes], str, UploadReport]:
    bucket = "packed-dataset"
    sync_s3_client.create_bucket(Bucket=bucket)
    src = tmp_path_factory.mktemp("packed") / "src"
    contents = dataset_tree(src)
    report = do_upload(src, f"s3://{bucket}/ds", local_s3)
    return src, contents, bucket, report


def test_small_files_go_into_a_few_shards_readable_by_tar(
    packed_dataset: tuple[Path, dict[str, bytes], str, UploadReport],
    sync_s3_client: Any,
    tmp_path: Path,
) -> None:
    _src, contents, bucket, report = packed_dataset
    assert report.ok and report.files_uploaded == len(contents)
    keys = list_keys(sync_s3_client, bucket, "ds/")
    shards = [k for k in keys if k.endswith(".tar")]
    assert 2 <= len(shards) <= 6
    assert "ds/big/video.bin" in keys and "ds/medium.bin" in keys
    loose_small = [k for k in keys if k.startswith("ds/img/") and len(contents[k[3:]]) < 256 * 1024]
    assert not loose_small  # every file under the pack threshold is in a shard
    members: set[str] = set()
    for key in shards:
        data = read_object(sync_s3_client, bucket, key)
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            names = archive.getnames()
            assert names[-1] == INDEX_MEMBER_NAME
            for info in archive.getmembers()[:-1]:
                extracted = archive.extractfile(info)
                assert extracted is not None and extracted.read() == contents[info.name]
            inner = archive.extractfile(names[-1])
            assert inner is not None
            inner_index = inner.read()
        # The index is also stored beside the shard, identical.
        assert read_object(sync_s3_client, bucket, key + ".index.json") == inner_index
        entries = index_from_bytes(inner_index, shard_key=key)
        members |= {e.path for e in entries}
        for entry in entries:
            assert data[entry.data_offset : entry.data_offset + entry.size] == contents[entry.path]
        # GNU tar lists and extracts it too.
        shard_file = tmp_path / "shard.tar"
        shard_file.write_bytes(data)
        listing = subprocess.run(
            ["tar", "-tf", str(shard_file)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "LC_ALL": "C.UTF-8"},
        )
        assert listing.stdout.splitlines() == names
        out = tmp_path / "x"
        out.mkdir(exist_ok=True)
        subprocess.run(["tar", "-xf", str(shard_file), "-C", str(out)], check=True)
    assert members == {p for p, d in contents.items() if len(d) < 256 * 1024}


def test_cat_fetches_one_file_with_one_ranged_get(
    packed_dataset: tuple[Path, dict[str, bytes], str, UploadReport], s3_env: LocalS3Info
) -> None:
    _, contents, bucket, _ = packed_dataset
    for path in [*random.Random(5).sample(sorted(contents), 12), "empty.txt", "big/video.bin"]:
        result = subprocess.run(
            [sys.executable, "-m", "s3xfer", "cat", f"s3://{bucket}/ds", path],
            capture_output=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        if result.stdout != contents[path]:
            src_bytes = (packed_dataset[0] / path).read_bytes()
            first = next(
                (
                    i
                    for i, (a, b) in enumerate(zip(result.stdout, contents[path], strict=False))
                    if a != b
                ),
                None,
            )
            raise AssertionError(
                f"{path}: {len(result.stdout)} bytes vs {len(contents[path])}, first diff at "
                f"{first}, on disk now equal to expected: {src_bytes == contents[path]}, "
                f"equal to cat: {src_bytes == result.stdout}; stderr {result.stderr[-300:]!r}"
            )


def test_dataset_reads_count_requests(
    packed_dataset: tuple[Path, dict[str, bytes], str, UploadReport], s3_env: LocalS3Info
) -> None:
    _, contents, bucket, _ = packed_dataset
    neighbours = [f"img/03/ünï {n:05d}.jpg" for n in range(300, 340)]

    async def main() -> None:
        async with Dataset(f"s3://{bucket}/ds", connection=connection(s3_env)) as ds:
            opened = ds.s3.requests
            assert opened == 0  # a path's catalog piece is found from the path alone
            path = neighbours[0]
            assert await ds.read(path) == contents[path]
            # Cold: one catalog piece + one data GET.
            assert (ds.s3.requests - opened, ds.stats.gets) == (2, 1)
            before = ds.s3.requests
            assert await ds.read(path) == contents[path]
            assert ds.s3.requests - before == 1  # warm: only the data GET
            before_gets = ds.stats.gets
            batch = await ds.read_many(neighbours)
            assert batch == {p: contents[p] for p in neighbours}
            # Forty neighbours in one shard (maybe straddling two): at most two GETs.
            assert ds.stats.gets - before_gets <= 2
            with pytest.raises(NotInDatasetError, match="not in the dataset"):
                await ds.read("img/no-such-file.jpg")
            handle = await ds.open("labels/" + "l" * 120 + ".json")
            assert handle.read() == contents["labels/" + "l" * 120 + ".json"]
            listed = await ds.ls("img/00/*")
            assert [r.path for r in listed] == sorted(
                p for p in contents if p.startswith("img/00/")
            )

    anyio.run(main)


def test_sync_dataset_for_training_loops(
    packed_dataset: tuple[Path, dict[str, bytes], str, UploadReport], s3_env: LocalS3Info
) -> None:
    _, contents, bucket, _ = packed_dataset
    with SyncDataset(f"s3://{bucket}/ds", connection=connection(s3_env)) as ds:
        paths = sorted(contents)[:64]
        assert ds.read_many(paths) == {p: contents[p] for p in paths}
        assert ds.read(paths[3]) == contents[paths[3]]


def test_get_restores_files_with_mtime_and_mode(
    packed_dataset: tuple[Path, dict[str, bytes], str, UploadReport],
    s3_env: LocalS3Info,
    tmp_path: Path,
) -> None:
    src, contents, bucket, _ = packed_dataset
    result = run_cli(
        "get", f"s3://{bucket}/ds", "img/1*", "empty.txt", str(tmp_path / "out"), "--json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    wanted = [p for p in contents if p.startswith("img/1") or p == "empty.txt"]
    assert report["files"] == len(wanted)
    listing = run_cli("ls", f"s3://{bucket}/ds", "--json")
    objects = {r["key"] for r in json.loads(listing.stdout) if r["path"] in wanted and r["size"]}
    # About 1,000 files: one GET per shard touched (their ranges are coalesced) and per loose file.
    assert report["gets"] == len(objects) < 10
    for path in wanted:
        restored = tmp_path / "out" / path
        assert restored.read_bytes() == contents[path]
        original = os.stat(src / path)
        assert restored.stat().st_mtime_ns == original.st_mtime_ns
        assert restored.stat().st_mode & 0o7777 == original.st_mode & 0o7777


def test_unchanged_rerun_sends_nothing_and_a_change_resends_one_shard(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str
) -> None:
    src = tmp_path / "src"
    contents = dataset_tree(src, files=2000, seed=9)
    first = do_upload(src, f"s3://{bucket}/p", s3_env)
    assert first.ok and first.extra["shards_uploaded"] >= 2
    again = do_upload(src, f"s3://{bucket}/p", s3_env)
    assert again.write_requests == 0 and again.files_unchanged == len(contents)
    changed = "img/03/ünï 00350.jpg"
    (src / changed).write_bytes(b"a new picture")
    third = do_upload(src, f"s3://{bucket}/p", s3_env)
    assert third.extra["shards_uploaded"] == 1

    async def main() -> bytes:
        async with Dataset(f"s3://{bucket}/p", connection=connection(s3_env)) as ds:
            return await ds.read(changed)

    assert anyio.run(main) == b"a new picture"


def test_a_replaced_shard_is_detected_not_returned(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    src = tmp_path / "src"
    contents = dataset_tree(src, files=50, seed=4)
    do_upload(src, f"s3://{bucket}/r", s3_env)
    shard = next(k for k in list_keys(sync_s3_client, bucket, "r/") if k.endswith(".tar"))
    original = read_object(sync_s3_client, bucket, shard)
    sync_s3_client.put_object(Bucket=bucket, Key=shard, Body=original[::-1])

    async def main() -> None:
        async with Dataset(f"s3://{bucket}/r", connection=connection(s3_env)) as ds:
            with pytest.raises(IntegrityError, match="replaced"):
                await ds.read("img/00/ünï 00001.jpg")

    anyio.run(main)
    assert contents  # the tree was real


def test_a_corrupt_catalog_is_refused(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    src = tmp_path / "src"
    dataset_tree(src, files=20, seed=6)
    do_upload(src, f"s3://{bucket}/c", s3_env)
    dest = S3Url(bucket, "c")
    path = "img/00/ünï 00007.jpg"
    assert json.loads(read_object(sync_s3_client, bucket, root_key(dest)))["files"] == 24
    key = piece_key(dest, bucket_of(path))
    piece = json.loads(gzip.decompress(read_object(sync_s3_client, bucket, key)))
    for row in piece["files"]:
        if row[0] == path:
            row[5] = "AAAAAA=="  # a wrong CRC32 for this file
    sync_s3_client.put_object(
        Bucket=bucket, Key=key, Body=gzip.compress(json.dumps(piece).encode())
    )

    async def main() -> None:
        async with Dataset(f"s3://{bucket}/c", connection=connection(s3_env)) as ds:
            with pytest.raises(IntegrityError, match="checksum mismatch"):
                await ds.read(path)
        sync_s3_client.put_object(Bucket=bucket, Key=key, Body=b"not gzip")
        async with Dataset(f"s3://{bucket}/c", connection=connection(s3_env)) as ds:
            with pytest.raises(IntegrityError, match="corrupt dataset metadata: catalog piece"):
                await ds.read(path)

    anyio.run(main)


def test_unknown_dataset_is_one_clear_line(s3_env: LocalS3Info, bucket: str) -> None:
    result = run_cli("cat", f"s3://{bucket}/nothing-here", "a.txt")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"s3xfer: error: no s3xfer dataset at s3://{bucket}/nothing-here "
        f"(no catalog at s3://{bucket}/nothing-here/.s3xfer/catalog.json), "
        f"and no object s3://{bucket}/nothing-here/a.txt"
    ]
    listing = run_cli("ls", f"s3://{bucket}/nothing-here")
    assert listing.returncode == 2 and "no s3xfer dataset" in listing.stderr

"""Downloads against the real local S3 server: datasets restored exactly, plain prefixes,
subsets, re-runs that transfer nothing, hostile names kept inside DEST, resume after SIGKILL."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from s3xfer import S3Url, TransferConfig, make_plan, survey, upload
from s3xfer.checksums import crc32, crc32_to_base64
from s3xfer.config import MiB
from s3xfer.destination import STAGING_DIR, partial_name
from s3xfer.locals3 import LocalS3Info
from s3xfer.read import download as download_module
from s3xfer.read import rangedl as rangedl_module
from s3xfer.read.download import DownloadReport, download
from s3xfer.transport.s3 import S3
from s3xfer.write.upload import UploadReport

from .helpers import connection, run_cli, write_tree

SHAPED = TransferConfig(
    max_memory=64 * MiB,
    part_size=5 * MiB,
    multipart_threshold=8 * MiB,
    pack_threshold=64 * 1024,
    shard_size=5 * MiB,
)

TREE = {
    **{f"img/{n // 50:02d}/{n:04d}.jpg": 100 + (n * 997) % 30_000 for n in range(400)},
    "empty.txt": 0,
    "docs/ünïcødé – naïve.md": 999,
    "medium/a.bin": 3 * MiB,
    "big/video.bin": 21 * MiB + 5,  # multipart, 5 parts
}


def up(src: Path, url: str, info: LocalS3Info) -> UploadReport:
    plan = make_plan(survey(src), S3Url.parse(url), SHAPED)

    async def main() -> UploadReport:
        return await upload(plan, connection(info))

    return anyio.run(main)


def down(url: str, dest: Path, info: LocalS3Info, **options: Any) -> DownloadReport:
    async def main() -> DownloadReport:
        options.setdefault("range_size", 5 * MiB)
        return await download(S3Url.parse(url), dest, connection=connection(info), **options)

    return anyio.run(main)


def assert_same_tree(src: Path, dest: Path, paths: list[str]) -> None:
    for rel in paths:
        a, b = src / rel, dest / rel
        assert b.read_bytes() == a.read_bytes(), rel
        assert b.stat().st_mtime_ns == a.stat().st_mtime_ns, rel
        assert b.stat().st_mode & 0o7777 == a.stat().st_mode & 0o7777, rel


@pytest.fixture(scope="module")
def uploaded(
    tmp_path_factory: pytest.TempPathFactory, local_s3: LocalS3Info, sync_s3_client: Any
) -> tuple[Path, str]:
    sync_s3_client.create_bucket(Bucket="download-dataset")
    src = tmp_path_factory.mktemp("dl") / "src"
    write_tree(src, TREE, seed=11)
    os.chmod(src / "docs/ünïcødé – naïve.md", 0o600)
    os.utime(src / "empty.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    report = up(src, "s3://download-dataset/ds", local_s3)
    assert report.ok and report.extra["shards_uploaded"] >= 2
    return src, "s3://download-dataset/ds"


def test_dataset_round_trip_is_exact(
    uploaded: tuple[Path, str], local_s3: LocalS3Info, tmp_path: Path
) -> None:
    src, url = uploaded
    report = down(url, tmp_path / "out", local_s3)
    assert report.ok, report.failures
    assert report.kind == "dataset" and report.files_downloaded == len(TREE)
    assert_same_tree(src, tmp_path / "out", list(TREE))
    assert not [p for p in (tmp_path / "out").rglob("*s3xfer*")]  # no temporary files left
    again = down(url, tmp_path / "out", local_s3)
    assert (again.files_downloaded, again.files_skipped) == (0, len(TREE))
    assert again.requests <= 3  # bucket check, manifest: nothing transferred


def test_shards_are_read_in_large_ranges_not_per_file(
    uploaded: tuple[Path, str], local_s3: LocalS3Info, tmp_path: Path
) -> None:
    _, url = uploaded
    report = down(url, tmp_path / "out", local_s3, include=["img/*"])
    assert report.files_downloaded == 400
    assert report.requests < 20  # 400 files from two or three shards, 5 MiB ranges


def test_subset_by_glob(uploaded: tuple[Path, str], local_s3: LocalS3Info, tmp_path: Path) -> None:
    src, url = uploaded
    report = down(
        url, tmp_path / "out", local_s3, include=["img/01/*", "docs/*"], exclude=["img/01/006*"]
    )
    expected = [
        p
        for p in TREE
        if (p.startswith("img/01/") and not p.startswith("img/01/006")) or p.startswith("docs/")
    ]
    assert report.files_downloaded == len(expected)
    assert_same_tree(src, tmp_path / "out", expected)
    assert sorted(
        str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file()
    ) == sorted(expected)


def test_existing_files_are_kept_unless_overwrite(
    uploaded: tuple[Path, str], local_s3: LocalS3Info, tmp_path: Path
) -> None:
    src, url = uploaded
    out = tmp_path / "out"
    (out / "docs").mkdir(parents=True)
    (out / "docs/ünïcødé – naïve.md").write_text("mine")
    report = down(url, out, local_s3, include=["docs/*"])
    assert not report.ok and "use --overwrite" in report.failures[0][1]
    assert (out / "docs/ünïcødé – naïve.md").read_text() == "mine"
    report = down(url, out, local_s3, include=["docs/*"], overwrite=True)
    assert report.ok, (report.failures, report.refused)
    assert_same_tree(src, out, ["docs/ünïcødé – naïve.md"])


def test_plain_prefix_from_another_client(
    local_s3: LocalS3Info, bucket: str, sync_s3_client: Any, tmp_path: Path
) -> None:
    bodies = {"raw/a.txt": b"alpha", "raw/dir/b.bin": os.urandom(12 * MiB + 3), "raw/c": b""}
    for key, body in bodies.items():
        sync_s3_client.put_object(Bucket=bucket, Key=key, Body=body, ChecksumAlgorithm="CRC32")
    report = down(f"s3://{bucket}/raw", tmp_path / "out", local_s3)
    assert report.ok and report.kind == "prefix" and report.files_downloaded == 3
    for key, body in bodies.items():
        assert (tmp_path / "out" / key.removeprefix("raw/")).read_bytes() == body
    again = down(f"s3://{bucket}/raw", tmp_path / "out", local_s3)
    assert again.files_downloaded == 0 and again.files_skipped == 3


def multipart_put(
    client: Any, bucket: str, key: str, parts: list[bytes], *, full_object_crc32: bool
) -> None:
    """An object as another client uploads it: in these parts, with S3 keeping its
    whole-object CRC32 (ChecksumType FULL_OBJECT) or no checksum at all."""
    extra: dict[str, Any] = {}
    if full_object_crc32:
        extra = {"ChecksumAlgorithm": "CRC32", "ChecksumType": "FULL_OBJECT"}
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, **extra)["UploadId"]
    done = []
    for number, body in enumerate(parts, start=1):
        checksum = {"ChecksumCRC32": crc32_to_base64(crc32(body))} if full_object_crc32 else {}
        answer = client.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body, **checksum
        )
        done.append({"PartNumber": number, "ETag": answer["ETag"], **checksum})
    whole = {}
    if full_object_crc32:
        whole = {
            "ChecksumCRC32": crc32_to_base64(crc32(b"".join(parts))),
            "ChecksumType": "FULL_OBJECT",
        }
    client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done}, **whole
    )


def test_large_objects_of_a_plain_prefix_come_in_ranges_aligned_to_their_parts_and_verified(
    local_s3: LocalS3Info,
    bucket: str,
    sync_s3_client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    part = 5 * MiB
    checked = [os.urandom(part) for _ in range(3)] + [os.urandom(1234)]
    unchecked = [os.urandom(part) for _ in range(4)]
    multipart_put(sync_s3_client, bucket, "parts/checked.bin", checked, full_object_crc32=True)
    multipart_put(sync_s3_client, bucket, "parts/plain.bin", unchecked, full_object_crc32=False)
    ranges: list[tuple[str, str]] = []
    expected: dict[str, str | None] = {}
    real_get, real_download = S3.get_range_to, rangedl_module.download_ranges

    async def spy_get(self: S3, bucket: str, key: str, **kw: Any) -> int:
        ranges.append((key, kw["byte_range"]))
        return await real_get(self, bucket, key, **kw)

    async def spy_download(s3: Any, job: rangedl_module.RangedDownload, **kw: Any) -> Any:
        expected[job.key] = job.expected_crc32
        return await real_download(s3, job, **kw)

    monkeypatch.setattr(S3, "get_range_to", spy_get)
    monkeypatch.setattr(download_module, "download_ranges", spy_download)
    # 8 MiB preferred ranges: one 5 MiB part each, never a range across two parts.
    report = down(f"s3://{bucket}/parts", tmp_path / "out", local_s3, range_size=8 * MiB)
    assert report.ok and report.files_downloaded == 2, report.failures
    for name, parts in (("checked.bin", checked), ("plain.bin", unchecked)):
        assert (tmp_path / "out" / name).read_bytes() == b"".join(parts)
    for key in ("parts/checked.bin", "parts/plain.bin"):
        starts = sorted(int(r.removeprefix("bytes=").split("-")[0]) for k, r in ranges if k == key)
        assert starts == [0, part, 2 * part, 3 * part], (key, ranges)
    assert expected == {  # the CRC32 S3 kept is checked; none is made up for the other
        "parts/checked.bin": crc32_to_base64(crc32(b"".join(checked))),
        "parts/plain.bin": None,
    }


def test_hostile_names_stay_inside_dest(
    local_s3: LocalS3Info, bucket: str, sync_s3_client: Any, tmp_path: Path
) -> None:
    # A manifest crafted to point outside DEST, and a symlink inside DEST pointing out. ('..'
    # and absolute paths never get this far: the manifest is refused whole, exit 4, see
    # tests/faults/test_hostile_metadata.py.)
    outside = tmp_path / "outside"
    outside.mkdir()
    sync_s3_client.put_object(Bucket=bucket, Key="h/data", Body=b"evil")
    etag = sync_s3_client.head_object(Bucket=bucket, Key="h/data")["ETag"]
    rows = [
        [path, "h/data", 4, 0, 0o644, "", 0, -1, etag]
        for path in [
            "C:/win",
            "link/inside",
            "ok.txt",
        ]
    ]
    manifest = {
        "format": "s3xfer-manifest",
        "version": 1,
        "dest": f"s3://{bucket}/h",
        "files": rows,
        "shards": [],
    }
    sync_s3_client.put_object(
        Bucket=bucket,
        Key="h/.s3xfer/manifest.json.gz",
        Body=gzip.compress(json.dumps(manifest).encode()),
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(outside)
    result = run_cli("download", f"s3://{bucket}/h", str(out), "--json", env=local_s3.env())
    assert result.returncode == 1
    report = json.loads(result.stdout)
    refused = {r["path"] for r in report["refused"]}
    assert refused == {"link/inside"}
    assert (out / "ok.txt").read_bytes() == b"evil"
    assert (out / "C:" / "win").read_bytes() == b"evil"  # an ordinary name on POSIX
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "escape.txt").exists() and not Path("/etc/s3xfer-abs").exists()
    assert "REFUSED" in result.stderr


def test_killed_download_resumes(
    local_s3: LocalS3Info, bucket: str, sync_s3_client: Any, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    write_tree(src, {"huge.bin": 96 * MiB, **{f"s/{n}": 5000 for n in range(50)}}, seed=5)
    up(src, f"s3://{bucket}/k", local_s3)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "s3xfer",
            "download",
            f"s3://{bucket}/k",
            str(out),
            "-q",
            "--range-size",
            "5MiB",
            "-c",
            "1",
        ],
        env={**os.environ, **local_s3.env()},
    )
    deadline = time.monotonic() + 60
    sidecar = rangedl_module.sidecar_path(out / STAGING_DIR / partial_name("huge.bin"))
    while time.monotonic() < deadline and proc.poll() is None:
        if sidecar.exists() and len(json.loads(sidecar.read_text() or "{}").get("done", [])) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "huge.bin").exists()  # never a partial file under the final name
    report = down(f"s3://{bucket}/k", out, local_s3)
    assert report.ok, (report.failures, report.refused)
    assert report.bytes_downloaded < 96 * MiB + 50 * 5000  # the ranges already there were kept
    assert_same_tree(src, out, ["huge.bin", *(f"s/{n}" for n in range(50))])

"""One writer per dataset prefix (issue 12, case 6), through the real CLI.

Two uploads to one prefix at once used to leave the catalog and the manifest disagreeing for
good (`cat` and `download` returned different bytes, a later upload did not repair it). Now
the first to take `<prefix>/.s3xfer/lease.json` writes; the other stops at once, exit 6, one
line, nothing written. The races are made deterministic without sleeping: one upload runs
through the fault proxy, which holds its catalog writes (it then holds the lease) while the
test starts the other, or the test itself holds the lease object.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from s3xfer.dataset import catalog
from s3xfer.dataset.keys import S3Url
from s3xfer.locals3 import LocalS3Info
from s3xfer.write.lease import lease_key
from tests.faults.helpers import upload_holding
from tests.faults.test_bad_input import assert_one_clear_line
from tests.integration.helpers import list_keys, read_object, run_cli, write_tree

FILES = {"a.txt": 100, "b.txt": 200, "sub/c.json": 300, "big.bin": 2 * 1024 * 1024}


def lease_body(*, seconds: int = 300, released: bool = False, token: str = "f" * 32) -> bytes:
    return json.dumps(
        {
            "format": "s3xfer-lease",
            "version": 1,
            "token": token,
            "host": "otherhost",
            "pid": 4242,
            "command": "upload",
            "started": time.time(),
            "seconds": seconds,
            "released": released,
            "machine": "",
            "pid_start": 0,
        }
    ).encode()


def assert_reads_agree(url: S3Url, tree: dict[str, bytes], out: Path) -> None:
    """`cat` (catalog) and `download` (manifest) both give back exactly the tree."""
    result = run_cli("download", str(url), str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    restored = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert restored == tree
    for path, data in tree.items():
        cat = subprocess.run(
            [sys.executable, "-m", "s3xfer", "cat", str(url), path], capture_output=True
        )
        assert cat.returncode == 0, cat.stderr
        assert cat.stdout == data, path


def catalog_pieces(client: Any, url: S3Url) -> dict[str, bytes]:
    return {
        key: read_object(client, url.bucket, key)
        for key in list_keys(client, url.bucket, url.key(".s3xfer/catalog/"))
    }


def test_a_second_upload_while_the_first_writes_stops_and_writes_nothing(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    url = S3Url(bucket, "ds")
    first = write_tree(tmp_path / "first", FILES, seed=1)
    second = write_tree(tmp_path / "second", {**FILES, "only-second.txt": 50}, seed=2)
    seen: dict[str, Any] = {}

    def second_upload(
        _: subprocess.Popen[str],
    ) -> None:  # runs while the first is held at its first catalog write
        seen["before"] = {
            k: read_object(sync_s3_client, bucket, k)
            for k in list_keys(sync_s3_client, bucket, "ds/")
            if k != lease_key(url)
        }
        seen["result"] = run_cli("upload", str(tmp_path / "second"), str(url), "--quiet")
        seen["after"] = {
            k: read_object(sync_s3_client, bucket, k)
            for k in list_keys(sync_s3_client, bucket, "ds/")
            if k != lease_key(url)
        }

    result = upload_holding(
        [str(tmp_path / "first"), str(url), "--quiet"],
        info=s3_env,
        hold=rf"^/{bucket}/ds/\.s3xfer/catalog/",
        meanwhile=second_upload,
    )
    assert result.returncode == 0, result.stderr
    assert_one_clear_line(
        seen["result"], 6, "another s3xfer is writing s3://", "`s3xfer upload` on", "--break-lease"
    )
    assert seen["after"] == seen["before"], "the second upload wrote while the first held it"
    assert_reads_agree(url, first, tmp_path / "out")
    lease = json.loads(read_object(sync_s3_client, bucket, lease_key(url)))
    assert lease["released"] is True
    del second


def test_an_upload_that_lost_its_lease_writes_no_manifest(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    """Its lease broken (--break-lease elsewhere) while it runs: it stops before writing."""
    url = S3Url(bucket, "ds")
    write_tree(tmp_path / "src", FILES)

    def break_it(_: subprocess.Popen[str]) -> None:
        sync_s3_client.put_object(Bucket=bucket, Key=lease_key(url), Body=lease_body())

    result = upload_holding(
        [str(tmp_path / "src"), str(url), "--quiet"],
        info=s3_env,
        hold=rf"^/{bucket}/ds/big\.bin",  # a data PUT: before any catalog write
        meanwhile=break_it,
    )
    assert_one_clear_line(result, 6, "lost the lease of s3://", "otherhost")
    keys = list_keys(sync_s3_client, bucket, "ds/")
    assert not any(".s3xfer/catalog" in k or k.endswith("manifest.json.gz") for k in keys), keys


def test_a_held_lease_stops_upload_and_finalize_until_broken(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    url = S3Url(bucket, "ds")
    tree = write_tree(tmp_path / "src", FILES)
    sync_s3_client.put_object(Bucket=bucket, Key=lease_key(url), Body=lease_body())
    result = run_cli("upload", str(tmp_path / "src"), str(url), "--quiet")
    assert_one_clear_line(result, 6, "otherhost, pid 4242", "expires in")
    assert list_keys(sync_s3_client, bucket, "ds/") == [lease_key(url)]
    plan = tmp_path / "plan.json"
    assert run_cli("plan", str(tmp_path / "src"), str(url), "-o", str(plan)).returncode == 0
    assert run_cli("upload", "--plan", str(plan), "--slice", "1/1", "--quiet").returncode == 0
    result = run_cli("finalize", "--plan", str(plan))
    assert_one_clear_line(result, 6, "another s3xfer is writing", "otherhost")
    result = run_cli("upload", str(tmp_path / "src"), str(url), "--quiet", "--break-lease")
    assert result.returncode == 0, result.stderr
    assert_reads_agree(url, tree, tmp_path / "out")


@pytest.mark.parametrize(
    "body",
    [lease_body(seconds=0), lease_body(released=True)],
    ids=["expired", "released"],
)
def test_an_expired_or_released_lease_is_taken_over(
    body: bytes, tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    url = S3Url(bucket, "ds")
    tree = write_tree(tmp_path / "src", FILES)
    sync_s3_client.put_object(Bucket=bucket, Key=lease_key(url), Body=body)
    result = run_cli("upload", str(tmp_path / "src"), str(url), "--quiet")
    assert result.returncode == 0, result.stderr
    assert_reads_agree(url, tree, tmp_path / "out")


def test_an_unreadable_lease_still_holds_until_it_expires(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    url = S3Url(bucket, "ds")
    write_tree(tmp_path / "src", FILES)
    sync_s3_client.put_object(Bucket=bucket, Key=lease_key(url), Body=b"\x00garbage")
    result = run_cli("upload", str(tmp_path / "src"), str(url), "--quiet")
    assert_one_clear_line(result, 6, "an unreadable lease", "--break-lease")


def test_a_later_upload_repairs_a_catalog_that_disagrees_with_the_manifest(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    """What two racing writers (or one killed between the catalog and the manifest) left: a
    catalog piece from one state, the manifest from another. The next upload of the same,
    unchanged tree rewrites the catalog from the manifest."""
    url = S3Url(bucket, "ds")
    src = tmp_path / "src"
    write_tree(src, FILES, seed=1)
    assert run_cli("upload", str(src), str(url), "--quiet").returncode == 0
    old_pieces = catalog_pieces(sync_s3_client, url)
    tree = write_tree(src, {"a.txt": 150, "sub/c.json": 300, "new.txt": 10}, seed=3)
    tree |= {rel: (src / rel).read_bytes() for rel in ("b.txt", "big.bin")}
    assert run_cli("upload", str(src), str(url), "--quiet").returncode == 0
    for key, body in old_pieces.items():  # the other writer's pieces, landed last
        sync_s3_client.put_object(Bucket=bucket, Key=key, Body=body)
    stale = subprocess.run(
        [sys.executable, "-m", "s3xfer", "cat", str(url), "a.txt"], capture_output=True
    )
    assert stale.stdout != tree["a.txt"]  # the catalog disagrees with the manifest
    again = run_cli("upload", str(src), str(url), "--json")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["files_uploaded"] == 0 and report["manifest_written"] is True
    assert_reads_agree(url, tree, tmp_path / "out")
    root = json.loads(read_object(sync_s3_client, bucket, catalog.root_key(url)))
    listed = {
        key: sync_s3_client.head_object(Bucket=bucket, Key=key)["ETag"]
        for key in list_keys(sync_s3_client, bucket, url.key(".s3xfer/catalog/"))
    }
    assert {catalog.piece_key(url, int(b, 16)): e for b, e in root["pieces"].items()} == listed
    quiet = json.loads(run_cli("upload", str(src), str(url), "--json").stdout)
    assert quiet["write_requests"] == 0  # repaired once; a re-run writes nothing, no lease


def test_a_catalog_without_its_manifest_checksum_is_rewritten_once(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    """A root as s3xfer wrote it before these checks (no manifest_sha256, no pieces) and a
    piece missing: the next upload writes the whole catalog again."""
    url = S3Url(bucket, "ds")
    tree = write_tree(tmp_path / "src", FILES)
    assert run_cli("upload", str(tmp_path / "src"), str(url), "--quiet").returncode == 0
    root = json.loads(read_object(sync_s3_client, bucket, catalog.root_key(url)))
    del root["manifest_sha256"], root["pieces"]
    sync_s3_client.put_object(Bucket=bucket, Key=catalog.root_key(url), Body=json.dumps(root))
    piece = catalog.piece_key(url, catalog.bucket_of("a.txt"))
    sync_s3_client.delete_object(Bucket=bucket, Key=piece)
    result = run_cli("upload", str(tmp_path / "src"), str(url), "--quiet")
    assert result.returncode == 0, result.stderr
    assert json.loads(gzip.decompress(read_object(sync_s3_client, bucket, piece)))["files"]
    assert_reads_agree(url, tree, tmp_path / "out")


def test_break_lease_is_refused_where_no_lease_is_taken(tmp_path: Path) -> None:
    result = run_cli(
        "upload", "--plan", str(tmp_path / "p.json"), "--slice", "1/2", "--break-lease"
    )
    assert_one_clear_line(result, 2, "--break-lease applies where the manifest is written")


def test_a_lease_is_aged_by_the_servers_clock(s3_env: LocalS3Info, bucket: str) -> None:
    """The HEAD of the lease brings Last-Modified and Date, both the server's."""
    import anyio

    from s3xfer.checksums import crc32, crc32_to_base64
    from s3xfer.transport.retry import RetryPolicy
    from s3xfer.transport.s3 import open_s3
    from s3xfer.write.lease import look
    from tests.integration.helpers import connection

    url = S3Url(bucket, "aged")

    async def main() -> None:
        async with open_s3(connection(s3_env)) as s3:
            body = lease_body()
            await s3.put_object(bucket, lease_key(url), body, crc32=crc32_to_base64(crc32(body)))
            head = await s3.head_object(bucket, lease_key(url))
            assert {"LastModified", "Date"} <= set(head)
            found = await look(s3, url, policy=RetryPolicy(max_attempts=2))
            assert found is not None and found.info is not None
            assert 0 <= found.age < 60 and not found.free

    anyio.run(main)

"""Hostile or corrupt metadata, through the real CLI: a manifest, catalog piece or slice result
holding one bad value makes `download`, `cat`, `get`, `ls`, `upload` and `finalize` stop
with exit 4 and one line "corrupt dataset metadata: <kind> <where>: <what>", never a crash,
never a skipped file, nothing written and no temporary file left.

Each row uploads a small dataset with the CLI, damages one value with the test's own botocore
client, and runs one command against it.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import subprocess
import sys
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from s3xfer.dataset import catalog
from s3xfer.dataset.keys import S3Url, manifest_key
from s3xfer.locals3 import LocalS3Info
from tests.faults.test_bad_input import TEMPORARY_NAMES, assert_one_clear_line
from tests.integration.helpers import list_keys, run_cli, write_tree

FILES = {"a.txt": 10, "b.txt": 20, "sub/c.json": 300, "big.bin": 2 * 1024 * 1024}
Damage = Callable[[Any, S3Url], None]


def read_gzip_json(client: Any, bucket: str, key: str) -> Any:
    return json.loads(gzip.decompress(client.get_object(Bucket=bucket, Key=key)["Body"].read()))


def put_gzip_json(client: Any, bucket: str, key: str, data: Any) -> None:
    client.put_object(Bucket=bucket, Key=key, Body=gzip.compress(json.dumps(data).encode()))


# Row fields: path, key, size, mtime_ns, mode, crc32, part_size, offset, etag, content_type
# (docs/format.md).
FIELD = {
    "path": 0,
    "size": 2,
    "mtime_ns": 3,
    "mode": 4,
    "crc32": 5,
    "offset": 7,
    "etag": 8,
    "content_type": 9,
}


def set_in_manifest(path: str, name: str, value: Any) -> Damage:
    def damage(client: Any, url: S3Url) -> None:
        data = read_gzip_json(client, url.bucket, manifest_key(url))
        for row in data["files"]:
            if row[0] == path:
                row[FIELD[name]] = value
        put_gzip_json(client, url.bucket, manifest_key(url), data)

    return damage


def set_in_piece(path: str, name: str, value: Any) -> Damage:
    def damage(client: Any, url: S3Url) -> None:
        key = catalog.piece_key(url, catalog.bucket_of(path))
        data = read_gzip_json(client, url.bucket, key)
        for row in data["files"]:
            if row[0] == path:
                row[FIELD[name]] = value
        put_gzip_json(client, url.bucket, key, data)

    return damage


def duplicate_in_manifest(client: Any, url: S3Url) -> None:
    data = read_gzip_json(client, url.bucket, manifest_key(url))
    data["files"].append(list(data["files"][0]))
    put_gzip_json(client, url.bucket, manifest_key(url), data)


def broken_deflate(body: bytes) -> bytes:
    """A gzip header followed by a deflate stream no inflater accepts (block type 3)."""
    return body[:10] + b"\xff" * 64


def gzip_bomb() -> bytes:
    """About 2 MB of gzip that inflates to 2 GiB of zeros."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    return b"".join(packer.compress(zeros) for _ in range(2048)) + packer.flush()


def replace_manifest(make: Callable[[bytes], bytes]) -> Damage:
    def damage(client: Any, url: S3Url) -> None:
        body = client.get_object(Bucket=url.bucket, Key=manifest_key(url))["Body"].read()
        client.put_object(Bucket=url.bucket, Key=manifest_key(url), Body=make(body))

    return damage


def replace_piece(path: str, make: Callable[[bytes], bytes]) -> Damage:
    def damage(client: Any, url: S3Url) -> None:
        key = catalog.piece_key(url, catalog.bucket_of(path))
        body = client.get_object(Bucket=url.bucket, Key=key)["Body"].read()
        client.put_object(Bucket=url.bucket, Key=key, Body=make(body))

    return damage


@dataclass(frozen=True)
class Row:
    damage: Damage
    argv: tuple[str, ...]  # after `s3xfer`; {url} and {out} filled in
    fragments: tuple[str, ...]  # in the one stderr line, after "corrupt dataset metadata: "


def row(damage: Damage, argv: str, *fragments: str) -> Row:
    return Row(damage, tuple(argv.split()), fragments)


MANIFEST = "manifest {url}/.s3xfer/manifest.json.gz"
PIECE = "catalog piece {url}/.s3xfer/catalog/"
HUGE = 10**15

ROWS = {
    "download-broken-deflate": row(
        replace_manifest(broken_deflate), "download {url} {out}", MANIFEST, "not a valid gzip"
    ),
    "cat-broken-deflate": row(
        replace_piece("a.txt", broken_deflate), "cat {url} a.txt", PIECE, "not a valid gzip"
    ),
    "download-negative-size": row(
        set_in_manifest("a.txt", "size", -1),
        "download {url} {out}",
        MANIFEST,
        "file 'a.txt': size -1 is below 0",
    ),
    "cat-negative-size": row(
        set_in_piece("a.txt", "size", -1), "cat {url} a.txt", PIECE, "'a.txt': size -1"
    ),
    "get-negative-size": row(
        set_in_manifest("a.txt", "size", -1), "get {url} * {out}", MANIFEST, "size -1"
    ),
    "download-huge-size": row(
        set_in_manifest("big.bin", "size", HUGE),
        "download {url} {out}",
        MANIFEST,
        f"file 'big.bin': size {HUGE} is above",
    ),
    "cat-huge-size": row(
        set_in_piece("big.bin", "size", HUGE), "cat {url} big.bin", PIECE, f"size {HUGE}"
    ),
    "download-huge-mtime": row(
        set_in_manifest("a.txt", "mtime_ns", 10**30),
        "download {url} {out}",
        MANIFEST,
        "mtime_ns 1000000000000000000000000000000 is above",
    ),
    "ls-huge-mtime": row(
        set_in_manifest("a.txt", "mtime_ns", 10**30), "ls {url}", MANIFEST, "mtime_ns"
    ),
    "download-negative-mode": row(
        set_in_manifest("a.txt", "mode", -1),
        "download {url} {out}",
        MANIFEST,
        "mode -0o1 is not permission bits",
    ),
    "download-file-type-in-mode": row(
        set_in_manifest("a.txt", "mode", 0o100644), "download {url} {out}", MANIFEST, "mode"
    ),
    "download-offset-past-the-shard": row(
        set_in_manifest("a.txt", "offset", 512 * 10**6),
        "download {url} {out}",
        MANIFEST,
        "past the end of its shard",
    ),
    "download-offset-off-block": row(
        set_in_manifest("a.txt", "offset", 513), "download {url} {out}", MANIFEST, "513"
    ),
    "download-etag-with-newline": row(
        set_in_manifest("a.txt", "etag", '"abc"\r\nX-Evil: 1'),
        "download {url} {out}",
        MANIFEST,
        "not printable ASCII",
    ),
    "cat-content-type-with-escape": row(
        set_in_piece("a.txt", "content_type", "text/plain\x1b]0;owned\x07"),
        "cat {url} a.txt",
        PIECE,
        "content_type",
    ),
    "download-crc-not-base64": row(
        set_in_manifest("a.txt", "crc32", "!!!!!!=="),
        "download {url} {out}",
        MANIFEST,
        "crc32",
    ),
    "download-path-dotdot": row(
        set_in_manifest("a.txt", "path", "../escape.txt"),
        "download {url} {out}",
        MANIFEST,
        "'../escape.txt' is not normalized",
    ),
    "download-path-absolute": row(
        set_in_manifest("a.txt", "path", "/etc/escape"),
        "download {url} {out}",
        MANIFEST,
        "is absolute",
    ),
    "download-path-nul": row(
        set_in_manifest("a.txt", "path", "a\x00b"),
        "download {url} {out}",
        MANIFEST,
        "NUL",
    ),
    "download-path-twice": row(
        duplicate_in_manifest, "download {url} {out}", MANIFEST, "listed twice"
    ),
    "upload-again-negative-size": row(
        set_in_manifest("a.txt", "size", -1),
        "upload {src} {url} --quiet",
        MANIFEST,
        "size -1",
    ),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile-src")
    write_tree(root, FILES)
    return root


def uploaded(source: Path, bucket: str) -> S3Url:
    url = S3Url(bucket, f"ds-{uuid.uuid4().hex[:8]}")
    result = run_cli("upload", str(source), str(url), "--quiet")
    assert result.returncode == 0, result.stderr
    return url


def objects(client: Any, url: S3Url) -> dict[str, str]:
    """Every object of the dataset and its ETag."""
    return {
        key: client.head_object(Bucket=url.bucket, Key=key)["ETag"]
        for key in list_keys(client, url.bucket, url.prefix + "/")
    }


def assert_nothing_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    written = [p for p in out.rglob("*")] if out.exists() else []
    assert written == [], written
    leftovers = [p for pattern in TEMPORARY_NAMES for p in tmp_path.rglob(pattern)]
    assert leftovers == [], leftovers
    assert not (tmp_path / "escape.txt").exists()


@pytest.mark.parametrize("name", list(ROWS))
def test_a_bad_value_stops_the_command_with_exit_4(
    name: str,
    source: Path,
    s3_env: LocalS3Info,
    sync_s3_client: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    case = ROWS[name]
    url = uploaded(source, bucket)
    case.damage(sync_s3_client, url)
    before = objects(sync_s3_client, url)
    names = {"url": str(url), "out": str(tmp_path / "out"), "src": str(source)}
    result = run_cli(*(arg.format(**names) for arg in case.argv))
    fragments = [f.format(**names) for f in case.fragments]
    assert_one_clear_line(result, 4, "corrupt dataset metadata: ", *fragments)
    assert result.stdout == "" or case.argv[0] == "upload", result.stdout
    assert_nothing_written(tmp_path)
    assert objects(sync_s3_client, url) == before, "the damaged dataset was written to"


def run_with_memory_cap(
    argv: list[str], *, cap: int, tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], int]:
    """The CLI with at most `cap` bytes of address space: its result and its peak RSS."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "s3xfer", *argv], stdout=out, stderr=err, preexec_fn=limit
        )
        _pid, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    result = subprocess.CompletedProcess(
        argv, process.returncode, out_path.read_text(), err_path.read_text()
    )
    return result, usage.ru_maxrss * 1024


@pytest.mark.parametrize("command", ["download", "cat"])
def test_a_gzip_bomb_is_refused_within_bounded_memory(
    command: str,
    source: Path,
    s3_env: LocalS3Info,
    sync_s3_client: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    """2 MB that inflate to 2 GiB: refused after at most 64 times the stored size."""
    url = uploaded(source, bucket)
    bomb = gzip_bomb()
    assert len(bomb) < 3 * 1024 * 1024
    if command == "download":
        replace_manifest(lambda _body: bomb)(sync_s3_client, url)
        argv, kind = ["download", str(url), str(tmp_path / "out")], MANIFEST
    else:
        replace_piece("a.txt", lambda _body: bomb)(sync_s3_client, url)
        argv, kind = ["cat", str(url), "a.txt"], PIECE
    # 2 GiB of address space: the bomb inflated whole (or twice) cannot fit in it.
    result, peak = run_with_memory_cap(argv, cap=2 * 1024**3, tmp_path=tmp_path)
    assert_one_clear_line(
        result, 4, "corrupt dataset metadata: ", kind.format(url=url), "inflates to more than"
    )
    assert peak < 700 * 1024**2, f"peak RSS {peak / 2**20:.0f} MiB"
    assert_nothing_written(tmp_path)


def test_a_catalogued_size_the_object_does_not_have_fails_at_once(
    source: Path, s3_env: LocalS3Info, sync_s3_client: Any, bucket: str
) -> None:
    """A record that says 3 MiB for an object of 2 MiB: the answer is complete and will be
    the same next time, so it is refused after one GET, not retried as if transient."""
    from s3xfer.read.sync import SyncDataset
    from s3xfer.transport.s3 import Connection

    url = uploaded(source, bucket)
    set_in_piece("big.bin", "size", 3 * 1024 * 1024)(sync_s3_client, url)
    result = run_cli("cat", str(url), "big.bin")
    assert_one_clear_line(result, 4, "big.bin", "catalogued 3145728")
    connection = Connection(
        endpoint_url=s3_env.endpoint_url,
        region=s3_env.region,
        access_key=s3_env.access_key,
        secret_key=s3_env.secret_key,
    )
    with SyncDataset(str(url), connection=connection) as ds:
        with pytest.raises(Exception, match="catalogued 3145728") as raised:
            ds.read("big.bin")
        assert type(raised.value).__name__ == "IntegrityError"
        assert (ds.stats.gets, ds.stats.retries) == (1, 0)


def test_setuid_and_setgid_bits_are_not_restored(
    s3_env: LocalS3Info, bucket: str, tmp_path: Path
) -> None:
    """Recorded as uploaded, restored without them (docs/reliability.md): a dataset cannot
    plant a program that runs as whoever restored it. The sticky bit and the rest are kept."""
    src = tmp_path / "src"
    write_tree(src, {"tool.sh": 10, "big.bin": 2 * 1024 * 1024, "shared": 5})
    (src / "tool.sh").chmod(0o4755)
    (src / "big.bin").chmod(0o6750)
    (src / "shared").chmod(0o1777)
    url = f"s3://{bucket}/modes"
    assert run_cli("upload", str(src), url, "--quiet").returncode == 0
    listed = json.loads(run_cli("ls", url, "--json").stdout)
    assert {r["path"]: r["mode"] for r in listed}["tool.sh"] == 0o4755  # recorded whole
    out = tmp_path / "out"
    result = run_cli("download", url, str(out), "--quiet", "--range-size", "1MiB")  # rangedl
    assert result.returncode == 0, result.stderr
    modes = {
        name: os.stat(out / name).st_mode & 0o7777 for name in ("tool.sh", "big.bin", "shared")
    }
    assert modes == {"tool.sh": 0o755, "big.bin": 0o750, "shared": 0o1777}


def test_a_corrupt_slice_result_stops_finalize(
    s3_env: LocalS3Info, sync_s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    write_tree(src, FILES)
    plan = tmp_path / "plan.json"
    url = S3Url(bucket, "sliced")
    assert run_cli("plan", str(src), str(url), "-o", str(plan)).returncode == 0
    for k in (1, 2):
        result = run_cli("upload", "--plan", str(plan), "--slice", f"{k}/2", "--quiet")
        assert result.returncode == 0, result.stderr
    [key] = [
        k for k in list_keys(sync_s3_client, bucket, "sliced/") if k.endswith("1-of-00002.json.gz")
    ]
    data = read_gzip_json(sync_s3_client, bucket, key)
    data["files"][0][FIELD["size"]] = -5
    put_gzip_json(sync_s3_client, bucket, key, data)
    result = run_cli("finalize", "--plan", str(plan))
    assert_one_clear_line(result, 4, "corrupt dataset metadata: slice result", "size -5")
    assert manifest_key(url) not in list_keys(sync_s3_client, bucket, "sliced/")


def test_a_plan_with_a_bad_value_is_refused_by_name(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, {"big.bin": 2 * 1024 * 1024})
    plan = tmp_path / "plan.json"
    assert run_cli("plan", str(src), "s3://bkt/x", "-o", str(plan)).returncode == 0
    data = json.loads(plan.read_text())
    data["units"][0][5] = -1  # mode
    plan.write_text(json.dumps(data))
    result = run_cli("upload", "--plan", str(plan))
    assert_one_clear_line(result, 2, f"corrupt plan file {plan}", "'big.bin': mode -0o1")

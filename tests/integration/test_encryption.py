"""Client-side encryption (--encryption-key) through the real CLI against the local S3 server:
the server never holds a byte of a file in the clear, every reader decrypts with the key and
refuses without it, and anything changed on the server is an integrity error, never garbage."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from s3xfer.config import MiB
from s3xfer.dataset.manifest import Manifest
from s3xfer.errors import EncryptionKeyError
from s3xfer.locals3 import LocalS3Info
from s3xfer.read.reader import Dataset
from s3xfer.read.sync import SyncDataset

from .helpers import connection, list_keys, read_object, run_cli

SHAPE = [
    "--part-size",
    "5MiB",
    "--multipart-threshold",
    "6MiB",
    "--pack-threshold",
    "64KiB",
    "--shard-size",
    "5MiB",
    "--concurrency",
    "8",
]

# Names as odd as a tree holds them; sizes at frame and part edges.
TREE = {
    **{f"img/{n // 40:02d}/ünï {n:04d}.jpg": 100 + (n * 997) % 30_000 for n in range(200)},
    "empty.txt": 0,
    "odd\nname.txt": 17,
    "docs/naïve – déjà vu.md": 999,
    "medium/one frame.bin": MiB,
    "medium/frame and a byte.bin": MiB + 1,
    "big/video.bin": 11 * MiB + 5,  # multipart: parts of 5 MiB, frames of 1 MiB
}


def marked_tree(root: Path) -> dict[str, bytes]:
    """Every file starts with a marker of its own (16 random bytes) and repeats it, so that
    any plaintext on the server shows as one of them."""
    rng = random.Random(16)
    contents: dict[str, bytes] = {}
    for rel, size in TREE.items():
        marker = rng.randbytes(16)
        data = (marker * (size // 16 + 1))[:size]
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        contents[rel] = data
    return contents


def env(info: LocalS3Info) -> dict[str, str]:
    return info.env()


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("key") / "dataset.key"
    path.write_bytes(os.urandom(32))
    return path


@pytest.fixture(scope="module")
def encrypted(
    tmp_path_factory: pytest.TempPathFactory,
    local_s3: LocalS3Info,
    sync_s3_client: Any,
    key_file: Path,
) -> tuple[Path, dict[str, bytes], str]:
    bucket = "encrypted-dataset"
    sync_s3_client.create_bucket(Bucket=bucket)
    src = tmp_path_factory.mktemp("enc") / "src"
    contents = marked_tree(src)
    result = run_cli(
        "upload",
        str(src),
        f"s3://{bucket}/ds",
        *SHAPE,
        "--encryption-key",
        str(key_file),
        "--quiet",
        env=env(local_s3),
    )
    assert result.returncode == 0, result.stderr
    return src, contents, bucket


def test_no_byte_of_a_file_is_on_the_server_in_the_clear(
    encrypted: tuple[Path, dict[str, bytes], str], sync_s3_client: Any, key_file: Path
) -> None:
    _, contents, bucket = encrypted
    markers = {rel: data[:16] for rel, data in contents.items() if len(data) >= 16}
    stored = {
        key: read_object(sync_s3_client, bucket, key) for key in list_keys(sync_s3_client, bucket)
    }
    assert any(key.endswith(".tar") for key in stored) and "ds/big/video.bin" in stored
    assert "ds/.s3xfer/keys.json" in stored
    user_key = key_file.read_bytes()
    for key, body in stored.items():
        assert user_key not in body, key
        for rel, marker in markers.items():
            assert marker not in body, f"{rel}'s bytes in the clear in {key}"
    manifest = Manifest.from_bytes(stored["ds/.s3xfer/manifest.json.gz"], where="m")
    assert {r.coding for r in manifest.records.values()} == {"aes-256-gcm"}
    video = manifest.records["big/video.bin"]
    assert video.stored == 11 * MiB + 5 + 12 * 28 == len(stored["ds/big/video.bin"])


def test_every_file_reads_back_with_the_key(
    encrypted: tuple[Path, dict[str, bytes], str], s3_env: LocalS3Info, key_file: Path
) -> None:
    _, contents, bucket = encrypted
    user_key = key_file.read_bytes()

    async def main() -> dict[str, bytes]:
        url = f"s3://{bucket}/ds"
        async with Dataset(url, connection=connection(s3_env), encryption_key=user_key) as ds:
            return await ds.read_many(list(contents))

    assert anyio.run(main) == contents


def test_a_dataset_read_without_its_key_is_refused(
    encrypted: tuple[Path, dict[str, bytes], str], s3_env: LocalS3Info
) -> None:
    _, _, bucket = encrypted

    async def main() -> None:
        async with Dataset(f"s3://{bucket}/ds", connection=connection(s3_env)) as ds:
            await ds.read("empty.txt")

    with pytest.raises(EncryptionKeyError, match="encryption-key"):
        anyio.run(main)


def cli(info: LocalS3Info, *args: str) -> Any:
    return run_cli(*args, env=env(info))


def test_cat_and_get_decrypt_through_the_cli(
    encrypted: tuple[Path, dict[str, bytes], str],
    s3_env: LocalS3Info,
    key_file: Path,
    tmp_path: Path,
) -> None:
    _, contents, bucket = encrypted
    url = f"s3://{bucket}/ds"
    for rel in ("img/01/ünï 0042.jpg", "big/video.bin", "empty.txt", "medium/frame and a byte.bin"):
        result = subprocess_bytes(s3_env, "cat", url, rel, "--encryption-key", str(key_file))
        assert result.returncode == 0, result.stderr
        assert result.stdout == contents[rel], rel
    out = tmp_path / "out"
    result = cli(s3_env, "get", url, "*", str(out), "--encryption-key", str(key_file))
    assert result.returncode == 0, result.stderr
    for rel, data in contents.items():
        assert (out / rel).read_bytes() == data, rel


def subprocess_bytes(info: LocalS3Info, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "s3xfer", *args],
        env={**os.environ, **env(info)},
        capture_output=True,
        timeout=120,
    )


@pytest.mark.parametrize("command", ["cat", "get"])
def test_a_missing_or_wrong_key_is_one_line_exit_2_and_nothing_written(
    encrypted: tuple[Path, dict[str, bytes], str],
    s3_env: LocalS3Info,
    key_file: Path,
    tmp_path: Path,
    command: str,
) -> None:
    _, _, bucket = encrypted
    url = f"s3://{bucket}/ds"
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(os.urandom(32))
    short = tmp_path / "short.key"
    short.write_bytes(b"0123456789")
    out = tmp_path / "out"
    target = ["docs/naïve – déjà vu.md"] if command == "cat" else ["docs/*", str(out)]
    for key_args, message in [
        ([], "is encrypted: give the dataset's --encryption-key"),
        (["--encryption-key", str(wrong)], "wrong encryption key"),
        (["--encryption-key", str(short)], "must hold exactly 32 bytes"),
    ]:
        result = subprocess_bytes(s3_env, command, url, *target, *key_args)
        stderr = result.stderr.decode()
        assert result.returncode == 2, stderr
        assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
        assert result.stdout == b"" or command == "get"
        assert not out.exists()
        assert key_file.read_bytes().hex() not in stderr


def test_upload_without_the_key_into_an_encrypted_dataset_is_refused(
    encrypted: tuple[Path, dict[str, bytes], str], s3_env: LocalS3Info
) -> None:
    src, _, bucket = encrypted
    (src / "new.txt").write_bytes(b"would be stored in the clear")
    try:
        result = cli(s3_env, "upload", str(src), f"s3://{bucket}/ds", *SHAPE, "--quiet")
    finally:
        (src / "new.txt").unlink()
    assert result.returncode == 2, result.stderr
    assert "is encrypted: give its --encryption-key" in result.stderr


def test_a_re_upload_with_the_key_sends_nothing(
    encrypted: tuple[Path, dict[str, bytes], str], s3_env: LocalS3Info, key_file: Path
) -> None:
    src, _, bucket = encrypted
    url = f"s3://{bucket}/ds"
    result = cli(
        s3_env, "upload", str(src), url, *SHAPE, "--encryption-key", str(key_file), "--json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["files_uploaded"] == 0 and report["files_unchanged"] == len(TREE), report


def test_reading_one_member_is_one_data_get(
    encrypted: tuple[Path, dict[str, bytes], str], s3_env: LocalS3Info, key_file: Path
) -> None:
    _, contents, bucket = encrypted
    user_key = key_file.read_bytes()
    first, second = "img/02/ünï 0081.jpg", "img/02/ünï 0082.jpg"

    async def main() -> None:
        url = f"s3://{bucket}/ds"
        async with Dataset(url, connection=connection(s3_env), encryption_key=user_key) as ds:
            assert await ds.read(first) == contents[first]
            # its catalog piece, the key record (once per Dataset), and one data GET
            assert (ds.s3.requests, ds.stats.gets) == (3, 1)
            before = ds.s3.requests
            await ds.stat(second)
            piece = ds.s3.requests - before  # 0 when both share a piece
            assert await ds.read(second) == contents[second]
            assert ds.s3.requests - before - piece == 1 and ds.stats.gets == 2

    anyio.run(main)


def replace_stored(client: Any, bucket: str, key: str, body: bytes) -> None:
    """Write `body` over an object, and give every catalog record of it the new ETag (as if
    the dataset had been written so): only the bytes' own checks stand between the reader
    and what was changed."""
    old = client.head_object(Bucket=bucket, Key=key)["ETag"]
    new = client.put_object(Bucket=bucket, Key=key, Body=body)["ETag"]
    for piece in list_keys(client, bucket, "ds/.s3xfer/catalog/"):
        raw = gzip.decompress(read_object(client, bucket, piece))
        if old.encode() in raw or json.dumps(old).encode() in raw:
            text = raw.decode().replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1])
            client.put_object(Bucket=bucket, Key=piece, Body=gzip.compress(text.encode()))


@pytest.fixture
def small_encrypted(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, key_file: Path
) -> tuple[dict[str, bytes], str]:
    files = {"swap/a.txt": b"A" * 300, "swap/b.txt": b"B" * 300, "big.bin": os.urandom(7 * MiB)}
    for rel, data in files.items():
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / rel).write_bytes(data)
    result = cli(
        s3_env, "upload", str(tmp_path / "src"), f"s3://{bucket}/ds", *SHAPE,
        "--encryption-key", str(key_file), "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return files, bucket


def shard_of(client: Any, bucket: str) -> str:
    return next(k for k in list_keys(client, bucket, "ds/.s3xfer/shards/") if k.endswith(".tar"))


@pytest.mark.parametrize("where", ["member", "large file"])
def test_a_changed_byte_is_exit_4_never_garbage(
    small_encrypted: tuple[dict[str, bytes], str],
    s3_env: LocalS3Info,
    sync_s3_client: Any,
    key_file: Path,
    where: str,
) -> None:
    _files, bucket = small_encrypted
    if where == "member":
        key, rel = shard_of(sync_s3_client, bucket), "swap/a.txt"
        body = bytearray(read_object(sync_s3_client, bucket, key))
        body[512 + 100] ^= 0x01  # inside the first member's ciphertext
    else:
        key, rel = "ds/big.bin", "big.bin"
        body = bytearray(read_object(sync_s3_client, bucket, key))
        body[3 * MiB] ^= 0x01
    replace_stored(sync_s3_client, bucket, key, bytes(body))
    result = subprocess_bytes(
        s3_env, "cat", f"s3://{bucket}/ds", rel, "--encryption-key", str(key_file)
    )
    assert result.returncode == 4, result.stderr
    assert b"fails authentication" in result.stderr and result.stdout == b""


def test_members_swapped_inside_their_shard_are_refused(
    small_encrypted: tuple[dict[str, bytes], str],
    s3_env: LocalS3Info,
    sync_s3_client: Any,
    key_file: Path,
) -> None:
    files, bucket = small_encrypted
    key = shard_of(sync_s3_client, bucket)
    body = read_object(sync_s3_client, bucket, key)
    stored = 300 + 28
    a_at = body.index(b"swap/a.txt") // 512 * 512 + 512
    b_at = body.index(b"swap/b.txt") // 512 * 512 + 512
    swapped = bytearray(body)
    swapped[a_at : a_at + stored] = body[b_at : b_at + stored]
    swapped[b_at : b_at + stored] = body[a_at : a_at + stored]
    replace_stored(sync_s3_client, bucket, key, bytes(swapped))
    for rel in files:
        if rel.startswith("swap/"):
            result = subprocess_bytes(
                s3_env, "cat", f"s3://{bucket}/ds", rel, "--encryption-key", str(key_file)
            )
            assert result.returncode == 4, result.stderr
            assert result.stdout == b""


def test_download_decrypts_the_tree_and_resumes_nothing_left(
    encrypted: tuple[Path, dict[str, bytes], str],
    s3_env: LocalS3Info,
    key_file: Path,
    tmp_path: Path,
) -> None:
    src, contents, bucket = encrypted
    out = tmp_path / "restored"
    url = f"s3://{bucket}/ds"
    args = ("download", url, str(out), "--range-size", "2MiB", "--json")
    refused = cli(s3_env, *args)
    assert refused.returncode == 2 and "--encryption-key" in refused.stderr
    assert not out.exists()
    result = cli(s3_env, *args, "--encryption-key", str(key_file))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["files_downloaded"] == len(TREE)
    for rel, data in contents.items():
        assert (out / rel).read_bytes() == data, rel
        assert (out / rel).stat().st_mtime_ns == (src / rel).stat().st_mtime_ns, rel
    again = cli(s3_env, *args, "--encryption-key", str(key_file))
    assert json.loads(again.stdout)["files_skipped"] == len(TREE), again.stdout


def test_sync_dataset_reads_and_iterates_an_epoch_with_the_key(
    encrypted: tuple[Path, dict[str, bytes], str], s3_env: LocalS3Info, key_file: Path
) -> None:
    _, contents, bucket = encrypted
    url = f"s3://{bucket}/ds"
    with SyncDataset(
        url, connection=connection(s3_env), encryption_key=key_file.read_bytes()
    ) as ds:
        assert ds.read("odd\nname.txt") == contents["odd\nname.txt"]
        assert ds.stat("big/video.bin").size == len(contents["big/video.bin"])  # the original's
        seen = dict(ds.iter_epoch(seed=7, block_bytes=256 * 1024))
    assert seen == contents
    listed = cli(s3_env, "ls", url, "--json")
    assert listed.returncode == 0, listed.stderr
    sizes = {row["path"]: row["size"] for row in json.loads(listed.stdout)}
    assert sizes == {rel: len(data) for rel, data in contents.items()}

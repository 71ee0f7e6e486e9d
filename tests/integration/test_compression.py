"""`upload --compress` through the real CLI against the local S3 server: text shrinks on the
server, incompressible files are stored as they are under `auto`, and every reader returns
the original bytes (with and without --encryption-key)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from s3xfer.config import MiB
from s3xfer.dataset.manifest import Manifest
from s3xfer.locals3 import LocalS3Info

from .helpers import list_keys, read_object, run_cli

SHAPE = ["--part-size", "5MiB", "--multipart-threshold", "6MiB", "--pack-threshold", "256KiB"]
SHAPE += ["--shard-size", "5MiB", "--concurrency", "8"]


def text_tree(root: Path) -> dict[str, bytes]:
    """JSON lines and CSV (compressible), random bytes (not), an empty file, a large file."""
    rng = random.Random(7)
    files: dict[str, bytes] = {}
    for n in range(120):
        rows = [
            json.dumps(
                {"id": n * 1000 + i, "name": f"user {rng.randrange(10**6)}", "ok": i % 3 == 0}
            )
            for i in range(rng.randrange(50, 1500))
        ]
        files[f"json/{n // 30}/part {n:03d}.jsonl"] = ("\n".join(rows) + "\n").encode()
    files["csv/table.csv"] = "".join(f"{i},{i * 7 % 13},name {i}\n" for i in range(60_000)).encode()
    files["odd\nname.txt"] = b"hello hello hello hello " * 50
    files["random/noise.bin"] = rng.randbytes(100_000)
    files["random/one frame and more.bin"] = rng.randbytes(MiB + 3)
    files["empty.txt"] = b""
    files["big/log.txt"] = b"".join(b"2026-12-07 line %d ok\n" % i for i in range(400_000))
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("key") / "k"
    path.write_bytes(os.urandom(32))
    return path


@pytest.mark.parametrize("encrypt", [False, True], ids=["compress", "compress+encrypt"])
def test_auto_shrinks_text_keeps_noise_and_every_reader_returns_the_original(
    tmp_path: Path,
    s3_env: LocalS3Info,
    bucket: str,
    sync_s3_client: Any,
    key_file: Path,
    encrypt: bool,
) -> None:
    files = text_tree(tmp_path / "src")
    url = f"s3://{bucket}/ds"
    key_args = ["--encryption-key", str(key_file)] if encrypt else []
    env = s3_env.env()
    result = run_cli(
        "upload", str(tmp_path / "src"), url, *SHAPE, "--compress", "auto", *key_args, "--quiet",
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    stored = {k: read_object(sync_s3_client, bucket, k) for k in list_keys(sync_s3_client, bucket)}
    manifest = Manifest.from_bytes(stored["ds/.s3xfer/manifest.json.gz"], where="m")
    records = manifest.records
    suffix = "+aes-256-gcm" if encrypt else ""
    plain = "aes-256-gcm" if encrypt else ""
    assert records["csv/table.csv"].coding == "zstd" + suffix
    assert records["random/noise.bin"].coding == plain  # auto: its sample does not shrink
    assert records["big/log.txt"].coding == plain  # multipart: stored as it is
    text = [r for r in records.values() if r.path.startswith(("json/", "csv/"))]
    assert sum(r.size for r in text) >= 3 * sum(r.stored for r in text)
    shards = sum(len(body) for key, body in stored.items() if key.endswith(".tar"))
    assert shards < 0.5 * sum(r.size for r in records.values() if r.packed)  # on the server
    # every reader: cat, get, download
    for rel in ("csv/table.csv", "odd\nname.txt", "json/2/part 077.jsonl", "empty.txt"):
        got = run_cli_bytes(env, "cat", url, rel, *key_args)
        assert got == files[rel], rel
    out = tmp_path / "got"
    result = run_cli("get", url, "*", str(out), *key_args, env=env)
    assert result.returncode == 0, result.stderr
    restored = tmp_path / "restored"
    result = run_cli("download", url, str(restored), "--range-size", "2MiB", *key_args, env=env)
    assert result.returncode == 0, result.stderr
    for rel, data in files.items():
        assert (out / rel).read_bytes() == data, rel
        assert (restored / rel).read_bytes() == data, rel
    # a re-run with the same options sends nothing
    again = run_cli(
        "upload", str(tmp_path / "src"), url, *SHAPE, "--compress", "auto", *key_args, "--json",
        env=env,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["files_uploaded"] == 0


def run_cli_bytes(env: dict[str, str], *args: str) -> bytes:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "s3xfer", *args],
        env={**os.environ, **env},
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_plan_shows_the_expected_saving(tmp_path: Path) -> None:
    files = text_tree(tmp_path / "src")
    shape = SHAPE[:-2]  # without --concurrency: how to run, not what to plan
    result = run_cli(
        "plan", str(tmp_path / "src"), "s3://bucket/p", *shape, "--compress", "auto", "--json"
    )
    assert result.returncode == 0, result.stderr
    saving = json.loads(result.stdout)["compression"]
    assert saving["mode"] == "auto" and saving["files"] >= 120
    assert saving["original_bytes"] >= 3 * saving["stored_bytes"] > 0
    assert saving["original_bytes"] < sum(len(d) for d in files.values())  # not the noise
    text = run_cli("plan", str(tmp_path / "src"), "s3://bucket/p", *shape, "--compress", "auto")
    assert "--compress auto" in text.stdout and "x smaller" in text.stdout, text.stdout

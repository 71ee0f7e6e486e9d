"""Bad input gets one clear line on stderr, a non-zero exit code, and no traceback."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest

from s3xfer.locals3 import LocalS3Info

from .helpers import list_keys, run_cli, write_tree


def assert_one_clear_line(result: Any, code: int, *fragments: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    write_tree(tmp_path / "src", {"a.txt": 10})
    return tmp_path / "src"


def test_missing_path(tmp_path: Path) -> None:
    for command in ("survey", "plan", "upload"):
        extra = ["s3://bucket/x"] if command != "survey" else []
        result = run_cli(command, str(tmp_path / "nope"), *extra)
        assert_one_clear_line(result, 2, "no such file or directory", "nope")


def test_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run_cli("plan", str(tmp_path / "empty"), "s3://bucket/x")
    assert_one_clear_line(result, 2, "nothing to upload")


def test_only_unreadable_entries_is_nothing_to_upload(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "loop").symlink_to(src / "loop")
    (src / "dangling").symlink_to(tmp_path / "missing")
    os.mkfifo(src / "fifo")
    result = run_cli("plan", str(src), "s3://bucket/x")
    assert_one_clear_line(result, 2, "nothing to upload")
    survey = run_cli("survey", str(src))
    assert survey.returncode == 0
    for reason in ("symlink loop", "broken symlink", "fifo"):
        assert reason in survey.stdout


@pytest.mark.parametrize("url", ["bucket/prefix", "s3:/bucket", "s3://UPPER/x", "s3://a/../b"])
def test_malformed_url(tree: Path, url: str) -> None:
    result = run_cli("upload", str(tree), url)
    assert_one_clear_line(result, 2, url.split("/")[0] if "s3" not in url else "")


def test_bad_option_value(tree: Path) -> None:
    result = run_cli("plan", str(tree), "s3://bucket/x", "--max-memory", "lots")
    assert result.returncode == 2 and "not a size" in result.stderr
    result = run_cli("plan", str(tree), "s3://bucket/x", "--part-size", "1MiB")
    assert_one_clear_line(result, 2, "part size must be between 5 MiB and 5 GiB")


def test_bad_endpoint_url(tree: Path) -> None:
    result = run_cli("upload", str(tree), "s3://bucket/x", "--endpoint-url", "127.0.0.1:9")
    assert_one_clear_line(result, 2, "bad endpoint URL")


def test_no_such_bucket(tree: Path, s3_env: LocalS3Info) -> None:
    result = run_cli("upload", str(tree), "s3://no-such-bucket-here/x")
    assert_one_clear_line(result, 3, "no such bucket: s3://no-such-bucket-here")


def test_wrong_credentials(
    tree: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    wrong_secret = "not-the-secret-" + "x" * 20
    result = run_cli(
        "upload", str(tree), f"s3://{bucket}/x", env={"AWS_SECRET_ACCESS_KEY": wrong_secret}
    )
    assert_one_clear_line(result, 3, "access denied", bucket)
    assert wrong_secret not in result.stderr + result.stdout
    assert s3_env.secret_key not in result.stderr + result.stdout
    assert list_keys(sync_s3_client, bucket) == []  # nothing half-written


def test_unknown_access_key(tree: Path, s3_env: LocalS3Info, bucket: str) -> None:
    result = run_cli(
        "upload", str(tree), f"s3://{bucket}/x", env={"AWS_ACCESS_KEY_ID": "AKIDONTKNOWYOU"}
    )
    assert_one_clear_line(result, 3, "access denied")


def test_unreachable_endpoint(tree: Path, s3_env: LocalS3Info) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    result = run_cli("upload", str(tree), "s3://bucket/x", "--endpoint-url", endpoint, timeout=180)
    assert_one_clear_line(result, 3, "cannot reach S3 endpoint", endpoint)


def test_unknown_profile(tree: Path, s3_env: LocalS3Info) -> None:
    result = run_cli("upload", str(tree), "s3://bucket/x", "--profile", "nobody-has-this")
    assert_one_clear_line(result, 2, "nobody-has-this")


def test_corrupt_saved_plan(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text("{ not json")
    result = run_cli("upload", "--plan", str(plan))
    assert_one_clear_line(result, 2, "corrupt plan file")
    result = run_cli("upload", "--plan", str(tmp_path / "missing.json"))
    assert_one_clear_line(result, 2, "cannot read plan")


def test_upload_without_arguments() -> None:
    result = run_cli("upload")
    assert_one_clear_line(result, 2, "missing PATH and DEST")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run_cli("--debug", "survey", str(tmp_path / "nope"))
    assert result.returncode != 0 and "Traceback" in result.stderr

"""The AWS settings awscli honours, through the real CLI: the S3-only endpoint variable,
credentials that refresh themselves during a run, an SSO profile that is not logged in,
and unsigned requests to a public bucket."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from moto.server import ThreadedMotoServer

from s3xfer.locals3 import LocalS3Info

from .helpers import run_cli, write_tree


@pytest.fixture
def s3_only_env(s3_env: LocalS3Info, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """AWS_ENDPOINT_URL_S3 and no AWS_ENDPOINT_URL."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    return {"AWS_ENDPOINT_URL_S3": s3_env.endpoint_url}


def test_aws_endpoint_url_s3_alone_serves_every_command(
    tmp_path: Path, bucket: str, s3_only_env: dict[str, str]
) -> None:
    env = s3_only_env
    contents = write_tree(tmp_path / "src", {"d/b.bin": 6 * 2**20})
    (tmp_path / "src/a.txt").write_text("some text\n")
    contents["a.txt"] = b"some text\n"
    url = f"s3://{bucket}/only-s3"

    def ok(*args: str) -> str:
        result = run_cli(*args, env=env)
        assert result.returncode == 0, (args, result.stderr)
        return result.stdout

    ok("upload", str(tmp_path / "src"), url, "--quiet")
    ok("upload", str(tmp_path / "src"), f"{url}-loose", "--no-pack", "--quiet")
    assert "d/b.bin" in ok("ls", url)
    assert ok("cat", url, "a.txt") == "some text\n"
    ok("get", url, "d/*", str(tmp_path / "got"))
    assert (tmp_path / "got/d/b.bin").read_bytes() == contents["d/b.bin"]
    ok("download", url, str(tmp_path / "out"), "--quiet")
    assert (tmp_path / "out/a.txt").read_bytes() == contents["a.txt"]
    ok("download", f"{url}-loose", str(tmp_path / "out-loose"), "--quiet")
    assert (tmp_path / "out-loose/d/b.bin").read_bytes() == contents["d/b.bin"]
    ok("cleanup", url, "--dry-run")
    ok(
        "bench",
        f"s3://{bucket}/bench",
        "--ops",
        "put,get",
        "--sizes",
        "16KiB",
        "--concurrency",
        "1",
        "--point-seconds",
        "0.2",
        "--max-seconds",
        "10",
    )


def test_credentials_that_expire_are_refreshed_during_an_upload(
    tmp_path: Path, bucket: str, s3_only_env: dict[str, str], s3_env: LocalS3Info
) -> None:
    """credential_process hands out credentials within botocore's refresh window: every
    signature asks for fresh ones, so the process runs again and again during the upload
    (a copy taken once would run it once)."""
    calls = tmp_path / "calls"
    script = tmp_path / "creds.py"
    script.write_text(
        "import datetime, json, pathlib\n"
        f"calls = pathlib.Path({str(calls)!r})\n"
        "calls.write_text(str(int(calls.read_text() or 0) + 1) if calls.exists() else '1')\n"
        "expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=12)\n"
        "print(json.dumps({'Version': 1, "
        f"'AccessKeyId': {s3_env.access_key!r}, 'SecretAccessKey': {s3_env.secret_key!r}, "
        "'Expiration': expiry.isoformat()}))\n"
    )
    config = tmp_path / "config"
    config.write_text(
        f"[profile refreshing]\nregion = us-east-1\n"
        f"credential_process = {sys.executable} {script}\n"
    )
    env = {
        **s3_only_env,
        "AWS_CONFIG_FILE": str(config),
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
    }
    contents = write_tree(tmp_path / "src", {f"f{i}.txt": 100 for i in range(4)})
    url = f"s3://{bucket}/refreshing"
    result = run_cli(
        "upload",
        str(tmp_path / "src"),
        url,
        "--no-pack",
        "--profile",
        "refreshing",
        "--quiet",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert int(calls.read_text()) >= 4  # at least once per object written
    restored = run_cli(
        "download", url, str(tmp_path / "out"), "--profile", "refreshing", "--quiet", env=env
    )
    assert restored.returncode == 0, restored.stderr
    assert (tmp_path / "out/f3.txt").read_bytes() == contents["f3.txt"]


def test_an_sso_profile_not_logged_in_says_how_to_log_in(
    tmp_path: Path, bucket: str, s3_only_env: dict[str, str]
) -> None:
    config = tmp_path / "config"
    config.write_text(
        "[profile work]\nregion = us-east-1\n"
        "sso_start_url = https://example.awsapps.com/start\nsso_region = us-east-1\n"
        "sso_account_id = 123456789012\nsso_role_name = Reader\n"
    )
    env = {
        **s3_only_env,
        "AWS_CONFIG_FILE": str(config),
        "HOME": str(tmp_path),  # an empty SSO token cache
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
    }
    for command in (["ls", f"s3://{bucket}/x"], ["download", f"s3://{bucket}/x", str(tmp_path)]):
        result = run_cli(*command, "--profile", "work", env=env)
        assert result.returncode == 3, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "aws sso login --profile work" in lines[0]


@pytest.fixture
def public_endpoint() -> Iterator[str]:
    """moto's server: it serves requests without a signature, as a public bucket does."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def test_no_sign_request_reads_a_public_bucket_without_credentials(
    tmp_path: Path, public_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    missing = tmp_path / "no-aws"
    base = {
        "AWS_CONFIG_FILE": str(missing / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(missing / "credentials"),
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": public_endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    writer: Any = botocore.session.Session().create_client(
        "s3",
        endpoint_url=public_endpoint,
        region_name="us-east-1",
        aws_access_key_id="owner",
        aws_secret_access_key="owner",
    )
    writer.create_bucket(Bucket="public")
    writer.put_object(
        Bucket="public",
        Key="open/data.json",
        Body=json.dumps({"a": 1}).encode(),
        ACL="public-read",
    )

    refused = run_cli("download", "s3://public/open", str(tmp_path / "no"), env=base)
    assert refused.returncode == 3, refused.stderr
    assert "no AWS credentials" in refused.stderr

    got = run_cli(
        "download",
        "s3://public/open",
        str(tmp_path / "out"),
        "--no-sign-request",
        "--quiet",
        env=base,
    )
    assert got.returncode == 0, got.stderr
    assert json.loads((tmp_path / "out/data.json").read_text()) == {"a": 1}

"""`s3xfer local-s3`: prints a working endpoint and credentials, stops cleanly on Ctrl-C."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import botocore.session
import pytest

from s3xfer.cli.main import main


def test_local_s3_serves_until_interrupted(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "s3xfer",
            "local-s3",
            "--bucket",
            "cli-bucket",
            "--data-dir",
            str(data_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        for line in proc.stdout:
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        output = "".join(lines)
        exports = dict(re.findall(r"export (\w+)=(\S+)", output))
        assert exports["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        client: Any = botocore.session.Session().create_client(
            "s3",
            endpoint_url=exports["AWS_ENDPOINT_URL"],
            region_name=exports.get("AWS_DEFAULT_REGION", "us-east-1"),
            aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"],
        )
        names = [b["Name"] for b in client.list_buckets()["Buckets"]]
        assert "cli-bucket" in names
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "stopped" in out
        assert "Traceback" not in err
        assert data_dir.is_dir()  # a given data directory is kept
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_local_s3_without_seaweedfs_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(shutil, "which", lambda *_args, **_kwargs: None)
    monkeypatch.setattr(sys, "argv", ["s3xfer", "local-s3"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 5
    err = capsys.readouterr().err
    assert "pip install" in err and "Traceback" not in err

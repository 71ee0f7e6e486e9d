"""Credentials never appear in output, logs or files: every artefact of a full run (stdout and
stderr of every command, --debug tracebacks, plan, journal, reports, downloaded files, bench
profile and CSV, and every object written to the bucket) is searched for the secret key."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from s3xfer.locals3 import LocalS3Info
from s3xfer.write.journal import journal_path

from ..integration.helpers import list_keys, read_object, write_tree
from .helpers import interrupt_upload


def test_no_artefact_of_a_run_contains_the_secret(
    tmp_path: Path,
    local_s3: LocalS3Info,
    bucket: str,
    sync_s3_client: Any,
    slow_endpoint: str,
) -> None:
    secret = local_s3.secret_key
    assert len(secret) >= 16
    home = tmp_path / "home"
    env = {
        **local_s3.env(),
        "S3XFER_STATE_DIR": str(home / "state"),
        "S3XFER_HOME": str(home / "config"),
        "HOME": str(home),
    }
    src = tmp_path / "src"
    write_tree(src, {"big.bin": 12 * 1024 * 1024, **{f"s/{n}.txt": 500 + n for n in range(300)}})
    dest = f"s3://{bucket}/ds"
    sizes = ["--part-size", "5MiB", "--multipart-threshold", "8MiB", "--shard-size", "5MiB"]
    outputs: list[str] = []

    def run(*args: str, **extra: str) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "s3xfer", *args],
            env={**os.environ, **env, **extra},
            capture_output=True,
            timeout=120,
        )
        outputs.extend(o.decode("utf-8", "replace") for o in (result.stdout, result.stderr))

    # An interrupted upload leaves its journal; it is searched too.
    journal = journal_path(src, dest, state_dir=home / "state")
    interrupt_upload(
        ["upload", str(src), dest, *sizes, "--quiet"],
        env={**env, "AWS_ENDPOINT_URL": slow_endpoint},
        journal=journal,
        condition=lambda events: any(e["e"] == "part" for e in events),
        how=signal.SIGTERM,
    )
    artefacts = [journal.read_bytes()]
    run("survey", str(src), "--json")
    run("plan", str(src), dest, *sizes, "--output", str(tmp_path / "plan.json"))
    run("upload", "--plan", str(tmp_path / "plan.json"), "--json")
    run("--debug", "upload", str(src), "s3://no-such-bucket-xyz/ds")  # a traceback
    run("upload", str(src), dest, "--json", AWS_SECRET_ACCESS_KEY=secret[::-1])  # wrong secret
    run("ls", dest, "--json")
    run("cat", dest, "s/1.txt")
    run("get", dest, "s/2*", str(tmp_path / "got"), "--json")
    run("download", dest, str(tmp_path / "restored"), "--json")
    run("cleanup", dest, "--older-than", "0", "--json")
    run(
        "bench", f"s3://{bucket}/bench", "--ops", "put", "--sizes", "16KiB",
        "--concurrency", "1,2", "--point-seconds", "0.3", "--save", "p",
        "--csv", str(tmp_path / "bench.csv"), "--json",
    )  # fmt: skip

    text = "".join(outputs)
    assert "Traceback" in text and "access denied" in text and "knee" in text  # all ran
    for text in outputs:
        assert secret not in text and secret[::-1] not in text
    artefacts += [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p != src]
    artefacts += [read_object(sync_s3_client, bucket, k) for k in list_keys(sync_s3_client, bucket)]
    assert len(artefacts) > 300
    for data in artefacts:
        assert secret.encode() not in data and secret[::-1].encode() not in data

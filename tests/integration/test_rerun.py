"""An unchanged re-run through the real CLI (write/rerun.py): the tree walked beside the
manifest, nothing planned, nothing sent; and every difference goes the usual way, which
sends or removes exactly what changed. Each report is compared with what the usual way
says of the same state (the library's upload(), which always plans)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from s3xfer.config import TransferConfig
from s3xfer.dataset.keys import S3Url
from s3xfer.locals3 import LocalS3Info
from s3xfer.planning.globs import PathFilter
from s3xfer.planning.plan import make_plan
from s3xfer.planning.survey import survey
from s3xfer.write.upload import upload

from .helpers import connection, run_cli, write_tree

TREE = {
    **{f"d{n // 40}/f{n:03d}.txt": 100 + n for n in range(120)},  # packed
    "big/one.bin": 2 * 1024 * 1024,  # its own object (above the pack threshold)
    "a-b": 5,  # sorts before "a/..." by path, after it by name: the orders must agree
    "a/x": 6,
    "a.txt": 7,
    "é/ü.txt": 8,
}
COMPARABLE = (
    "files_uploaded",
    "bytes_uploaded",
    "files_unchanged",
    "bytes_unchanged",
    "files_failed",
    "write_requests",
    "manifest_written",
    "files_removed",
    "files_kept_deleted",
    "files_not_selected",
    "objects_deleted",
)


def cli_upload(root: Path, dest: str, *args: str) -> dict[str, Any]:
    done = run_cli("upload", str(root), dest, "--json", "--quiet", *args)
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def planned_upload(
    info: LocalS3Info, root: Path, dest: str, *, keep_deleted: bool = False, **selection: Any
) -> dict[str, Any]:
    """The usual way: survey, plan, prepare, commit."""
    plan = make_plan(
        survey(root, selection=PathFilter(**selection)), S3Url.parse(dest), TransferConfig()
    )

    async def run() -> dict[str, Any]:
        report = await upload(plan, connection(info), keep_deleted=keep_deleted)
        return report.to_json()

    return anyio.run(run)


def same_outcome(fast: dict[str, Any], usual: dict[str, Any]) -> None:
    assert {k: fast[k] for k in COMPARABLE} == {k: usual[k] for k in COMPARABLE}


@pytest.fixture
def uploaded(s3_env: LocalS3Info, bucket: str, tmp_path: Path) -> tuple[Path, str]:
    root = tmp_path / "tree"
    write_tree(root, TREE)
    dest = f"s3://{bucket}/ds"
    first = cli_upload(root, dest)
    assert first["files_uploaded"] == len(TREE) and "compared_while_walking" not in first
    return root, dest


def test_an_unchanged_rerun_compares_while_walking_and_sends_nothing(
    s3_env: LocalS3Info, uploaded: tuple[Path, str]
) -> None:
    root, dest = uploaded
    again = cli_upload(root, dest)
    assert again["compared_while_walking"] is True
    assert again["files_unchanged"] == len(TREE) and again["write_requests"] == 0
    assert again["bytes_unchanged"] == sum(TREE.values())
    same_outcome(again, planned_upload(s3_env, root, dest))
    text = run_cli("upload", str(root), dest)
    assert text.returncode == 0, text.stderr
    assert "nothing changed since the last upload: no PUT was sent" in text.stdout


@pytest.mark.parametrize(
    "change",
    ["touch a packed file", "touch the large file", "chmod", "add", "remove", "add between"],
)
def test_any_difference_goes_the_usual_way(
    s3_env: LocalS3Info, uploaded: tuple[Path, str], change: str
) -> None:
    root, dest = uploaded
    if change == "touch a packed file":
        os.utime(root / "d1/f050.txt", ns=(0, 1_000_000_000))
    elif change == "touch the large file":
        os.utime(root / "big/one.bin", ns=(0, 1_000_000_000))
    elif change == "chmod":
        (root / "a/x").chmod(0o600)
    elif change == "add":
        (root / "zzz.txt").write_bytes(b"new")
    elif change == "remove":
        (root / "d0/f010.txt").unlink()
    else:
        (root / "d1/f050a.txt").write_bytes(b"between two packed files")
    report = cli_upload(root, dest)
    assert "compared_while_walking" not in report
    assert report["files_uploaded"] + report["files_removed"] >= 1
    assert report["manifest_written"] is True
    # And now it is unchanged again: told while walking.
    assert cli_upload(root, dest)["compared_while_walking"] is True


def test_kept_and_unselected_files_are_counted_as_the_usual_way_counts_them(
    s3_env: LocalS3Info, uploaded: tuple[Path, str]
) -> None:
    root, dest = uploaded
    # Its own object: a packed file's leaving would cut its shard anew (the usual way sends).
    (root / "big/one.bin").unlink()
    kept = cli_upload(root, dest, "--keep-deleted")
    assert kept["compared_while_walking"] is True and kept["files_kept_deleted"] == 1
    same_outcome(kept, planned_upload(s3_env, root, dest, keep_deleted=True))
    # Outside --exclude: left alone (a packed file left out would cut its shard anew).
    (root / "big/one.bin").write_bytes(b"back, and smaller")
    chosen = cli_upload(root, dest, "--exclude", "big/*")
    assert chosen["compared_while_walking"] is True
    assert (chosen["files_unchanged"], chosen["files_not_selected"]) == (len(TREE) - 1, 1)
    same_outcome(chosen, planned_upload(s3_env, root, dest, exclude=("big/*",)))


def test_an_interrupted_runs_journal_goes_the_usual_way(
    s3_env: LocalS3Info, uploaded: tuple[Path, str], state_dir: Path
) -> None:
    root, dest = uploaded
    from s3xfer.write.journal import journal_path

    journal = journal_path(root, dest, state_dir=state_dir)
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal.write_bytes(b"")
    report = cli_upload(root, dest)
    assert "compared_while_walking" not in report and report["files_unchanged"] == len(TREE)


def test_an_encryption_key_goes_the_usual_way(
    s3_env: LocalS3Info, uploaded: tuple[Path, str], tmp_path: Path
) -> None:
    """Files stored in the clear are not what `--encryption-key` asks for: sent again,
    encrypted, though the tree is as the manifest says."""
    root, dest = uploaded
    key = tmp_path / "dataset.key"
    key.write_bytes(os.urandom(32))
    report = cli_upload(root, dest, "--encryption-key", str(key))
    assert "compared_while_walking" not in report
    assert report["files_uploaded"] == len(TREE)


def test_an_unreadable_file_goes_the_usual_way(
    s3_env: LocalS3Info, uploaded: tuple[Path, str]
) -> None:
    root, dest = uploaded
    os.mkfifo(root / "d0/pipe")
    done = run_cli("upload", str(root), dest, "--json", "--quiet")
    report = json.loads(done.stdout)
    assert "compared_while_walking" not in report
    assert [p["path"] for p in report["problems"]] == ["d0/pipe"]

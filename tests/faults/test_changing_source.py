"""A file that changes while it is uploaded is reported as failed, alone: its multipart upload
is aborted and the catalog never records bytes that were not the file's."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest

from s3xfer.config import MiB, TransferConfig
from s3xfer.dataset.keys import S3Url
from s3xfer.limits import RunLimits
from s3xfer.locals3 import LocalS3Info
from s3xfer.planning.plan import make_plan
from s3xfer.planning.survey import survey
from s3xfer.write.journal import journal_path
from s3xfer.write.upload import UploadReport, upload

from ..integration.helpers import connection, list_keys, read_object, run_cli, write_tree
from ..integration.redis_server import redis_url_fixture  # noqa: F401  (the `redis_url` fixture)
from ..integration.test_distributed import database, workers
from .helpers import journal_events, upload_holding

CONFIG = TransferConfig(part_size=5 * MiB, multipart_threshold=8 * MiB, shard_size=5 * MiB)
LIMITS = RunLimits(concurrency=2)


def run_upload(src: Path, url: str, info: LocalS3Info) -> UploadReport:
    async def main() -> UploadReport:
        plan = make_plan(survey(src), S3Url.parse(url), CONFIG)
        return await upload(plan, connection(info), limits=LIMITS)

    return anyio.run(main)


def test_a_file_written_to_during_its_upload_fails_alone_and_is_not_catalogued(
    tmp_path: Path,
    local_s3: LocalS3Info,
    bucket: str,
    sync_s3_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = tmp_path / "src"
    contents = write_tree(src, {"growing.log": 16 * MiB, "a.txt": 100, "b.bin": 9 * MiB})
    growing = str(src / "growing.log")
    real_pread = os.pread
    reads = 0

    def pread_while_someone_appends(fd: int, length: int, offset: int) -> bytes:
        nonlocal reads
        if os.readlink(f"/proc/self/fd/{fd}") == growing:
            reads += 1
            if reads == 2:  # a writer appends while the second part is being read
                with open(growing, "ab") as file:
                    file.write(b"more log lines\n")
        return real_pread(fd, length, offset)

    monkeypatch.setattr(os, "pread", pread_while_someone_appends)
    report = run_upload(src, f"s3://{bucket}/ds", local_s3)
    monkeypatch.undo()

    assert [path for path, _ in report.failures] == ["growing.log"]
    assert "changed" in report.failures[0][1]
    assert report.files_uploaded == 2  # the others went on
    assert sync_s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert "ds/growing.log" not in list_keys(sync_s3_client, bucket, "ds/")
    assert read_object(sync_s3_client, bucket, "ds/b.bin") == contents["b.bin"]

    # Once it holds still, the next run uploads it.
    again = run_upload(src, f"s3://{bucket}/ds", local_s3)
    assert again.ok and again.files_uploaded == 1 and again.files_unchanged == 2
    assert (
        read_object(sync_s3_client, bucket, "ds/growing.log") == (src / "growing.log").read_bytes()
    )


# --- A file swapped for another of the same size and mtime while it uploads (issue 12, case 5)
# The real CLI uploads through the fault proxy, which holds one chosen request until the test
# has changed the source: whatever is read after that is read from the changed file.

CLI_OPTIONS = [
    "--part-size", "5MiB", "--multipart-threshold", "8MiB", "--shard-size", "5MiB",
    "--concurrency", "1", "--json",
]  # fmt: skip


def swap_keeping_size_and_mtime(path: Path, *, in_place: bool) -> bytes:
    """Give path other bytes of the same length and the same mtime: by renaming a copy over it
    (a new inode), or by writing into it and setting the mtime back (the same inode)."""
    before = path.stat()
    new = bytes(b ^ 0xFF for b in path.read_bytes())
    if in_place:
        with path.open("r+b") as file:
            file.write(new)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    else:
        copy = path.with_name(path.name + ".new")
        copy.write_bytes(new)
        os.utime(copy, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.replace(copy, path)
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    return new


@pytest.mark.parametrize("in_place", [False, True], ids=["renamed-over", "rewritten-in-place"])
def test_a_file_swapped_with_the_same_size_and_mtime_mid_upload_fails_alone(
    tmp_path: Path, local_s3: LocalS3Info, bucket: str, sync_s3_client: Any, in_place: bool
) -> None:
    src = tmp_path / "src"
    contents = write_tree(src, {"big.bin": 15 * MiB, "other.bin": 9 * MiB, "a.txt": 100})
    url = f"s3://{bucket}/ds"

    # Part 1 of big.bin was read from the old file; part 2 is held while the file is swapped,
    # so part 3 is read from the new one.
    result = upload_holding(
        [str(src), url, *CLI_OPTIONS],
        info=local_s3,
        hold=r"/ds/big\.bin\?partNumber=2&",
        meanwhile=lambda _: swap_keeping_size_and_mtime(src / "big.bin", in_place=in_place),
    )

    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert [f["path"] for f in report["failures"]] == ["big.bin"]
    assert "changed while it was read" in report["failures"][0]["error"]
    assert report["files_uploaded"] == 2  # the others went on
    assert "ds/big.bin" not in list_keys(sync_s3_client, bucket, "ds/")
    assert sync_s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert read_object(sync_s3_client, bucket, "ds/other.bin") == contents["other.bin"]

    # The next run stores the file as it is now.
    again = run_cli("upload", str(src), url, *CLI_OPTIONS, env=local_s3.env())
    assert again.returncode == 0, again.stderr
    assert read_object(sync_s3_client, bucket, "ds/big.bin") == (src / "big.bin").read_bytes()


def test_a_resumed_upload_of_a_file_swapped_in_between_starts_afresh(
    tmp_path: Path, local_s3: LocalS3Info, bucket: str, sync_s3_client: Any, state_dir: Path
) -> None:
    src = tmp_path / "src"
    write_tree(src, {"big.bin": 15 * MiB})
    url = f"s3://{bucket}/ds"
    journal = journal_path(src, url, state_dir=state_dir)

    def killed_then_swapped(process: subprocess.Popen[str]) -> None:
        # Part 1 is acknowledged and journaled; part 2 waits at the proxy.
        assert [e["n"] for e in journal_events(journal) if e["e"] == "part"] == [1]
        process.kill()
        process.wait()
        swap_keeping_size_and_mtime(src / "big.bin", in_place=False)

    killed = upload_holding(
        [str(src), url, *CLI_OPTIONS],
        info=local_s3,
        hold=r"/ds/big\.bin\?partNumber=2&",
        meanwhile=killed_then_swapped,
    )
    assert killed.returncode == -signal.SIGKILL
    (mpu,) = [e for e in journal_events(journal) if e["e"] == "mpu"]
    assert mpu["ident"][1] != (src / "big.bin").stat().st_ino  # the journal saw the old file

    again = run_cli("upload", str(src), url, *CLI_OPTIONS, env=local_s3.env())
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    # Not the file the journal saw: its upload is not continued but aborted, and started afresh.
    assert report["uploads_resumed"] == 0 and report["bytes_reused"] == 0
    assert read_object(sync_s3_client, bucket, "ds/big.bin") == (src / "big.bin").read_bytes()
    assert sync_s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


# --- Files that changed between `plan` and `upload --plan` (issue 12, case 9)
# Before: every member of the shard of one touched or vanished file failed ("changed since it
# was planned"), with --broker and --slice too.

SMALL = {f"small/{n:03d}.txt": 2000 + n for n in range(300)}
PLAN_SIZES = ["--part-size", "5MiB", "--multipart-threshold", "8MiB", "--shard-size", "5MiB"]


def plan_then_change(src: Path, url: str, plan_file: Path, env: dict[str, str]) -> None:
    """Plan a tree of small files (one shard), then: touch one, rewrite one with another size
    (still small), delete one, and let one grow too large to pack."""
    write_tree(src, SMALL)
    planned = run_cli("plan", str(src), url, *PLAN_SIZES, "--output", str(plan_file), env=env)
    assert planned.returncode == 0, planned.stderr
    change_four(src)


def change_four(src: Path) -> None:
    os.utime(src / "small/010.txt", ns=(2_000_000_000_000_000_000, 2_000_000_000_000_000_000))
    (src / "small/020.txt").write_bytes(b"rewritten, shorter")
    (src / "small/030.txt").unlink()
    (src / "small/040.txt").write_bytes(bytes(2 * MiB))


def check_changed_after_planning(report: dict[str, Any], src: Path) -> None:
    failures = {f["path"]: f["error"] for f in report["failures"]}
    assert set(failures) == {"small/030.txt", "small/040.txt"}, failures
    assert "vanished after it was planned" in failures["small/030.txt"]
    assert "too large to pack" in failures["small/040.txt"]


def check_restored(url: str, src: Path, out: Path, env: dict[str, str]) -> None:
    """Every file but the two that failed comes back as it is now, mtime included."""
    restored = run_cli("download", url, str(out), "--json", env=env)
    assert restored.returncode == 0, restored.stderr
    expected = set(SMALL) - {"small/030.txt", "small/040.txt"}
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == expected
    for rel in expected:
        assert (out / rel).read_bytes() == (src / rel).read_bytes(), rel
        assert (out / rel).stat().st_mtime_ns == (src / rel).stat().st_mtime_ns, rel


def test_files_changed_after_planning_fail_alone_or_are_packed_as_they_are_now(
    tmp_path: Path, local_s3: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    src, plan_file, url = tmp_path / "src", tmp_path / "p.json", f"s3://{bucket}/ds"
    env = local_s3.env()
    plan_then_change(src, url, plan_file, env)

    result = run_cli("upload", "--plan", str(plan_file), "--json", env=env)
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    check_changed_after_planning(report, src)
    assert report["files_uploaded"] == len(SMALL) - 2 and report["shards_uploaded"] == 1
    check_restored(url, src, tmp_path / "out", env)
    # The shard was laid out again, under a key of its own: one key, one layout.
    shards = list_keys(sync_s3_client, bucket, "ds/.s3xfer/shards/")
    assert len(shards) == 2  # the shard and its index
    assert all(re.search(r"-[0-9a-f]{16}\.tar(\.index\.json)?$", key) for key in shards)

    # The same plan again: the shard laid out as the files are now is found stored.
    again = run_cli("upload", "--plan", str(plan_file), "--json", env=env)
    assert again.returncode == 1, again.stderr
    second = json.loads(again.stdout)
    check_changed_after_planning(second, src)
    assert second["shards_uploaded"] == 0 and second["files_unchanged"] == len(SMALL) - 2

    # Planned afresh, the grown file uploads too.
    fresh = run_cli("upload", str(src), url, *PLAN_SIZES, "--json", env=env)
    assert fresh.returncode == 0, fresh.stderr
    assert read_object(sync_s3_client, bucket, "ds/small/040.txt") == bytes(2 * MiB)


def test_loose_files_read_together_fail_alone_when_changed_after_planning(
    tmp_path: Path, local_s3: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    """--no-pack: small files are read in batches (one worker-thread call for many); each
    file changed since planning fails alone, its neighbours in the batch are uploaded."""
    src, plan_file, url = tmp_path / "src", tmp_path / "p.json", f"s3://{bucket}/loose"
    env = local_s3.env()
    write_tree(src, SMALL)
    planned = run_cli("plan", str(src), url, "--no-pack", "--output", str(plan_file), env=env)
    assert planned.returncode == 0, planned.stderr
    change_four(src)

    result = run_cli("upload", "--plan", str(plan_file), "--json", env=env)
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    failures = {f["path"]: f["error"] for f in report["failures"]}
    changed = {"small/010.txt", "small/020.txt", "small/030.txt", "small/040.txt"}
    assert set(failures) == changed, failures
    assert "vanished after it was planned" in failures["small/030.txt"]
    for path in changed - {"small/030.txt"}:
        assert "changed since it was planned" in failures[path], failures[path]
    assert report["files_uploaded"] == len(SMALL) - 4
    stored = set(list_keys(sync_s3_client, bucket, "loose/small/"))
    assert stored == {f"loose/{path}" for path in set(SMALL) - changed}
    for path in set(SMALL) - changed:
        assert read_object(sync_s3_client, bucket, f"loose/{path}") == (src / path).read_bytes()


def test_files_changed_after_planning_fail_alone_in_slices(
    tmp_path: Path, local_s3: LocalS3Info, bucket: str
) -> None:
    src, plan_file, url = tmp_path / "src", tmp_path / "p.json", f"s3://{bucket}/ds"
    env = local_s3.env()
    plan_then_change(src, url, plan_file, env)
    codes = []
    for k in (1, 2):
        sliced = run_cli("upload", "--plan", str(plan_file), "--slice", f"{k}/2", env=env)
        codes.append(sliced.returncode)
    assert sorted(codes) == [0, 1]  # one slice holds the shard, the other has nothing to do
    finalized = run_cli("finalize", "--plan", str(plan_file), "--json", env=env)
    assert finalized.returncode == 1, finalized.stderr
    check_changed_after_planning(json.loads(finalized.stdout), src)
    check_restored(url, src, tmp_path / "out", env)


def test_files_changed_after_planning_fail_alone_with_workers(
    tmp_path: Path, local_s3: LocalS3Info, bucket: str, redis_url: str
) -> None:
    src, plan_file, url = tmp_path / "src", tmp_path / "p.json", f"s3://{bucket}/ds"
    env = local_s3.env()
    plan_then_change(src, url, plan_file, env)
    broker = database(redis_url, 5)
    with workers(1, broker, env, tmp_path / "logs"):
        result = run_cli("upload", "--plan", str(plan_file), "--broker", broker, "--json", env=env)
    assert result.returncode == 1, result.stderr
    check_changed_after_planning(json.loads(result.stdout), src)
    check_restored(url, src, tmp_path / "out", env)


def test_members_that_change_while_their_shard_is_read_fail_alone(
    tmp_path: Path, local_s3: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    # One shard of about 11.5 MiB: 60 members of 200 KiB, in three parts of 5 MiB. Part 1
    # holds members 0-24, part 3 members 51-59.
    src = tmp_path / "src"
    write_tree(src, {f"small/{n:03d}.bin": 200 * 1024 for n in range(60)})
    url = f"s3://{bucket}/ds"
    options = [*CLI_OPTIONS, "--shard-size", "16MiB"]

    def change_two_members(_: subprocess.Popen[str]) -> None:
        # Part 1 was read and sent; part 2 waits; part 3 is still to be read.
        swap_keeping_size_and_mtime(src / "small/002.bin", in_place=True)  # read already
        swap_keeping_size_and_mtime(src / "small/055.bin", in_place=False)  # not read yet

    result = upload_holding(
        [str(src), url, *options],
        info=local_s3,
        hold=r"/ds/\.s3xfer/shards/.*\.tar\?partNumber=2&",
        meanwhile=change_two_members,
    )
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    failures = {f["path"]: f["error"] for f in report["failures"]}
    assert set(failures) == {"small/002.bin", "small/055.bin"}
    assert "changed while it was read (written to in place" in failures["small/002.bin"]
    assert "changed while it was read (replaced by another file)" in failures["small/055.bin"]
    assert report["files_uploaded"] == 58 and report["shards_uploaded"] == 1
    assert sync_s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    out = tmp_path / "out"
    restored = run_cli("download", url, str(out), env=local_s3.env())
    assert restored.returncode == 0, restored.stderr
    restored_files = sorted(p.name for p in (out / "small").iterdir())
    assert restored_files == [f"{n:03d}.bin" for n in range(60) if n not in (2, 55)]
    for name in restored_files:
        assert (out / "small" / name).read_bytes() == (src / "small" / name).read_bytes()

"""Bad input, through the real CLI: one clear line on stderr, the right exit code, no
traceback, and nothing lost.

Every row of CASES sets the stage (a source tree, a plan file, a damaged dataset, a full
disk...), runs `s3xfer ...` as a subprocess and is checked the same way: exactly one non-empty
line on stderr, starting with "s3xfer: " and containing the expected fragments; the expected
exit code (2 usage or source, 3 remote, 4 integrity, 1 files failed or not written); no
traceback; and nothing lost: the source tree untouched, no temporary or partial file left at
the destination, nothing half-written to the bucket that failing uploads aim at, no secret
printed. A row may add its own check (nothing outside DEST, the rest still uploaded...).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import shlex
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from s3xfer.dataset import catalog
from s3xfer.dataset.keys import S3Url, manifest_key
from s3xfer.locals3 import LocalS3Info
from s3xfer.write.journal import Journal, journal_path
from tests.integration.helpers import (
    list_keys,
    run_cli,
    without_file_permission_override,
    write_tree,
)

# The dataset every read-only case reads: small files packed into a shard, one file big enough
# to be its own object (and, with a small --range-size, a ranged download), > 1 MiB in all.
DATASET_FILES = {
    "a.txt": 10,
    "labels/000.json": 300,
    "labels/001.json": 300,
    "images/07/img.jpg": 20_000,
    "big/blob.bin": 3 * 1024 * 1024,
}
SOURCE_FILES = {"a.txt": 10, "sub/b.txt": 1_000, "sub/c.json": 200}
TEMPORARY_NAMES = (".s3xfer-*",)  # s3xfer's staging directories (destination.Staging)
SMALL_DISK = "1m"  # tmpfs size for the disk-full cases: smaller than the dataset
PLAIN_OBJECTS = 40  # of 64 KiB in the shared plain prefix: 2.5 MiB, more than SMALL_DISK


@dataclass
class Stage:
    """What one case runs against. `names` fill the {placeholders} of its argv and env."""

    tmp: Path
    client: Any
    bucket: str  # holds the shared dataset; cases put their own objects under fresh prefixes
    scratch: str  # stays empty: the uploads that must fail are aimed here
    dataset_source: Path
    names: dict[str, str] = field(default_factory=dict)
    held: list[Journal] = field(default_factory=list)  # open while the case runs

    @property
    def src(self) -> Path:
        return self.tmp / "src"

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def fresh_prefix(self) -> str:
        return f"case-{uuid.uuid4().hex[:12]}"


Setup = Callable[[Stage], None]
Check = Callable[[Stage, "subprocess.CompletedProcess[str]"], None]


def no_setup(stage: Stage) -> None:
    pass


def no_check(stage: Stage, result: subprocess.CompletedProcess[str]) -> None:
    pass


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]  # after `s3xfer`, with {placeholders} (see test_bad_input)
    code: int
    fragments: tuple[str, ...]  # all in the one stderr line
    setup: Setup = no_setup
    env: Mapping[str, str] = field(default_factory=dict)
    check: Check = no_check
    unprivileged: bool = False  # file permissions must hold even when the tests run as root
    stdout_to: str | None = None  # a path stdout is written to instead of a pipe
    small_disk: bool = False  # {out} is a file system of SMALL_DISK bytes
    timeout: float = 120  # seconds before the run counts as hung


def case(name: str, argv: str, code: int, *fragments: str, xfail: str = "", **options: Any) -> Any:
    """One row: `s3xfer ARGV` exits with `code` and one stderr line holding every fragment.
    `xfail` names the product fix a row waits for."""
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    row = Case(tuple(shlex.split(argv)), code, fragments, **options)
    return pytest.param(row, id=name, marks=marks)


# --- setups ---------------------------------------------------------------------------------


def empty_dir(stage: Stage) -> None:
    (stage.tmp / "empty").mkdir()


def links_and_fifo_only(stage: Stage) -> None:
    odd = stage.tmp / "odd"
    odd.mkdir()
    (odd / "loop").symlink_to(odd / "loop")
    (odd / "dangling").symlink_to(stage.tmp / "missing")
    os.mkfifo(odd / "fifo")


def unreadable_only(stage: Stage) -> None:
    locked = stage.tmp / "locked"
    write_tree(locked, {"file.txt": 10, "dir/inner.txt": 10})
    (locked / "file.txt").chmod(0)
    (locked / "dir").chmod(0)


def one_unreadable_file(stage: Stage) -> None:
    (stage.src / "sub" / "b.txt").chmod(0)
    stage.names["fresh"] = f"s3://{stage.bucket}/{stage.fresh_prefix()}"


def fresh_journal(stage: Stage) -> Path:
    """The journal an upload of the case's tree to a fresh prefix will use."""
    dest = f"s3://{stage.bucket}/{stage.fresh_prefix()}"
    stage.names["fresh"] = dest
    return journal_path(stage.src, dest, state_dir=Path(os.environ["S3XFER_STATE_DIR"]))


def damaged_journal(stage: Stage) -> None:
    path = fresh_journal(stage)
    Journal.open(path, source=stage.src, dest=stage.names["fresh"]).close()
    with path.open("ab") as journal:
        journal.write(b"0badc0de this line was damaged on disk\n")


def journal_in_use(stage: Stage) -> None:
    path = fresh_journal(stage)
    stage.held.append(Journal.open(path, source=stage.src, dest=stage.names["fresh"]))


def journals_dir_is_a_file(stage: Stage) -> None:
    stage.names["fresh"] = f"s3://{stage.bucket}/{stage.fresh_prefix()}"
    (stage.tmp / "state").mkdir()
    (stage.tmp / "state" / "journals").write_text("not a directory")


def dest_is_a_file(stage: Stage) -> None:
    stage.out.write_bytes(b"not a directory")


def read_only_dest(stage: Stage) -> None:
    stage.out.mkdir()
    stage.out.chmod(0o500)


def big_source_file(stage: Stage) -> None:
    write_tree(stage.src, {"big.bin": 2 * 1024 * 1024}, seed=2)


def plan_file(text: str) -> Setup:
    def setup(stage: Stage) -> None:
        (stage.tmp / "plan.json").write_text(text)

    return setup


def fresh_dataset(damage: Callable[[Stage, S3Url], None]) -> Setup:
    """Upload the dataset to a fresh prefix ({fresh}) with the real CLI, then damage it."""

    def setup(stage: Stage) -> None:
        url = S3Url(stage.bucket, stage.fresh_prefix())
        result = run_cli("upload", str(stage.dataset_source), str(url), "--quiet")
        assert result.returncode == 0, result.stderr
        damage(stage, url)
        stage.names["fresh"] = str(url)

    return setup


def replace_shards(stage: Stage, url: S3Url) -> None:
    """Every shard overwritten with other bytes of the same length."""
    shards = [k for k in list_keys(stage.client, url.bucket, url.prefix) if k.endswith(".tar")]
    assert shards
    for key in shards:
        body = stage.client.get_object(Bucket=url.bucket, Key=key)["Body"].read()
        stage.client.put_object(Bucket=url.bucket, Key=key, Body=bytes(b ^ 0xFF for b in body))


def catalog_lies_about_crc(stage: Stage, url: S3Url) -> None:
    """The catalog piece of a.txt records another CRC32: the bytes no longer match it."""
    key = catalog.piece_key(url, catalog.bucket_of("a.txt"))
    piece = json.loads(
        gzip.decompress(stage.client.get_object(Bucket=url.bucket, Key=key)["Body"].read())
    )
    for row in piece["files"]:
        if row[0] == "a.txt":
            row[5] = "AAAAAA=="
    stage.client.put_object(
        Bucket=url.bucket, Key=key, Body=gzip.compress(json.dumps(piece).encode())
    )


def garbage_catalog_piece(stage: Stage, url: S3Url) -> None:
    key = catalog.piece_key(url, catalog.bucket_of("a.txt"))
    stage.client.put_object(Bucket=url.bucket, Key=key, Body=b"\x1f\x8bnot gzip at all")


def garbage_manifest(stage: Stage, url: S3Url) -> None:
    stage.client.put_object(Bucket=url.bucket, Key=manifest_key(url), Body=b"{ not json")


def hostile_manifest(bad_path: str) -> Setup:
    """A dataset whose manifest lists bad_path (out of DEST, or a name no file system holds)
    beside ok.txt."""

    def setup(stage: Stage) -> None:
        prefix = stage.fresh_prefix()
        stage.client.put_object(Bucket=stage.bucket, Key=f"{prefix}/data", Body=b"evil")
        etag = stage.client.head_object(Bucket=stage.bucket, Key=f"{prefix}/data")["ETag"]
        rows = [
            [path, f"{prefix}/data", 4, 0, 0o644, "", 0, -1, etag] for path in (bad_path, "ok.txt")
        ]
        manifest = {
            "format": "s3xfer-manifest",
            "version": 1,
            "dest": f"s3://{stage.bucket}/{prefix}",
            "files": rows,
            "shards": [],
        }
        body = gzip.compress(json.dumps(manifest).encode())
        stage.client.put_object(
            Bucket=stage.bucket, Key=f"{prefix}/.s3xfer/manifest.json.gz", Body=body
        )
        stage.out.mkdir()
        stage.names["fresh"] = f"s3://{stage.bucket}/{prefix}"

    return setup


# --- checks beyond the common ones ----------------------------------------------------------


def nothing_written(stage: Stage, result: subprocess.CompletedProcess[str]) -> None:
    written = [p for p in stage.out.rglob("*") if p.is_file()] if stage.out.is_dir() else []
    assert written == [], written


def survey_names_each_problem(stage: Stage, result: subprocess.CompletedProcess[str]) -> None:
    survey = run_cli("survey", str(stage.tmp / "odd"))
    assert survey.returncode == 0, survey.stderr
    for reason in ("symlink loop", "broken symlink", "fifo"):
        assert reason in survey.stdout


def dest_file_untouched(stage: Stage, result: subprocess.CompletedProcess[str]) -> None:
    assert stage.out.read_bytes() == b"not a directory"


def only_safe_file_written(stage: Stage, result: subprocess.CompletedProcess[str]) -> None:
    assert sorted(p.name for p in stage.out.rglob("*") if p.is_file()) == ["ok.txt"]
    assert sorted(p.name for p in stage.tmp.iterdir()) == ["out", "src"]  # nothing beside DEST


def readable_files_uploaded(stage: Stage, result: subprocess.CompletedProcess[str]) -> None:
    keys = list_keys(stage.client, stage.bucket, S3Url.parse(stage.names["fresh"]).prefix + "/")
    assert keys, "the readable files should still have been uploaded"
    assert not any("b.txt" in k for k in keys)


# --- the matrix -----------------------------------------------------------------------------

WRONG_SECRET = "not-the-secret-" + "x" * 24
NO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "",
    "AWS_SECRET_ACCESS_KEY": "",
    "AWS_EC2_METADATA_DISABLED": "true",  # no wait for an instance metadata service
}

CASES = [
    # paths
    case("survey-missing-path", "survey {missing}", 2, "no such file or directory", "nope"),
    case("plan-missing-path", "plan {missing} {void}", 2, "no such file or directory", "nope"),
    case("upload-missing-path", "upload {missing} {void}", 2, "no such file or directory", "nope"),
    case(
        "plan-empty-dir",
        "plan {tmp}/empty {void}",
        2,
        "nothing to upload",
        "empty",
        setup=empty_dir,
    ),
    case("upload-empty-dir", "upload {tmp}/empty {void}", 2, "nothing to upload", setup=empty_dir),
    case("plan-source-is-a-device", "plan /dev/null {void}", 2, "not a regular file", "/dev/null"),
    case(
        "plan-only-links-and-fifos",
        "plan {tmp}/odd {void}",
        2,
        "nothing to upload",
        setup=links_and_fifo_only,
        check=survey_names_each_problem,
    ),
    case(
        "upload-only-unreadable",
        "upload {tmp}/locked {void}",
        2,
        "nothing to upload",
        setup=unreadable_only,
        unprivileged=True,
    ),
    case(
        "upload-one-unreadable-among-readable",
        "upload {src} {fresh} --quiet",
        1,
        "b.txt",
        "permission denied",
        setup=one_unreadable_file,
        check=readable_files_uploaded,
        unprivileged=True,
    ),
    case(
        "download-dest-is-a-file",
        "download {ds} {out}",
        2,
        "is a file",
        "{out}",
        setup=dest_is_a_file,
        check=dest_file_untouched,
    ),
    case(
        "get-dest-is-a-file",
        "get {ds} * {out}",
        2,
        "not a directory: {out}",
        setup=dest_is_a_file,
        check=dest_file_untouched,
    ),
    case(
        "download-to-a-read-only-dest",
        "download {ds} {out} --quiet",
        1,
        "cannot write into {out}: permission denied",
        setup=read_only_dest,
        unprivileged=True,
        check=nothing_written,
    ),
    case(
        "get-to-a-read-only-dest",
        "get {ds} * {out}",
        1,
        "cannot write {out}/",
        "Permission denied",
        setup=read_only_dest,
        unprivileged=True,
        check=nothing_written,
    ),
    case(
        "cat-path-not-in-dataset", "cat {ds} nothere.txt", 2, "'nothere.txt' is not in the dataset"
    ),
    case(
        "get-path-not-in-dataset",
        "get {ds} nothere.txt {out}",
        2,
        "no file of {ds} matches nothere.txt",
        check=nothing_written,
    ),
    case(
        "get-glob-matches-nothing",
        "get {ds} zzz/* {out}",
        2,
        "no file of {ds} matches zzz/*",
        check=nothing_written,
    ),
    case(
        "download-include-matches-nothing",
        "download {ds} {out} --include zzz/*",
        2,
        "no file of {ds} matches --include zzz/*",
        check=nothing_written,
    ),
    # URLs and endpoints
    case("url-one-slash", "upload {src} s3:/x", 2, "not an S3 URL", "s3:/x"),
    case("url-http", "plan {src} http://bucket/x", 2, "not an S3 URL", "http://bucket/x"),
    case("url-no-bucket", "ls s3://", 2, "not a valid bucket name"),
    case("url-bad-bucket-name", "upload {src} s3://Bad_Bucket/x", 2, "bucket name", "Bad_Bucket"),
    case("url-dotdot-prefix", "plan {src} s3://{scratch}/a/../b", 2, "'..'", "a/../b"),
    case(
        "download-url-not-s3",
        "download {bucket}/ds {out}",
        2,
        "not an S3 URL",
        check=nothing_written,
    ),
    case(
        "endpoint-ftp", "upload {src} {void} --endpoint-url ftp://h/", 2, "bad endpoint URL", "ftp"
    ),
    case(
        "endpoint-no-scheme",
        "upload {src} {void} --endpoint-url 127.0.0.1:9",
        2,
        "bad endpoint URL",
    ),
    case("endpoint-not-a-url", "ls {ds} --endpoint-url notaurl", 2, "bad endpoint URL", "notaurl"),
    # credentials
    case(
        "upload-wrong-secret",
        "upload {src} {void}",
        3,
        "access denied",
        "{scratch}",
        env={"AWS_SECRET_ACCESS_KEY": WRONG_SECRET},
    ),
    case(
        "cat-wrong-secret",
        "cat {ds} a.txt",
        3,
        "access denied",
        env={"AWS_SECRET_ACCESS_KEY": WRONG_SECRET},
    ),
    case(
        "upload-unknown-access-key",
        "upload {src} {void}",
        3,
        "access denied",
        env={"AWS_ACCESS_KEY_ID": "AKIDONTKNOWYOU"},
    ),
    case(
        "download-unknown-access-key",
        "download {ds} {out}",
        3,
        "access denied",
        env={"AWS_ACCESS_KEY_ID": "AKIDONTKNOWYOU"},
        check=nothing_written,
    ),
    case(
        "upload-no-credentials", "upload {src} {void}", 3, "no AWS credentials", env=NO_CREDENTIALS
    ),
    case("ls-no-credentials", "ls {ds}", 3, "no AWS credentials", env=NO_CREDENTIALS),
    case(
        "upload-unknown-profile",
        "upload {src} {void} --profile nobody-has-this",
        2,
        "no such AWS profile: nobody-has-this",
    ),
    # the remote side
    case(
        "upload-no-such-bucket",
        "upload {src} s3://no-such-bkt/x",
        3,
        "no such bucket: s3://no-such-bkt",
    ),
    case("ls-no-such-bucket", "ls s3://no-such-bkt/x", 3, "no such bucket: s3://no-such-bkt"),
    case(
        "download-no-such-bucket",
        "download s3://no-such-bkt/x {out}",
        3,
        "no such bucket: s3://no-such-bkt",
        check=nothing_written,
    ),
    case(
        "upload-unreachable-endpoint",
        "upload {src} {void} --endpoint-url {closed}",
        3,
        "cannot reach S3 endpoint {closed}",
    ),
    case(
        "download-unreachable-endpoint",
        "download {ds} {out} --endpoint-url {closed}",
        3,
        "cannot reach S3 endpoint {closed}",
        check=nothing_written,
    ),
    case(
        "cat-unreachable-endpoint",
        "cat {ds} a.txt --endpoint-url {closed}",
        3,
        "cannot reach S3 endpoint {closed}",
        timeout=10,  # said at once, not after ten attempts
    ),
    case("ls-no-dataset", "ls s3://{bucket}/none", 2, "no s3xfer dataset at s3://{bucket}/none"),
    case(
        "cat-no-dataset",
        "cat s3://{bucket}/none a.txt",
        2,
        "no s3xfer dataset at s3://{bucket}/none",
    ),
    case(
        "download-nothing-there",
        "download s3://{bucket}/none {out}",
        2,
        "nothing to download",
        "s3://{bucket}/none",
        check=nothing_written,
    ),
    # options
    case(
        "part-size-below-5MiB", "plan {src} {void} --part-size 1MiB", 2, "between 5 MiB and 5 GiB"
    ),
    case(
        "max-memory-below-one-part",
        "plan {src} {void} --multipart-threshold 1MiB --part-size 8MiB --max-memory 5MiB",
        2,
        "needs parts of 8 MiB",
        "raise --max-memory",
        setup=big_source_file,
    ),
    case("concurrency-zero", "upload {src} {void} -c 0", 2, "concurrency"),
    case("size-with-bad-unit", "plan {src} {void} --part-size 12XB", 2, "12XB"),
    # upload journals (s3xfer/write/journal.py): damage costs only redone work, never the upload
    case(
        "upload-damaged-journal",
        "upload {src} {fresh} --quiet",
        0,
        "warning: journal",
        "damaged at line 2",
        setup=damaged_journal,
    ),
    case(
        "upload-journal-in-use",
        "upload {src} {fresh} --quiet",
        2,
        "another s3xfer upload of",
        "is running",
        setup=journal_in_use,
    ),
    case(
        "upload-journal-cannot-be-written",
        "upload {src} {fresh} --quiet --state-dir {tmp}/state",
        2,
        "cannot open the upload journal",
        setup=journals_dir_is_a_file,
    ),
    case(
        "plan-and-path-together",
        "upload {src} {void} --plan {tmp}/plan.json",
        2,
        "give either PATH DEST or --plan, not both",
        setup=plan_file("{}"),
    ),
    case("upload-without-arguments", "upload", 2, "missing PATH and DEST"),
    # files s3xfer reads: plans, shards, catalog, manifest
    case("plan-file-missing", "upload --plan {tmp}/nope.json", 2, "cannot read plan", "nope.json"),
    case(
        "plan-file-garbage",
        "upload --plan {tmp}/plan.json",
        2,
        "corrupt plan file {tmp}/plan.json",
        setup=plan_file("{ not json"),
    ),
    case(
        "plan-file-not-an-object",
        "upload --plan {tmp}/plan.json",
        2,
        "corrupt plan file {tmp}/plan.json: not a JSON object",
        setup=plan_file("[1, 2]"),
    ),
    case(
        "plan-file-fields-missing",
        "upload --plan {tmp}/plan.json",
        2,
        "corrupt plan file {tmp}/plan.json: no 'source' field",
        setup=plan_file('{"format": "s3xfer-plan", "version": 1, "dest": "s3://b-b-b/x"}'),
    ),
    case(
        "plan-file-newer-version",
        "upload --plan {tmp}/plan.json",
        2,
        "{tmp}/plan.json has format version 99",
        "newer s3xfer",
        setup=plan_file('{"format": "s3xfer-plan", "version": 99}'),
    ),
    case(
        "cat-shard-replaced",
        "cat {fresh} a.txt",
        4,
        "a.txt: s3://",
        ".tar",
        "replaced",
        setup=fresh_dataset(replace_shards),
    ),
    case(
        "get-shard-replaced",
        "get {fresh} labels/000.json {out}",
        1,  # each file fails alone, named (its neighbours in the shard may be fine)
        ".tar",
        "replaced",
        setup=fresh_dataset(replace_shards),
        check=nothing_written,
    ),
    case(
        "cat-catalog-crc-mismatch",
        "cat {fresh} a.txt",
        4,
        "a.txt: checksum mismatch",
        setup=fresh_dataset(catalog_lies_about_crc),
    ),
    case(
        "cat-corrupt-catalog-piece",
        "cat {fresh} a.txt",
        4,
        "corrupt dataset metadata: catalog piece {fresh}/.s3xfer/catalog/",
        setup=fresh_dataset(garbage_catalog_piece),
    ),
    case(
        "ls-corrupt-manifest",
        "ls {fresh}",
        4,
        "corrupt dataset metadata: manifest {fresh}/.s3xfer/manifest.json.gz",
        setup=fresh_dataset(garbage_manifest),
    ),
    case(
        "download-corrupt-manifest",
        "download {fresh} {out}",
        4,
        "corrupt dataset metadata: manifest {fresh}/.s3xfer/manifest.json.gz",
        setup=fresh_dataset(garbage_manifest),
        check=nothing_written,
    ),
    # a full disk
    case(
        "cat-to-a-full-disk",
        "cat {ds} big/blob.bin",
        1,
        "No space left on device",
        stdout_to="/dev/full",
    ),
    case(
        "get-to-a-full-disk",
        "get {ds} * {out}",
        1,
        "cannot write {out}/",
        "No space left on device",
        small_disk=True,
    ),
    case(
        "download-to-a-full-disk",
        "download {ds} {out} --quiet",
        1,
        "cannot write {out}/",
        "No space left on device",
        small_disk=True,
    ),
    case(  # loose objects of a plain prefix: written in batches as they arrive
        "download-prefix-to-a-full-disk",
        "download {plain} {out} --quiet",
        1,
        "cannot write {out}/",
        "No space left on device",
        small_disk=True,
    ),
    case(
        "download-ranged-to-a-full-disk",
        "download {ds} {out} --quiet --range-size 1MiB",
        1,
        "cannot write {out}/",
        "No space left on device",
        small_disk=True,
    ),
    # hostile names
    case(  # a manifest is checked whole before anything is written (test_hostile_metadata.py)
        "download-dataset-dotdot",
        "download {fresh} {out} --quiet",
        4,
        "corrupt dataset metadata: manifest",
        "'../escape.txt' is not normalized",
        setup=hostile_manifest("../escape.txt"),
        check=nothing_written,
    ),
    case(
        "download-dataset-name-too-long",
        "download {fresh} {out} --quiet",
        1,
        f"REFUSED 'd/{'n' * 300}'",
        "a name of 300 bytes, longer than the 255",
        setup=hostile_manifest(f"d/{'n' * 300}"),
        check=only_safe_file_written,
    ),
]


# --- running a case -------------------------------------------------------------------------


def assert_one_clear_line(
    result: subprocess.CompletedProcess[str], code: int, *fragments: str
) -> None:
    """Exactly one non-empty line on stderr, ours, with every fragment; the exit code; no
    traceback anywhere."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("s3xfer: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.returncode == code, (result.returncode, result.stderr)


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Mode, mtime and (where readable) bytes of everything under root."""
    state: dict[str, tuple[int, int, bytes | None]] = {}
    for path in sorted(root.rglob("*")) if root.is_dir() else []:
        info = path.lstat()
        data = path.read_bytes() if path.is_file() and os.access(path, os.R_OK) else None
        state[str(path.relative_to(root))] = (info.st_mode, info.st_mtime_ns, data)
    return state


def assert_nothing_lost(
    stage: Stage,
    result: subprocess.CompletedProcess[str],
    source_before: dict[str, tuple[int, int, bytes | None]],
    secrets: list[str],
) -> None:
    assert snapshot(stage.src) == source_before, "the source tree changed"
    leftovers = [p for pattern in TEMPORARY_NAMES for p in stage.tmp.rglob(pattern)]
    assert leftovers == [], leftovers
    assert list_keys(stage.client, stage.scratch) == [], "a failed upload left objects"
    uploads = stage.client.list_multipart_uploads(Bucket=stage.scratch).get("Uploads", [])
    assert uploads == [], "a failed upload left a multipart upload open"
    for secret in secrets:
        assert secret not in result.stdout + result.stderr, "a secret was printed"


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def run_cli_special(
    argv: list[str],
    env: dict[str, str],
    *,
    unprivileged: bool,
    stdout_to: str | None,
    timeout: float,
) -> subprocess.CompletedProcess[str]:
    """run_cli, with permissions enforced even for root, or stdout going to a file."""
    preexec = without_file_permission_override if unprivileged and os.geteuid() == 0 else None
    with contextlib.ExitStack() as stack:
        stdout: Any = stack.enter_context(open(stdout_to, "wb")) if stdout_to else subprocess.PIPE
        result = subprocess.run(
            [sys.executable, "-m", "s3xfer", *argv],
            env={**os.environ, **env},
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec,
            timeout=timeout,
        )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout or "", result.stderr
    )


@contextlib.contextmanager
def small_disk(path: Path) -> Iterator[bool]:
    """path as a file system of SMALL_DISK bytes (a tmpfs) when this process may mount one;
    False when it may not, and a full disk has to be faked in-process instead."""
    path.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        mount = ["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK}", "tmpfs", str(path)]
        if subprocess.run(mount, capture_output=True, check=False).returncode == 0:
            try:
                yield True
            finally:
                subprocess.run(["umount", str(path)], check=True)
            return
    yield False


def run_with_faked_full_disk(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> subprocess.CompletedProcess[str]:
    """The CLI in-process, with every file write failing with ENOSPC half way through (the
    temporary file is left for the product to clean up) and no space to preallocate."""
    from s3xfer import localfs
    from s3xfer.cli.main import main

    def half_then_full(fd: int, data: bytes | memoryview) -> None:
        os.write(fd, memoryview(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(localfs, "_write_all", half_then_full)
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    monkeypatch.setattr(sys, "argv", ["s3xfer", *argv])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as stopped:
        code = stopped.code if isinstance(stopped.code, int) else 1
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


@dataclass(frozen=True)
class Shared:
    bucket: str
    scratch: str
    dataset: str
    dataset_source: Path
    plain: str  # a plain prefix of loose objects (no manifest), larger than SMALL_DISK


@pytest.fixture(scope="module")
def shared(
    local_s3: LocalS3Info, sync_s3_client: Any, tmp_path_factory: pytest.TempPathFactory
) -> Shared:
    """One dataset uploaded once with the real CLI, for every case that only reads it."""
    bucket, scratch = f"bad-{uuid.uuid4().hex[:12]}", f"scratch-{uuid.uuid4().hex[:12]}"
    for name in (bucket, scratch):
        sync_s3_client.create_bucket(Bucket=name)
    source = tmp_path_factory.mktemp("dataset")
    write_tree(source, DATASET_FILES)
    missing = tmp_path_factory.mktemp("no-aws-config")
    with pytest.MonkeyPatch.context() as env:  # as s3_env does, for the whole module
        for name in [name for name in os.environ if name.startswith("AWS_")]:
            env.delenv(name)
        for name, value in local_s3.env().items():
            env.setenv(name, value)
        env.setenv("AWS_CONFIG_FILE", str(missing / "config"))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(missing / "credentials"))
        result = run_cli("upload", str(source), f"s3://{bucket}/ds", "--quiet")
    assert result.returncode == 0, result.stderr
    for n in range(PLAIN_OBJECTS):
        sync_s3_client.put_object(
            Bucket=bucket, Key=f"plain/{n:03d}.bin", Body=os.urandom(64 << 10)
        )
    return Shared(bucket, scratch, f"s3://{bucket}/ds", source, f"s3://{bucket}/plain")


def unlock(path: Path) -> None:
    """Give back the permissions a case took away, so the directory can be removed."""
    if path.is_symlink() or not path.exists():
        return
    path.chmod(0o700)
    if path.is_dir():
        for child in path.iterdir():
            unlock(child)


@pytest.mark.parametrize("row", CASES)
def test_bad_input(
    row: Case,
    shared: Shared,
    s3_env: LocalS3Info,
    sync_s3_client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stage = Stage(
        tmp_path / "stage", sync_s3_client, shared.bucket, shared.scratch, shared.dataset_source
    )
    stage.names.update(
        tmp=str(stage.tmp),
        src=str(stage.src),  # a small tree, made for each case
        out=str(stage.out),  # a download's DEST, not created
        missing=str(stage.tmp / "nope"),
        ds=shared.dataset,  # the shared dataset, only read
        plain=shared.plain,  # the shared plain prefix, only read
        bucket=shared.bucket,
        scratch=shared.scratch,
        void=f"s3://{shared.scratch}/x",  # where uploads that must fail are aimed
        closed=closed_port_url(),  # an endpoint nothing listens on
    )
    write_tree(stage.src, SOURCE_FILES)
    row.setup(stage)
    argv = [arg.format(**stage.names) for arg in row.argv]
    env = {name: value.format(**stage.names) for name, value in row.env.items()}
    source_before = snapshot(stage.src)
    try:
        with small_disk(stage.out) if row.small_disk else contextlib.nullcontext(True) as real:
            if not real:
                for name, value in env.items():
                    monkeypatch.setenv(name, value)
                result = run_with_faked_full_disk(argv, monkeypatch, capsys)
            elif row.unprivileged or row.stdout_to:
                result = run_cli_special(
                    argv,
                    env,
                    unprivileged=row.unprivileged,
                    stdout_to=row.stdout_to,
                    timeout=row.timeout,
                )
            else:
                result = run_cli(*argv, env=env, timeout=row.timeout)
            fragments = [fragment.format(**stage.names) for fragment in row.fragments]
            assert_one_clear_line(result, row.code, *fragments)
            secrets = [s3_env.secret_key, env.get("AWS_SECRET_ACCESS_KEY") or s3_env.secret_key]
            assert_nothing_lost(stage, result, source_before, secrets)
            row.check(stage, result)
    finally:
        for journal in stage.held:
            journal.close()
        unlock(stage.tmp)


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run_cli("--debug", "survey", str(tmp_path / "nope"))
    assert result.returncode != 0 and "Traceback" in result.stderr

"""Property: whatever happens to a tree between uploads — files added, modified, chmodded,
deleted, renamed, replaced by a directory or a directory replaced by a file — a download of
the dataset into a fresh directory gives back the tree as it was at the last upload, byte for
byte, with mtimes and modes; and the prefix holds nothing the manifest does not refer to.

Random sequences from Hypothesis, run against the real local server through the library
(the CLI's own cases are in test_sync.py). Packed small files, files of nearly 1 MiB that
fill more than one shard, files of their own and multipart files, with small thresholds so
that every example stays quick.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    precondition,
    rule,
    run_state_machine_as_test,
)

from s3xfer import S3Url, TransferConfig, make_plan, survey, upload
from s3xfer.config import MiB
from s3xfer.locals3 import LocalS3Info
from s3xfer.read.download import download

from .helpers import connection
from .test_sync import keys_under, referenced_keys, tree_of

CONFIG = TransferConfig(
    max_memory=32 * MiB,
    part_size=5 * MiB,
    multipart_threshold=2 * MiB,
    pack_threshold=1 * MiB,
    shard_size=5 * MiB,
)
# Packed (empty to 900 kB: a few of the largest fill a second shard), own object, multipart.
SIZES = st.sampled_from([0, 1, 700, 5000, 40_000, 900_000, 1_100_000, 2_300_000])
NAMES = st.sampled_from(["a", "b", "c.txt", "d/a", "d/b.bin", "d/e/a", "d/e/f/g", "e/a"])
MODES = st.sampled_from([0o644, 0o600, 0o755])
# Sequences per run: short enough for CI (about a minute); S3XFER_SYNC_EXAMPLES runs more
# (with --timeout 0), as for the figures in docs/reliability.md.
EXAMPLES = int(os.environ.get("S3XFER_SYNC_EXAMPLES", "15"))
STEPS = 14


def test_download_after_any_sequence_of_changes_and_uploads_equals_the_last_uploaded_tree(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    prefixes = itertools.count()
    conn = connection(s3_env)
    counts: Counter[str] = Counter()  # of sequences, changes, uploads and files restored

    class TreeChanges(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.work = Path(tempfile.mkdtemp(dir=tmp_path))
            self.src = self.work / "src"
            self.src.mkdir()
            self.prefix = f"prop{next(prefixes)}"
            self.uploaded: dict[str, tuple[bytes, int, int]] | None = None
            self.uploads = 0
            self.clock = 1_600_000_000_000_000_000  # every write gets a later mtime
            self.were_directories: set[str] = set()
            counts["sequences"] += 1

        # --- what the tree holds
        def files(self) -> list[str]:
            return sorted(tree_of(self.src))

        def directories(self) -> list[str]:
            return sorted(
                p.relative_to(self.src).as_posix() for p in self.src.rglob("*") if p.is_dir()
            )

        def fits(self, name: str) -> bool:
            """A file can be created at name: nothing there, no file on the way."""
            target = self.src / name
            parents = [self.src / p for p in Path(name).parents if str(p) != "."]
            return not target.exists() and not any(p.is_file() for p in parents)

        def multipart_allowed(self, name: str) -> bool:
            """SeaweedFS refuses (InternalError) to complete a multipart upload at a key that
            ever was a "directory" (the prefix of another key), even once every object under
            it is deleted: a quirk of its filer, not of S3 (which has no directories), and not
            s3xfer's to fix. Such names get files uploaded in one PUT."""
            return name not in self.were_directories

        def write(self, name: str, size: int, seed: int, mode: int) -> None:
            if size >= CONFIG.multipart_threshold and not self.multipart_allowed(name):
                size = CONFIG.pack_threshold + 1  # its own object all the same
            path = self.src / name
            path.parent.mkdir(parents=True, exist_ok=True)
            self.were_directories.update(p.as_posix() for p in Path(name).parents)
            path.write_bytes(random.Random(seed).randbytes(size))
            path.chmod(mode)
            self.clock += 1_000_000_007
            os.utime(path, ns=(self.clock, self.clock))

        # --- changes
        @rule(name=NAMES, size=SIZES, seed=st.integers(0, 2**16), mode=MODES)
        def add(self, name: str, size: int, seed: int, mode: int) -> None:
            if self.fits(name):
                self.write(name, size, seed, mode)
                counts["added"] += 1

        @precondition(lambda self: self.files())
        @rule(pick=st.integers(0, 99), size=SIZES, seed=st.integers(0, 2**16), mode=MODES)
        def modify(self, pick: int, size: int, seed: int, mode: int) -> None:
            files = self.files()
            self.write(files[pick % len(files)], size, seed, mode)
            counts["modified"] += 1

        @precondition(lambda self: self.files())
        @rule(pick=st.integers(0, 99), mode=MODES)
        def chmod_and_touch(self, pick: int, mode: int) -> None:
            files = self.files()
            path = self.src / files[pick % len(files)]
            path.chmod(mode)
            self.clock += 1_000_000_007
            os.utime(path, ns=(self.clock, self.clock))
            counts["chmodded and touched"] += 1

        @precondition(lambda self: self.files())
        @rule(pick=st.integers(0, 99))
        def delete(self, pick: int) -> None:
            files = self.files()
            (self.src / files[pick % len(files)]).unlink()
            counts["deleted"] += 1

        @precondition(lambda self: self.files())
        @rule(pick=st.integers(0, 99), name=NAMES)
        def rename(self, pick: int, name: str) -> None:
            files = self.files()
            source = self.src / files[pick % len(files)]
            multipart = source.stat().st_size >= CONFIG.multipart_threshold
            if self.fits(name) and (self.multipart_allowed(name) or not multipart):
                (self.src / name).parent.mkdir(parents=True, exist_ok=True)
                self.were_directories.update(p.as_posix() for p in Path(name).parents)
                source.rename(self.src / name)
                counts["renamed"] += 1

        @precondition(lambda self: self.files())
        @rule(pick=st.integers(0, 99), size=SIZES, seed=st.integers(0, 2**16))
        def replace_file_by_directory(self, pick: int, size: int, seed: int) -> None:
            files = self.files()
            name = files[pick % len(files)]
            (self.src / name).unlink()
            self.write(f"{name}/inside", size, seed, 0o644)
            counts["file replaced by a directory"] += 1

        @precondition(lambda self: self.directories())
        @rule(pick=st.integers(0, 99), size=SIZES, seed=st.integers(0, 2**16))
        def replace_directory_by_file(self, pick: int, size: int, seed: int) -> None:
            directories = self.directories()
            name = directories[pick % len(directories)]
            shutil.rmtree(self.src / name)
            self.write(name, size, seed, 0o644)
            counts["directory replaced by a file"] += 1

        @precondition(lambda self: self.files())
        @rule()
        def upload_again(self) -> None:
            tree = tree_of(self.src)
            plan = make_plan(survey(self.src), S3Url(bucket, self.prefix), CONFIG)

            async def run() -> Any:
                return await upload(plan, conn)

            report = anyio.run(run)
            assert report.ok, report.failures
            self.uploaded = tree
            self.uploads += 1
            counts["uploads"] += 1
            counts["files removed by an upload"] += report.files_removed
            counts["objects deleted"] += report.objects_deleted

        def teardown(self) -> None:
            try:
                if self.uploaded is not None:
                    self.check_download()
            finally:
                shutil.rmtree(self.work, ignore_errors=True)

        def check_download(self) -> None:
            out = self.work / f"out{self.uploads}"

            async def run() -> Any:
                url = S3Url(bucket, self.prefix)
                return await download(url, out, connection=conn, range_size=5 * MiB)

            report = anyio.run(run)
            assert report.ok, report.failures
            assert tree_of(out) == self.uploaded
            counts["downloads compared"] += 1
            counts["files restored"] += len(self.uploaded)
            held = keys_under(sync_s3_client, bucket, self.prefix)
            assert held == referenced_keys(sync_s3_client, bucket, self.prefix)

    run_state_machine_as_test(
        TreeChanges,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
            derandomize=False,
        ),
    )
    if "S3XFER_SYNC_STATS" in os.environ:  # for the figures in docs/reliability.md
        Path(os.environ["S3XFER_SYNC_STATS"]).write_text(json.dumps(counts, indent=1))

"""An unchanged re-run at the speed of a walk: the tree as it is walked, merge-joined in path
order with the destination's manifest as it is read, before anything is planned.

An upload of a tree already uploaded surveyed it, planned every shard (a layout and a
content digest each), read the whole manifest into records and compared them: 25 times the
time `find` takes to list the same tree, and memory growing with the number of files. Here
the walk and the manifest's rows are two streams in the same order (the walk yields paths in
plain string order, the manifest is written sorted by path), compared one file at a time:
what is held is one shard's members, never the tree or the manifest.

Only "nothing to do" is decided here: at the first difference (a new, changed or deleted
file, a shard cut differently, a path the walk could not read, an interrupted run's journal,
a catalog to repair) it says None, and the upload goes the usual way, which decides exactly
what to send. So it answers "unchanged" only where that way would send and write nothing:
every file's record matches the unit the plan would make of it (its key, size, mtime, mode,
part size), every shard would be cut and named as recorded and its members lie where
recorded, no record is stale or outside the tree (unless kept), and every listed shard is
still referred to.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from ..config import TransferConfig
from ..dataset.keys import S3Url, manifest_key
from ..dataset.manifest import ManifestRecord, ManifestRows
from ..dataset.tarpack import member_data_offset
from ..errors import CorruptMetadataError
from ..limits import DEFAULT_LIMITS, RunLimits
from ..planning.globs import NO_FILTER, PathFilter
from ..planning.plan import Kind, classify, plan_file, shard_groups, shard_key
from ..planning.survey import FileEntry, base_dir, scan
from ..transport.retry import RetryCount, RetryPolicy
from ..transport.s3 import Connection, open_s3
from .journal import journal_path
from .upload import UploadReport, concurrently, get_if_present, load_catalog_state


# Private, not in errors.py: control flow of the merge-join, caught in this module.
class _Differs(Exception):
    """The tree is not the manifest's: the usual upload decides what to do (never raised out
    of this module)."""


@dataclass
class Unchanged:
    """What the comparison found when nothing differs."""

    files: int = 0
    size: int = 0  # bytes of those files
    kept_deleted: int = 0  # records of files no longer in the tree, kept (--keep-deleted)
    not_selected: int = 0  # records outside --include/--exclude, left alone
    # Per shard key: the ETags its records carry, and how many records point into it.
    shard_etags: dict[str, set[str]] = field(default_factory=dict)
    shard_members: dict[str, int] = field(default_factory=dict)


def compare(
    rows: Iterator[ManifestRecord],
    walk: Iterator[FileEntry | object],
    dest: S3Url,
    config: TransferConfig,
    *,
    selection: PathFilter = NO_FILTER,
    keep_deleted: bool = False,
) -> Unchanged:
    """Walk and manifest rows merge-joined by path; _Differs at the first difference that
    would make an upload send or write anything. Holds one shard's members at most (those
    the cutting has not closed yet, with their records). Pure but for the iterators."""
    found = Unchanged()
    packed: dict[str, ManifestRecord] = {}  # records of small files not yet in a closed shard
    row: ManifestRecord | None = None
    last_row = ""

    def next_row() -> ManifestRecord | None:
        nonlocal last_row
        record = next(rows, None)
        if record is not None:
            if record.path <= last_row and last_row:
                raise _Differs("the manifest's rows are not in path order")
            last_row = record.path
            if record.packed:
                found.shard_etags.setdefault(record.key, set()).add(record.etag)
                found.shard_members[record.key] = found.shard_members.get(record.key, 0) + 1
        return record

    def not_in_tree(record: ManifestRecord) -> None:
        if not selection.selects(record.path):
            found.not_selected += 1
        elif keep_deleted:
            found.kept_deleted += 1
        else:
            raise _Differs(f"{record.path}: no longer in the tree")

    def small_files() -> Iterator[FileEntry]:
        """The walk joined with the rows: files checked here, small files handed on to be cut
        into shards (their records wait in `packed`)."""
        nonlocal row
        row = next_row()
        last_path = ""
        for item in walk:
            if not isinstance(item, FileEntry):
                raise _Differs("a path the walk could not upload")  # a Problem
            if item.path <= last_path and last_path:
                raise _Differs("the walk is not in path order")
            last_path = item.path
            while row is not None and row.path < item.path:
                not_in_tree(row)
                row = next_row()
            if row is None or row.path != item.path:
                raise _Differs(f"{item.path}: new")
            if row.coding:
                raise _Differs(f"{item.path}: stored coded")  # whether it still would be: plan
            found.files += 1
            found.size += item.size
            if classify(item.size, config) is Kind.PACK:
                packed[item.path] = row
                yield item
            elif not row.matches(plan_file(item, dest, config)):
                raise _Differs(f"{item.path}: changed")
            row = next_row()
        while row is not None:
            not_in_tree(row)
            row = next_row()

    for members, footprints in shard_groups(small_files(), config):
        key = shard_key(dest, members)
        offset = 0
        for member, footprint in zip(members, footprints, strict=True):
            record = packed.pop(member.path)
            data_offset = member_data_offset(offset, footprint, member.size)
            if (record.key, record.offset, record.size, record.mtime_ns, record.mode) != (
                key,
                data_offset,
                member.size,
                member.mtime_ns,
                member.mode,
            ):
                raise _Differs(f"{member.path}: not where its shard would put it now")
            offset += footprint
    assert not packed  # every small file's shard was closed
    return found


def _shards_as_recorded(found: Unchanged, rows: ManifestRows) -> bool:
    """No stale record (its shard rewritten since), every listed shard referred to, and each
    holding as many members as recorded."""
    for key, shard in rows.shards.items():
        if found.shard_etags.get(key, set()) - {shard.etag}:
            return False
        if found.shard_members.get(key) != shard.members:
            return False
    return set(found.shard_etags) <= set(rows.shards)


def _compare_tree(
    raw: bytes,
    *,
    where: str,
    root: Path,
    dest: S3Url,
    config: TransferConfig,
    selection: PathFilter,
    keep_deleted: bool,
) -> Unchanged | None:
    try:
        rows = ManifestRows(raw, where=where)
        found = compare(
            iter(rows),
            scan(root, selection=selection),
            dest,
            config,
            selection=selection,
            keep_deleted=keep_deleted,
        )
    except (_Differs, CorruptMetadataError):
        return None  # the usual way says what, and reports a corrupt manifest
    return found if _shards_as_recorded(found, rows) else None


def _journal_exists(root: Path, dest: S3Url, state_dir: Path | None) -> bool:
    source = base_dir(Path(os.path.abspath(root)))  # the plan's source, as the survey names it
    return journal_path(source, str(dest), state_dir=state_dir).exists()


async def unchanged_upload(
    root: Path,
    dest: S3Url,
    config: TransferConfig,
    connection: Connection,
    *,
    selection: PathFilter = NO_FILTER,
    keep_deleted: bool = False,
    resume: bool = True,
    state_dir: Path | None = None,
    limits: RunLimits = DEFAULT_LIMITS,
) -> UploadReport | None:
    """The report of uploading `root` to `dest` when nothing would be sent or written (see the
    module's docstring), decided by walking the tree once beside the manifest; None when
    something differs (or cannot be told this way): then plan and upload as usual. Reads
    only: no lease, no PUT. SourceError when the root cannot be read (as the survey)."""
    started = time.perf_counter()
    if resume and await anyio.to_thread.run_sync(_journal_exists, root, dest, state_dir):
        return None  # an interrupted run to finish (or its uploads to abort)
    policy = RetryPolicy(max_attempts=limits.max_attempts)
    retries = RetryCount()
    async with open_s3(connection, max_pool_connections=4) as s3:
        await s3.check_bucket(dest.bucket)
        key = manifest_key(dest)
        # At once: one round trip, not three, before a first upload goes on to plan.
        raw, catalog = await concurrently(
            lambda: get_if_present(s3, dest.bucket, key, policy=policy, on_retry=retries),
            lambda: load_catalog_state(s3, dest, policy, on_retry=retries),
        )
        if raw is None:
            return None
        if not catalog.current(hashlib.sha256(raw).hexdigest()):
            return None
        found = await anyio.to_thread.run_sync(
            lambda: _compare_tree(
                raw,
                where=f"s3://{dest.bucket}/{key}",
                root=root,
                dest=dest,
                config=config,
                selection=selection,
                keep_deleted=keep_deleted,
            )
        )
        requests, writes = s3.requests, s3.writes
    if found is None:
        return None
    return UploadReport(
        dest=str(dest),
        files_uploaded=0,
        bytes_uploaded=0,
        files_unchanged=found.files,
        bytes_unchanged=found.size,
        files_failed=0,
        failures=[],
        problems=[],
        seconds=time.perf_counter() - started,
        requests=requests,
        write_requests=writes,
        retries=retries.retries,
        throttled=retries.throttled,
        peak_buffered_bytes=0,
        manifest_written=False,
        extra={"shards_uploaded": 0, "compared_while_walking": True},
        files_kept_deleted=found.kept_deleted,
        files_not_selected=found.not_selected,
        concurrency=limits.concurrency,
        lowest_concurrency=limits.concurrency,
    )

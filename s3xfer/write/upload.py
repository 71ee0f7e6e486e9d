"""Upload orchestration: check the bucket, skip what the manifest (and the journal of an
interrupted run) says is done, run the engine, write the merged manifest, and report."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio

from ..checksums import crc32, crc32_to_base64
from ..config import format_size
from ..dataset import catalog
from ..dataset.coding import ENCRYPTED, IDENTITY, Coding, CompressMode, FrameKey
from ..dataset.keys import S3Url, manifest_key, sync_deletable
from ..dataset.manifest import Manifest, ManifestRecord, ShardRecord
from ..errors import CorruptMetadataError, EncryptionKeyError, NoSuchKeyError, S3XferError
from ..limits import DEFAULT_LIMITS, Budget, RunLimits
from ..planning.plan import FileUnit, Kind, Plan, ShardUnit
from ..planning.survey import Problem
from ..transport.retry import RetryCount, RetryPolicy, call_with_retries
from ..transport.s3 import MAX_DELETE_KEYS, S3, Connection, open_s3
from ..transport.throttle import TunerSettings
from . import lease
from .compress import measure_compression
from .counters import RunCounters
from .datakey import open_or_create_data_key
from .engine import Engine, ProgressCallback
from .journal import Journal, journal_path


@dataclass(frozen=True)
class UploadReport:
    dest: str
    files_uploaded: int
    bytes_uploaded: int
    files_unchanged: int
    bytes_unchanged: int
    files_failed: int
    failures: list[tuple[str, str]]
    problems: list[tuple[str, str]]  # files the survey could not read
    seconds: float
    requests: int
    write_requests: int
    retries: int
    throttled: int
    peak_buffered_bytes: int
    manifest_written: bool
    extra: dict[str, Any] = field(default_factory=dict)
    # The dataset made equal to the tree (see Committed).
    files_removed: int = 0  # left the dataset: deleted, renamed or replaced in the tree
    files_kept_deleted: int = 0  # no longer in the tree, kept (--keep-deleted, unreadable)
    files_not_selected: int = 0  # in the dataset, outside --include/--exclude: left alone
    objects_deleted: int = 0  # objects and shards nothing referred to any more
    # Resuming an interrupted run (see journal.py).
    files_from_journal: int = 0  # finished by the interrupted run: not sent again
    bytes_reused: int = 0  # parts of its multipart uploads found in S3 and verified: not sent
    uploads_resumed: int = 0
    uploads_kept: int = 0  # left open by this run's interruption, for the next run
    concurrency: int = 0
    lowest_concurrency: int = 0  # the adaptive window's low point (throttle.py)
    # What the gate chose and why (AdaptiveGate.summary): `concurrency` in --json.
    concurrency_choice: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.bytes_uploaded / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def unreadable(self) -> list[tuple[str, str]]:
        """Files the survey found but could not read: not uploaded, so the upload is not ok."""
        return [(p, r) for p, r in self.problems if Problem(p, r).unreadable]

    @property
    def ok(self) -> bool:
        return self.files_failed == 0 and not self.unreadable

    def to_json(self) -> dict[str, Any]:
        data = {
            name: getattr(self, name)
            for name in self.__dataclass_fields__
            if name not in ("extra", "concurrency_choice")
        }
        if self.concurrency_choice:
            data["concurrency"] = self.concurrency_choice
        data["failures"] = [{"path": p, "error": e} for p, e in self.failures]
        data["problems"] = [{"path": p, "reason": r} for p, r in self.problems]
        data["mb_per_s"] = round(self.mb_per_s, 2)
        data["seconds"] = round(self.seconds, 3)
        return {**data, **self.extra}


async def get_if_present(
    s3: S3, bucket: str, key: str, *, policy: RetryPolicy, on_retry: RetryCount | None = None
) -> bytes | None:
    """One of s3xfer's own objects (manifest, catalog, slice result), or None if absent."""
    try:
        return await call_with_retries(
            lambda: s3.get_object(bucket, key), policy=policy, on_retry=on_retry
        )
    except NoSuchKeyError:
        return None


async def put_with_checksum(
    s3: S3,
    bucket: str,
    key: str,
    body: bytes,
    *,
    policy: RetryPolicy,
    on_retry: RetryCount | None = None,
) -> str:
    """One of s3xfer's own objects, with its CRC32 for S3 to verify: its ETag."""
    checksum = crc32_to_base64(crc32(body))
    return await call_with_retries(
        lambda: s3.put_object(bucket, key, body, crc32=checksum), policy=policy, on_retry=on_retry
    )


async def open_journal(plan: Plan, *, state_dir: Path | None, name: str) -> Journal:
    """The journal of uploading plan.source as `name` (the destination, or a slice of it),
    opened (read, replayed, locked) in a worker thread: it may be large."""
    where = journal_path(plan.source, name, state_dir=state_dir)
    return await anyio.to_thread.run_sync(
        lambda: Journal.open(where, source=plan.source, dest=name)
    )


async def close_journal(journal: Journal, *, remove: bool) -> None:
    """Close (fsync, or delete) in a worker thread, even when the upload was cancelled."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(lambda: journal.close(remove=remove))


async def load_manifest(
    s3: S3, plan: Plan, policy: RetryPolicy, *, on_retry: RetryCount | None = None
) -> tuple[Manifest | None, str | None]:
    """The destination's manifest and the SHA-256 of its object (None, None: no manifest)."""
    key = manifest_key(plan.dest)
    raw = await get_if_present(s3, plan.dest.bucket, key, policy=policy, on_retry=on_retry)
    if raw is None:
        return None, None
    manifest = Manifest.from_bytes(raw, where=f"s3://{plan.dest.bucket}/{key}")
    return manifest, hashlib.sha256(raw).hexdigest()


async def load_catalog_state(
    s3: S3, dest: S3Url, policy: RetryPolicy, *, on_retry: RetryCount | None = None
) -> catalog.CatalogState:
    """The catalog's root and the pieces one listing shows: whether it is whole and current is
    for CatalogState.current to say. A root that cannot be read is a catalog to write again,
    not an error: the manifest, not the catalog, is what uploads start from."""
    listed: dict[int, str] = {}

    async def list_pieces() -> None:
        pieces = s3.list_objects(
            dest.bucket, catalog.pieces_prefix(dest), policy=policy, on_retry=on_retry
        )
        async for item in pieces:
            bucket = catalog.piece_bucket(dest, str(item["Key"]))
            if bucket is not None:
                listed[bucket] = str(item.get("ETag", ""))

    raw, _ = await concurrently(
        lambda: get_if_present(
            s3, dest.bucket, catalog.root_key(dest), policy=policy, on_retry=on_retry
        ),
        list_pieces,
    )
    try:
        root = catalog.CatalogRoot.from_bytes(raw, where="") if raw is not None else None
    except CorruptMetadataError:
        root = None
    return catalog.CatalogState(root, listed)


async def concurrently(*calls: Callable[[], Awaitable[Any]]) -> list[Any]:
    """The calls' results, in order, their round trips overlapping (over a long path the
    reads an upload starts with cost one round trip, not three). When any fails, the error
    of the first in the order given that failed, whatever failed first in time."""
    results: list[Any] = [None] * len(calls)
    errors: list[Exception | None] = [None] * len(calls)

    async def run(index: int) -> None:
        try:
            results[index] = await calls[index]()
        except Exception as error:  # raised below, in order
            errors[index] = error

    async with anyio.create_task_group() as group:
        for index in range(len(calls)):
            group.start_soon(run, index)
    for error in errors:
        if error is not None:
            raise error
    return results


# DeleteObjects requests at once (1,000 keys each): a million deletions need not be 1,000
# requests in flight.
DELETE_REQUESTS_IN_FLIGHT = 8
StartCallback = Callable[[int, int, int], None]  # (files to send, bytes to send, unchanged)


@dataclass
class Prepared:
    """What an upload starts from: the destination's manifest (with what a journal says an
    interrupted run finished), and the plan split into what to send and what is unchanged."""

    old: Manifest | None
    manifest: Manifest
    todo: list[FileUnit]
    unchanged: list[FileUnit]
    shards_todo: list[ShardUnit]
    shards_unchanged: list[ShardUnit]
    journaled: dict[str, ManifestRecord]
    policy: RetryPolicy
    metadata_retries: RetryCount  # of the manifest and catalog requests
    # Every key the manifest, journal or earlier results referred to: those the new
    # manifest no longer refers to are deleted once it is written.
    known_keys: set[str] = field(default_factory=set)
    stale: list[str] = field(default_factory=list)  # records dropped: their shard is gone
    old_sha256: str | None = None  # of the manifest object `old` was read from
    catalog_state: catalog.CatalogState | None = None  # as found; None: not looked at

    @property
    def catalog_current(self) -> bool:
        """The catalog holds exactly `old` (see CatalogState.current)."""
        return self.catalog_state is None or self.catalog_state.current(self.old_sha256)

    @property
    def files_todo(self) -> int:
        return len(self.todo) + sum(len(s.members) for s in self.shards_todo)

    @property
    def bytes_todo(self) -> int:
        return sum(u.size for u in self.todo) + sum(s.size for s in self.shards_todo)

    @property
    def files_unchanged(self) -> int:
        return len(self.unchanged) + sum(len(s.members) for s in self.shards_unchanged)

    @property
    def bytes_unchanged(self) -> int:
        return sum(u.size for u in self.unchanged) + sum(
            m.size for s in self.shards_unchanged for m in s.members
        )

    @property
    def files_from_journal(self) -> int:
        return sum(u.path in self.journaled for u in self.unchanged) + sum(
            m.path in self.journaled for s in self.shards_unchanged for m in s.members
        )


async def prepare(
    s3: S3,
    plan: Plan,
    *,
    journal: Journal | None = None,
    done: Manifest | None = None,
    metadata_retries: RetryCount | None = None,
    check_bucket: bool = True,
    limits: RunLimits = DEFAULT_LIMITS,
) -> Prepared:
    """Check the bucket, read the manifest and the catalog's state, and split the plan into
    work and no work. `done`: work finished but not in the destination's manifest
    yet (a slice's earlier result). `metadata_retries`: where to count the retries of
    metadata requests (one counter for an upload that prepares twice and holds a lease, so
    that its report counts them all). `check_bucket`: False when this run checked it."""
    policy = RetryPolicy(max_attempts=limits.max_attempts)
    metadata_retries = metadata_retries if metadata_retries is not None else RetryCount()
    if check_bucket:  # first and alone: not retried, its failure is one clear line at once
        await s3.check_bucket(plan.dest.bucket)
    # The manifest, then the catalog's state (its root and listing at once). Reading the
    # manifest beside them made tests/faults/test_faults.py's throttling test fail 2 runs in
    # 3 (a catalog piece out of attempts at the end): not understood yet, so not done.
    old, old_sha256 = await load_manifest(s3, plan, policy, on_retry=metadata_retries)
    catalog_state = await load_catalog_state(s3, plan.dest, policy, on_retry=metadata_retries)
    manifest = Manifest(str(plan.dest), dict(old.records), dict(old.shards)) if old else None
    manifest = manifest or Manifest(str(plan.dest), {})
    known_keys = manifest.object_keys()
    journaled = journal.state.records if journal is not None else {}
    for earlier in (
        Manifest("", journaled, journal.state.shards) if journal is not None else None,
        done,
    ):
        if earlier is not None:
            manifest.records.update(earlier.records)
            manifest.shards.update(earlier.shards)
            known_keys |= earlier.object_keys()
    stale = manifest.drop_stale()  # never "unchanged" on the word of bytes that are gone
    todo, unchanged = manifest.select_changed(plan.units)
    shards_todo, shards_unchanged = manifest.select_changed_shards(plan.shards)
    return Prepared(
        old,
        manifest,
        todo,
        unchanged,
        shards_todo,
        shards_unchanged,
        journaled,
        policy,
        metadata_retries,
        known_keys,
        stale,
        old_sha256,
        catalog_state,
    )


@dataclass(frozen=True)
class Committed:
    """What writing the new manifest did, and what is left to delete."""

    written: bool
    files_removed: int
    files_kept_deleted: int
    unreferenced: list[str]  # keys nothing refers to any more: delete after the manifest
    warnings: list[str]
    files_not_selected: int = 0  # outside the plan's --include/--exclude: left alone


NOT_COMMITTED = Committed(
    written=False, files_removed=0, files_kept_deleted=0, unreferenced=[], warnings=[]
)


def tree_paths(plan: Plan) -> set[str]:
    """Every file of the uploaded tree: the plan's files and shard members."""
    return {u.path for u in plan.units} | {m.path for s in plan.shards for m in s.members}


def kept_paths(plan: Plan, *, keep_deleted: bool) -> Callable[[str], bool]:
    """Which files no longer in the tree stay in the dataset: all with --keep-deleted, else
    those outside the plan's --include/--exclude selection (the upload was not about them,
    as `rclone sync` leaves excluded files alone), and those the survey could not read (or
    that lie under a directory it could not read): a file that could not be read is not a
    deleted file."""
    if keep_deleted:
        return lambda _path: True
    selection = plan.selection
    unreadable = {p.path for p in plan.problems if p.unreadable}
    if not unreadable and not selection:
        return lambda _path: False

    def kept(path: str) -> bool:
        if not selection.selects(path):
            return True
        parts = path.split("/")
        return any("/".join(parts[:n]) in unreadable for n in range(1, len(parts) + 1))

    return kept


async def commit(
    s3: S3,
    plan: Plan,
    prepared: Prepared,
    records: Iterable[ManifestRecord],
    shard_records: Iterable[ShardRecord],
    *,
    keep_deleted: bool = False,
) -> Committed:
    """Make the dataset equal the uploaded tree: merge what was uploaded into the manifest,
    leave out the files no longer in the tree (unless kept) and every stale record, and
    write the catalog and manifest when anything changed. Deletes nothing: the keys no
    longer referred to are returned, for `delete_unreferenced` once nothing that could
    still vouch for them (the journal) is left."""
    merged = prepared.manifest
    merged.records.update((record.path, record) for record in records)
    merged.shards.update((shard.key, shard) for shard in shard_records)
    # A shard rewritten in place holds its new members only: records of other files still
    # pointing into it (deleted, moved to another shard, replaced by a directory) must go.
    stale = [*prepared.stale, *merged.drop_stale()]
    tree = tree_paths(plan)
    keep = kept_paths(plan, keep_deleted=keep_deleted)
    final = merged.synced(tree, keep=keep)
    warnings = []
    gone = [p for p in stale if p not in tree and keep(p)]
    if gone:
        warnings.append(
            f"{len(gone)} files no longer in the tree could not be kept, their shard having "
            f"been rewritten by an earlier s3xfer: {', '.join(gone[:5])}"
            + (" …" if len(gone) > 5 else "")
        )
    before = prepared.old.records if prepared.old is not None else {}
    referenced = final.object_keys()
    unreferenced = sorted(
        key
        for key in (prepared.known_keys | merged.object_keys()) - referenced
        if sync_deletable(plan.dest, key)
    )
    selects = plan.selection.selects
    committed = Committed(
        written=not final.same_as(prepared.old) or not prepared.catalog_current,
        files_removed=sum(path not in final.records for path in before),
        files_kept_deleted=sum(path not in tree and selects(path) for path in final.records),
        unreferenced=unreferenced,
        warnings=warnings,
        files_not_selected=sum(not selects(path) for path in final.records)
        if plan.selection
        else 0,
    )
    if committed.written:
        await save_catalog(s3, plan.dest, prepared, final, on_retry=prepared.metadata_retries)
    prepared.manifest = final
    return committed


def may_write(prepared: Prepared, plan: Plan, *, keep_deleted: bool) -> bool:
    """Whether an upload from `prepared` could write anything: files to send, a catalog to
    repair, or a manifest that commit would change even if nothing were sent (records an
    interrupted run left, files that left the tree: commit's own computation, without the
    engine's results)."""
    if prepared.todo or prepared.shards_todo or not prepared.catalog_current:
        return True
    unsent = prepared.manifest.synced(
        tree_paths(plan), keep=kept_paths(plan, keep_deleted=keep_deleted)
    )
    return not unsent.same_as(prepared.old)


async def prepare_to_write(
    s3: S3,
    plan: Plan,
    stack: contextlib.AsyncExitStack,
    *,
    command: str,
    keep_deleted: bool,
    break_lease: bool,
    retries: RetryCount,
    journal: Journal | None = None,
    limits: RunLimits = DEFAULT_LIMITS,
) -> tuple[Prepared, lease.Lease | None]:
    """prepare(); then, when the upload may write, the prefix's lease taken (held by `stack`
    until it closes) and prepare() again under it: the dataset as the last writer left it.
    The lease is None for an upload with nothing to write, which takes none."""
    prepared = await prepare(s3, plan, journal=journal, metadata_retries=retries, limits=limits)
    if not may_write(prepared, plan, keep_deleted=keep_deleted):
        return prepared, None
    held = await stack.enter_async_context(
        lease.held(
            s3,
            plan.dest,
            policy=prepared.policy,
            command=command,
            break_lease=break_lease,
            on_retry=retries,
        )
    )
    again = await prepare(
        s3,
        plan,
        journal=journal,
        metadata_retries=retries,
        check_bucket=False,
        limits=limits,
    )
    return again, held


async def delete_unreferenced(
    s3: S3, dest: S3Url, keys: list[str], policy: RetryPolicy
) -> tuple[int, list[str]]:
    """Delete objects the written manifest no longer refers to, 1,000 per request; how many
    were deleted, and a warning for those that could not be (left behind, harmless: nothing
    refers to them)."""
    failed: list[tuple[str, str]] = []
    limiter = anyio.CapacityLimiter(DELETE_REQUESTS_IN_FLIGHT)

    async def delete(batch: list[str]) -> None:
        try:
            async with limiter:
                failed.extend(
                    await call_with_retries(
                        lambda: s3.delete_objects(dest.bucket, batch), policy=policy
                    )
                )
        except S3XferError as error:
            failed.extend((key, str(error)) for key in batch)

    async with anyio.create_task_group() as group:
        for start in range(0, len(keys), MAX_DELETE_KEYS):
            group.start_soon(delete, keys[start : start + MAX_DELETE_KEYS])
    warnings = []
    if failed:
        key, reason = failed[0]
        warnings.append(
            f"{len(failed)} objects no longer in the dataset could not be deleted (left "
            f"behind, referred to by nothing), e.g. s3://{dest.bucket}/{key}: {reason}"
        )
    return len(keys) - len(failed), warnings


def refuse_plain_into_encrypted(manifest: Manifest | None) -> None:
    """An upload without the key into a dataset of encrypted files would store the new files
    in the clear beside them: refused, nothing written."""
    if manifest is not None and any(
        Coding.from_json(r.coding).encrypted for r in manifest.records.values() if r.coding
    ):
        raise EncryptionKeyError(
            f"{manifest.dest} is encrypted: give its --encryption-key to upload to it"
        )


def run_budget(plan: Plan, limits: RunLimits) -> Budget:
    """The byte budget a run of `plan` needs: limits.max_memory, or the plan's largest part
    (or single PUT) when that is larger: a saved plan's parts are what it was made with, and
    each is held whole while it is sent. Budget.raised says so."""
    largest = max(
        (u.part_size if u.kind is Kind.MULTIPART else u.size for u in plan.units), default=0
    )
    largest = max(largest, max((s.part_size for s in plan.shards), default=0))
    return limits.memory_for(largest, what=f"one part of {format_size(largest)} of the plan")


def make_engine(
    s3: S3,
    plan: Plan,
    *,
    limits: RunLimits = DEFAULT_LIMITS,
    on_progress: ProgressCallback | None = None,
    journal: Journal | None = None,
    adopt_uploads: bool = False,
    stored: Manifest | None = None,
    frame_key: FrameKey | None = None,
) -> Engine:
    """The engine of a plan; `stored`: what the destination holds (the manifest an upload
    starts from), so that a shard laid out again as its files are now is not sent twice;
    `frame_key`: the dataset's key when files are encrypted."""
    return Engine(
        s3,
        bucket=plan.dest.bucket,
        source=plan.source,
        config=plan.config,
        limits=limits,
        max_memory=run_budget(plan, limits).capacity,
        on_progress=on_progress,
        journal=journal,
        prefix=plan.dest.prefix,
        adopt_uploads=adopt_uploads,
        stored=stored,
        frame_key=frame_key,
    )


def _raised(plan: Plan, limits: RunLimits) -> list[str]:
    """The notice of a budget raised to hold the plan's largest part, if it was."""
    raised = run_budget(plan, limits).raised
    return [raised] if raised else []


def make_report(
    plan: Plan,
    prepared: Prepared,
    counters: RunCounters,
    *,
    limits: RunLimits = DEFAULT_LIMITS,
    started: float,
    committed: Committed,
    objects_deleted: int = 0,
    warnings: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> UploadReport:
    """The report of an upload, one machine's or many's: what the engine runs did (counters),
    with what preparing and committing it did."""
    return UploadReport(
        dest=str(plan.dest),
        files_uploaded=counters.files_done,
        bytes_uploaded=counters.bytes_done,
        files_unchanged=prepared.files_unchanged + counters.files_unchanged,
        bytes_unchanged=prepared.bytes_unchanged,
        files_failed=counters.files_failed,
        failures=sorted(counters.failures),
        problems=[(p.path, p.reason) for p in plan.problems],
        seconds=time.perf_counter() - started,
        requests=counters.requests,
        write_requests=counters.write_requests,
        retries=counters.retries + prepared.metadata_retries.retries,
        throttled=counters.throttled + prepared.metadata_retries.throttled,
        peak_buffered_bytes=counters.peak_buffered_bytes,
        manifest_written=committed.written,
        extra={"shards_uploaded": counters.shards_done, **(extra or {})},
        files_removed=committed.files_removed,
        files_kept_deleted=committed.files_kept_deleted,
        files_not_selected=committed.files_not_selected,
        objects_deleted=objects_deleted,
        files_from_journal=prepared.files_from_journal,
        bytes_reused=counters.bytes_reused,
        uploads_resumed=counters.uploads_resumed,
        uploads_kept=counters.uploads_kept,
        warnings=[*_raised(plan, limits), *(warnings or []), *committed.warnings],
        concurrency=counters.concurrency_choice.get("final", limits.concurrency)
        if limits.auto_concurrency
        else limits.concurrency,
        lowest_concurrency=counters.lowest_concurrency or limits.concurrency,
        concurrency_choice=dict(counters.concurrency_choice),
    )


async def execute_plan(
    s3: S3,
    plan: Plan,
    *,
    on_start: StartCallback | None = None,
    on_progress: ProgressCallback | None = None,
    journal: Journal | None = None,
    keep_deleted: bool = False,
    break_lease: bool = False,
    encryption_key: bytes | None = None,
    limits: RunLimits = DEFAULT_LIMITS,
    compress: CompressMode = CompressMode.NONE,
) -> UploadReport:
    """Upload what changed since the last run of this plan's destination, with a client given,
    and make the dataset equal the tree (files no longer in it leave the manifest, objects
    nothing refers to any more are deleted), unless `keep_deleted`. With a journal, what an
    interrupted run finished counts as uploaded, and its multipart uploads are resumed.

    An upload that will write anything holds the prefix's lease (lease.py) from before it
    reads the manifest to after it deleted what is no longer referred to: LeaseHeldError,
    with nothing written, when another s3xfer holds it (`break_lease` takes it anyway). One
    with nothing to write (a re-run of an unchanged tree) takes no lease and sends no PUT.

    `encryption_key` (32 bytes): every file is stored encrypted (docs/format.md, "Coded
    files") with the dataset's data key, which it wraps."""
    started = time.perf_counter()
    retries = RetryCount()  # of the metadata and lease requests
    frame_key = None
    base = IDENTITY
    if encryption_key is not None:
        policy = RetryPolicy(max_attempts=limits.max_attempts)
        frame_key = await open_or_create_data_key(s3, plan.dest, encryption_key, policy=policy)
        base = ENCRYPTED
    compressed, _summary = await measure_compression(plan, compress, base=base)
    plan = plan.coded(base, compressed)
    async with contextlib.AsyncExitStack() as stack:
        prepared, held = await prepare_to_write(
            s3,
            plan,
            stack,
            command="upload",
            keep_deleted=keep_deleted,
            break_lease=break_lease,
            retries=retries,
            journal=journal,
            limits=limits,
        )
        if frame_key is None:
            refuse_plain_into_encrypted(prepared.old)
        if on_start is not None:
            on_start(prepared.files_todo, prepared.bytes_todo, prepared.files_unchanged)
        engine = make_engine(
            s3,
            plan,
            limits=limits,
            on_progress=on_progress,
            journal=journal,
            stored=prepared.manifest,
            frame_key=frame_key,
        )
        await engine.run(prepared.todo, prepared.shards_todo)
        warnings = list(journal.warnings) if journal is not None else []
        if held is not None:
            await held.confirm()
        committed = await commit(
            s3, plan, prepared, engine.records, engine.shard_records, keep_deleted=keep_deleted
        )
        deleted = 0
        if engine.stats.uploads_kept == 0:
            if journal is not None:
                # Its work is in the manifest now. Gone before any deletion: a journal that
                # outlived one could vouch, on a later run, for an object deleted here.
                await close_journal(journal, remove=True)
            deleted, failed = await delete_unreferenced(
                s3, plan.dest, committed.unreferenced, prepared.policy
            )
            warnings += failed
    return make_report(
        plan,
        prepared,
        RunCounters.of(engine),
        limits=limits,
        started=started,
        committed=committed,
        objects_deleted=deleted,
        warnings=warnings,
    )


async def save_catalog(
    s3: S3,
    dest: S3Url,
    prepared: Prepared,
    new: Manifest,
    *,
    on_retry: RetryCount | None = None,
) -> None:
    """Write the catalog and manifest of `new`: the pieces, then the root, then the manifest
    (readers start there). Only the pieces that changed since `prepared.old` when the catalog
    holds exactly that (CatalogState.current); otherwise every piece, and the pieces that
    should not be there written empty: a catalog left half-written by a writer that died, or
    mixed by two that raced, is repaired. The root records the pieces' ETags and the
    manifest's SHA-256, so that the next upload can tell."""
    state = prepared.catalog_state or catalog.CatalogState(None, {})
    current = prepared.catalog_current

    async def put(key: str, body: bytes) -> str:
        return await put_with_checksum(
            s3, dest.bucket, key, body, policy=prepared.policy, on_retry=on_retry
        )

    root, changed = catalog.build(
        new,
        dest,
        previous=prepared.old if current else None,
        stale=() if current else state.listed,
    )
    etags = dict(state.listed) if current else {}

    async def put_piece(key: str, body: bytes) -> None:
        bucket = catalog.piece_bucket(dest, key)
        assert bucket is not None  # build names its pieces with piece_key
        etags[bucket] = await put(key, body)

    async with anyio.create_task_group() as group:
        for key, body in changed.items():
            group.start_soon(put_piece, key, body)
    manifest_bytes = new.to_bytes()
    root = replace(root, manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(), pieces=etags)
    await put(catalog.root_key(dest), root.to_bytes())
    await put(manifest_key(dest), manifest_bytes)


def open_s3_for(
    limits: RunLimits, connection: Connection
) -> contextlib.AbstractAsyncContextManager[S3]:
    """The client of an upload: its requests in flight fixed at limits.concurrency, or tuned
    during the transfer (auto_concurrency), the pools sized to match."""
    return open_s3(
        connection,
        max_pool_connections=limits.concurrency,
        tuner=TunerSettings() if limits.auto_concurrency else None,
    )


async def upload(
    plan: Plan,
    connection: Connection | None = None,
    *,
    on_start: StartCallback | None = None,
    on_progress: ProgressCallback | None = None,
    resume: bool = True,
    state_dir: Path | None = None,
    keep_deleted: bool = False,
    break_lease: bool = False,
    encryption_key: bytes | None = None,
    limits: RunLimits | None = None,
    compress: CompressMode = CompressMode.NONE,
) -> UploadReport:
    """Execute a plan: one client, its connection pool sized to limits.concurrency. The
    dataset is made equal to the plan's tree, unless `keep_deleted`; `break_lease` takes the
    prefix's lease even from another writer (see execute_plan). `limits`: how the run is
    bounded (default: RunLimits with the memory budget the plan was made with).

    With `resume` (the default) progress is journaled under the state directory, and a run
    interrupted at any point is resumed by running the same upload again."""
    limits = limits or RunLimits(max_memory=plan.config.max_memory)
    journal = None
    if resume:
        journal = await open_journal(plan, state_dir=state_dir, name=str(plan.dest))
    finished = False
    try:
        async with open_s3_for(limits, connection or Connection()) as s3:
            report = await execute_plan(
                s3,
                plan,
                on_start=on_start,
                on_progress=on_progress,
                journal=journal,
                keep_deleted=keep_deleted,
                break_lease=break_lease,
                encryption_key=encryption_key,
                limits=limits,
                compress=compress,
            )
        finished = report.uploads_kept == 0
        return report
    finally:
        if journal is not None:
            await close_journal(journal, remove=finished)

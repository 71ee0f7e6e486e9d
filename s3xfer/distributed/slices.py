"""One plan over many jobs without a broker, for batch schedulers (Slurm arrays, Kubernetes
indexed jobs, AWS Batch): `upload --plan P --slice K/N` uploads a deterministic slice and
stores what it did as `<prefix>/.s3xfer/slices/<plan id>/<K>-of-<N>.json.gz`; `finalize`
merges every slice's result into the manifest and catalog, as one upload would have.

Slices are idempotent: re-running one skips what its stored result (or its journal) says is
done. The plan id is a hash of the plan, so results of another plan are never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from ..dataset import validate
from ..dataset.keys import META_DIR, S3Url
from ..dataset.manifest import Manifest, ManifestRecord, ShardRecord, parse_rows
from ..errors import BadValue, MissingSlicesError
from ..limits import DEFAULT_LIMITS, RunLimits
from ..planning.plan import Plan, slice_of, work_units
from ..transport.retry import RetryCount, RetryPolicy
from ..transport.s3 import Connection, open_s3
from ..write import lease
from ..write.counters import RunCounters
from ..write.engine import ProgressCallback
from ..write.upload import (
    NOT_COMMITTED,
    StartCallback,
    UploadReport,
    close_journal,
    commit,
    delete_unreferenced,
    get_if_present,
    make_engine,
    make_report,
    open_journal,
    open_s3_for,
    prepare,
    put_with_checksum,
)

SLICE_FORMAT = "s3xfer-slice"
SLICE_VERSION = 1
MAX_SLICES = 100_000  # slice numbers are written with 5 digits


def plan_id(plan: Plan) -> str:
    """The identity of a plan: its source, destination, settings and units."""
    data = plan.to_json()
    del data["estimate"], data["problems"]
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def slices_prefix(dest: S3Url, identity: str) -> str:
    return dest.key(f"{META_DIR}/slices/{identity}/")


def slice_key(dest: S3Url, identity: str, index: int, count: int) -> str:
    return f"{slices_prefix(dest, identity)}{index:05d}-of-{count:05d}.json.gz"


@dataclass
class SliceResult:
    """What one slice stored: the records of every file of the slice it uploaded."""

    plan: str
    index: int
    count: int
    records: list[ManifestRecord] = field(default_factory=list)
    shards: list[ShardRecord] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        data = {
            "format": SLICE_FORMAT,
            "version": SLICE_VERSION,
            "plan": self.plan,
            "slice": [self.index, self.count],
            "files": [r.to_json() for r in sorted(self.records, key=lambda r: r.path)],
            "shards": [s.to_json() for s in sorted(self.shards, key=lambda s: s.key)],
            "failures": [list(f) for f in sorted(self.failures)],
        }
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        return validate.compress_bounded(text.encode("utf-8"))

    @classmethod
    def from_bytes(cls, raw: bytes, *, where: str) -> SliceResult:
        """Raises CorruptMetadataError naming the value, and `where`, on anything malformed."""
        try:
            data = validate.json_object(validate.gunzip(raw))
            validate.envelope(data, format=SLICE_FORMAT, version=SLICE_VERSION)
            index, count = validate.array(validate.field(data, "slice"), "slice", length=2)
            count = validate.integer(count, "slice count", low=1, high=MAX_SLICES)
            index = validate.integer(index, "slice index", low=1, high=count)
            records, shards = parse_rows(
                validate.field(data, "files"), validate.field(data, "shards")
            )
            failures = [
                (
                    validate.relative_path(path, "failed path"),
                    validate.text(error, "failure", max_bytes=64 * 1024, empty=True),
                )
                for path, error in (
                    validate.array(row, "failure", length=2)
                    for row in validate.array(validate.field(data, "failures"), "failures")
                )
            ]
            plan = validate.text(validate.field(data, "plan"), "plan id", max_bytes=64)
        except BadValue as exc:
            raise validate.corrupt("slice result", where, exc) from exc
        return cls(plan, index, count, list(records.values()), list(shards.values()), failures)

    @property
    def counters(self) -> RunCounters:
        return RunCounters.of_records(self.records, self.shards, self.failures)

    def as_manifest(self, dest: S3Url) -> Manifest:
        return Manifest(
            str(dest), {r.path: r for r in self.records}, {s.key: s for s in self.shards}
        )


async def upload_slice(
    plan: Plan,
    index: int,
    count: int,
    connection: Connection | None = None,
    *,
    on_start: StartCallback | None = None,
    on_progress: ProgressCallback | None = None,
    state_dir: Path | None = None,
    limits: RunLimits | None = None,
) -> UploadReport:
    """Upload slice `index` of `count` (from 1) of the plan's work units, and store its result
    for `finalize`. The catalog is not written: finalize does it once, for all slices.
    `limits`: as upload's (default: the memory budget the plan was made with)."""
    started = time.perf_counter()
    limits = limits or RunLimits(max_memory=plan.config.max_memory)
    policy = RetryPolicy(max_attempts=limits.max_attempts)
    identity = plan_id(plan)
    key = slice_key(plan.dest, identity, index, count)
    journal = await open_journal(
        plan, state_dir=state_dir, name=f"{plan.dest}#slice-{index}-of-{count}"
    )
    finished = False
    try:
        async with open_s3_for(limits, connection or Connection()) as s3:
            await s3.check_bucket(plan.dest.bucket)
            raw = await get_if_present(s3, plan.dest.bucket, key, policy=policy)
            earlier = SliceResult.from_bytes(raw, where=key) if raw is not None else None
            done = earlier.as_manifest(plan.dest) if earlier is not None else None
            prepared = await prepare(s3, plan, journal=journal, done=done, limits=limits)
            mine = slice_of(work_units(plan.units, plan.shards), index, count)
            my_paths = {f.path for unit in mine for f in unit.files}
            my_shards = {s.key for unit in mine for s in unit.shards}
            prepared.todo = [u for u in prepared.todo if u.path in my_paths]
            prepared.unchanged = [u for u in prepared.unchanged if u.path in my_paths]
            prepared.shards_todo = [s for s in prepared.shards_todo if s.key in my_shards]
            prepared.shards_unchanged = [s for s in prepared.shards_unchanged if s.key in my_shards]
            if on_start is not None:
                on_start(prepared.files_todo, prepared.bytes_todo, 0)
            engine = make_engine(
                s3,
                plan,
                limits=limits,
                on_progress=on_progress,
                journal=journal,
                stored=prepared.manifest,
            )
            await engine.run(prepared.todo, prepared.shards_todo)
            # Everything this slice has done, whichever run did it.
            member_paths = {m.path for unit in mine for shard in unit.shards for m in shard.members}
            known = prepared.manifest.records
            records = {path: known[path] for path in my_paths | member_paths if path in known}
            records.update((r.path, r) for r in engine.records)
            # Shards laid out again as their files were at upload time have keys of their own.
            stored = {r.key for r in records.values() if r.packed} | my_shards
            shards = {
                k: prepared.manifest.shards[k] for k in stored if k in prepared.manifest.shards
            }
            shards.update((s.key, s) for s in engine.shard_records)
            counters = RunCounters.of(engine)
            result = SliceResult(
                identity,
                index,
                count,
                list(records.values()),
                list(shards.values()),
                list(counters.failures),
            )
            await put_with_checksum(s3, plan.dest.bucket, key, result.to_bytes(), policy=policy)
            report = make_report(
                plan,
                prepared,
                RunCounters.of(engine),
                limits=limits,
                started=started,
                committed=NOT_COMMITTED,
                warnings=list(journal.warnings),
            )
        finished = report.uploads_kept == 0
        return report
    finally:
        await close_journal(journal, remove=finished)


async def finalize(
    plan: Plan,
    connection: Connection | None = None,
    *,
    keep_deleted: bool = False,
    break_lease: bool = False,
    limits: RunLimits = DEFAULT_LIMITS,
) -> UploadReport:
    """Merge every slice's result into the manifest and catalog, the dataset made equal to
    the plan's tree as one upload of the plan would (unless `keep_deleted`): files no longer
    in it leave the manifest, and objects nothing refers to any more are deleted after it is
    written. Refuses, naming them, when slices are missing; files a slice failed are reported
    (exit 1), the rest catalogued. It holds the prefix's lease throughout (see lease.py)."""
    started = time.perf_counter()
    policy = RetryPolicy(max_attempts=limits.max_attempts)
    identity = plan_id(plan)
    retries = RetryCount()  # of the metadata and lease requests
    async with (
        open_s3(connection or Connection(), max_pool_connections=16) as s3,
        lease.held(
            s3,
            plan.dest,
            policy=policy,
            command="finalize",
            break_lease=break_lease,
            on_retry=retries,
        ) as held,
    ):
        prepared = await prepare(s3, plan, metadata_retries=retries, limits=limits)
        found: dict[int, SliceResult] = {}
        counts: set[int] = set()
        prefix = slices_prefix(plan.dest, identity)
        listing = s3.list_objects(plan.dest.bucket, prefix, policy=policy, on_retry=retries)
        keys = [item["Key"] async for item in listing]

        async def load(key: str) -> None:
            raw = await get_if_present(s3, plan.dest.bucket, key, policy=policy)
            if raw is not None:
                result = SliceResult.from_bytes(raw, where=f"s3://{plan.dest.bucket}/{key}")
                found[result.index] = result
                counts.add(result.count)

        async with anyio.create_task_group() as group:
            for key in keys:
                group.start_soon(load, key)
        if not found:
            raise MissingSlicesError(
                f"no slice results for this plan under s3://{plan.dest.bucket}/{prefix}: "
                "run `s3xfer upload --plan PLAN --slice K/N` for every K first"
            )
        if len(counts) != 1:
            raise MissingSlicesError(
                f"slice results of different slicings ({sorted(counts)}) for one plan: "
                "run every slice with the same N"
            )
        count = counts.pop()
        missing = [k for k in range(1, count + 1) if k not in found]
        if missing:
            listed = ", ".join(map(str, missing[:20])) + (" …" if len(missing) > 20 else "")
            raise MissingSlicesError(f"{len(missing)} of {count} slices have no result: {listed}")
        records = [r for result in found.values() for r in result.records]
        shards = [s for result in found.values() for s in result.shards]
        await held.confirm()
        committed = await commit(s3, plan, prepared, records, shards, keep_deleted=keep_deleted)
        deleted, warnings = await delete_unreferenced(
            s3, plan.dest, committed.unreferenced, prepared.policy
        )
        counters = RunCounters.merged(result.counters for result in found.values())
        return make_report(
            plan,
            prepared,
            counters.with_requests_of(s3),
            limits=limits,
            started=started,
            committed=committed,
            objects_deleted=deleted,
            warnings=warnings,
        )

"""The pure parts of a distributed upload: the job's names and timings, a unit's payload and
result (built from the engine's counters, merged into one upload's), and the decisions the
producer takes from what Redis shows (progress, silent workers, lost and finished units).
No celery, no redis: `jobs.py` and `worker.py` do the talking; tests/unit/test_distributed.py
checks these with plain values.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ..dataset.manifest import ManifestRecord, ShardRecord
from ..errors import S3XferError, UnitFailed, UsageError
from ..limits import RunLimits
from ..planning.plan import Plan, WorkUnit
from ..transport.s3 import Connection
from ..write.counters import RunCounters

QUEUE = "s3xfer"
TASK_NAME = "s3xfer.upload_unit"
PAYLOAD_VERSION = 1
RESULT_FORMAT = "s3xfer-unit-result"
RESULT_VERSION = 1

# A dead worker's unit goes back to the queue this long after its last heartbeat. Shorter
# recovers faster; longer tolerates a worker cut off from Redis for a while without a second
# delivery (harmless, but work done twice).
DEFAULT_VISIBILITY_TIMEOUT = 120.0
MIN_VISIBILITY_TIMEOUT = 5.0
PROGRESS_INTERVAL = 0.25  # a worker writes its unit's progress at most this often...
BEAT_INTERVAL = 1.0  # ...and at least this often (its heartbeat)
JOB_TTL = 7 * 24 * 3600  # Redis keys and task results of a job whose producer went away
LOCK_TTL = 30  # a dead producer's lock on its job frees itself after this long
NOTICE_AFTER = 10.0  # without any sign of a worker for this long, the producer says so
# Pinned, not left to kombu's defaults: the heartbeat writes to the sorted set, and the
# producer looks for its units' messages in the hash.
UNACKED_INDEX_KEY = "unacked_index"
UNACKED_KEY = "unacked"
STALE_AFTER = 10.0  # a run of a unit whose beats stood still this long has stopped
LOST_CHECK_INTERVAL = 2.0  # a unit missing from the queue is looked for again this soon


def transport_options(visibility_timeout: float) -> dict[str, Any]:
    """Kombu Redis transport options for a visibility timeout.

    Kombu sweeps for messages to restore every `unacked_restore_interval` seconds, but scans
    only every `unacked_restore_throttle`-th sweep (10 s × 10 by default: a dead worker's unit
    would wait about 100 s beyond the timeout). Every sweep scans here, a tenth of the
    timeout apart (1 to 30 s)."""
    if visibility_timeout < MIN_VISIBILITY_TIMEOUT:
        raise UsageError(
            f"the visibility timeout must be at least {MIN_VISIBILITY_TIMEOUT:.0f} s "
            f"(workers beat every {BEAT_INTERVAL:.0f} s), got {visibility_timeout:g}"
        )
    return {
        "visibility_timeout": visibility_timeout,
        "unacked_restore_interval": min(30.0, max(1.0, visibility_timeout / 10)),
        "unacked_restore_throttle": 1,
        "unacked_index_key": UNACKED_INDEX_KEY,
        "unacked_key": UNACKED_KEY,
        # A sweeper killed while holding the sweep lock must not stop sweeps for long.
        "unacked_mutex_expire": max(10, math.ceil(min(300.0, visibility_timeout))),
    }


# Connection settings a worker takes from the producer. Credentials (and the profile naming
# them) never travel: each worker finds its own in its environment.
SHARED_CONNECTION_FIELDS = (
    "endpoint_url",
    "region",
    "verify_ssl",
    "unsigned",
    "sse",
    "sse_kms_key_id",
    "expected_bucket_owner",
    "stall_timeout",
    "read_timeout",
)
# Never sent through the broker: each worker signs with its own credentials (its profile,
# environment or instance role), so no secret is ever stored in Redis.
WORKER_OWN_CONNECTION_FIELDS = ("profile", "access_key", "secret_key", "session_token")


def connection_to_json(connection: Connection) -> dict[str, Any]:
    """What workers connect with: the producer's endpoint, also when it came from
    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (a worker's own environment may not say it)."""
    from ..transport.endpoints import configured_endpoint

    data = {name: getattr(connection, name) for name in SHARED_CONNECTION_FIELDS}
    data["endpoint_url"] = configured_endpoint(connection.endpoint_url, os.environ)
    return data


def connection_from_json(data: dict[str, Any]) -> Connection:
    return Connection(**{name: data[name] for name in SHARED_CONNECTION_FIELDS if name in data})


def job_id(plan: Plan, work: list[WorkUnit]) -> str:
    """The same upload of the same files is the same job: a producer run again after dying
    finds its units' results instead of sending them again."""
    data = [str(plan.source), str(plan.dest), [unit.to_json() for unit in work]]
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def task_prefix(job: str) -> str:
    return f"s3xfer-{job}-"


def task_id(job: str, index: int) -> str:
    return f"{task_prefix(job)}{index}"


def job_key(job: str, what: str) -> str:
    return f"s3xfer:{job}:{what}"


def current_key(source: str, dest: str) -> str:
    """Where the job currently uploading `source` to `dest` is named. Workers run only its
    units: those of an older job of the same pair (its producer died, then the files changed
    and a new job began) or of a finished one (a stray second delivery) are skipped, so they
    cannot write an old shard layout over the new one."""
    pair = hashlib.sha256(f"{source}\n{dest}".encode()).hexdigest()[:16]
    return f"s3xfer:current:{pair}"


def unit_payload(
    *,
    job: str,
    index: int,
    plan: Plan,
    limits: RunLimits,
    connection: Connection,
    unit: WorkUnit,
) -> dict[str, Any]:
    """A unit as a worker receives it: what to send (the plan's part of it) and how (the
    producer's limits; a worker's --concurrency replaces theirs)."""
    return {
        "version": PAYLOAD_VERSION,
        "job": job,
        "index": index,
        "source": str(plan.source),
        "dest": str(plan.dest),
        "config": plan.config.to_json(),
        "limits": limits.to_json(),
        "connection": connection_to_json(connection),
        "unit": unit.to_json(),
    }


def unit_paths(unit: WorkUnit) -> list[str]:
    return [f.path for f in unit.files] + [m.path for s in unit.shards for m in s.members]


@dataclass(frozen=True)
class UnitResult:
    """What a worker did with one unit: the records of what it stored, what failed, counters."""

    job: str
    index: int
    worker: str
    records: list[ManifestRecord] = field(default_factory=list)
    shards: list[ShardRecord] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    files_done: int = 0
    files_failed: int = 0
    bytes_done: int = 0
    bytes_reused: int = 0
    uploads_resumed: int = 0
    shards_done: int = 0
    retries: int = 0
    throttled: int = 0
    requests: int = 0
    write_requests: int = 0
    peak_buffered_bytes: int = 0
    lowest_concurrency: int = 0
    seconds: float = 0.0
    redelivered: bool = False
    skipped: bool = False  # the job was over (or gone) when the unit was delivered
    error: str = ""  # the whole unit failed: no bucket, no source, no credentials, a bug
    run: str = ""  # which delivery of the unit this is (a worker may run it twice)

    @property
    def complete(self) -> bool:
        return not self.skipped and not self.error and self.files_failed == 0

    @classmethod
    def of_run(
        cls, counters: RunCounters, *, records: list[ManifestRecord], shards: list[ShardRecord]
    ) -> UnitResult:
        """The result of the engine's run of a unit (job, index and worker filled in later)."""
        return cls("", 0, "", records=records, shards=shards, **counters.as_fields(_COUNTERS))

    @property
    def counters(self) -> RunCounters:
        values = {name: getattr(self, name) for name in _COUNTERS}
        return RunCounters(**{**values, "failures": tuple(self.failures)})

    @classmethod
    def failed(
        cls, unit: WorkUnit, reason: str, *, job: str, index: int, worker: str, run: str = ""
    ) -> UnitResult:
        """Every file of the unit failed for one reason."""
        paths = unit_paths(unit)
        return cls(
            job,
            index,
            worker,
            failures=[(p, reason) for p in paths],
            files_failed=len(paths),
            error=reason,
            run=run,
        )

    def to_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["records"] = [r.to_json() for r in self.records]
        data["shards"] = [s.to_json() for s in self.shards]
        data["failures"] = [list(f) for f in self.failures]
        return {"format": RESULT_FORMAT, "version": RESULT_VERSION, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UnitResult:
        if data.get("format") != RESULT_FORMAT or data.get("version") != RESULT_VERSION:
            raise S3XferError(
                f"a worker answered with an unknown result format {data.get('format')!r} "
                f"v{data.get('version')!r}: run the same s3xfer version everywhere"
            )
        counters = {
            name: data[name]
            for name in cls.__dataclass_fields__
            if name not in ("records", "shards", "failures") and name in data
        }
        return cls(
            **counters,
            records=[ManifestRecord.from_json(row) for row in data["records"]],
            shards=[ShardRecord.from_json(row) for row in data["shards"]],
            failures=[(str(p), str(e)) for p, e in data["failures"]],
        )


# The counters a unit's result carries (RunCounters' fields but uploads_kept and
# files_unchanged, which a unit's run does not report).
_COUNTERS = (
    "failures",
    "files_done",
    "files_failed",
    "bytes_done",
    "bytes_reused",
    "uploads_resumed",
    "shards_done",
    "retries",
    "throttled",
    "requests",
    "write_requests",
    "peak_buffered_bytes",
    "lowest_concurrency",
)


@dataclass
class Merged:
    records: list[ManifestRecord]
    shards: list[ShardRecord]
    counters: RunCounters
    workers: int
    redelivered: int


def merge_results(results: Iterable[UnitResult]) -> Merged:
    """Every unit's outcome as one upload's: records, engine counters, requests."""
    results = list(results)
    return Merged(
        records=[record for r in results for record in r.records],
        shards=[shard for r in results for shard in r.shards],
        counters=RunCounters.merged(r.counters for r in results),
        workers=len({r.worker for r in results if r.worker}),
        redelivered=sum(r.redelivered for r in results),
    )


def unit_outcome(unit: WorkUnit, meta: dict[str, Any], *, job: str, index: int) -> UnitResult:
    """A finished task's stored state (Celery's meta) as the unit's result. A unit that did
    not complete, or a task that failed in another way, fails each of its files by name."""
    status, stored = meta.get("status"), meta.get("result")
    data = stored.result if isinstance(stored, UnitFailed) else stored
    if status == "SUCCESS" or isinstance(stored, UnitFailed):
        try:
            result = UnitResult.from_json(data)  # type: ignore[arg-type]
        except (S3XferError, KeyError, TypeError, ValueError, AttributeError) as exc:
            return UnitResult.failed(
                unit, f"unreadable result: {exc}", job=job, index=index, worker=""
            )
    else:
        reason = (
            f"{type(stored).__name__}: {stored}" if isinstance(stored, BaseException) else stored
        )
        return UnitResult.failed(
            unit, f"the worker failed ({status}): {reason}", job=job, index=index, worker=""
        )
    if result.skipped:
        reason = (
            "skipped: this job is over, or a newer upload of the same source and destination began"
        )
    elif result.error:
        reason = result.error
    else:
        return result
    failed = UnitResult.failed(
        unit, reason, job=job, index=index, worker=result.worker, run=result.run
    )
    return replace(failed, skipped=result.skipped, redelivered=result.redelivered)


def progress_totals(values: Iterable[str]) -> tuple[int, int]:
    """(bytes, files) over the progress hash of a job; a malformed entry counts nothing."""
    total_bytes = total_files = 0
    for raw in values:
        try:
            entry = json.loads(raw)
            nbytes, files = int(entry["bytes"]), int(entry["files"])
        except (ValueError, KeyError, TypeError):
            continue
        total_bytes += nbytes
        total_files += files
    return total_bytes, total_files


@dataclass
class WorkerWatch:
    """Notices no sign of any worker (no progress, no result, no answer to a ping) and says
    so once, without giving up: workers may still be starting."""

    command: str  # how to start a worker, for the notice
    notice_after: float = NOTICE_AFTER
    last_sign: float = 0.0
    last_ping: float = -math.inf
    waiting: bool = False

    def activity(self, now: float) -> str | None:
        self.last_sign = now
        if self.waiting:
            self.waiting = False
            return "a worker is at work on this job: going on"
        return None

    def should_ping(self, now: float) -> bool:
        quiet = now - self.last_sign
        return quiet >= self.notice_after and now - self.last_ping >= self.notice_after

    def stalled(self, now: float) -> bool:
        return now - self.last_sign >= self.notice_after

    def pinged(self, answers: int, now: float) -> str | None:
        """Idle workers answering are not work done: the job stays stalled (lost units?)."""
        self.last_ping = now
        if answers:
            if self.waiting:
                self.waiting = False
                return f"{answers} idle worker{'s' if answers > 1 else ''} answered: waiting"
            return None
        if self.waiting:
            return None
        self.waiting = True
        return (
            f"no worker has taken a unit of this job or answered for "
            f"{now - self.last_sign:.0f} s; start one with `{self.command}` (still waiting)"
        )


@dataclass
class LostUnits:
    """Units waited for that are neither queued nor at a worker: their message was lost (a
    Redis restarted empty), or acknowledged by another delivery of the unit before the worker
    still holding it died. Missing in two checks in a row (a message on its way from the queue
    to a worker is in neither for a moment), they are sent again."""

    confirm_after: float = LOST_CHECK_INTERVAL  # the second look at suspects
    period: float = 30.0  # otherwise (each check reads the whole queue in Redis)
    last_check: float = -math.inf
    suspects: frozenset[str] = frozenset()

    def due(self, now: float) -> bool:
        wait = self.confirm_after if self.suspects else self.period
        return now - self.last_check >= wait

    def checked(self, missing: set[str], now: float) -> set[str]:
        confirmed = set(self.suspects & missing)
        self.suspects = frozenset(missing - confirmed)
        self.last_check = now
        return confirmed


def failure_is_final(result: UnitResult, beats: dict[str, float], *, now: float) -> bool:
    """Whether a unit's failed result stands: not while another run of the unit (`beats`:
    each run's last heartbeat seen) still beats, for that one may yet complete it, and its
    success replaces the failure (a worker cut off from Redis had its unit given to another,
    and the two raced)."""
    return all(now - seen >= STALE_AFTER for run, seen in beats.items() if run != result.run)

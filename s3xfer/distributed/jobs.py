"""One upload spread over many machines by Celery over Redis: the producer plans, enqueues the
plan's work units and writes the catalog; each worker runs units with the same engine. The
only module that imports celery and redis (the `distributed` extra).

Delivery: a worker takes one unit at a time (solo pool, prefetch 1) and acknowledges it only
when it has finished (late ack). Kombu's Redis transport keeps every unacknowledged message in
a sorted set scored by delivery time; idle workers sweep it and put back any message older than
the visibility timeout. A running unit therefore refreshes its score (the heartbeat below), so
only the unit of a worker that died or lost Redis is delivered again. Units are idempotent
(deterministic keys and bytes; an incomplete multipart upload of a large file is adopted), so
a second delivery costs time, never data. See docs/distributed.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio

from .. import runner
from ..config import TransferConfig
from ..dataset.keys import S3Url
from ..dataset.manifest import ManifestRecord, ShardRecord
from ..errors import (
    BrokerError,
    JobBusyError,
    S3XferError,
    UnitFailed,
    UsageError,
    first_error,
)
from ..planning.plan import Kind, Plan, UploadKeys, WorkUnit, work_units
from ..transport.retry import RetryCount, RetryPolicy
from ..transport.s3 import S3, Connection, open_s3
from ..write.counters import RunCounters
from ..write.engine import ProgressCallback
from ..write.incomplete import abort_uploads, incomplete_uploads
from ..write.upload import (
    StartCallback,
    UploadReport,
    commit,
    delete_unreferenced,
    make_engine,
    make_report,
    open_s3_for,
    prepare_to_write,
)

try:
    import redis
    from celery import Celery, signals  # type: ignore[import-untyped]
    from celery.worker.request import Request  # type: ignore[import-untyped]
    from kombu.utils.url import maybe_sanitize_url
except ImportError as exc:  # the base tool runs without the extra
    raise UsageError(
        "the distributed mode needs the extra: pip install 's3xfer[distributed]'"
    ) from exc

T = TypeVar("T")
_log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- pure parts


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
    *, job: str, index: int, plan: Plan, connection: Connection, unit: WorkUnit
) -> dict[str, Any]:
    return {
        "version": PAYLOAD_VERSION,
        "job": job,
        "index": index,
        "source": str(plan.source),
        "dest": str(plan.dest),
        "config": plan.config.to_json(),
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


# --------------------------------------------------------------------------- Celery and Redis


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def check_broker_url(url: str) -> None:
    if not url.startswith(("redis://", "rediss://")):
        raise UsageError(f"not a Redis URL: {url!r} (expected redis://HOST[:PORT][/DB])")


def connect(url: str) -> redis.Redis:
    """A Redis client on the broker, checked with a PING."""
    check_broker_url(url)
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=10, socket_timeout=60)
        client.ping()
    except (redis.RedisError, ValueError) as exc:
        raise BrokerError(f"cannot reach the broker {maybe_sanitize_url(url)}: {exc}") from exc
    return client


UnitStartCallback = Callable[[str, int, WorkUnit, bool], None]  # job, index, unit, redelivered


@dataclass
class WorkerSettings:
    """What a worker process adds to each unit: its own limits, identity and reporting."""

    broker: str
    concurrency: int | None = None  # requests in flight per unit; None: the producer's
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    on_start: UnitStartCallback | None = None
    on_unit: Callable[[UnitResult], None] | None = None
    _client: redis.Redis | None = None

    def redis(self) -> redis.Redis:
        if self._client is None:
            self._client = connect(self.broker)
        return self._client


class _TaggedRequest(Request):  # type: ignore[misc]
    """Gives the task its message's delivery tag, which the heartbeat refreshes."""

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        self.delivery_info["delivery_tag"] = message.delivery_tag


def make_app(
    broker: str,
    *,
    visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
    worker: WorkerSettings | None = None,
) -> Any:
    """The Celery app of producers and workers: JSON only, late acks, one unit at a time."""
    check_broker_url(broker)
    app = Celery("s3xfer", broker=broker, backend=broker, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
        result_expires=JOB_TTL,
        broker_transport_options=transport_options(visibility_timeout),
        broker_connection_retry_on_startup=True,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        enable_utc=True,
    )

    @app.task(  # type: ignore[untyped-decorator]
        name=TASK_NAME, bind=True, Request=_TaggedRequest, throws=(UnitFailed,)
    )
    def upload_unit(task: Any, payload: dict[str, Any]) -> dict[str, Any]:
        if worker is None:
            raise RuntimeError("this app only enqueues units; `s3xfer worker` runs them")
        info = task.request.delivery_info or {}
        run = uuid.uuid4().hex[:12]
        redelivered = bool(info.get("redelivered"))
        try:
            result = execute_unit(
                payload,
                worker,
                run=run,
                delivery_tag=info.get("delivery_tag"),
                redelivered=redelivered,
            )
        except Exception as exc:  # a bug, or an error no layer below translated
            _log.exception("unit %s of job %s failed", payload.get("index"), payload.get("job"))
            result = UnitResult(
                str(payload.get("job")),
                int(payload.get("index", -1)),
                worker.worker_id,
                error=f"{type(exc).__name__}: {exc}",
                run=run,
                redelivered=redelivered,
            )
        if worker.on_unit is not None:
            worker.on_unit(result)
        if not result.complete:
            raise UnitFailed(result.to_json())
        return result.to_json()

    return app


# --------------------------------------------------------------------------- worker side


class _Reporter:
    """Writes a unit's progress to the job's progress hash (HSET: a unit delivered again
    overwrites its entry instead of counting twice) and keeps its message's delivery time
    fresh, so that no other worker is given the unit while this one works on it."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        job: str,
        index: int,
        worker: str,
        run: str,
        delivery_tag: str | None,
    ) -> None:
        self.client = client
        self.key = job_key(job, "progress")
        self.runs_key = job_key(job, "runs")  # every run's beats: two runs of a unit may race
        self.field = str(index)
        self.worker = worker
        self.run_id = run
        self.delivery_tag = delivery_tag
        self.bytes = 0
        self.files = 0
        self.beats = 0
        self.written: tuple[int, int] | None = None
        self.last_write = -math.inf
        self.failing = False
        self._limiter = anyio.CapacityLimiter(1)  # never queued behind the engine's reads

    def advance(self, nbytes: int, files: int) -> None:
        self.bytes += nbytes
        self.files += files

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            if (self.bytes, self.files) != self.written or now - self.last_write >= BEAT_INTERVAL:
                await self.write()
            await anyio.sleep(PROGRESS_INTERVAL)

    async def write(self) -> None:
        snapshot = (self.bytes, self.files)
        self.beats += 1
        value = json.dumps(
            {
                "bytes": snapshot[0],
                "files": snapshot[1],
                "worker": self.worker,
                "run": self.run_id,
                "beat": self.beats,
            }
        )
        try:
            await anyio.to_thread.run_sync(partial(self._write, value), limiter=self._limiter)
        except redis.RedisError:
            self.failing = True  # the unit goes on; Redis may come back
            return
        self.written = snapshot
        self.last_write = time.monotonic()

    def _write(self, value: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.key, self.field, value)
        pipe.expire(self.key, JOB_TTL)
        pipe.hset(self.runs_key, f"{self.field}:{self.run_id}", self.beats)
        pipe.expire(self.runs_key, JOB_TTL)
        if self.delivery_tag is not None:
            pipe.zadd(UNACKED_INDEX_KEY, {self.delivery_tag: time.time()}, xx=True)
        pipe.execute()


def execute_unit(
    payload: dict[str, Any],
    worker: WorkerSettings,
    *,
    run: str = "",
    delivery_tag: str | None = None,
    redelivered: bool = False,
) -> UnitResult:
    """Run one unit with the engine, in this process: open_s3, adopt what a lost worker left
    of the same multipart uploads, report progress, return the records."""
    if payload.get("version") != PAYLOAD_VERSION:
        raise S3XferError(
            f"a unit of payload version {payload.get('version')!r} reached a worker that "
            f"reads version {PAYLOAD_VERSION}: run the same s3xfer version everywhere"
        )
    job, index = str(payload["job"]), int(payload["index"])
    unit = WorkUnit.from_json(payload["unit"])
    client = worker.redis()
    if _text(client.get(current_key(str(payload["source"]), str(payload["dest"])))) != job:
        return UnitResult(
            job, index, worker.worker_id, skipped=True, redelivered=redelivered, run=run
        )
    if worker.on_start is not None:
        worker.on_start(job, index, unit, redelivered)
    config = TransferConfig.from_json(payload["config"])
    if worker.concurrency is not None:
        config = replace(config, concurrency=worker.concurrency)
    plan = Plan(
        source=Path(payload["source"]),
        dest=S3Url.parse(payload["dest"]),
        config=config,
        units=unit.files,
        shards=unit.shards,
    )
    if not plan.source.is_dir():
        return UnitResult(
            job,
            index,
            worker.worker_id,
            error=f"the source {plan.source} is not a directory on worker {worker.worker_id} "
            "(every worker needs the same view of the source)",
            redelivered=redelivered,
            run=run,
        )
    reporter = _Reporter(
        client, job=job, index=index, worker=worker.worker_id, run=run, delivery_tag=delivery_tag
    )
    connection = connection_from_json(payload["connection"])
    started = time.perf_counter()
    try:
        with first_error():
            result: UnitResult = runner.run(_upload_unit, plan, unit, connection, reporter)
    except S3XferError as error:
        result = UnitResult(job, index, worker.worker_id, error=str(error))
    return replace(
        result,
        job=job,
        index=index,
        worker=worker.worker_id,
        seconds=round(time.perf_counter() - started, 3),
        redelivered=redelivered,
        run=run,
    )


async def _upload_unit(
    plan: Plan, unit: WorkUnit, connection: Connection, reporter: _Reporter
) -> UnitResult:
    async with open_s3_for(plan, connection) as s3:
        await s3.check_bucket(plan.dest.bucket)
        engine = make_engine(s3, plan, on_progress=reporter.advance, adopt_uploads=True)
        async with anyio.create_task_group() as group:
            group.start_soon(reporter.run)
            try:
                await engine.run(unit.files, unit.shards)
            finally:
                group.cancel_scope.cancel()
        await reporter.write()  # the final count, before the result says the unit is done
        return UnitResult.of_run(
            RunCounters.of(engine), records=list(engine.records), shards=list(engine.shard_records)
        )


def run_worker(
    broker: str,
    *,
    concurrency: int | None = None,
    visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
    loglevel: str = "WARNING",
    on_ready: Callable[[str], None] | None = None,
    on_start: UnitStartCallback | None = None,
    on_unit: Callable[[UnitResult], None] | None = None,
) -> int:
    """Run a Celery worker executing s3xfer units until SIGTERM or Ctrl-C (warm shutdown:
    the unit in progress is finished first). Returns its exit code."""
    settings = WorkerSettings(broker, concurrency=concurrency, on_start=on_start, on_unit=on_unit)
    settings.redis()  # fail now, in one line, when the broker is not there
    app = make_app(broker, visibility_timeout=visibility_timeout, worker=settings)
    hostname = f"s3xfer-{os.getpid()}@{socket.gethostname()}"
    per_unit = (
        f"{concurrency} requests in flight per unit"
        if concurrency is not None
        else "requests in flight per unit as the producer's --concurrency"
    )

    def ready(**_: Any) -> None:
        if on_ready is not None:
            on_ready(
                f"s3xfer worker {hostname} ready: broker {maybe_sanitize_url(broker)}, queue "
                f"{QUEUE}, one unit at a time, {per_unit}; a lost worker's unit is redelivered "
                f"after {visibility_timeout:g} s"
            )

    signals.worker_ready.connect(ready, weak=False)
    try:
        worker = app.Worker(
            hostname=hostname,
            pool_cls="solo",
            concurrency=1,
            loglevel=loglevel.upper(),
            quiet=True,
            without_mingle=True,
            without_gossip=True,
            without_heartbeat=True,
            queues=[QUEUE],
        )
        worker.start()
        return int(worker.exitcode or 0)
    finally:
        signals.worker_ready.disconnect(ready)


# --------------------------------------------------------------------------- producer side


# Task ids (with a prefix) of the messages in a kombu queue (a list of JSON envelopes) and
# in its unacked hash (tag -> JSON [envelope, exchange, routing key]).
_HELD_TASK_IDS = """
local found = {}
local function note(envelope)
  local headers = type(envelope) == 'table' and envelope['headers']
  local id = type(headers) == 'table' and headers['id']
  if type(id) == 'string' and string.sub(id, 1, #ARGV[1]) == ARGV[1] then
    table.insert(found, id)
  end
end
for _, raw in ipairs(redis.call('lrange', KEYS[1], 0, -1)) do
  local ok, envelope = pcall(cjson.decode, raw)
  if ok then note(envelope) end
end
for _, raw in ipairs(redis.call('hvals', KEYS[2])) do
  local ok, held = pcall(cjson.decode, raw)
  if ok and type(held) == 'table' then note(held[1]) end
end
return found
"""

# Refresh a key still holding our value, set it again when it is gone (a Redis restarted),
# and say 0 when another value took its place.
_KEEP_IF_MINE = """
local value = redis.call('get', KEYS[1])
if value == false then
  redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
elseif value == ARGV[1] then
  redis.call('expire', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

_DELETE_IF_EQUAL = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def _dead_here(owner: str) -> bool:
    """Whether `host:pid` names a process of this machine that no longer runs."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class _Job:
    """The producer's side of one job in Redis: its lock, its units, their results."""

    def __init__(
        self,
        app: Any,
        client: redis.Redis,
        *,
        plan: Plan,
        connection: Connection,
        work: list[WorkUnit],
    ) -> None:
        self.app = app
        self.client = client
        self.plan = plan
        self.connection = connection
        self.id = job_id(plan, work)
        self.work = work
        self.task_ids = [task_id(self.id, n) for n in range(len(work))]
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.worker_id = f"producer {self.owner}"

    def key(self, what: str) -> str:
        return job_key(self.id, what)

    def lock(self) -> None:
        """One producer per job (a second one would find the results gone when the first
        finishes). A dead producer's lock expires after LOCK_TTL seconds, or at once when it
        ran on this machine."""
        key = self.key("producer")
        for _attempt in range(2):
            if self.client.set(key, self.owner, nx=True, ex=LOCK_TTL):
                self.client.set(self.current, self.id, ex=JOB_TTL)  # supersedes older jobs
                return
            holder = _text(self.client.get(key))
            if not _dead_here(holder):
                break
            # compare and delete: only that dead producer's lock
            self.client.eval(_DELETE_IF_EQUAL, 1, key, holder)
        raise JobBusyError(
            f"another producer ({holder}) is already waiting for this job; if it has died, "
            f"run the command again in {LOCK_TTL} s"
        )

    def keep_alive(self) -> None:
        """Refresh the lock and the keys' lifetimes; refuse to go on once a newer job of the
        same source and destination has taken over."""
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.key("producer"), self.owner, ex=LOCK_TTL)
        pipe.eval(_KEEP_IF_MINE, 1, self.current, self.id, JOB_TTL)
        for what in ("enqueued", "progress", "runs"):
            pipe.expire(self.key(what), JOB_TTL)
        current = pipe.execute()[1]
        if not current:
            raise JobBusyError(
                f"a newer upload of {self.plan.source} to {self.plan.dest} started: this one "
                "stops (its remaining units are skipped)"
            )

    def unlock(self) -> None:
        self.client.eval(_DELETE_IF_EQUAL, 1, self.key("producer"), self.owner)

    @property
    def current(self) -> str:
        return current_key(str(self.plan.source), str(self.plan.dest))

    def outcome(self, index: int, meta: dict[str, Any]) -> UnitResult:
        return unit_outcome(self.work[index], meta, job=self.id, index=index)

    def ready(self, task_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The stored states of those tasks that have finished (one MGET)."""
        ids = list(task_ids)
        if not ids:
            return {}
        found = self.app.backend.get_many(ids, interval=0, max_iterations=1)
        return {str(tid): meta for tid, meta in found}

    def enqueue(self, results: dict[int, UnitResult]) -> dict[str, int]:
        """Send the units that are neither done nor already queued by an earlier producer of
        this job. The tasks to wait for."""
        done = self.ready(self.task_ids)
        queued = {int(m) for m in self.client.smembers(self.key("enqueued"))}
        pending: dict[str, int] = {}
        send: list[int] = []
        for index, tid in enumerate(self.task_ids):
            meta = done.get(tid)
            if meta is not None:
                outcome = self.outcome(index, meta)
                if outcome.complete:
                    results[index] = outcome
                    continue
                self.app.backend.forget(tid)  # failed earlier: try again
            elif index in queued:
                pending[tid] = index  # in the queue, or at a worker, since the last producer
                continue
            send.append(index)
        self.send(send)
        pending.update((self.task_ids[index], index) for index in send)
        return pending

    def send(self, indexes: Iterable[int]) -> None:
        """Enqueue these units, largest first (the long ones start early)."""
        with self.app.producer_or_acquire() as producer:
            for index in sorted(indexes, key=lambda n: -self.work[n].size):
                payload = unit_payload(
                    job=self.id,
                    index=index,
                    plan=self.plan,
                    connection=self.connection,
                    unit=self.work[index],
                )
                self.app.send_task(
                    TASK_NAME,
                    args=[payload],
                    task_id=self.task_ids[index],
                    queue=QUEUE,
                    producer=producer,
                )
                self.client.sadd(self.key("enqueued"), index)
        self.client.expire(self.key("enqueued"), JOB_TTL)

    def held(self) -> set[str]:
        """The task ids of this job that are in the queue or delivered to a worker (and not
        acknowledged yet), read by a script in Redis (the messages stay there)."""
        ids = self.client.eval(_HELD_TASK_IDS, 2, QUEUE, UNACKED_KEY, task_prefix(self.id))
        return {_text(i) for i in ids}

    def progress(self) -> tuple[dict[int, str], dict[tuple[int, str], str]]:
        """Each unit's progress entry (JSON, its latest run's), by unit index; and the beat
        count of every run of every unit."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.key("progress"))
        pipe.hgetall(self.key("runs"))
        entries, runs = pipe.execute()
        by_run = {}
        for key, beats in runs.items():
            index, _, run = _text(key).partition(":")
            by_run[int(index), run] = _text(beats)
        return {int(_text(k)): _text(v) for k, v in entries.items()}, by_run

    def ping(self) -> int:
        """How many workers answer (a worker busy with a unit cannot: the solo pool)."""
        return len(self.app.control.ping(timeout=1.0) or [])

    def forget(self) -> None:
        """The job is committed: nothing of it stays in Redis."""
        self.client.eval(_DELETE_IF_EQUAL, 1, self.current, self.id)
        keys = [self.key(w) for w in ("enqueued", "progress", "runs", "producer")]
        keys += [self.app.backend.get_key_for_task(tid) for tid in self.task_ids]
        for start in range(0, len(keys), 1000):
            self.client.delete(*keys[start : start + 1000])


async def _blocking(function: Callable[..., T], *args: Any) -> T:
    """A Redis or Celery call, off the event loop; its Redis errors as BrokerError."""
    try:
        return await anyio.to_thread.run_sync(partial(function, *args))
    except redis.RedisError as exc:
        raise BrokerError(f"lost the broker: {exc}") from exc


async def _wait_for_units(
    job: _Job,
    pending: dict[str, int],
    results: dict[int, UnitResult],
    *,
    broker: str,
    on_progress: ProgressCallback | None,
    on_notice: Callable[[str], None] | None,
    poll_interval: float,
    notice_after: float,
) -> None:
    """Collect results as they come, follow the progress hash; when nothing moves, say so if
    no worker is there, and send again units that were lost."""
    watch = WorkerWatch(
        f"s3xfer worker --broker {maybe_sanitize_url(broker)}",
        notice_after=notice_after,
        last_sign=time.monotonic(),
    )
    lost = LostUnits()
    shown = (0, 0)
    entries: dict[int, str] = {}
    beats: dict[tuple[int, str], str] = {}
    beat_at: dict[int, dict[str, float]] = {}  # unit → run → when its beat last changed
    last_keep_alive = time.monotonic()

    def notice(text: str | None) -> None:
        if text is not None and on_notice is not None:
            on_notice(text)

    while pending:
        finished = await _blocking(job.ready, list(pending))
        progress, runs = await _blocking(job.progress)
        now = time.monotonic()
        moved = progress != entries
        entries = progress
        for (index, run), count in runs.items():
            if beats.get((index, run)) != count:
                beats[index, run] = count
                beat_at.setdefault(index, {})[run] = now
        for tid, meta in finished.items():
            index = pending[tid]
            result = job.outcome(index, meta)
            if result.complete or failure_is_final(result, beat_at.get(index, {}), now=now):
                results[index] = result
                del pending[tid]
                moved = True
        if moved:
            notice(watch.activity(now))
        totals = progress_totals(entries.values())
        if on_progress is not None and totals != shown:
            on_progress(totals[0] - shown[0], totals[1] - shown[1])
            shown = totals
        if pending and watch.stalled(now) and lost.due(now):
            missing = set(pending) - set(finished) - await _blocking(job.held)
            confirmed = lost.checked(missing, now)
            if confirmed:
                await _blocking(job.send, [pending[tid] for tid in confirmed])
                notice(
                    f"{len(confirmed)} unit{'s were' if len(confirmed) > 1 else ' was'} neither "
                    "queued nor at a worker (a lost message): sent again"
                )
        if watch.should_ping(now):
            notice(watch.pinged(await _blocking(job.ping), time.monotonic()))
        if now - last_keep_alive >= LOCK_TTL / 3:
            await _blocking(job.keep_alive)
            last_keep_alive = now
        if pending:
            await anyio.sleep(poll_interval)


async def _abort_leftovers(s3: S3, plan: Plan, work: list[WorkUnit]) -> int:
    """Incomplete multipart uploads of this job's keys, once every unit has a result: left
    by a worker that died mid-unit (a shard is rebuilt under a new upload, and a large
    file's newest upload only is adopted) or by a second delivery of a unit. Aborted."""
    keys = {s.key for u in work for s in u.shards}
    keys |= {f.key for u in work for f in u.files if f.kind is Kind.MULTIPART}
    if not keys:
        return 0
    policy = RetryPolicy(max_attempts=plan.config.max_attempts)
    found = await incomplete_uploads(s3, plan.dest, policy=policy, keys=UploadKeys(frozenset(keys)))
    return len(await abort_uploads(s3, plan.dest.bucket, found, policy=policy))


async def upload_with_workers(
    plan: Plan,
    broker: str,
    connection: Connection | None = None,
    *,
    on_start: StartCallback | None = None,
    on_progress: ProgressCallback | None = None,
    on_notice: Callable[[str], None] | None = None,
    poll_interval: float = 0.5,
    notice_after: float = NOTICE_AFTER,
    keep_deleted: bool = False,
    break_lease: bool = False,
) -> UploadReport:
    """Upload a plan with the workers listening on `broker`: check the bucket and manifest
    here, enqueue what changed as work units, follow their progress, and write the manifest
    and catalog once every unit has a result, the dataset made equal to the plan's tree as
    one machine's upload would (unless `keep_deleted`). Run again after the producer died, it
    waits for the same units (their results are kept in Redis) instead of sending them again.
    Holds the prefix's lease throughout when it may write, as upload.execute_plan does."""
    started = time.perf_counter()
    connection = connection or Connection()
    client = await _blocking(connect, broker)
    app = make_app(broker)
    retries = RetryCount()  # of the metadata and lease requests
    async with open_s3(connection, max_pool_connections=16) as s3, AsyncExitStack() as stack:
        prepared, held = await prepare_to_write(
            s3,
            plan,
            stack,
            command="upload --broker",
            keep_deleted=keep_deleted,
            break_lease=break_lease,
            retries=retries,
        )
        work = work_units(prepared.todo, prepared.shards_todo)
        if on_start is not None:
            on_start(prepared.files_todo, prepared.bytes_todo, prepared.files_unchanged)
        job = _Job(app, client, plan=plan, connection=connection, work=work)
        results: dict[int, UnitResult] = {}
        aborted = 0
        if work:
            await _blocking(job.lock)
            try:
                pending = await _blocking(job.enqueue, results)
                await _wait_for_units(
                    job,
                    pending,
                    results,
                    broker=broker,
                    on_progress=on_progress,
                    on_notice=on_notice,
                    poll_interval=poll_interval,
                    notice_after=notice_after,
                )
            finally:
                with anyio.CancelScope(shield=True):
                    await _blocking(job.unlock)
            aborted = await _abort_leftovers(s3, plan, work)
        merged = merge_results(results.values())
        if held is not None:
            await held.confirm()
        committed = await commit(
            s3, plan, prepared, merged.records, merged.shards, keep_deleted=keep_deleted
        )
        deleted, warnings = await delete_unreferenced(
            s3, plan.dest, committed.unreferenced, prepared.policy
        )
        report = make_report(
            plan,
            prepared,
            merged.counters.with_requests_of(s3),
            started=started,
            committed=committed,
            objects_deleted=deleted,
            warnings=warnings,
            extra={
                "job": job.id,
                "units": len(work),
                "workers": merged.workers,
                "units_redelivered": merged.redelivered,
                "uploads_aborted": aborted,
            },
        )
    if work:
        await _blocking(job.forget)
    return report

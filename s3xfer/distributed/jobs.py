"""One upload spread over many machines by Celery over Redis, the producer's side: it plans,
enqueues the plan's work units, follows them and writes the catalog; each worker runs units
with the same engine (`worker.py`). The pure parts are `units.py`'s, the extra's imports
`broker.py`'s.

Delivery: a worker takes one unit at a time (solo pool, prefetch 1) and acknowledges it only
when it has finished (late ack). Kombu's Redis transport keeps every unacknowledged message in
a sorted set scored by delivery time; idle workers sweep it and put back any message older than
the visibility timeout. A running unit therefore refreshes its score (worker.py's heartbeat), so
only the unit of a worker that died or lost Redis is delivered again. Units are idempotent
(deterministic keys and bytes; an incomplete multipart upload of a large file is adopted), so
a second delivery costs time, never data. See docs/distributed.md.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from functools import partial
from typing import Any, TypeVar

import anyio

from ..errors import BrokerError, JobBusyError
from ..limits import RunLimits
from ..planning.plan import Kind, Plan, UploadKeys, WorkUnit, work_units
from ..transport.retry import RetryCount, RetryPolicy
from ..transport.s3 import S3, Connection, open_s3
from ..write.engine import ProgressCallback
from ..write.incomplete import abort_uploads, incomplete_uploads
from ..write.upload import (
    StartCallback,
    UploadReport,
    commit,
    delete_unreferenced,
    make_report,
    prepare_to_write,
)
from .broker import as_text, connect, maybe_sanitize_url, redis
from .units import (
    JOB_TTL,
    LOCK_TTL,
    NOTICE_AFTER,
    QUEUE,
    TASK_NAME,
    UNACKED_KEY,
    LostUnits,
    UnitResult,
    WorkerWatch,
    current_key,
    failure_is_final,
    job_id,
    job_key,
    merge_results,
    progress_totals,
    task_id,
    task_prefix,
    unit_outcome,
    unit_payload,
)
from .worker import make_app

T = TypeVar("T")


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
        limits: RunLimits,
        connection: Connection,
        work: list[WorkUnit],
    ) -> None:
        self.app = app
        self.client = client
        self.plan = plan
        self.limits = limits
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
            holder = as_text(self.client.get(key))
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
                    limits=self.limits,
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
        return {as_text(i) for i in ids}

    def progress(self) -> tuple[dict[int, str], dict[tuple[int, str], str]]:
        """Each unit's progress entry (JSON, its latest run's), by unit index; and the beat
        count of every run of every unit."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.key("progress"))
        pipe.hgetall(self.key("runs"))
        entries, runs = pipe.execute()
        by_run = {}
        for key, beats in runs.items():
            index, _, run = as_text(key).partition(":")
            by_run[int(index), run] = as_text(beats)
        return {int(as_text(k)): as_text(v) for k, v in entries.items()}, by_run

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


async def _abort_leftovers(s3: S3, plan: Plan, work: list[WorkUnit], *, limits: RunLimits) -> int:
    """Incomplete multipart uploads of this job's keys, once every unit has a result: left
    by a worker that died mid-unit (a shard is rebuilt under a new upload, and a large
    file's newest upload only is adopted) or by a second delivery of a unit. Aborted."""
    keys = {s.key for u in work for s in u.shards}
    keys |= {f.key for u in work for f in u.files if f.kind is Kind.MULTIPART}
    if not keys:
        return 0
    policy = RetryPolicy(max_attempts=limits.max_attempts)
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
    limits: RunLimits | None = None,
) -> UploadReport:
    """Upload a plan with the workers listening on `broker`: check the bucket and manifest
    here, enqueue what changed as work units, follow their progress, and write the manifest
    and catalog once every unit has a result, the dataset made equal to the plan's tree as
    one machine's upload would (unless `keep_deleted`). Run again after the producer died, it
    waits for the same units (their results are kept in Redis) instead of sending them again.
    Holds the prefix's lease throughout when it may write, as upload.execute_plan does.
    `limits`: as upload's; the workers run each unit with them (or their --concurrency)."""
    started = time.perf_counter()
    limits = limits or RunLimits(max_memory=plan.config.max_memory)
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
            limits=limits,
        )
        work = work_units(prepared.todo, prepared.shards_todo)
        if on_start is not None:
            on_start(prepared.files_todo, prepared.bytes_todo, prepared.files_unchanged)
        job = _Job(app, client, plan=plan, limits=limits, connection=connection, work=work)
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
            aborted = await _abort_leftovers(s3, plan, work, limits=limits)
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
            limits=limits,
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

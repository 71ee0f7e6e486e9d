"""The Celery app of a distributed upload, and the worker's side: `s3xfer worker` takes one unit
at a time, runs it with the engine, writes its progress and heartbeat to Redis, and returns
the unit's result (units.UnitResult).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from .. import runner
from ..config import TransferConfig
from ..dataset.keys import S3Url
from ..errors import S3XferError, UnitFailed, first_error
from ..limits import RunLimits
from ..planning.plan import Plan, WorkUnit
from ..transport.s3 import Connection
from ..write.counters import RunCounters
from ..write.upload import make_engine, open_s3_for
from .broker import (
    Celery,
    Request,
    as_text,
    check_broker_url,
    connect,
    maybe_sanitize_url,
    redis,
    signals,
)
from .units import (
    BEAT_INTERVAL,
    DEFAULT_VISIBILITY_TIMEOUT,
    JOB_TTL,
    PAYLOAD_VERSION,
    PROGRESS_INTERVAL,
    QUEUE,
    TASK_NAME,
    UNACKED_INDEX_KEY,
    UnitResult,
    connection_from_json,
    current_key,
    job_key,
    transport_options,
)

_log = logging.getLogger(__name__)


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
    if as_text(client.get(current_key(str(payload["source"]), str(payload["dest"])))) != job:
        return UnitResult(
            job, index, worker.worker_id, skipped=True, redelivered=redelivered, run=run
        )
    if worker.on_start is not None:
        worker.on_start(job, index, unit, redelivered)
    config = TransferConfig.from_json(payload["config"])
    # A payload of an s3xfer before RunLimits carries none: its config's memory budget then.
    limits = RunLimits.from_json(payload.get("limits", {"max_memory": config.max_memory}))
    if worker.concurrency is not None:
        limits = replace(limits, concurrency=worker.concurrency, auto_concurrency=False)
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
            result: UnitResult = runner.run(_upload_unit, plan, limits, unit, connection, reporter)
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
    plan: Plan, limits: RunLimits, unit: WorkUnit, connection: Connection, reporter: _Reporter
) -> UnitResult:
    async with open_s3_for(limits, connection) as s3:
        await s3.check_bucket(plan.dest.bucket)
        engine = make_engine(
            s3, plan, limits=limits, on_progress=reporter.advance, adopt_uploads=True
        )
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

"""The measurement engine behind `s3xfer bench`: runs the sweep of operation × object size ×
concurrency against S3, point by point, and removes everything it wrote.

What to measure is `settings.py`'s (pure); what was found, and how it is written out (JSON, CSV,
the plot), `results.py`'s; the recommended settings kept as named profiles, `profiles.py`'s;
the statistics that judge a point, `stats.py`'s. The `bench` command (cli/bench.py) only presents.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel

from ..checksums import combine_parts, crc32, crc32_to_base64
from ..dataset.keys import S3Url
from ..errors import (
    AccessDeniedError,
    IntegrityError,
    NoSuchBucketError,
    S3XferError,
    TransientError,
    UsageError,
)
from ..transport.endpoints import configured_endpoint
from ..transport.retry import RetryPolicy, call_with_retries
from ..transport.s3 import S3, Connection, open_s3
from ..transport.translate import map_errors
from .netem import PathEmulator
from .recorder import BenchListener, PointRecorder, reached_cap, warmed_up
from .results import BenchResult, CleanupReport, EmulatedPath, MeasuredPoint
from .settings import (
    MIN_POINT_SECONDS,
    OP_RANGE,
    READ_OPS,
    BenchPlan,
    BenchSettings,
    plan_bench,
    read_set_count,
    read_source_size,
    sample_interval,
)
from .stats import OP_MULTIPART, OP_PUT, StabilityTracker, SweepPoint, recommend

T = TypeVar("T")

MAX_PREPARE_CONCURRENCY = 32
# A multipart point uploads objects of max(this, concurrency) parts, so every part in flight
# can belong to one upload (as with one large file) and create/complete are amortised alike.
MULTIPART_MIN_PARTS = 8
DELETE_BATCH = 1000  # S3's DeleteObjects limit
CLEANUP_TIMEOUT_SECONDS = 300.0
# Throughput samples per point: a window of this many samples must be stable to stop early.
STABLE_WINDOWS = 5
# A point whose measured interval holds fewer requests than workers runs on, up to this
# many times its cap (never past the run's deadline): see reached_cap.
OVERRUN_FACTOR = 3.0
# How long the requests in flight at the end of a point may take to finish before they are
# cancelled (and left to the cleanup's straggler search).
DRAIN_SECONDS = 60.0

STOP_STABLE = "stable"  # throughput settled before the cap
STOP_TIME = "time"  # ran to its cap
STOP_DEADLINE = "deadline"  # cut short by the whole run's time bound


Clock = Callable[[], float]


class _Written:
    """Keys and multipart uploads one stage of the run has created: what to delete."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.uploads: dict[str, str] = {}  # upload id -> key, while not completed


Retrying = Callable[[Callable[[], Awaitable[T]]], Awaitable[T]]


class _Operation(Protocol):
    """One request of a point's op; returns (bytes moved, time to first byte or None)."""

    async def once(
        self, worker: int, seq: int, retrying: Retrying[Any]
    ) -> tuple[int, float | None]: ...


class _Put:
    def __init__(self, s3: S3, bucket: str, prefix: str, body: bytes, written: _Written) -> None:
        self.s3, self.bucket, self.prefix, self.body = s3, bucket, prefix, body
        self.crc32 = crc32_to_base64(crc32(body))
        self.written = written

    async def once(
        self, worker: int, seq: int, retrying: Retrying[Any]
    ) -> tuple[int, float | None]:
        key = f"{self.prefix}/{worker}-{seq}"
        self.written.keys.append(key)  # before sending: a cancelled PUT may still land
        await retrying(
            functools.partial(self.s3.put_object, self.bucket, key, self.body, crc32=self.crc32)
        )
        return len(self.body), None


class _Get:
    """Whole GETs (size None) or ranged GETs of `size` bytes at seeded random offsets."""

    def __init__(
        self,
        s3: S3,
        bucket: str,
        keys: Sequence[str],
        *,
        source_size: int,
        size: int | None,
        seed: int,
        clock: Clock,
    ) -> None:
        self.s3, self.bucket, self.keys = s3, bucket, keys
        self.source_size, self.size = source_size, size
        self.seed, self.clock = seed, clock
        self.rngs: dict[int, random.Random] = {}

    async def once(
        self, worker: int, seq: int, retrying: Retrying[Any]
    ) -> tuple[int, float | None]:
        rng = self.rngs.setdefault(worker, random.Random(f"{self.seed}/{worker}"))
        key = self.keys[rng.randrange(len(self.keys))]
        span = None
        if self.size is not None:
            start = rng.randrange(self.source_size - self.size + 1)
            span = (start, start + self.size - 1)
        result: tuple[int, float] = await retrying(functools.partial(self._get, key, span))
        return result

    async def _get(self, key: str, span: tuple[int, int] | None) -> tuple[int, float]:
        """One GET through the transport, as downloads send them; its TTFB is the time until
        the response headers, its body counted and dropped piece by piece (memory stays at
        one piece per request)."""
        byte_range = None if span is None else f"bytes={span[0]}-{span[1]}"
        answered: list[float] = []
        where = f"s3://{self.bucket}/{key} ({byte_range})"

        def check(status: int, content_range: str | None, _length: int) -> None:
            answered.append(self.clock())
            if span is not None and (
                status != 206 or not (content_range or "").startswith(f"bytes {span[0]}-{span[1]}/")
            ):
                raise IntegrityError(
                    f"{where}: the server answered {status} with Content-Range "
                    f"{content_range!r}, not the range asked for"
                )

        started = self.clock()
        nbytes = await self.s3.get_range_to(
            self.bucket, key, byte_range=byte_range, on_head=check, sink=lambda _piece: None
        )
        if span is not None and nbytes != span[1] - span[0] + 1:
            raise IntegrityError(f"{where}: {nbytes} bytes, not {span[1] - span[0] + 1}")
        return nbytes, (answered[0] if answered else self.clock()) - started


@dataclass(slots=True)
class _Upload:
    key: str
    upload_id: str
    next_part: int = 1
    etags: dict[int, str] = field(default_factory=dict)


class _Multipart:
    """Parts of `parts`-part uploads, handed out so all parts in flight can share an upload.

    A new upload is created only when the current one has no part left to hand out; the
    worker finishing an upload's last part completes it, so no worker waits on another.
    """

    def __init__(
        self, s3: S3, bucket: str, prefix: str, body: bytes, *, parts: int, written: _Written
    ) -> None:
        self.s3, self.bucket, self.prefix, self.body = s3, bucket, prefix, body
        self.parts = parts
        self.part_crc = crc32(body)
        self.part_crc32 = crc32_to_base64(self.part_crc)
        self.whole_crc32 = crc32_to_base64(combine_parts([(self.part_crc, len(body))] * parts))
        self.written = written
        self.current: _Upload | None = None
        self.created = 0
        self.lock = anyio.Lock()

    async def _next_part(self, retrying: Retrying[Any]) -> tuple[_Upload, int]:
        async with self.lock:
            if self.current is None or self.current.next_part > self.parts:
                key = f"{self.prefix}/{self.created}"
                self.created += 1
                upload_id = await retrying(
                    functools.partial(self.s3.create_multipart_upload, self.bucket, key)
                )
                self.written.uploads[upload_id] = key
                self.current = _Upload(key, upload_id)
            upload = self.current
            number = upload.next_part
            upload.next_part += 1
            return upload, number

    async def once(
        self, worker: int, seq: int, retrying: Retrying[Any]
    ) -> tuple[int, float | None]:
        upload, number = await self._next_part(retrying)
        upload.etags[number] = await retrying(
            functools.partial(
                self.s3.upload_part,
                self.bucket,
                upload.key,
                upload_id=upload.upload_id,
                number=number,
                body=self.body,
                crc32=self.part_crc32,
            )
        )
        if len(upload.etags) == self.parts:
            parts = [(n, upload.etags[n], self.part_crc32) for n in range(1, self.parts + 1)]
            self.written.keys.append(upload.key)  # before completing: it may land if cancelled
            await retrying(
                functools.partial(
                    self.s3.complete_multipart_upload,
                    self.bucket,
                    upload.key,
                    upload_id=upload.upload_id,
                    parts=parts,
                    crc32=self.whole_crc32,
                )
            )
            del self.written.uploads[upload.upload_id]
        return len(self.body), None


# Errors that no amount of measuring will get past: stop the run at once.
_FATAL = (AccessDeniedError, NoSuchBucketError)


class _Runner:
    def __init__(
        self,
        s3: S3,
        settings: BenchSettings,
        *,
        listener: BenchListener,
        clock: Clock,
        run_prefix: str,
    ) -> None:
        self.s3 = s3
        self.settings = settings
        self.bucket = settings.url.bucket
        self.listener = listener
        self.clock = clock
        self.run_prefix = run_prefix
        self.policy = RetryPolicy(max_attempts=settings.max_attempts)
        self.max_concurrency = max(settings.concurrencies)
        self.bodies: dict[int, bytes] = {}
        self.read_sets: dict[int, _Written] = {}  # by object size
        self.pending: list[_Written] = []  # points measured but not yet cleaned up
        self.objects_deleted = 0
        self.uploads_aborted = 0

    def body(self, size: int) -> bytes:
        """Seeded random bytes, made once per size: the client spends its CPU on requests,
        not on generating or hashing data, so the path is what gets measured."""
        if size not in self.bodies:
            self.bodies[size] = random.Random(self.settings.seed * 1_000_003 + size).randbytes(size)
        return self.bodies[size]

    async def sweep(
        self, plan: BenchPlan, *, deadline: float
    ) -> tuple[list[MeasuredPoint], list[SweepPoint]]:
        measured: list[MeasuredPoint] = []
        skipped: list[SweepPoint] = []
        groups = [
            (key, list(points))
            for key, points in itertools.groupby(plan.sweep, key=lambda p: (p.op, p.object_size))
        ]
        for number, ((op, size), points) in enumerate(groups):
            if self.clock() + MIN_POINT_SECONDS > deadline:
                skipped.extend(points)
                continue
            keys: list[str] = []
            if op in READ_OPS:
                keys = await self.read_set(op, size)
            for planned in points:
                remaining = deadline - self.clock()
                if remaining < MIN_POINT_SECONDS:
                    skipped.append(planned)
                    continue
                written = _Written()
                self.pending.append(written)
                result = await self.measure(
                    planned,
                    keys=keys,
                    written=written,
                    cap=min(planned.max_seconds, remaining),
                    deadline_left=remaining,
                )
                # Deleted point by point, so the bucket never holds more than one point's
                # objects; on an error, clean_all deletes what is still pending.
                await self.remove(written)
                self.pending.remove(written)
                measured.append(result)
                self.listener.point_done(result, len(measured) + len(skipped), len(plan.sweep))
            await self.release_read_sets(still_needed=groups[number + 1 :])
        return measured, skipped

    async def read_set(self, op: str, size: int) -> list[str]:
        source = read_source_size(op, size)
        if source not in self.read_sets:
            count = read_set_count(source, max_concurrency=self.max_concurrency)
            written = _Written()
            self.read_sets[source] = written
            self.listener.preparing(op, source, count)
            body = self.body(source)
            checksum = crc32_to_base64(crc32(body))
            limiter = anyio.CapacityLimiter(min(self.max_concurrency, MAX_PREPARE_CONCURRENCY))

            async def put(key: str) -> None:
                async with limiter:
                    await call_with_retries(
                        functools.partial(
                            self.s3.put_object, self.bucket, key, body, crc32=checksum
                        ),
                        policy=self.policy,
                    )

            async with anyio.create_task_group() as group:
                for n in range(count):
                    key = f"{self.run_prefix}/read-{source}/{n}"
                    written.keys.append(key)
                    group.start_soon(put, key)
        return list(self.read_sets[source].keys)

    async def release_read_sets(
        self, *, still_needed: Sequence[tuple[tuple[str, int], list[SweepPoint]]]
    ) -> None:
        """Delete read sets no remaining group reads, so the bucket holds at most one or two."""
        needed = {read_source_size(op, size) for (op, size), _ in still_needed if op in READ_OPS}
        for source in [s for s in self.read_sets if s not in needed]:
            await self.remove(self.read_sets[source])
            del self.read_sets[source]
            self.bodies.pop(source, None)

    def operation(self, planned: SweepPoint, *, keys: list[str], written: _Written) -> _Operation:
        prefix = f"{self.run_prefix}/{planned.op}-{planned.object_size}-c{planned.concurrency}"
        size = planned.object_size
        if planned.op == OP_PUT:
            return _Put(self.s3, self.bucket, prefix, self.body(size), written)
        if planned.op == OP_MULTIPART:
            parts = max(MULTIPART_MIN_PARTS, planned.concurrency)
            return _Multipart(
                self.s3, self.bucket, prefix, self.body(size), parts=parts, written=written
            )
        return _Get(
            self.s3,
            self.bucket,
            keys,
            source_size=read_source_size(planned.op, size),
            size=size if planned.op == OP_RANGE else None,
            seed=self.settings.seed,
            clock=self.clock,
        )

    async def measure(
        self,
        planned: SweepPoint,
        *,
        keys: list[str],
        written: _Written,
        cap: float,
        deadline_left: float,
    ) -> MeasuredPoint:
        operation = self.operation(planned, keys=keys, written=written)
        recorder = PointRecorder()
        interval = sample_interval(cap)
        tracker: StabilityTracker | None = None  # made when warm-up ends: it sees no warm-up
        stop = STOP_DEADLINE if cap < planned.max_seconds else STOP_TIME
        hard_cap = min(cap * OVERRUN_FACTOR, deadline_left)
        stopping = anyio.Event()
        async with anyio.create_task_group() as workers:
            for worker in range(planned.concurrency):
                workers.start_soon(self.work, operation, recorder, worker, stopping)
            start = last = tick = self.clock()
            for windows in itertools.count(1):
                # Ticks on a fixed grid (re-based if the loop fell behind) so samples cover
                # equal spans; each rate is divided by the span it really covered.
                tick = max(tick + interval, self.clock())
                await anyio.sleep(max(0.0, tick - self.clock()))
                now = self.clock()
                rate = recorder.take_window() / max(now - last, 1e-9)
                last = now
                if tracker is None:
                    if warmed_up(planned, recorder, windows=windows, elapsed=now - start, cap=cap):
                        recorder.begin(now)
                        tracker = StabilityTracker(
                            window=STABLE_WINDOWS, max_cv=self.settings.max_cv, warmup=0
                        )
                else:
                    tracker.add(rate)
                    if tracker.is_stable():
                        stop = STOP_STABLE
                        break
                if reached_cap(planned, recorder, now=now, start=start, cap=cap, hard_cap=hard_cap):
                    break
            recorder.end(now)
            # Let the requests in flight finish (not counted) rather than cancel them: a PUT
            # cancelled with its body already on the wire still lands, after the cleanup has
            # listed the prefix, and is left behind to be billed. Cancelled only past a bound.
            stopping.set()
            workers.cancel_scope.deadline = anyio.current_time() + DRAIN_SECONDS
        point = recorder.point(planned, reads=planned.op in READ_OPS)
        return MeasuredPoint(point=point, stop=stop, last_error=recorder.last_error)

    async def work(
        self, operation: _Operation, recorder: PointRecorder, worker: int, stopping: anyio.Event
    ) -> None:
        def on_retry(_error: TransientError) -> None:
            recorder.retried(self.clock())

        async def retrying(call: Callable[[], Awaitable[T]]) -> T:
            return await call_with_retries(call, policy=self.policy, on_retry=on_retry)

        for seq in itertools.count():
            if stopping.is_set():
                return
            began = self.clock()
            recorder.started(began, worker=worker)
            try:
                nbytes, ttfb = await operation.once(worker, seq, retrying)
            except _FATAL:
                raise
            except S3XferError as error:
                recorder.failed(self.clock(), error, worker=worker)
                # A request failing at once must not starve the sampler.
                await anyio.lowlevel.checkpoint()
                continue
            now = self.clock()
            recorder.completed(now, worker=worker, nbytes=nbytes, latency=now - began, ttfb=ttfb)

    async def remove(self, written: _Written) -> None:
        """Abort unfinished uploads, then delete the keys, in batches of 1,000."""
        for upload_id, key in list(written.uploads.items()):
            await call_with_retries(
                functools.partial(
                    self.s3.abort_multipart_upload, self.bucket, key, upload_id=upload_id
                ),
                policy=self.policy,
            )
            del written.uploads[upload_id]
            self.uploads_aborted += 1
        keys = list(dict.fromkeys(written.keys))
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start : start + DELETE_BATCH]
            await call_with_retries(functools.partial(self.delete, batch), policy=self.policy)
            self.objects_deleted += len(batch)
        written.keys.clear()

    async def delete(self, keys: Sequence[str]) -> None:
        self.s3.calls["delete_objects"] += 1
        with map_errors(self.bucket, keys[0] if len(keys) == 1 else None):
            client = await self.s3.client()
            response = await client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True},
            )
        errors = response.get("Errors", [])
        if errors:
            first = errors[0]
            raise TransientError(
                f"could not delete {len(errors)} of {len(keys)} objects under "
                f"s3://{self.bucket}/{self.run_prefix}/, e.g. {first.get('Key')}: "
                f"{first.get('Code')} {first.get('Message')}"
            )

    async def leftovers(self) -> tuple[list[str], list[tuple[str, str]]]:
        """Every key and unfinished upload still under the run prefix: the proof of cleanup,
        and a catch for writes whose request was cancelled after the server had acted."""
        prefix = f"{self.run_prefix}/"
        keys: list[str] = []
        uploads: list[tuple[str, str]] = []
        with map_errors(self.bucket, prefix):
            token: str | None = None
            while True:
                self.s3.calls["list_objects"] += 1
                kwargs: dict[str, Any] = {} if token is None else {"ContinuationToken": token}
                client = await self.s3.client()
                listed = await client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, **kwargs)
                keys.extend(item["Key"] for item in listed.get("Contents", []))
                token = listed.get("NextContinuationToken")
                if not listed.get("IsTruncated") or not token:
                    break
            self.s3.calls["list_multipart_uploads"] += 1
            client = await self.s3.client()
            pending = await client.list_multipart_uploads(Bucket=self.bucket, Prefix=prefix)
            uploads.extend((u["Key"], u["UploadId"]) for u in pending.get("Uploads", []))
        return keys, uploads

    async def clean_all(self) -> CleanupReport:
        """Remove what is still recorded, then whatever the listing still shows, then check."""
        try:
            for written in [*self.pending, *self.read_sets.values()]:
                await self.remove(written)
            self.pending.clear()
            self.read_sets.clear()
            keys, uploads = await self.leftovers()
            # Writes cancelled on our side may still land a moment later (bytes already on a
            # slow path drain to the server): list again a few times before giving up.
            for pause in STRAGGLER_PAUSES:
                if not keys and not uploads:
                    break
                stragglers = _Written()
                stragglers.keys.extend(keys)
                stragglers.uploads.update({upload_id: key for key, upload_id in uploads})
                await self.remove(stragglers)
                await anyio.sleep(pause)
                keys, uploads = await self.leftovers()
        except S3XferError as error:
            return CleanupReport(
                objects_deleted=self.objects_deleted,
                uploads_aborted=self.uploads_aborted,
                left_behind=-1,
                error=str(error),
            )
        return CleanupReport(
            objects_deleted=self.objects_deleted,
            uploads_aborted=self.uploads_aborted,
            left_behind=len(keys) + len(uploads),
        )


STRAGGLER_PAUSES = (0.0, 0.5, 1.0, 2.0)


def new_run_prefix(url: S3Url) -> str:
    """A fresh prefix per run, so runs never touch each other's objects (or the user's)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return url.key(f"s3xfer-bench-{stamp}-{secrets.token_hex(3)}")


async def run_sweep(
    s3: S3,
    settings: BenchSettings,
    *,
    listener: BenchListener | None = None,
    emulated: EmulatedPath | None = None,
    endpoint: str | None = None,
    clock: Clock = time.perf_counter,
) -> BenchResult:
    """Measure the sweep with a client given, then delete everything it wrote.

    Cleanup runs shielded from cancellation, so an interrupted run (Ctrl-C, a timeout around
    this call) still removes its objects and aborts its multipart uploads before unwinding.
    """
    listener = listener or BenchListener()
    plan = plan_bench(settings)
    run_prefix = new_run_prefix(settings.url)
    runner = _Runner(s3, settings, listener=listener, clock=clock, run_prefix=run_prefix)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    started = clock()
    listener.started(plan, run_prefix=run_prefix)
    try:
        measured, skipped = await runner.sweep(plan, deadline=started + settings.max_seconds)
    finally:
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(CLEANUP_TIMEOUT_SECONDS) as limit:
                cleanup = await runner.clean_all()
            if limit.cancelled_caught:
                cleanup = CleanupReport(
                    objects_deleted=runner.objects_deleted,
                    uploads_aborted=runner.uploads_aborted,
                    left_behind=-1,
                    error=f"cleanup took longer than {CLEANUP_TIMEOUT_SECONDS:g} s",
                )
            listener.cleaned(cleanup)
    points = [m.point for m in measured]
    return BenchResult(
        settings=settings,
        plan=plan,
        endpoint=endpoint or s3.endpoint_label,
        emulated=emulated,
        started_at=started_at,
        seconds=clock() - started,
        points=tuple(measured),
        skipped=tuple(skipped),
        cleanup=cleanup,
        recommendation=recommend(points, tolerance=settings.tolerance) if points else None,
    )


def emulation_upstream(endpoint_url: str | None) -> tuple[str, int]:
    """(host, port) to put the path emulator in front of: the endpoint given, else the one
    configured in the environment (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL). Only a plain-http
    endpoint on loopback: the emulator is a test instrument and must never relay traffic
    elsewhere."""
    endpoint_url = configured_endpoint(endpoint_url, os.environ)
    parts = urlsplit(endpoint_url or "")
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost"):
        raise UsageError(
            "--emulate-rtt / --emulate-bw work only with an http endpoint on 127.0.0.1 "
            "(for example one started by `s3xfer local-s3`); "
            f"got {endpoint_url or 'no --endpoint-url'}"
        )
    return "127.0.0.1", parts.port or 80


async def bench(
    connection: Connection,
    settings: BenchSettings,
    *,
    emulate: EmulatedPath | None = None,
    listener: BenchListener | None = None,
) -> BenchResult:
    """Run `s3xfer bench`: one client (its pool sized to the highest concurrency), optionally
    behind an emulated network path, the bucket checked first."""
    endpoint = configured_endpoint(connection.endpoint_url, os.environ) or "AWS S3"
    async with AsyncExitStack() as stack:
        if emulate is not None:
            host, port = emulation_upstream(connection.endpoint_url)
            path = await stack.enter_async_context(
                PathEmulator(
                    host,
                    port,
                    rtt=emulate.rtt,
                    bandwidth=emulate.bandwidth,
                    link_bandwidth=emulate.link,
                )
            )
            connection = dataclasses.replace(connection, endpoint_url=path.endpoint_url)
        s3 = await stack.enter_async_context(
            # A sweep holds each concurrency it measures: no adaptive window.
            open_s3(connection, max_pool_connections=max(settings.concurrencies), adaptive=False)
        )
        await s3.check_bucket(settings.url.bucket)
        return await run_sweep(s3, settings, listener=listener, emulated=emulate, endpoint=endpoint)

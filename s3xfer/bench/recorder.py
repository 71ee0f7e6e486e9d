"""What one point of a sweep records while it runs (latencies, time to first byte, bytes and
requests per sample window), and when it has warmed up or reached its cap.
"""

from __future__ import annotations

import statistics

from .results import CleanupReport, MeasuredPoint
from .settings import BenchPlan
from .stats import Point, SweepPoint, latency_summary

# Warm-up lasts at least this many samples (and until every worker has finished a request).
WARMUP_WINDOWS = 2


class BenchListener:
    """Progress hooks of a run; the defaults do nothing. Called on the event loop: keep quick."""

    def started(self, plan: BenchPlan, *, run_prefix: str) -> None:
        """The sweep is about to start; objects go under s3://bucket/run_prefix/."""

    def preparing(self, op: str, object_size: int, objects: int) -> None:
        """Uploading `objects` objects of `object_size` for a read op to read."""

    def point_done(self, measured: MeasuredPoint, index: int, total: int) -> None:
        """Point number `index` (from 1) of `total` is measured."""

    def cleaned(self, cleanup: CleanupReport) -> None:
        """Everything the run wrote has been deleted (or the report says what was not)."""


class PointRecorder:
    """Counts one point's completions. Pure: the caller passes the times.

    Warm-up is excluded: only the part of each request that falls between `begin` and `end`
    counts. A request's bytes are spread evenly over its duration, and the requests still in
    flight at `end` count for the time they have run (at the typical request's pace). Counting
    whole requests by when they complete instead is biased when requests are long next to the
    interval (a slow path at high concurrency): workers move in waves, and an interval that
    starts just after a wave counts it whole. The window counter feeds the stability samples
    and counts warm-up too.
    """

    def __init__(self) -> None:
        self.since: float | None = None
        self.until: float | None = None
        self.window_bytes = 0
        self.bytes = 0.0  # time-weighted, see above
        self.weighted_objects = 0.0
        self.objects = 0  # requests completed inside the interval
        self.errors = 0
        self.retries = 0
        self.latencies: list[float] = []
        self.ttfbs: list[float] = []
        self.last_error: str | None = None
        self.warm_workers: set[int] = set()  # workers whose first request has finished
        self._started: dict[int, float] = {}  # requests in flight: worker → start time
        self._done_bytes = 0  # every completed request, warm-up included: the typical size
        self._done = 0

    def begin(self, now: float) -> None:
        self.since = now

    def started(self, now: float, *, worker: int) -> None:
        self._started[worker] = now

    def end(self, now: float) -> None:
        self.until = now
        if self.since is None or not self._done or not self.latencies:
            return
        typical_latency = statistics.median(self.latencies)
        typical_bytes = self._done_bytes / self._done
        for began in self._started.values():
            share = min(1.0, (now - max(began, self.since)) / max(typical_latency, 1e-9))
            self.bytes += typical_bytes * max(share, 0.0)
            self.weighted_objects += max(share, 0.0)

    def _counts(self, now: float) -> bool:
        return self.since is not None and self.until is None and now >= self.since

    def completed(
        self, now: float, *, worker: int, nbytes: int, latency: float, ttfb: float | None
    ) -> None:
        self.warm_workers.add(worker)
        self._started.pop(worker, None)
        if self.until is not None:
            return
        self.window_bytes += nbytes
        self._done_bytes += nbytes
        self._done += 1
        if self._counts(now):
            assert self.since is not None
            began = now - latency
            share = 1.0 if began >= self.since or latency <= 0 else (now - self.since) / latency
            self.bytes += nbytes * share
            self.weighted_objects += share
            self.objects += 1
            self.latencies.append(latency)
            if ttfb is not None:
                self.ttfbs.append(ttfb)

    def failed(self, now: float, error: BaseException, *, worker: int) -> None:
        self.warm_workers.add(worker)
        self._started.pop(worker, None)
        self.last_error = str(error)
        if self._counts(now):
            self.errors += 1

    def retried(self, now: float) -> None:
        if self._counts(now):
            self.retries += 1

    def take_window(self) -> int:
        nbytes, self.window_bytes = self.window_bytes, 0
        return nbytes

    def point(self, planned: SweepPoint, *, reads: bool) -> Point:
        if self.since is None or self.until is None or not self.until > self.since:
            raise RuntimeError("a point is reported after its measured interval ended")
        return Point(
            op=planned.op,
            object_size=planned.object_size,
            concurrency=planned.concurrency,
            seconds=self.until - self.since,
            bytes=round(self.bytes),
            objects=round(self.weighted_objects),
            errors=self.errors,
            retries=self.retries,
            latency=latency_summary(self.latencies),
            ttfb=latency_summary(self.ttfbs) if reads else None,
        )


def warmed_up(
    planned: SweepPoint, recorder: PointRecorder, *, windows: int, elapsed: float, cap: float
) -> bool:
    """Whether a point's warm-up is over: at least WARMUP_WINDOWS samples, and every worker
    has finished its first request (the one that opened its connection, which on a real path
    costs a TCP and often a TLS handshake). At half the cap warm-up ends regardless, so a
    point that is slow to start still measures something."""
    if windows < WARMUP_WINDOWS:
        return False
    return len(recorder.warm_workers) >= planned.concurrency or elapsed >= cap / 2


def reached_cap(
    planned: SweepPoint,
    recorder: PointRecorder,
    *,
    now: float,
    start: float,
    cap: float,
    hard_cap: float,
) -> bool:
    """Whether a point has run long enough to stop without being stable.

    At its cap a point normally stops; but it runs on (up to `hard_cap`) until its
    measured interval holds one request per worker. Workers start together, so large
    objects complete in waves: with fewer completions than workers the rate is mostly
    the luck of where the interval fell between waves. Never before the measured
    interval has begun, so a point always reports a real interval.
    """
    if recorder.since is None or now <= recorder.since:
        return False
    elapsed = now - start
    measured = recorder.objects + recorder.errors
    return elapsed >= hard_cap or (elapsed >= cap and measured >= planned.concurrency)

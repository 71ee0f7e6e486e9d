"""What an engine run did, counted: the one source of every upload report.

`EngineStats` are the engine's live counters (progress displays read them as it runs).
`RunCounters.of(engine)` reads them, the requests its S3 client sent, the most bytes it held
and the adaptive window's low point. An upload's report (upload.make_report), a slice's result
(distributed/slices.py) and a distributed unit's result (distributed/units.py) are all built
from it, and the runs of many slices or units merge into one (`RunCounters.merged`) the same
way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from ..transport.retry import RetryCount

if TYPE_CHECKING:
    from ..dataset.manifest import ManifestRecord, ShardRecord
    from ..transport.s3 import S3
    from .engine import Engine


@dataclass
class EngineStats:
    """Live counters, read by progress displays, reports and tests."""

    files_done: int = 0
    bytes_done: int = 0  # sent and acknowledged
    bytes_reused: int = 0  # parts found already uploaded by an interrupted run, not sent again
    uploads_resumed: int = 0
    uploads_kept: int = 0  # multipart uploads left open on interruption, for the next run
    files_failed: int = 0
    files_unchanged: int = 0  # found stored once their shard was laid out as they are now
    shards_done: int = 0
    retried: RetryCount = field(default_factory=RetryCount)  # requests retried, throttled
    in_flight: int = 0
    peak_in_flight: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RunCounters:
    files_done: int = 0
    files_failed: int = 0
    bytes_done: int = 0  # sent and acknowledged
    bytes_reused: int = 0  # parts an interrupted run had uploaded, verified, not sent again
    uploads_resumed: int = 0
    uploads_kept: int = 0  # multipart uploads left open on interruption, for the next run
    files_unchanged: int = 0  # found stored once their shard was laid out as they are now
    shards_done: int = 0
    retries: int = 0
    throttled: int = 0
    requests: int = 0
    write_requests: int = 0
    peak_buffered_bytes: int = 0
    lowest_concurrency: int = 0  # 0: no engine ran (the report then says the plan's)
    failures: tuple[tuple[str, str], ...] = ()  # (path, why)
    # What the gate chose and why (AdaptiveGate.summary); one run's, none for merged runs.
    concurrency_choice: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, engine: Engine) -> RunCounters:
        """The engine's counters, and those of its S3 client (every request it sent, the
        metadata requests of an upload that shares it included)."""
        stats, s3 = engine.stats, engine.s3
        return cls(
            files_done=stats.files_done,
            files_failed=stats.files_failed,
            bytes_done=stats.bytes_done,
            bytes_reused=stats.bytes_reused,
            uploads_resumed=stats.uploads_resumed,
            uploads_kept=stats.uploads_kept,
            files_unchanged=stats.files_unchanged,
            shards_done=stats.shards_done,
            retries=stats.retried.retries,
            throttled=stats.retried.throttled,
            requests=s3.requests,
            write_requests=s3.writes,
            peak_buffered_bytes=engine.budget.peak,
            lowest_concurrency=s3.gate.window.lowest if s3.gate else engine.limits.concurrency,
            failures=tuple(stats.failures),
            concurrency_choice=s3.gate.summary() if s3.gate else {},
        )

    @classmethod
    def of_records(
        cls,
        records: Iterable[ManifestRecord],
        shards: Iterable[ShardRecord],
        failures: Iterable[tuple[str, str]],
    ) -> RunCounters:
        """What a stored result (a slice's) says was done: its records, nothing of its run."""
        records = list(records)
        failures = tuple(failures)
        return cls(
            files_done=len(records),
            bytes_done=sum(r.size for r in records),
            shards_done=sum(1 for _ in shards),
            files_failed=len(failures),
            failures=failures,
        )

    @classmethod
    def merged(cls, parts: Iterable[RunCounters]) -> RunCounters:
        """Many runs (a job's units, a plan's slices) as one: counts added, the highest peak
        of memory (each ran in its own process) and the lowest window."""
        parts = list(parts)
        summed = {
            f.name: sum(getattr(p, f.name) for p in parts)
            for f in fields(cls)
            if f.name
            not in ("peak_buffered_bytes", "lowest_concurrency", "failures", "concurrency_choice")
        }
        return cls(
            **summed,
            peak_buffered_bytes=max((p.peak_buffered_bytes for p in parts), default=0),
            lowest_concurrency=min(
                (p.lowest_concurrency for p in parts if p.lowest_concurrency), default=0
            ),
            failures=tuple(f for p in parts for f in p.failures),
        )

    def with_requests_of(self, s3: S3) -> RunCounters:
        """With the requests of a client of this process's own (the producer of a
        distributed job, finalize) added to those the runs sent."""
        return replace(
            self,
            requests=self.requests + s3.requests,
            write_requests=self.write_requests + s3.writes,
        )

    def as_fields(self, names: Iterable[str]) -> dict[str, Any]:
        """The counters of these names (a result type's own fields), failures as a list."""
        values = {name: getattr(self, name) for name in names}
        if "failures" in values:
            values["failures"] = list(self.failures)
        return values

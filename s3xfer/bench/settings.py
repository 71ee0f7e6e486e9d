"""What a bench run measures: the operations, sizes and concurrencies (the presets and the
settings), and the plan of points with its time estimate. Pure: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..config import KiB, MiB
from ..dataset.keys import S3Url
from ..errors import UsageError
from .stats import OP_GET, OP_MULTIPART, OP_PUT, SweepPoint, estimate_sweep_seconds, plan_sweep

OP_RANGE = "range"  # a ranged GET of `object_size` bytes out of a larger object (a shard member)
ALL_OPS: tuple[str, ...] = (OP_PUT, OP_GET, OP_RANGE, OP_MULTIPART)
READ_OPS = frozenset({OP_GET, OP_RANGE})


@dataclass(frozen=True, slots=True)
class SweepPreset:
    """The sizes, concurrencies and times a run uses unless told otherwise."""

    sizes: tuple[int, ...]
    concurrencies: tuple[int, ...]
    point_seconds: float
    max_seconds: float


# The default: about a minute, enough for the knees that set `upload` (1 MiB PUTs, 16 MiB
# parts) and `get`/`download` (ranged and whole GETs), at concurrencies a factor of 4 apart.
QUICK = SweepPreset(
    sizes=(1 * MiB, 16 * MiB), concurrencies=(1, 4, 16, 64), point_seconds=2.0, max_seconds=60.0
)
# `--full`: every size that matters, concurrency doubling up to 128 (up to 15 minutes).
FULL = SweepPreset(
    sizes=(16 * KiB, 1 * MiB, 16 * MiB, 64 * MiB),
    concurrencies=(1, 2, 4, 8, 16, 32, 64, 128),
    point_seconds=5.0,
    max_seconds=900.0,
)
DEFAULT_TOLERANCE = 0.05
MIN_POINT_SECONDS = 0.2  # below this a point is mostly connection set-up
MAX_CONCURRENCY = 1024
MAX_SINGLE_PUT = 5 * 1024 * MiB  # S3: one PUT carries at most 5 GiB

# Estimate of the time a point costs beyond its cap: draining, deleting what it wrote.
PER_POINT_OVERHEAD_SECONDS = 1.0
# GETs read a set of objects rather than one, so a server cache of one hot object does not
# flatter the result; the set is capped in bytes so large sizes do not take long to prepare.
READ_SET_BYTES = 256 * MiB
# Ranged GETs read member-sized ranges out of objects at least this large (a shard's size
# order of magnitude, kept small enough to prepare quickly).
RANGE_SOURCE_BYTES = 16 * MiB


@dataclass(frozen=True, slots=True)
class BenchSettings:
    """What to sweep and how long to spend. Validated on construction (UsageError)."""

    url: S3Url
    ops: tuple[str, ...] = ALL_OPS
    sizes: tuple[int, ...] = QUICK.sizes
    concurrencies: tuple[int, ...] = QUICK.concurrencies
    point_seconds: float = QUICK.point_seconds
    max_seconds: float = QUICK.max_seconds
    tolerance: float = DEFAULT_TOLERANCE
    max_cv: float = 0.05  # coefficient of variation under which a point counts as stable
    max_attempts: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [op for op in self.ops if op not in ALL_OPS]
        if not self.ops or unknown:
            raise UsageError(
                f"unknown bench operation {', '.join(unknown) or '(none)'}; "
                f"choose from {','.join(ALL_OPS)}"
            )
        if not self.sizes or min(self.sizes) < 1:
            raise UsageError("bench sizes must be at least 1 byte")
        if any(op in (OP_PUT, OP_GET) for op in self.ops) and max(self.sizes) > MAX_SINGLE_PUT:
            raise UsageError("bench sizes for put and get must be at most 5 GiB (one PUT)")
        if not self.concurrencies or not all(1 <= c <= MAX_CONCURRENCY for c in self.concurrencies):
            raise UsageError(f"bench concurrency must be between 1 and {MAX_CONCURRENCY}")
        if not MIN_POINT_SECONDS <= self.point_seconds < math.inf:
            raise UsageError(f"point time must be at least {MIN_POINT_SECONDS} s")
        if not self.max_seconds > 0 or math.isinf(self.max_seconds):
            raise UsageError("the total time bound must be a positive number of seconds")
        if not 0.0 <= self.tolerance < 1.0:
            raise UsageError("the knee tolerance must be in [0, 1)")
        if not 1 <= self.max_attempts <= 100:
            raise UsageError("max attempts must be between 1 and 100")

    def to_json(self) -> dict[str, Any]:
        return {
            "url": str(self.url),
            "ops": list(self.ops),
            "sizes": list(self.sizes),
            "concurrencies": list(self.concurrencies),
            "point_seconds": self.point_seconds,
            "max_seconds": self.max_seconds,
            "tolerance": self.tolerance,
            "max_cv": self.max_cv,
            "max_attempts": self.max_attempts,
            "seed": self.seed,
        }


@dataclass(frozen=True, slots=True)
class BenchPlan:
    """The sweep as it will run, known before it starts: shown up front."""

    sweep: tuple[SweepPoint, ...]
    point_seconds: float  # the per-point cap after fitting the sweep into max_seconds
    estimate_seconds: float  # upper bound on measuring, preparation excluded
    prepare_bytes: int  # uploaded before the GETs to have something to read

    def to_json(self) -> dict[str, Any]:
        return {
            "points": len(self.sweep),
            "point_seconds": self.point_seconds,
            "estimate_seconds": self.estimate_seconds,
            "prepare_bytes": self.prepare_bytes,
        }


def read_set_count(object_size: int, *, max_concurrency: int) -> int:
    """How many objects of `object_size` the GETs of a point spread over."""
    return max(1, min(max_concurrency, math.ceil(READ_SET_BYTES / object_size)))


def read_source_size(op: str, object_size: int) -> int:
    """Size of the objects a read op reads from: the object itself for a whole GET, a larger
    shard-like object for a ranged GET (the range is then a member of it)."""
    return object_size if op == OP_GET else max(RANGE_SOURCE_BYTES, object_size)


def plan_bench(settings: BenchSettings) -> BenchPlan:
    """Fit the sweep into `max_seconds` by shortening every point's cap if needed.

    Shortening all points evenly (rather than dropping the last ones) keeps every curve
    complete; below MIN_POINT_SECONDS a point measures nothing useful, so that is refused.
    """
    sweep = plan_sweep(
        settings.ops, settings.sizes, settings.concurrencies, point_seconds=settings.point_seconds
    )
    fitted = settings.max_seconds / len(sweep) - PER_POINT_OVERHEAD_SECONDS
    point_seconds = min(settings.point_seconds, fitted)
    if point_seconds < MIN_POINT_SECONDS:
        raise UsageError(
            f"a sweep of {len(sweep)} points does not fit in {settings.max_seconds:g} s "
            f"(each point needs at least {MIN_POINT_SECONDS + PER_POINT_OVERHEAD_SECONDS:g} s): "
            "raise --max-seconds or measure fewer ops, sizes or concurrencies"
        )
    if point_seconds < settings.point_seconds:
        sweep = plan_sweep(
            settings.ops, settings.sizes, settings.concurrencies, point_seconds=point_seconds
        )
    max_concurrency = max(settings.concurrencies)
    sources = {(read_source_size(p.op, p.object_size)) for p in sweep if p.op in READ_OPS}
    prepare = sum(size * read_set_count(size, max_concurrency=max_concurrency) for size in sources)
    return BenchPlan(
        sweep=tuple(sweep),
        point_seconds=point_seconds,
        estimate_seconds=estimate_sweep_seconds(
            sweep, per_point_overhead=PER_POINT_OVERHEAD_SECONDS
        ),
        prepare_bytes=prepare,
    )


def sample_interval(cap_seconds: float) -> float:
    """Seconds between throughput samples of a point capped at `cap_seconds`: about ten
    per point, between 50 ms and 0.5 s, so short test points still get a warm-up and a few
    measured windows and long ones are not sampled needlessly often."""
    return min(0.5, max(0.05, cap_seconds / 10))

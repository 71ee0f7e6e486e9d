"""Pure statistics behind `s3xfer bench`: percentiles, measured points, the knee of a
throughput-versus-concurrency curve, run stability, recommendations and sweep plans.

Nothing here does I/O or reads a clock: the runner measures, this module judges.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, ClassVar, Literal

MIB = 1024 * 1024
GIB = 1024 * MIB
MIN_PART_SIZE = 5 * MIB  # S3: every part but the last is at least 5 MiB
MAX_PART_SIZE = 5 * GIB  # S3: no part (and no single PUT) above 5 GiB

OP_PUT = "put"
OP_GET = "get"
OP_MULTIPART = "multipart"  # object_size is the size of each part
UPLOAD_OPS = frozenset({OP_PUT, OP_MULTIPART})
DOWNLOAD_OPS = frozenset({OP_GET})

Metric = Literal["mb_per_s", "objects_per_s"]
_METRICS: tuple[str, ...] = ("mb_per_s", "objects_per_s")


# --------------------------------------------------------------------------- percentiles


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (q in [0, 100]) of ascending values, interpolating linearly.

    Same definition as numpy's default and `statistics.quantiles(method="inclusive")`:
    position (n - 1) * q / 100 between the two nearest ranks.
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:  # also rejects NaN
        raise ValueError(f"percentile q must be in [0, 100], got {q!r}")
    if any(b < a for a, b in pairwise(sorted_values)):
        raise ValueError("percentile needs values sorted in ascending order")
    position = (len(sorted_values) - 1) * q / 100.0
    lower = math.floor(position)
    fraction = position - lower
    low = sorted_values[lower]
    if fraction == 0.0:
        return float(low)
    high = sorted_values[lower + 1]
    # Clamped because low + (high - low) can round past high, which would break monotonicity.
    return float(min(low + (high - low) * fraction, high))


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Per-request latency in seconds. count == 0 means no request succeeded; then all are 0."""

    p50: float
    p90: float
    p99: float
    max: float
    mean: float
    count: int

    def to_json(self) -> dict[str, Any]:
        return {
            "p50": self.p50,
            "p90": self.p90,
            "p99": self.p99,
            "max": self.max,
            "mean": self.mean,
            "count": self.count,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatencySummary:
        return cls(
            p50=float(data["p50"]),
            p90=float(data["p90"]),
            p99=float(data["p99"]),
            max=float(data["max"]),
            mean=float(data["mean"]),
            count=int(data["count"]),
        )


def latency_summary(samples: Iterable[float]) -> LatencySummary:
    """Summarise latency samples (seconds, any order). No samples gives an all-zero summary
    with count 0, so a point where every request failed can still be reported."""
    ordered = sorted(samples)
    if not ordered:
        return LatencySummary(p50=0.0, p90=0.0, p99=0.0, max=0.0, mean=0.0, count=0)
    return LatencySummary(
        p50=percentile(ordered, 50),
        p90=percentile(ordered, 90),
        p99=percentile(ordered, 99),
        max=float(ordered[-1]),
        mean=math.fsum(ordered) / len(ordered),
        count=len(ordered),
    )


# --------------------------------------------------------------------------- points


@dataclass(frozen=True, slots=True)
class Point:
    """One measured point of a sweep: `op` on objects of `object_size` bytes with
    `concurrency` requests in flight for `seconds`. `bytes` and `objects` count only
    successful transfers; `ttfb` is time to first byte, for reads."""

    op: str
    object_size: int
    concurrency: int
    seconds: float
    bytes: int
    objects: int
    errors: int
    retries: int
    latency: LatencySummary
    ttfb: LatencySummary | None = None

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ValueError(f"point {self.op}/{self.object_size}: seconds must be > 0")
        if self.concurrency < 1:
            raise ValueError(f"point {self.op}/{self.object_size}: concurrency must be >= 1")
        if self.object_size < 0 or min(self.bytes, self.objects, self.errors, self.retries) < 0:
            raise ValueError(f"point {self.op}/{self.object_size}: negative count")

    @property
    def mb_per_s(self) -> float:
        """Throughput in MB/s, MB being 10**6 bytes (as network rates are quoted)."""
        return self.bytes / self.seconds / 1e6

    @property
    def objects_per_s(self) -> float:
        return self.objects / self.seconds

    def metric(self, name: Metric) -> float:
        return self.mb_per_s if name == "mb_per_s" else self.objects_per_s

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; the derived rates are included for readers and ignored on load."""
        return {
            "op": self.op,
            "object_size": self.object_size,
            "concurrency": self.concurrency,
            "seconds": self.seconds,
            "bytes": self.bytes,
            "objects": self.objects,
            "errors": self.errors,
            "retries": self.retries,
            "latency": self.latency.to_json(),
            "ttfb": None if self.ttfb is None else self.ttfb.to_json(),
            "mb_per_s": self.mb_per_s,
            "objects_per_s": self.objects_per_s,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Point:
        ttfb = data.get("ttfb")
        return cls(
            op=str(data["op"]),
            object_size=int(data["object_size"]),
            concurrency=int(data["concurrency"]),
            seconds=float(data["seconds"]),
            bytes=int(data["bytes"]),
            objects=int(data["objects"]),
            errors=int(data["errors"]),
            retries=int(data["retries"]),
            latency=LatencySummary.from_json(data["latency"]),
            ttfb=None if ttfb is None else LatencySummary.from_json(ttfb),
        )


# --------------------------------------------------------------------------- knee


def find_knee(
    points: Sequence[Point], *, tolerance: float = 0.05, metric: Metric = "mb_per_s"
) -> Point:
    """The point with the smallest concurrency whose `metric` is within `tolerance`
    (a fraction) of the best point's, among points of one (op, object_size).

    Why this definition: past the knee, more requests in flight buy less than `tolerance`
    of throughput but cost memory, connections and throttling risk, so the cheapest
    near-best setting is the useful one. Comparing against the global best (rather than
    stopping at the first small marginal gain) is robust to noise and to curves that fall
    again at high concurrency. A flat curve therefore gives the lowest concurrency measured.
    """
    if not points:
        raise ValueError("find_knee needs at least one point")
    if metric not in _METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(_METRICS)}")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
    groups = {(p.op, p.object_size) for p in points}
    if len(groups) > 1:
        raise ValueError(f"find_knee needs points of one (op, object_size), got {sorted(groups)}")
    best = max(p.metric(metric) for p in points)
    good_enough = [p for p in points if p.metric(metric) >= best * (1.0 - tolerance)]
    # Ties at one concurrency (repeated runs) go to the faster run.
    return min(good_enough, key=lambda p: (p.concurrency, -p.metric(metric)))


# --------------------------------------------------------------------------- stability


class StabilityTracker:
    """Decides when a running point's throughput has settled, so the runner can stop early.

    Fed one throughput sample per fixed window (say every 0.5 s). The first `warmup`
    samples are ignored (connection set-up, slow start). Stable means at least
    `min_windows` samples after warm-up, and over the last `window` of them both
    the coefficient of variation (population stdev / mean) at most `max_cv` and the drift
    (least-squares slope across the window, relative to the mean) at most `max_drift`.
    The drift test exists because a steady ramp has a small CV once the mean is large,
    yet a point still ramping up has not settled.
    A mean of zero is never stable: the runner's time cap ends such a point.
    """

    __slots__ = (
        "_max_cv",
        "_max_drift",
        "_min_windows",
        "_recent",
        "_seen",
        "_warmup",
        "_window",
    )

    def __init__(
        self,
        *,
        window: int = 5,
        max_cv: float = 0.05,
        warmup: int = 2,
        min_windows: int | None = None,
        max_drift: float | None = None,
    ) -> None:
        if window < 2:
            raise ValueError(f"window must be >= 2 samples, got {window}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        if max_cv < 0:
            raise ValueError(f"max_cv must be >= 0, got {max_cv}")
        self._window = window
        self._max_cv = max_cv
        self._max_drift = max_cv if max_drift is None else max_drift
        self._warmup = warmup
        self._min_windows = window if min_windows is None else max(min_windows, window)
        self._recent: deque[float] = deque(maxlen=window)
        self._seen = 0

    def add(self, sample: float) -> None:
        """Record the throughput of one window (any unit, the same every time)."""
        if not sample >= 0 or math.isinf(sample):
            raise ValueError(f"throughput sample must be finite and >= 0, got {sample!r}")
        self._seen += 1
        if self._seen > self._warmup:
            self._recent.append(sample)

    @property
    def windows_seen(self) -> int:
        """Samples fed so far, warm-up included."""
        return self._seen

    def cv(self) -> float | None:
        """Coefficient of variation of the last `window` samples after warm-up, or None
        while there are fewer."""
        if len(self._recent) < self._window:
            return None
        mean = math.fsum(self._recent) / len(self._recent)
        if mean <= 0:
            return math.inf
        variance = math.fsum((x - mean) ** 2 for x in self._recent) / len(self._recent)
        return math.sqrt(variance) / mean

    def drift(self) -> float | None:
        """Change across the last `window` samples along their least-squares line, relative
        to their mean (0.1 = rising or falling by 10 %), or None while there are fewer."""
        if len(self._recent) < self._window:
            return None
        n = len(self._recent)
        mean = math.fsum(self._recent) / n
        if mean <= 0:
            return math.inf
        x_mean = (n - 1) / 2
        covariance = math.fsum((x - x_mean) * (y - mean) for x, y in enumerate(self._recent))
        slope = covariance / math.fsum((x - x_mean) ** 2 for x in range(n))
        return abs(slope) * (n - 1) / mean

    def mean(self) -> float | None:
        """Mean of the last `window` samples after warm-up, or None while there are fewer."""
        if len(self._recent) < self._window:
            return None
        return math.fsum(self._recent) / len(self._recent)

    def is_stable(self) -> bool:
        if self._seen - self._warmup < self._min_windows:
            return False
        cv, drift = self.cv(), self.drift()
        return (
            cv is not None and drift is not None and cv <= self._max_cv and drift <= self._max_drift
        )


# --------------------------------------------------------------------------- recommendation


@dataclass(frozen=True, slots=True)
class Knee:
    """The knee of one (op, object_size) curve."""

    op: str
    object_size: int
    concurrency: int
    mb_per_s: float
    objects_per_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "object_size": self.object_size,
            "concurrency": self.concurrency,
            "mb_per_s": self.mb_per_s,
            "objects_per_s": self.objects_per_s,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Knee:
        return cls(
            op=str(data["op"]),
            object_size=int(data["object_size"]),
            concurrency=int(data["concurrency"]),
            mb_per_s=float(data["mb_per_s"]),
            objects_per_s=float(data["objects_per_s"]),
        )


@dataclass(frozen=True, slots=True)
class Recommendation:
    """Settings derived from a sweep, saved as a named profile.

    `concurrency` maps each op to the knee concurrency at the largest object size measured
    for it (large objects are bandwidth-bound, which is what concurrency is tuned for);
    `knees` keeps every (op, size) knee so small-object settings can be read too.
    `part_size` / `range_size` are None when no suitable sizes were measured.
    """

    FORMAT_VERSION: ClassVar[int] = 1

    concurrency: dict[str, int]
    part_size: int | None
    range_size: int | None
    knees: tuple[Knee, ...]
    tolerance: float

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.FORMAT_VERSION,
            "concurrency": dict(sorted(self.concurrency.items())),
            "part_size": self.part_size,
            "range_size": self.range_size,
            "knees": [k.to_json() for k in self.knees],
            "tolerance": self.tolerance,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recommendation:
        version = data.get("format")
        if version != cls.FORMAT_VERSION:
            raise ValueError(
                f"bench profile format {version!r} is not supported "
                f"(this s3xfer reads format {cls.FORMAT_VERSION})"
            )
        part_size = data["part_size"]
        range_size = data["range_size"]
        return cls(
            concurrency={str(op): int(c) for op, c in data["concurrency"].items()},
            part_size=None if part_size is None else int(part_size),
            range_size=None if range_size is None else int(range_size),
            knees=tuple(Knee.from_json(k) for k in data["knees"]),
            tolerance=float(data["tolerance"]),
        )


def _knees(points: Sequence[Point], *, tolerance: float) -> list[Knee]:
    groups: dict[tuple[str, int], list[Point]] = {}
    for point in points:
        groups.setdefault((point.op, point.object_size), []).append(point)
    knees = []
    for (op, size), group in sorted(groups.items()):
        knee = find_knee(group, tolerance=tolerance)
        knees.append(
            Knee(
                op=op,
                object_size=size,
                concurrency=knee.concurrency,
                mb_per_s=knee.mb_per_s,
                objects_per_s=knee.objects_per_s,
            )
        )
    return knees


def with_headroom(knee: Knee, points: Sequence[Point], *, tolerance: float) -> int:
    """The concurrency to use: one measured step above the knee when that step is still at
    the top of the curve (within `tolerance` of the best), else the knee.

    The sweep sends a steady stream of equal objects, so at the knee its pipe is just full.
    A real transfer has gaps the sweep has not: reading and checksumming the next file
    before its request, the first connections opening, the last requests draining. One step
    of headroom keeps the pipe full through them; past the top of the curve it would only
    add latency (or throttling), so it is taken only while the curve is still flat."""
    curve = sorted(
        (p for p in points if (p.op, p.object_size) == (knee.op, knee.object_size)),
        key=lambda p: p.concurrency,
    )
    best = max(p.mb_per_s for p in curve)
    above = [p for p in curve if p.concurrency > knee.concurrency]
    if above and above[0].mb_per_s >= best * (1.0 - tolerance):
        return above[0].concurrency
    return knee.concurrency


def _best_size(knees: Iterable[Knee], *, tolerance: float) -> int | None:
    """The smallest size whose knee throughput is within `tolerance` of the best size's:
    as with concurrency, a bigger part or range that buys under `tolerance` only costs memory
    (bytes buffered = size x concurrency) and retry work."""
    best_by_size: dict[int, float] = {}
    for knee in knees:
        best_by_size[knee.object_size] = max(best_by_size.get(knee.object_size, 0.0), knee.mb_per_s)
    if not best_by_size:
        return None
    best = max(best_by_size.values())
    return min(size for size, rate in best_by_size.items() if rate >= best * (1.0 - tolerance))


def recommend(points: Sequence[Point], *, tolerance: float = 0.05) -> Recommendation:
    """Recommended concurrency per op, part size for uploads and range size for reads."""
    if not points:
        raise ValueError("recommend needs at least one measured point")
    knees = _knees(points, tolerance=tolerance)
    largest: dict[str, Knee] = {}
    for knee in knees:  # sorted by (op, size), so the last one per op is the largest
        largest[knee.op] = knee
    part_size = _best_size(
        (k for k in knees if k.op in UPLOAD_OPS and k.object_size >= MIN_PART_SIZE),
        tolerance=tolerance,
    )
    if part_size is not None:
        part_size = min(max(part_size, MIN_PART_SIZE), MAX_PART_SIZE)
    range_size = _best_size((k for k in knees if k.op in DOWNLOAD_OPS), tolerance=tolerance)
    return Recommendation(
        concurrency={
            op: with_headroom(knee, points, tolerance=tolerance)
            for op, knee in sorted(largest.items())
        },
        part_size=part_size,
        range_size=range_size,
        knees=tuple(knees),
        tolerance=tolerance,
    )


# --------------------------------------------------------------------------- sweep plan


@dataclass(frozen=True, slots=True)
class SweepPoint:
    """One point to measure: run `op` on `object_size` objects at `concurrency` for at most
    `max_seconds` (the runner may stop earlier once throughput is stable)."""

    op: str
    object_size: int
    concurrency: int
    max_seconds: float


def plan_sweep(
    ops: Iterable[str],
    sizes: Iterable[int],
    concurrencies: Iterable[int],
    *,
    point_seconds: float,
) -> list[SweepPoint]:
    """Every (op, size, concurrency), ops in the order given, sizes and concurrencies
    ascending and de-duplicated, so each curve is measured left to right.

    Multipart sizes are part sizes: those outside S3's part limits are left out (S3 would
    reject them), so one size list can serve small PUTs and multipart alike.
    """
    op_list = list(dict.fromkeys(ops))
    size_list = sorted(set(sizes))
    concurrency_list = sorted(set(concurrencies))
    if not op_list or not size_list or not concurrency_list:
        raise ValueError("a sweep needs at least one op, one size and one concurrency")
    if not point_seconds > 0 or math.isinf(point_seconds):
        raise ValueError(f"point_seconds must be finite and > 0, got {point_seconds!r}")
    if size_list[0] <= 0:
        raise ValueError(f"object sizes must be > 0, got {size_list[0]}")
    if concurrency_list[0] < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency_list[0]}")
    sweep = [
        SweepPoint(op=op, object_size=size, concurrency=c, max_seconds=point_seconds)
        for op in op_list
        for size in size_list
        if op != OP_MULTIPART or MIN_PART_SIZE <= size <= MAX_PART_SIZE
        for c in concurrency_list
    ]
    if OP_MULTIPART in op_list and not any(p.op == OP_MULTIPART for p in sweep):
        raise ValueError("multipart needs at least one size within S3's part limits [5 MiB, 5 GiB]")
    return sweep


def estimate_sweep_seconds(
    sweep: Sequence[SweepPoint], *, per_point_overhead: float = 1.0
) -> float:
    """An upper bound on the run time of a sweep, to show before it starts: every point
    runs to its cap, plus `per_point_overhead` (connection set-up, draining, clean-up).
    Preparing objects to read is not included."""
    if per_point_overhead < 0:
        raise ValueError(f"per_point_overhead must be >= 0, got {per_point_overhead!r}")
    return math.fsum(p.max_seconds + per_point_overhead for p in sweep)

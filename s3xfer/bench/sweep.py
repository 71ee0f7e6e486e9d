"""The measurement engine behind `s3xfer bench`: sweeps operation × object size × concurrency
against S3, removes everything it wrote, and keeps the recommended settings as named profiles.

benchstats.py judges (percentiles, knee, stability, sweep plans); this module measures, shapes
the results (JSON, CSV, plot) and stores profiles. The CLI in benchcli.py only presents.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import itertools
import json
import math
import os
import random
import re
import secrets
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel

from ..checksums import combine_parts, crc32, crc32_to_base64
from ..config import KiB, MiB, format_size
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
from ..transport.s3 import S3, Connection, map_errors, open_s3
from .netem import PathEmulator
from .stats import (
    OP_GET,
    OP_MULTIPART,
    OP_PUT,
    Point,
    Recommendation,
    StabilityTracker,
    SweepPoint,
    estimate_sweep_seconds,
    latency_summary,
    plan_sweep,
    recommend,
)

T = TypeVar("T")

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
MAX_PREPARE_CONCURRENCY = 32
# A multipart point uploads objects of max(this, concurrency) parts, so every part in flight
# can belong to one upload (as with one large file) and create/complete are amortised alike.
MULTIPART_MIN_PARTS = 8
DELETE_BATCH = 1000  # S3's DeleteObjects limit
CLEANUP_TIMEOUT_SECONDS = 300.0
# Throughput samples per point: a window of this many samples must be stable to stop early.
STABLE_WINDOWS = 5
# Warm-up lasts at least this many samples (and until every worker has finished a request).
WARMUP_WINDOWS = 2
# A point whose measured interval holds fewer requests than workers runs on, up to this
# many times its cap (never past the run's deadline): see reached_cap.
OVERRUN_FACTOR = 3.0
# How long the requests in flight at the end of a point may take to finish before they are
# cancelled (and left to the cleanup's straggler search).
DRAIN_SECONDS = 60.0

STOP_STABLE = "stable"  # throughput settled before the cap
STOP_TIME = "time"  # ran to its cap
STOP_DEADLINE = "deadline"  # cut short by the whole run's time bound

PROFILE_DIR_ENV = "S3XFER_HOME"
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

Clock = Callable[[], float]


# --------------------------------------------------------------------------- settings and plan


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


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class MeasuredPoint:
    """A point as measured, with why it stopped and the last error seen (if any)."""

    point: Point
    stop: str
    last_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**self.point.to_json(), "stop": self.stop, "last_error": self.last_error}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MeasuredPoint:
        return cls(
            point=Point.from_json(data),
            stop=str(data["stop"]),
            last_error=data.get("last_error"),
        )


@dataclass(frozen=True, slots=True)
class CleanupReport:
    """What the run removed, and what it could not (left_behind > 0 or error set)."""

    objects_deleted: int
    uploads_aborted: int
    left_behind: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.left_behind == 0 and self.error is None

    def to_json(self) -> dict[str, Any]:
        return {
            "objects_deleted": self.objects_deleted,
            "uploads_aborted": self.uploads_aborted,
            "left_behind": self.left_behind,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CleanupReport:
        return cls(
            objects_deleted=int(data["objects_deleted"]),
            uploads_aborted=int(data["uploads_aborted"]),
            left_behind=int(data["left_behind"]),
            error=data.get("error"),
        )


@dataclass(frozen=True, slots=True)
class EmulatedPath:
    """The network path put between client and endpoint by `--emulate-rtt / --emulate-bw`."""

    rtt: float  # seconds
    bandwidth: float | None = None  # bytes/s per connection and direction
    link: float | None = None  # bytes/s per direction, shared by every connection

    def to_json(self) -> dict[str, Any]:
        return {
            "rtt_seconds": self.rtt,
            "bandwidth_bytes_per_s": self.bandwidth,
            "link_bytes_per_s": self.link,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EmulatedPath:
        bandwidth = data.get("bandwidth_bytes_per_s")
        link = data.get("link_bytes_per_s")
        return cls(
            rtt=float(data["rtt_seconds"]),
            bandwidth=None if bandwidth is None else float(bandwidth),
            link=None if link is None else float(link),
        )


@dataclass(frozen=True, slots=True)
class BenchResult:
    """Everything one `bench` run measured; `to_json` is the `--json` output."""

    FORMAT_VERSION: ClassVar[int] = 1

    settings: BenchSettings
    plan: BenchPlan
    endpoint: str
    emulated: EmulatedPath | None
    started_at: str  # ISO 8601, UTC
    seconds: float
    points: tuple[MeasuredPoint, ...]
    skipped: tuple[SweepPoint, ...]
    cleanup: CleanupReport
    recommendation: Recommendation | None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.FORMAT_VERSION,
            "kind": "s3xfer-bench",
            "settings": self.settings.to_json(),
            "plan": self.plan.to_json(),
            "endpoint": self.endpoint,
            "emulated_path": None if self.emulated is None else self.emulated.to_json(),
            "started_at": self.started_at,
            "seconds": self.seconds,
            "points": [p.to_json() for p in self.points],
            "skipped": [
                {"op": p.op, "object_size": p.object_size, "concurrency": p.concurrency}
                for p in self.skipped
            ],
            "cleanup": self.cleanup.to_json(),
            "recommendation": (
                None if self.recommendation is None else self.recommendation.to_json()
            ),
        }


CSV_COLUMNS: tuple[str, ...] = (
    "op",
    "object_size",
    "concurrency",
    "seconds",
    "bytes",
    "objects",
    "errors",
    "retries",
    "mb_per_s",
    "objects_per_s",
    "latency_p50_s",
    "latency_p90_s",
    "latency_p99_s",
    "latency_max_s",
    "ttfb_p50_s",
    "ttfb_p99_s",
    "stop",
)


def csv_rows(points: Iterable[MeasuredPoint]) -> list[dict[str, str | int | float]]:
    """One flat row per point, keyed by CSV_COLUMNS; TTFB cells are empty for uploads."""
    rows: list[dict[str, str | int | float]] = []
    for measured in points:
        p = measured.point
        rows.append(
            {
                "op": p.op,
                "object_size": p.object_size,
                "concurrency": p.concurrency,
                "seconds": round(p.seconds, 6),
                "bytes": p.bytes,
                "objects": p.objects,
                "errors": p.errors,
                "retries": p.retries,
                "mb_per_s": round(p.mb_per_s, 6),
                "objects_per_s": round(p.objects_per_s, 6),
                "latency_p50_s": round(p.latency.p50, 6),
                "latency_p90_s": round(p.latency.p90, 6),
                "latency_p99_s": round(p.latency.p99, 6),
                "latency_max_s": round(p.latency.max, 6),
                "ttfb_p50_s": "" if p.ttfb is None else round(p.ttfb.p50, 6),
                "ttfb_p99_s": "" if p.ttfb is None else round(p.ttfb.p99, 6),
                "stop": measured.stop,
            }
        )
    return rows


def write_csv(points: Iterable[MeasuredPoint], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(points))


# --------------------------------------------------------------------------- plot


def require_matplotlib() -> None:
    """Fail before a long run, not after it, when the plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise UsageError(
            "--plot needs matplotlib: pip install 's3xfer[plot]' (or pip install matplotlib)"
        ) from exc


def write_plot(
    points: Sequence[Point],
    path: Path,
    *,
    title: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> None:
    """Throughput and p99 latency against concurrency: one row of two panels per op, one line
    per object size, the knee of each throughput curve starred. The format follows the
    file name (PNG, SVG, PDF)."""
    require_matplotlib()
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    if not points:
        raise ValueError("nothing to plot: no measured points")
    knees = {(k.op, k.object_size): k for k in recommend(points, tolerance=tolerance).knees}
    curves = _curves(points)
    ops = list(dict.fromkeys(op for (op, _), _ in curves))
    concurrencies = sorted({p.concurrency for p in points})
    figure = Figure(figsize=(12, 3.6 * len(ops) + 0.6), layout="constrained")
    axes_grid = figure.subplots(len(ops), 2, squeeze=False)
    for row, op in enumerate(ops):
        rate_axes, p99_axes = axes_grid[row]
        rates: list[float] = []
        for (curve_op, size), group in curves:
            if curve_op != op:
                continue
            xs = [p.concurrency for p in group]
            label = format_size(size)
            rates.extend(p.mb_per_s for p in group)
            (line,) = rate_axes.plot(xs, [p.mb_per_s for p in group], marker="o", label=label)
            colour = line.get_color()
            p99_axes.plot(xs, [p.latency.p99 * 1000 for p in group], marker="o", color=colour)
            knee = knees[(op, size)]
            rate_axes.plot(
                [knee.concurrency],
                [knee.mb_per_s],
                marker="*",
                markersize=16,
                color=colour,
                linestyle="none",
            )
        positive = [r for r in rates if r > 0]
        # Sizes far apart (16 KiB next to 64 MiB) differ by orders of magnitude: a log axis
        # keeps the small ones from lying flat on zero.
        if positive and max(positive) / min(positive) > 100:
            rate_axes.set_yscale("log")
        else:
            rate_axes.set_ylim(bottom=0)
        p99_axes.set_yscale("log")
        rate_axes.set_title(f"{op}: throughput")
        p99_axes.set_title(f"{op}: p99 latency")
        rate_axes.set_ylabel("MB/s")
        p99_axes.set_ylabel("ms")
        rate_axes.legend(title="size (★ knee)", fontsize="small")
        for axes in (rate_axes, p99_axes):
            axes.set_xscale("log", base=2)
            axes.set_xticks(concurrencies, [str(c) for c in concurrencies])
            axes.set_xlabel("concurrency (requests in flight)")
            axes.grid(True, alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=110)


def _curves(points: Iterable[Point]) -> list[tuple[tuple[str, int], list[Point]]]:
    groups: dict[tuple[str, int], list[Point]] = {}
    for point in points:
        groups.setdefault((point.op, point.object_size), []).append(point)
    return [(key, sorted(group, key=lambda p: p.concurrency)) for key, group in groups.items()]


# --------------------------------------------------------------------------- profiles


def profiles_dir() -> Path:
    """Where named profiles live: $S3XFER_HOME/profiles, else $XDG_CONFIG_HOME/s3xfer/profiles,
    else ~/.config/s3xfer/profiles."""
    home = os.environ.get(PROFILE_DIR_ENV)
    if home:
        return Path(home) / "profiles"
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "s3xfer" / "profiles"


def profile_path(name: str) -> Path:
    """The file of profile `name`; the name must be a plain file name (no path separators)."""
    if not _PROFILE_NAME.fullmatch(name):
        raise UsageError(
            f"bad profile name {name!r}: use letters, digits, '.', '_' and '-' "
            "(at most 100, not starting with '.' or '-')"
        )
    return profiles_dir() / f"{name}.json"


def save_profile(
    name: str, recommendation: Recommendation, *, source: dict[str, Any] | None = None
) -> Path:
    """Store `recommendation` as profile `name` (replacing it atomically); returns the path.

    `source` describes what was measured (endpoint, emulated path, sweep) for the reader;
    it must hold no credentials.
    """
    path = profile_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        **recommendation.to_json(),
        "name": name,
        "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": source or {},
    }
    # Written beside the target and renamed, so a reader never sees half a profile.
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2)
            handle.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_profile(name: str) -> Recommendation:
    path = profile_path(name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(
            f"no bench profile named {name!r} (looked for {path}); "
            f"create it with: s3xfer bench s3://bucket/prefix --save {name}"
        ) from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read bench profile {path}: {exc}") from exc
    try:
        return Recommendation.from_json(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"bench profile {path} is not valid: {exc}") from exc


PROFILE_COMMANDS = ("upload", "plan", "get", "download")


def settings_for(recommendation: Recommendation, *, command: str) -> dict[str, int]:
    """The options of `command` a profile sets, keyed by option name; only measured ones.

    upload / plan: "concurrency" (the larger of the put and multipart knees: one upload
    carries both kinds, and too few requests in flight cost more than a few too many) and
    "part_size". get: "concurrency" from ranged GETs (how `get` reads members), else whole
    GETs, and "range_size"; download prefers whole GETs. Options the user gives explicitly
    should win over these.
    """
    if command not in PROFILE_COMMANDS:
        raise UsageError(f"bench profiles apply to {', '.join(PROFILE_COMMANDS)}, not {command}")
    known = recommendation.concurrency
    settings: dict[str, int] = {}
    if command in ("upload", "plan"):
        upload = [known[op] for op in (OP_PUT, OP_MULTIPART) if op in known]
        if upload:
            settings["concurrency"] = max(upload)
        if recommendation.part_size is not None:
            settings["part_size"] = recommendation.part_size
        return settings
    order = (OP_RANGE, OP_GET) if command == "get" else (OP_GET, OP_RANGE)
    read = next((known[op] for op in order if op in known), None)
    if read is not None:
        settings["concurrency"] = read
    if recommendation.range_size is not None:
        settings["range_size"] = recommendation.range_size
    return settings


def profile_settings(name: str, *, command: str = "upload") -> dict[str, int]:
    """What `--bench-profile NAME` sets for `command` (see settings_for)."""
    return settings_for(load_profile(name), command=command)


# --------------------------------------------------------------------------- measuring


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

"""What a bench run found, and how it is written out: the measured points, the cleanup, the
`--json` document, the CSV rows and the plot (matplotlib, the `plot` extra).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..config import format_size
from ..errors import UsageError
from .settings import DEFAULT_TOLERANCE, BenchPlan, BenchSettings
from .stats import Point, Recommendation, SweepPoint, recommend


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

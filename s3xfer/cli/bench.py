"""`s3xfer bench`: the command line of s3xfer/bench/sweep.py. Parses options, prints a table
row as each point completes and the recommended settings at the end; sweep.bench() does the
measuring."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import click

from ..bench.netem import parse_duration, parse_rate
from ..bench.profiles import profile_path, save_profile, settings_for
from ..bench.recorder import BenchListener
from ..bench.results import (
    BenchResult,
    CleanupReport,
    EmulatedPath,
    MeasuredPoint,
    require_matplotlib,
    write_csv,
    write_plot,
)
from ..bench.settings import (
    ALL_OPS,
    DEFAULT_TOLERANCE,
    FULL,
    MAX_CONCURRENCY,
    MIN_POINT_SECONDS,
    QUICK,
    BenchPlan,
    BenchSettings,
    plan_bench,
)
from ..bench.stats import Recommendation
from ..bench.sweep import bench, emulation_upstream
from ..config import format_size, parse_size
from ..dataset.keys import S3Url
from ..errors import UsageError
from .options import connection_options, connection_setting, make_connection
from .output import emit_json

# --------------------------------------------------------------------------- option types


class _ListType(click.ParamType):  # type: ignore[type-arg]
    """A comma-separated list, each item converted by `parse`; kept in the order given."""

    def __init__(self, name: str, parse: Callable[[str], Any]) -> None:
        self.name = name
        self._parse = parse

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[Any, ...]:
        if isinstance(value, tuple):
            return value
        items = [item.strip() for item in str(value).split(",") if item.strip()]
        if not items:
            self.fail("give at least one value", param, ctx)
        try:
            return tuple(self._parse(item) for item in items)
        except (UsageError, ValueError) as exc:
            self.fail(str(exc), param, ctx)


def _op(text: str) -> str:
    if text not in ALL_OPS:
        raise UsageError(f"unknown operation {text!r}; choose from {','.join(ALL_OPS)}")
    return text


def _concurrency(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_CONCURRENCY:
        raise UsageError(f"concurrency {value} is not between 1 and {MAX_CONCURRENCY}")
    return value


class _QuantityType(click.ParamType):  # type: ignore[type-arg]
    def __init__(self, name: str, parse: Callable[[str], float]) -> None:
        self.name = name
        self._parse = parse

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        try:
            return self._parse(str(value))
        except UsageError as exc:
            self.fail(str(exc), param, ctx)


OPS = _ListType("OPS", _op)
SIZES = _ListType("SIZES", parse_size)
CONCURRENCIES = _ListType("LIST", _concurrency)
DURATION = _QuantityType("DURATION", parse_duration)
RATE = _QuantityType("RATE", parse_rate)


# --------------------------------------------------------------------------- rendering

_COLUMNS = (
    f"{'point':>9}  {'op':<9} {'size':>8} {'conc':>4} {'MB/s':>9} {'obj/s':>9}  "
    f"{'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} {'ttfb50':>7}  "
    f"{'err':>4} {'retry':>5} {'secs':>5}  stop"
)


def duration_text(seconds: float) -> str:
    """'45 s', '11 min 12 s', '1 h 05 min'."""
    whole = round(seconds)
    if whole < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f}"


def point_row(measured: MeasuredPoint, index: int, total: int) -> str:
    p = measured.point
    ttfb = _ms(p.ttfb.p50) if p.ttfb is not None else f"{'-':>7}"
    return (
        f"{f'{index}/{total}':>9}  {p.op:<9} {format_size(p.object_size):>8} "
        f"{p.concurrency:>4} {p.mb_per_s:9.1f} {p.objects_per_s:9.1f}  "
        f"{_ms(p.latency.p50)} {_ms(p.latency.p90)} {_ms(p.latency.p99)} {_ms(p.latency.max)} "
        f"{ttfb}  {p.errors:>4} {p.retries:>5} {p.seconds:5.1f}  {measured.stop}"
    )


def plan_text(plan: BenchPlan, settings: BenchSettings, *, bucket: str, run_prefix: str) -> str:
    ops = ",".join(dict.fromkeys(p.op for p in plan.sweep))
    lines = [
        f"sweep: {len(plan.sweep)} points ({ops} × {len(settings.sizes)} sizes × "
        f"{len(settings.concurrencies)} concurrencies), each at most "
        f"{plan.point_seconds:g} s (sooner once stable), warm-up excluded",
        f"time: about {duration_text(plan.estimate_seconds)} at most"
        + (
            f", plus uploading {format_size(plan.prepare_bytes)} for the GETs to read"
            if plan.prepare_bytes
            else ""
        )
        + f"; never more than {duration_text(settings.max_seconds)} (--max-seconds)",
        f"objects go under s3://{bucket}/{run_prefix}/ and are all deleted at the end",
    ]
    if plan.point_seconds < settings.point_seconds:
        lines.append(
            f"note: points shortened from {settings.point_seconds:g} s to "
            f"{plan.point_seconds:.2f} s to fit --max-seconds"
        )
    return "\n".join(lines)


def cleanup_text(cleanup: CleanupReport, *, bucket: str, run_prefix: str | None) -> str:
    where = f"s3://{bucket}/{run_prefix}/" if run_prefix else f"s3://{bucket}"
    done = (
        f"cleanup: deleted {cleanup.objects_deleted:,} objects, aborted "
        f"{cleanup.uploads_aborted:,} multipart uploads under {where}"
    )
    if cleanup.error:
        return f"{done}\nWARNING: cleanup failed ({cleanup.error}); objects may remain"
    if cleanup.left_behind:
        return f"{done}\nWARNING: {cleanup.left_behind} objects or uploads remain under {where}"
    return done


def recommendation_text(recommendation: Recommendation) -> str:
    tolerance = f"{recommendation.tolerance:.0%}"
    lines = [f"knees (smallest concurrency within {tolerance} of the best MB/s):"]
    lines.extend(
        f"  {knee.op:<9} {format_size(knee.object_size):>8}: concurrency {knee.concurrency:>4}"
        f"  ({knee.mb_per_s:.1f} MB/s, {knee.objects_per_s:.1f} objects/s)"
        for knee in recommendation.knees
    )
    lines.append("recommended settings:")
    upload = settings_for(recommendation, command="upload")
    get = settings_for(recommendation, command="get")
    if upload:
        flags = []
        if "concurrency" in upload:
            flags.append(f"--concurrency {upload['concurrency']}")
        if "part_size" in upload:
            flags.append(f"--part-size {format_size(upload['part_size']).replace(' ', '')}")
        lines.append(f"  upload / plan: {' '.join(flags)}")
    if "concurrency" in get:
        lines.append(f"  get:           --concurrency {get['concurrency']}")
    if recommendation.range_size is not None:
        lines.append(f"  range size for large reads: {format_size(recommendation.range_size)}")
    return "\n".join(lines)


class TableListener(BenchListener):
    """Prints the plan, one row per point as it completes, and the cleanup."""

    def __init__(self, settings: BenchSettings, *, out: TextIO, quiet: bool) -> None:
        self.settings = settings
        self.out = out
        self.quiet = quiet
        self.run_prefix: str | None = None

    def _echo(self, text: str) -> None:
        click.echo(text, file=self.out)

    def started(self, plan: BenchPlan, *, run_prefix: str) -> None:
        self.run_prefix = run_prefix
        if not self.quiet:
            self._echo(
                plan_text(
                    plan, self.settings, bucket=self.settings.url.bucket, run_prefix=run_prefix
                )
            )
            self._echo(_COLUMNS)

    def preparing(self, op: str, object_size: int, objects: int) -> None:
        if not self.quiet:
            self._echo(
                f"{'':>9}  (uploading {objects} × {format_size(object_size)} for {op} to read)"
            )

    def point_done(self, measured: MeasuredPoint, index: int, total: int) -> None:
        if not self.quiet:
            self._echo(point_row(measured, index, total))

    def cleaned(self, cleanup: CleanupReport) -> None:
        # Also printed when the run is interrupted, so the user knows nothing was left.
        if not self.quiet or not cleanup.ok:
            self._echo(
                cleanup_text(cleanup, bucket=self.settings.url.bucket, run_prefix=self.run_prefix)
            )


# --------------------------------------------------------------------------- the command


def _bench(
    url: str,
    ops: tuple[str, ...],
    sizes: tuple[int, ...] | None,
    concurrencies: tuple[int, ...] | None,
    point_seconds: float | None,
    max_seconds: float | None,
    full: bool,
    tolerance: float,
    emulate_rtt: float | None,
    emulate_bw: float | None,
    emulate_link: float | None,
    as_json: bool,
    csv_path: Path | None,
    plot_path: Path | None,
    save: str | None,
    quiet: bool,
) -> None:
    """Measure throughput against parallelism at URL (s3://bucket/prefix) and recommend settings.

    \b
    s3xfer bench s3://bucket/tmp                   (about a minute; --full: up to 15)
    s3xfer bench s3://bucket/tmp --ops put --sizes 1MiB --concurrency 1,2,4,8,16,32,64
    s3xfer bench s3://bench/x --endpoint-url http://127.0.0.1:8333 --emulate-rtt 30ms
    s3xfer bench s3://bucket/tmp --save office     (then: s3xfer upload --bench-profile office)

    Sweeps each operation (put: single PUTs; get: whole GETs; range: ranged GETs of SIZE out
    of a larger object, like one file of a shard; multipart: parts of SIZE) × object size ×
    concurrency. Each point runs until its throughput is stable or --point-seconds pass, after a
    warm-up that is not counted; the whole run stops at --max-seconds. Per point: MB/s,
    objects/s, latency p50/p90/p99/max, time to first byte for GETs, errors and retries.

    The knee of each curve is the smallest concurrency within --tolerance of the best
    throughput; from the knees come the recommended concurrency, part size and range size.
    Every object written (under URL/s3xfer-bench-<time>-<id>/) is deleted at the end, also
    when the run is interrupted.
    """
    from .. import runner

    preset = FULL if full else QUICK
    settings = BenchSettings(
        url=S3Url.parse(url),
        ops=ops,
        sizes=sizes or preset.sizes,
        concurrencies=concurrencies or preset.concurrencies,
        point_seconds=point_seconds or preset.point_seconds,
        max_seconds=max_seconds or preset.max_seconds,
        tolerance=tolerance,
    )
    plan_bench(settings)  # a sweep that cannot fit fails here, before any request
    # Fail before a long run, not after it.
    if save is not None:
        profile_path(save)
    if plot_path is not None:
        require_matplotlib()
    emulate = None
    if emulate_rtt is not None or emulate_bw is not None or emulate_link is not None:
        emulate = EmulatedPath(rtt=emulate_rtt or 0.0, bandwidth=emulate_bw, link=emulate_link)
        emulation_upstream(connection_setting("endpoint_url"))
    connection = make_connection()
    table = sys.stderr if as_json else sys.stdout
    listener = TableListener(settings, out=table, quiet=quiet)

    async def run() -> BenchResult:
        return await bench(connection, settings, emulate=emulate, listener=listener)

    result = runner.run(run)
    saved: Path | None = None
    if save is not None and result.recommendation is not None:
        saved = save_profile(save, result.recommendation, source=profile_source(result))
    if csv_path is not None:
        write_csv(result.points, csv_path)
    if plot_path is not None:
        write_plot(
            [m.point for m in result.points],
            plot_path,
            title=plot_title(result),
            tolerance=settings.tolerance,
        )
    if as_json:
        emit_json({**result.to_json(), "profile": None if saved is None else str(saved)})
    else:
        click.echo(summary_text(result, saved=saved, name=save))
    if not result.cleanup.ok:
        sys.exit(1)


def profile_source(result: BenchResult) -> dict[str, Any]:
    """What a saved profile was measured on: no credentials, only the endpoint and the sweep."""
    return {
        "endpoint": result.endpoint,
        "url": str(result.settings.url),
        "emulated_path": None if result.emulated is None else result.emulated.to_json(),
        "started_at": result.started_at,
        "ops": list(result.settings.ops),
        "sizes": list(result.settings.sizes),
        "concurrencies": list(result.settings.concurrencies),
    }


def plot_title(result: BenchResult) -> str:
    path = ""
    if result.emulated is not None:
        path = f", emulated RTT {result.emulated.rtt * 1000:g} ms"
        if result.emulated.bandwidth is not None:
            path += f", {result.emulated.bandwidth / 1e6:g} MB/s per connection"
        if result.emulated.link is not None:
            path += f", a {result.emulated.link / 1e6:g} MB/s link"
    return f"s3xfer bench: {result.endpoint}{path}"


def summary_text(result: BenchResult, *, saved: Path | None, name: str | None) -> str:
    lines = [f"measured {len(result.points)} points in {duration_text(result.seconds)}"]
    if result.skipped:
        lines.append(
            f"{len(result.skipped)} points not measured: the run reached --max-seconds "
            f"({duration_text(result.settings.max_seconds)})"
        )
    errors = sum(m.point.errors for m in result.points)
    if errors:
        last = next((m.last_error for m in reversed(result.points) if m.last_error), None)
        lines.append(f"{errors:,} requests failed; the last error: {last}")
    if result.recommendation is not None:
        lines.append(recommendation_text(result.recommendation))
    if saved is not None:
        lines.append(f"saved profile {name!r} to {saved} (use it with --bench-profile {name})")
    elif name is not None:
        lines.append(f"profile {name!r} not saved: no point was measured")
    return "\n".join(lines)


def size_list(sizes: tuple[int, ...]) -> str:
    return ",".join(format_size(s).replace(" ", "") for s in sizes)


def _build_bench_command() -> click.Command:
    options = [
        click.argument("url"),
        click.option(
            "--ops",
            type=OPS,
            default=",".join(ALL_OPS),
            show_default=True,
            help="Operations to measure, comma-separated.",
        ),
        click.option(
            "--sizes",
            type=SIZES,
            default=None,
            help="Object sizes (range: bytes per ranged GET; multipart: part size, 5MiB-5GiB)"
            f"  [default: {size_list(QUICK.sizes)}; --full: {size_list(FULL.sizes)}]",
        ),
        click.option(
            "--concurrency",
            "concurrencies",
            type=CONCURRENCIES,
            default=None,
            help="Requests in flight at each point, comma-separated"
            f"  [default: {','.join(map(str, QUICK.concurrencies))}; "
            f"--full: {','.join(map(str, FULL.concurrencies))}]",
        ),
        click.option(
            "--point-seconds",
            type=click.FloatRange(min=MIN_POINT_SECONDS),
            default=None,
            help="Longest time one point runs (it stops sooner once stable)"
            f"  [default: {QUICK.point_seconds:g}; --full: {FULL.point_seconds:g}]",
        ),
        click.option(
            "--max-seconds",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            help="Bound on the measuring; points are shortened to fit it"
            f"  [default: {QUICK.max_seconds:g}; --full: {FULL.max_seconds:g}]",
        ),
        click.option(
            "--full",
            is_flag=True,
            help="The whole sweep (more sizes, concurrency doubling up to 128; up to 15 "
            "minutes) instead of the one-minute default. Options given explicitly still win.",
        ),
        click.option(
            "--tolerance",
            type=click.FloatRange(0, 0.5),
            default=DEFAULT_TOLERANCE,
            show_default=True,
            help="The knee is the smallest concurrency within this fraction of the best.",
        ),
        click.option(
            "--emulate-rtt",
            type=DURATION,
            default=None,
            help="Add this round-trip time with a local proxy (e.g. 30ms); "
            "only for an http endpoint on 127.0.0.1.",
        ),
        click.option(
            "--emulate-bw",
            type=RATE,
            default=None,
            help="Cap each connection at this rate with the same proxy (e.g. 50MB/s).",
        ),
        click.option(
            "--emulate-link",
            type=RATE,
            default=None,
            help="A link of this capacity each way shared by every connection, with the same "
            "proxy (e.g. 40MB/s): where throughput stops growing with concurrency.",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print every point as JSON."),
        click.option(
            "--csv",
            "csv_path",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Write every point to this CSV file.",
        ),
        click.option(
            "--plot",
            "plot_path",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Draw throughput and p99 latency against concurrency to this PNG "
            "(needs matplotlib: pip install 's3xfer[plot]').",
        ),
        click.option(
            "--save",
            metavar="NAME",
            default=None,
            help="Save the recommended settings as profile NAME "
            "(in $S3XFER_HOME/profiles or ~/.config/s3xfer/profiles).",
        ),
        click.option("--quiet", "-q", is_flag=True, help="No table while running."),
    ]
    function: Callable[..., None] = connection_options(_bench)
    for option in reversed(options):
        function = option(function)
    return click.command("bench")(function)


bench_command = _build_bench_command()

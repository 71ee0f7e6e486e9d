"""One upload spread over machines: `s3xfer worker`, and what `upload --broker` does in the
producer (plan here, follow the workers, write the catalog)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from .. import runner
from ..errors import UsageError
from ..limits import RunLimits
from ..transport.s3 import Connection
from .output import TransferProgress
from .render import _printable, human_bytes

if TYPE_CHECKING:
    from ..distributed.units import UnitResult
    from ..planning.plan import Plan, WorkUnit
    from ..write.upload import UploadReport


def check_broker(broker: str, slice_text: str | None) -> None:
    """Before any survey: the extra is installed, the URL is a Redis URL, no --slice."""
    from ..distributed.broker import check_broker_url

    check_broker_url(broker)
    if slice_text is not None:
        raise UsageError("give either --broker or --slice, not both")


def upload_with_broker(
    plan: Plan,
    limits: RunLimits,
    connection: Connection,
    broker: str,
    progress: TransferProgress,
    *,
    keep_deleted: bool,
    break_lease: bool,
) -> UploadReport:
    """upload --broker: the workers do the work; this process plans, follows and commits."""
    from ..distributed.jobs import upload_with_workers

    def notice(text: str) -> None:
        if progress.bar is not None and not progress.bar.disable:
            progress.bar.write(f"s3xfer: {text}", file=sys.stderr)
        else:
            click.echo(f"s3xfer: {text}", err=True)

    async def job() -> UploadReport:
        return await upload_with_workers(
            plan,
            broker,
            connection,
            on_start=progress.start,
            on_progress=progress.advance,
            on_notice=notice,
            keep_deleted=keep_deleted,
            break_lease=break_lease,
            limits=limits,
        )

    try:
        return runner.run(job)
    except KeyboardInterrupt:
        progress.close()
        click.echo(
            "s3xfer: interrupted; the workers go on with the units already queued: run the "
            "same command again to wait for them and write the catalog",
            err=True,
        )
        sys.exit(130)


def workers_summary(report: UploadReport) -> str:
    extra = report.extra
    line = (
        f"  {extra.get('units', 0):,} work units on {extra.get('workers', 0):,} workers "
        f"(job {extra.get('job', '?')})"
    )
    if extra.get("units_redelivered"):
        line += f"; {extra['units_redelivered']:,} delivered again after a worker was lost"
    if extra.get("uploads_aborted"):
        line += f"; {extra['uploads_aborted']:,} leftover multipart uploads aborted"
    return line


@click.command("worker")
@click.option(
    "--broker",
    required=True,
    metavar="URL",
    help="The Redis the producers enqueue units on: redis://HOST:6379/0.",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(1, 1024),
    default=None,
    help="Requests in flight while running a unit (default: the producer's --concurrency).",
)
@click.option(
    "--visibility-timeout",
    metavar="SECONDS",
    type=click.FloatRange(min=5),
    default=120.0,
    show_default=True,
    help="A unit whose worker stopped beating for this long is given to another worker. "
    "Give every worker the same value.",
)
@click.option(
    "--loglevel",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="warning",
    show_default=True,
    help="Celery's log level (on stderr).",
)
def worker_command(
    broker: str, concurrency: int | None, visibility_timeout: float, loglevel: str
) -> None:
    """Execute the work units of `s3xfer upload --broker URL` jobs, one at a time, until
    Ctrl-C or SIGTERM (the unit in progress is finished first).

    \b
    Every worker needs the same view of the source files as the producer (a shared
    filesystem, or identical copies at the same path) and its own AWS credentials (they are
    never sent through the broker). Run one worker per machine, or several for more
    parallelism; a unit of a worker that dies is redelivered to another after
    --visibility-timeout. Needs the extra s3xfer[distributed]. See docs/distributed.md.
    """
    from ..distributed.worker import run_worker

    def ready(text: str) -> None:
        click.echo(text)
        sys.stdout.flush()

    def files(count: int) -> str:
        return f"{count:,} file{'' if count == 1 else 's'}"

    def unit_started(job: str, index: int, unit: WorkUnit, redelivered: bool) -> None:
        again = " (delivered again)" if redelivered else ""
        click.echo(
            f"unit {index} of job {job} started: {files(unit.file_count)}, "
            f"{human_bytes(unit.size)}{again}"
        )
        sys.stdout.flush()

    def unit_done(result: UnitResult) -> None:
        line = f"unit {result.index} of job {result.job}: {files(result.files_done)}, "
        line += f"{human_bytes(result.bytes_done)} sent"
        if result.bytes_reused:
            line += f", {human_bytes(result.bytes_reused)} found in place"
        line += f" in {result.seconds:.1f} s"
        if result.redelivered:
            line += " (delivered again)"
        if result.skipped:
            line = f"unit {result.index} of job {result.job}: skipped (job over or superseded)"
        elif result.error:
            line = f"unit {result.index} of job {result.job} FAILED: {result.error}"
        click.echo(line)
        for path, error in result.failures:
            click.echo(f"  FAILED {_printable(path)}: {error}")
        sys.stdout.flush()

    code = run_worker(
        broker,
        concurrency=concurrency,
        visibility_timeout=visibility_timeout,
        loglevel=loglevel,
        on_ready=ready,
        on_start=unit_started,
        on_unit=unit_done,
    )
    click.echo("s3xfer worker stopped")
    sys.exit(code)

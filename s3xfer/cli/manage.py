"""Housekeeping of a bucket: `cleanup` (incomplete multipart uploads left by any tool)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from .. import runner
from ..dataset.keys import S3Url
from ..transport.s3 import open_s3
from .options import connection_options, make_connection
from .output import emit, emit_json
from .render import _printable

if TYPE_CHECKING:
    from ..write.cleanup import CleanupReport


@click.command("cleanup")
@click.argument("url")
@click.option(
    "--older-than",
    metavar="DURATION",
    default="24h",
    show_default=True,
    help="Only uploads started at least this long ago (30m, 2h, 7d, 1w; 0 for all), so that "
    "uploads still running, or waiting to be resumed, are left alone.",
)
@click.option("--dry-run", is_flag=True, help="List the uploads that would be aborted; abort none.")
@connection_options
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the uploads as a JSON list (key, upload_id, initiated, aborted).",
)
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
def cleanup_command(
    url: str,
    older_than: str,
    dry_run: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Abort the incomplete multipart uploads under URL (s3://bucket/prefix), left by any tool.

    A multipart upload that was started and never completed or aborted (a killed process, a
    crashed tool, a lost spot instance) keeps every part it received stored, and billed as
    storage, indefinitely, while no object listing (`s3xfer ls`, `aws s3 ls`, the console's
    object list) ever shows it. This lists them (age, key, upload id) and aborts those older
    than --older-than, which deletes their parts.

    \b
    s3xfer cleanup s3://bucket/data --dry-run        what is there
    s3xfer cleanup s3://bucket/data --older-than 7d  abort week-old leftovers

    An aborted upload cannot be resumed. A lifecycle rule (AbortIncompleteMultipartUpload)
    on the bucket does the same automatically.
    """
    from ..write.cleanup import cleanup, format_age, parse_age

    age = parse_age(older_than)
    target = S3Url.parse(url)
    connection = make_connection()

    async def run() -> CleanupReport:
        async with open_s3(connection, max_pool_connections=16) as s3:
            return await cleanup(s3, target, older_than=age, dry_run=dry_run)

    report = runner.run(run)
    if as_json:
        emit_json(report.to_json())
        return
    if quiet:
        return
    lines = (
        f"{format_age(report.checked_at - o.upload.initiated):>8}  "
        f"{_printable(o.upload.key)}  {o.upload.upload_id}\n"
        for o in report.stale
    )
    emit("".join(lines).encode())
    count = len(report.stale) if dry_run else report.aborted
    verb = "would abort" if dry_run else "aborted"
    summary = f"{verb} {count:,} incomplete upload{'' if count == 1 else 's'}"
    if age:
        summary += f" ({report.skipped_newer:,} skipped: newer than {older_than.strip()})"
    if report.already_gone:
        summary += f"; {report.already_gone:,} were already gone"
    click.echo(summary, err=True)

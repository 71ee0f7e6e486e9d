"""The commands that read: `ls`, `cat`, `get` and `download`. They load only the read path:
a `cat` pays for no planner, upload engine or botocore client (test_startup.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .. import runner
from ..dataset.keys import S3Url
from ..errors import NoDatasetError, NoSuchKeyError, UsageError
from ..transport.s3 import Connection
from .options import (
    READ_TIMEOUT_FOR_READS,
    SIZE,
    TIMEOUTS_PER_READ,
    apply_bench_profile,
    client_key_option,
    concurrency_is_given,
    concurrency_option,
    connection_options,
    deadline_option,
    make_connection,
    make_limits,
    memory_option,
    read_bench_profile_option,
    unfinished_hint,
    unfinished_option,
    within,
)
from .output import TransferProgress, emit, emit_json
from .render import _printable, human_bytes, render_concurrency_choice

if TYPE_CHECKING:
    from ..read.download import DownloadReport
    from ..read.reader import Dataset, GetReport


def _dataset(url: str, connection: Connection, **options: Any) -> Dataset:
    from ..read.reader import Dataset

    return Dataset(S3Url.parse(url), connection=connection, **options)


@click.command("ls")
@click.argument("url")
@click.argument("pattern", required=False)
@connection_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file, as a list.")
@unfinished_option
def ls_command(
    url: str,
    pattern: str | None,
    as_json: bool,
    unfinished: bool,
) -> None:
    """List the files of the dataset at URL (optionally matching a glob PATTERN).

    Shows each file's size, where it is stored (its own object, or a tar shard) and path.
    A prefix that holds no s3xfer dataset is listed like `aws s3 ls --recursive`: date,
    size and path of every object under it, streamed, with the total at the end. A prefix
    where an s3xfer upload has not finished (slices not finalized) is refused, exit 2, unless
    --unfinished.
    """
    connection = make_connection()

    async def run() -> None:
        async with _dataset(url, connection, unfinished=unfinished) as ds:
            try:
                records = await ds.ls(pattern)
            except NoDatasetError:
                await _ls_objects(ds, pattern, as_json=as_json)
                return
        if as_json:
            from ..dataset import catalog

            emit_json([catalog.to_json(r) for r in records])
            return
        lines = (
            f"{r.size:>14,}  {'shard ' if r.packed else 'object'}  {_printable(r.path)}\n"
            for r in records
        )
        emit("".join(lines).encode())
        total = human_bytes(sum(r.size for r in records))
        click.echo(f"{len(records):,} files, {total}", err=True)

    with unfinished_hint():
        runner.run(run)


async def _ls_objects(ds: Dataset, pattern: str | None, *, as_json: bool) -> None:
    """The objects of a plain prefix, written as they are listed (a page at a time)."""
    import anyio

    count = size = 0
    batch: list[str] = []

    async def flush() -> None:
        if batch:
            text = "".join(batch)
            batch.clear()
            await anyio.to_thread.run_sync(emit, text.encode())

    async for stored in ds.ls_objects(pattern):
        if as_json:
            item = json.dumps(stored.to_json(), ensure_ascii=False)
            batch.append(("[\n  " if count == 0 else ",\n  ") + item)
        else:
            when = stored.last_modified.astimezone().strftime("%Y-%m-%d %H:%M:%S")
            batch.append(f"{when} {stored.size:>14,}  {_printable(stored.path)}\n")
        count += 1
        size += stored.size
        if len(batch) >= 1000:
            await flush()
    if as_json:
        batch.append("[]\n" if count == 0 else "\n]\n")
    await flush()
    if count == 0:
        raise NoDatasetError(f"no s3xfer dataset at {ds.url}, and no objects under it")
    click.echo(
        f"{count:,} objects, {human_bytes(size)} (a plain prefix, not an s3xfer dataset)",
        err=True,
    )


@click.command("cat")
@click.argument("url")
@click.argument("path", required=False)
@memory_option
@connection_options
@client_key_option
@deadline_option
@unfinished_option
def cat_command(
    url: str,
    path: str | None,
    unfinished: bool,
    max_memory: int,
    deadline: float | None,
    encryption_key: bytes | None,
) -> None:
    """Write the file PATH of the dataset at URL to standard output.

    One small catalog GET finds it, one ranged GET fetches it, and its CRC32 is checked
    before a single byte is written. Without PATH, URL names one plain object (s3://bucket/key)
    or a dataset's file (s3://bucket/dataset/path: the prefixes above the key are tried for a
    dataset, nearest first, one small GET each); with PATH under a prefix that holds no
    dataset, the object URL/PATH is written. Plain objects are streamed in 8 MiB ranges
    (--max-memory, if smaller) of the one version first seen; a dataset's file larger than
    --max-memory is still held whole to be checked, with a warning. Under a prefix where an
    s3xfer upload has not finished (slices not finalized), exit 2, unless --unfinished.
    """
    import anyio

    from ..read.reader import OBJECT_RANGE

    limits = make_limits(max_memory=max_memory)
    object_range = min(OBJECT_RANGE, limits.max_memory)
    connection = make_connection(read_timeout=READ_TIMEOUT_FOR_READS)

    def held_whole(file: str, size: int) -> None:
        what = f"the file {file!r}, checked before it is written,"
        raised = limits.memory_for(size, what=what).raised
        if raised:
            click.echo(f"s3xfer: warning: {raised}", err=True)

    async def write(data: bytes) -> None:
        await anyio.to_thread.run_sync(emit, data)

    async def run() -> None:
        with within(deadline):
            await cat(
                _dataset(
                    url,
                    connection,
                    max_timeouts=TIMEOUTS_PER_READ,
                    unfinished=unfinished,
                    encryption_key=encryption_key,
                )
            )

    async def cat(dataset: Dataset) -> None:
        async with dataset as ds:
            if path is None:
                try:
                    await ds.read_object("", write, range_size=object_range)
                except NoSuchKeyError:
                    # s3://bucket/dataset/path names a dataset's file as well as an object.
                    from ..read.reader import read_enclosed

                    found = await read_enclosed(
                        ds.url, connection=connection, max_timeouts=TIMEOUTS_PER_READ
                    )
                    if found is None:
                        raise
                    held_whole(found[1], len(found[2]))
                    await write(found[2])
                return
            try:
                record = await ds.stat(path)
            except NoDatasetError as no_dataset:
                try:
                    await ds.read_object(path, write, range_size=object_range)
                except NoSuchKeyError:
                    where = ds.url.key(path)
                    raise NoDatasetError(
                        f"{no_dataset}, and no object s3://{ds.url.bucket}/{where}"
                    ) from None
            else:
                held_whole(path, record.size)
                await write(await ds.read(path))

    try:
        with unfinished_hint():
            runner.run(run)
    except BrokenPipeError:  # `s3xfer cat ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@click.command("get")
@click.argument("url")
@click.argument("args", nargs=-1, required=True)
@click.option(
    "--gap",
    type=SIZE,
    default="256KiB",
    show_default=True,
    help="Merge ranges of one shard closer than this into one GET.",
)
@concurrency_option("GETs in flight at once.")
@memory_option
@click.option("--overwrite", is_flag=True, help="Replace files that already exist in DEST.")
@read_bench_profile_option
@connection_options
@client_key_option
@deadline_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@unfinished_option
def get_command(
    url: str,
    args: tuple[str, ...],
    unfinished: bool,
    encryption_key: bytes | None,
    gap: int,
    concurrency: int,
    max_memory: int,
    overwrite: bool,
    bench_profile: str | None,
    as_json: bool,
    deadline: float | None,
) -> None:
    """Fetch the files of the dataset at URL matching GLOB... into DEST.

    \b
    s3xfer get s3://bucket/data 'images/07/*' labels/000.json ./out

    Ranges of one shard closer than --gap are merged into one GET (never a multi-range
    header); every response must be 206 with the asked Content-Range, and every file's CRC32
    is checked. Files are fetched in batches of at most --max-memory (64 MiB at most); a file
    larger than --max-memory is held whole, with a warning. Files keep their mtime and mode;
    nothing is written outside DEST.
    """
    if len(args) < 2:
        raise UsageError("give at least one GLOB and a DEST directory")
    tuned: dict[str, Any] = {"concurrency": concurrency, "bench_profile": bench_profile}
    apply_bench_profile(tuned, command="get")
    limits = make_limits(concurrency=tuned["concurrency"], max_memory=max_memory)
    *patterns, dest = args
    connection = make_connection(read_timeout=READ_TIMEOUT_FOR_READS)

    async def run() -> GetReport | DownloadReport:
        with within(deadline):
            report = await fetch()
        return report

    async def fetch() -> GetReport | DownloadReport:
        dataset = _dataset(
            url,
            connection,
            gap=gap,
            concurrency=limits.concurrency,
            max_attempts=limits.max_attempts,
            max_timeouts=TIMEOUTS_PER_READ,
            unfinished=unfinished,
            encryption_key=encryption_key,
        )
        async with dataset as ds:
            try:
                return await ds.get(
                    patterns, Path(dest), overwrite=overwrite, max_memory=limits.max_memory
                )
            except NoDatasetError:
                pass
        # A plain prefix: its objects matching the globs, as `download --include` takes them.
        return await download(
            ds.url,
            Path(dest),
            connection=connection,
            include=patterns,
            overwrite=overwrite,
            limits=limits,
            gap=gap,
            unfinished=unfinished,
        )

    from ..read.download import DownloadReport, download

    with unfinished_hint():
        report = runner.run(run)
    for warning in report.warnings:
        click.echo(f"s3xfer: warning: {warning}", err=True)
    if isinstance(report, DownloadReport):
        _print_prefix_get(report, as_json=as_json)
        return
    if as_json:
        emit_json(report.to_json())
    else:
        click.echo(
            f"fetched {report.files:,} files, {human_bytes(report.bytes)} with {report.gets:,} "
            f"GETs (+{report.catalog_requests} catalog reads) in {report.seconds:.2f} s into {dest}"
        )
    for path, error in report.failures:  # as download names them: on stderr, one line each
        click.echo(f"s3xfer: FAILED {_printable(path)}: {error}", err=True)
    if report.failures:
        sys.exit(1)


def _print_prefix_get(report: DownloadReport, *, as_json: bool) -> None:
    if as_json:
        emit_json(report.to_json())
    else:
        click.echo(
            f"fetched {report.files_downloaded:,} objects, {human_bytes(report.bytes_downloaded)}"
            f" with {report.requests:,} requests in {report.seconds:.2f} s into {report.dest} "
            f"(a plain prefix; {report.files_skipped:,} already there)"
        )
    for path, reason in report.refused:
        click.echo(f"s3xfer: REFUSED {_printable(path)}: {reason}", err=True)
    for path, error in report.failures:
        click.echo(f"s3xfer: FAILED {_printable(path)}: {error}", err=True)
    if not report.ok:
        sys.exit(1)


@click.command("download")
@click.argument("url")
@click.argument("dest", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--include",
    multiple=True,
    metavar="GLOB",
    help="Restore only files matching this glob (repeatable).",
)
@click.option(
    "--exclude", multiple=True, metavar="GLOB", help="Skip files matching this glob (repeatable)."
)
@click.option("--overwrite", is_flag=True, help="Replace existing files that differ.")
@concurrency_option(
    "GETs in flight at once (ranges of large objects: only as many as --max-memory holds "
    "whole). Without it, found during the download.",
    tuned=True,
)
@memory_option
@click.option(
    "--range-size",
    type=SIZE,
    default="16MiB",
    show_default=True,
    help="Size of the ranged GETs of large objects and shards.",
)
@read_bench_profile_option
@connection_options
@client_key_option
@click.option("--json", "as_json", is_flag=True, help="Print the final report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@unfinished_option
def download_command(
    url: str,
    dest: Path,
    unfinished: bool,
    encryption_key: bytes | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    overwrite: bool,
    concurrency: int,
    max_memory: int,
    range_size: int,
    bench_profile: str | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Download URL (s3://bucket/prefix) into DEST, verified.

    \b
    - An s3xfer dataset is restored exactly: every file, from its own object or from its tar
      shard (large sequential ranged GETs split into files as they arrive), with its mtime
      and mode, each checked against its catalogued CRC32.
    - Any other prefix is downloaded like `aws s3 cp --recursive`, checking the checksums S3
      stored where there are any. A prefix where an s3xfer upload has not finished (a
      sliced upload not finalized: no manifest yet) is refused, exit 2, unless --unfinished.
    - Large objects come as parallel ranged GETs into a temporary file, renamed into place
      only when complete and verified; an interrupted download resumes where it stopped.
    - Files already present and identical are skipped; others that exist are kept unless
      --overwrite. Nothing is ever written outside DEST: unsafe names are refused and listed.
    """
    from ..read.download import download

    tuned: dict[str, Any] = {
        "concurrency": concurrency,
        "range_size": range_size,
        "bench_profile": bench_profile,
    }
    apply_bench_profile(tuned, command="download")
    limits = make_limits(
        concurrency=tuned["concurrency"],
        max_memory=max_memory,
        auto_concurrency=not concurrency_is_given(),
    )
    range_size = tuned["range_size"]
    connection = make_connection()
    progress = TransferProgress(
        quiet=quiet or as_json, desc="download", skipped_note="already present and identical"
    )

    async def run() -> DownloadReport:
        return await download(
            S3Url.parse(url),
            dest,
            connection=connection,
            include=include,
            exclude=exclude,
            overwrite=overwrite,
            limits=limits,
            range_size=range_size,
            on_start=progress.start,
            on_progress=progress.advance,
            unfinished=unfinished,
            encryption_key=encryption_key,
        )

    try:
        with unfinished_hint():
            report = runner.run(run)
    finally:
        progress.close()
    for warning in report.warnings:
        click.echo(f"s3xfer: warning: {warning}", err=True)
    if as_json:
        emit_json(report.to_json())
    elif not quiet:
        click.echo(
            f"downloaded {report.files_downloaded:,} files, "
            f"{human_bytes(report.bytes_downloaded)} in {report.seconds:.1f} s "
            f"({report.mb_per_s:.1f} MB/s) from {report.source} ({report.kind}) into {dest}"
        )
        click.echo(
            f"  skipped {report.files_skipped:,} identical files, requests "
            f"{report.requests:,}, retries {report.retries:,}, failed "
            f"{report.files_failed:,}, refused {len(report.refused):,}"
        )
        if report.concurrency.get("mode") == "auto":
            click.echo(render_concurrency_choice(report.concurrency))
        if report.files_downloaded == 0 and report.ok:
            click.echo("  everything was already here: nothing transferred")
    for path, reason in report.refused:
        click.echo(f"s3xfer: REFUSED {path!r}: {reason}", err=True)
    for path, error in report.failures:
        click.echo(f"s3xfer: FAILED {_printable(path)}: {error}", err=True)
    if not report.ok:
        sys.exit(1)

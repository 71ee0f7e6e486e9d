"""The commands that write a dataset: `survey`, `plan`, `upload` and `finalize` (of an upload
run in slices)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .. import runner
from ..config import ObjectOptions, PriceTable, TransferConfig, parse_metadata
from ..dataset.coding import IDENTITY, CompressMode
from ..dataset.keys import S3Url
from ..errors import UsageError
from ..limits import RunLimits
from ..planning.globs import NO_FILTER, PathFilter
from ..transport.s3 import Connection
from .distributed import check_broker, upload_with_broker, workers_summary
from .options import (
    apply_bench_profile,
    break_lease_option,
    client_key_option,
    concurrency_is_given,
    concurrency_option,
    connection_options,
    encryption_options,
    given,
    make_connection,
    make_limits,
    make_selection,
    plan_options,
    selection_options,
)
from .output import TransferProgress, emit_json, upload_progress
from .render import _printable, human_bytes, render_plan, render_report, render_survey

if TYPE_CHECKING:
    from ..planning.plan import Plan
    from ..planning.survey import Survey
    from ..write.compress import CompressionSummary
    from ..write.upload import UploadReport


def upload_limits(options: dict[str, Any], *, max_memory: int) -> RunLimits:
    """The run limits of `upload`: --concurrency (tuned when not given) and `max_memory`."""
    return make_limits(
        concurrency=options["concurrency"],
        auto_concurrency=not concurrency_is_given(),
        max_memory=max_memory,
    )


def make_config(**options: Any) -> TransferConfig:
    return TransferConfig(
        max_memory=options["max_memory"],
        part_size=options["part_size"],
        multipart_threshold=options["multipart_threshold"],
        key_prefix=options["key_prefix"],
        pack=not options["no_pack"],
        pack_threshold=options["pack_threshold"],
        shard_size=options["shard_size"],
        prices=PriceTable(
            put_per_1000=options["price_put"], storage_gb_month=options["price_storage"]
        ),
        objects=ObjectOptions(
            content_type=options["content_type"],
            guess_content_type=not options["no_guess_mime_type"],
            storage_class=options["storage_class"].upper() if options["storage_class"] else None,
            metadata=parse_metadata(options["metadata"]),
        ),
    )


# What a plan says to send: given with `upload --plan`, they would be silently ignored.
# What shapes a plan: with `upload --plan`, the saved plan's values hold and these are refused.
_PLAN_ONLY = (
    "include",
    "exclude",
    "content_type",
    "no_guess_mime_type",
    "storage_class",
    "metadata",
    "part_size",
    "multipart_threshold",
    "pack_threshold",
    "shard_size",
    "no_pack",
    "key_prefix",
    "price_put",
    "price_storage",
    "bench_profile",
)


@contextmanager
def survey_progress(quiet: bool) -> Iterator[Callable[[int, int], None]]:
    from tqdm import tqdm

    bar = tqdm(
        desc="survey", unit=" files", disable=True if quiet else None, file=sys.stderr, leave=False
    )

    def update(files: int, total_bytes: int) -> None:
        bar.n = files
        bar.set_postfix_str(human_bytes(total_bytes), refresh=True)

    try:
        yield update
    finally:
        bar.close()


def run_survey(path: Path, *, quiet: bool, selection: PathFilter = NO_FILTER) -> Survey:
    from ..planning.survey import survey

    with survey_progress(quiet) as progress:
        return survey(path, on_progress=progress, selection=selection)


@click.command("survey")
@click.argument("path", type=click.Path(path_type=Path))
@selection_options
@click.option("--json", "as_json", is_flag=True, help="Print the survey as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
def survey_command(
    path: Path, include: tuple[str, ...], exclude: tuple[str, ...], as_json: bool, quiet: bool
) -> None:
    """Walk PATH once and summarise its file sizes.

    Prints the count, total bytes, min / max / mean / median / standard deviation, a log2
    size histogram, the largest files, and every path that cannot be uploaded (permission
    denied, broken or looping symlinks, fifos, sockets, devices) without stopping.
    """
    selection = make_selection(include, exclude)
    result = run_survey(path, quiet=quiet or as_json, selection=selection)
    if as_json:
        emit_json(result.to_json())
    else:
        click.echo(render_survey(result))


@click.command("plan")
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("dest")
@plan_options
@selection_options
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the plan to this file (gzip when it ends in .gz) for `upload --plan`.",
)
@click.option(
    "--compress",
    type=click.Choice([m.value for m in CompressMode]),
    default=CompressMode.NONE.value,
    show_default=True,
    help="Show what `upload --compress` would store: reads and compresses the files it would "
    "(the plan file does not keep it: give --compress to upload).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan summary as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
def plan_command(
    path: Path,
    dest: str,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    output: Path | None,
    compress: str,
    as_json: bool,
    quiet: bool,
    **options: Any,
) -> None:
    """Plan the upload of PATH to DEST (s3://bucket/prefix) without sending anything.

    Files at or above the multipart threshold become multipart uploads with a part size
    fitted to S3's limits and the memory budget; the others become single PUTs. Shows the
    objects, parts, requests, bytes and an estimated request and storage cost.
    """
    from ..planning.plan import make_plan
    from ..planning.planfile import save_plan

    url = S3Url.parse(dest)
    rate = apply_bench_profile(options, command="plan")
    config = make_config(**options)
    selection = make_selection(include, exclude)
    plan = make_plan(run_survey(path, quiet=quiet or as_json, selection=selection), url, config)
    seconds = plan.estimate.bytes / (rate * 1e6) if rate else None
    saving = None
    if compress != CompressMode.NONE:
        from ..write.compress import measure_compression

        async def measure() -> CompressionSummary:
            _chosen, summary = await measure_compression(
                plan, CompressMode(compress), base=IDENTITY
            )
            return summary

        saving = runner.run(measure)
    if output is not None:
        save_plan(plan, output)
    if as_json:
        summary = plan.to_json()
        del summary["units"]
        del summary["shards"]
        summary["output"] = str(output) if output else None
        summary["estimated_seconds"] = round(seconds, 1) if seconds is not None else None
        if saving is not None:
            summary["compression"] = {
                "mode": compress,
                "files": saving.files,
                "original_bytes": saving.original_bytes,
                "stored_bytes": saving.stored_bytes,
            }
        emit_json(summary)
    else:
        click.echo(render_plan(plan))
        if saving is not None:
            ratio = saving.original_bytes / saving.stored_bytes if saving.stored_bytes else 1.0
            click.echo(
                f"  --compress {compress:<6} {saving.files:>11,} files compressed, "
                f"{human_bytes(saving.original_bytes)} -> {human_bytes(saving.stored_bytes)} "
                f"({ratio:.1f}x smaller)"
            )
        if seconds is not None:
            click.echo(
                f"  estimated time    {seconds:>11.1f} s at {rate:.0f} MB/s "
                f"(bench profile {options['bench_profile']})"
            )
        if output is not None:
            click.echo(f"plan written to {output}; run it with: s3xfer upload --plan {output}")


@click.command("upload")
@click.argument("path", type=click.Path(path_type=Path), required=False)
@click.argument("dest", required=False)
@click.option(
    "--plan",
    "plan_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Execute a plan saved by `s3xfer plan --output` instead of PATH DEST.",
)
@concurrency_option(
    "Requests in flight at once (also the connection pool size); parts of large files only "
    "as many as --max-memory holds. Without it, found during the upload.",
    tuned=True,
)
@plan_options
@selection_options
@connection_options
@encryption_options
@client_key_option
@click.option(
    "--compress",
    type=click.Choice([m.value for m in CompressMode]),
    default=CompressMode.NONE.value,
    show_default=True,
    help="zstd: store every shard member and single-PUT file compressed (files of a "
    "multipart upload stay as they are); auto: only those whose first 64 KiB shrink by a "
    "tenth or more (text, JSON, CSV; not JPEG, zip or random bytes). Each file is read and "
    "compressed once before the upload starts, to lay out its shard.",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    envvar="S3XFER_STATE_DIR",
    default=None,
    help="Where upload journals are kept [env S3XFER_STATE_DIR; default "
    "$XDG_STATE_HOME/s3xfer or ~/.local/state/s3xfer].",
)
@click.option(
    "--slice",
    "slice_text",
    metavar="K/N",
    default=None,
    help="With --plan: upload only slice K of N of the plan's work (a batch job of an array; "
    "`s3xfer finalize --plan` then writes the catalog once every slice has run).",
)
@click.option(
    "--broker",
    metavar="URL",
    default=None,
    help="Spread the upload over the `s3xfer worker`s listening on this Redis "
    "(redis://HOST:6379/0): plan here, enqueue work units, show one progress bar, write the "
    "catalog when every unit is done. Needs the extra s3xfer[distributed].",
)
@click.option(
    "--keep-deleted",
    is_flag=True,
    help="Keep files deleted or renamed in the tree since the last upload in the dataset "
    "(and their objects), restorable as before. By default the dataset is made equal to the "
    "tree, like `rclone sync`.",
)
@break_lease_option
@click.option("--json", "as_json", is_flag=True, help="Print the final report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
def upload_command(
    path: Path | None,
    dest: str | None,
    plan_file: Path | None,
    keep_deleted: bool,
    break_lease: bool,
    as_json: bool,
    quiet: bool,
    sse: str | None,
    sse_kms_key_id: str | None,
    state_dir: Path | None,
    slice_text: str | None,
    broker: str | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    encryption_key: bytes | None,
    compress: str,
    **options: Any,
) -> None:
    """Upload PATH to DEST (s3://bucket/prefix), or execute a saved --plan.

    \b
    - Files unchanged since the last upload to DEST (same size, mtime, mode and key in the
      manifest at DEST/.s3xfer/manifest.json.gz) are skipped: a re-run sends no PUT.
    - The dataset is made equal to the tree: files deleted or renamed since the last upload
      leave it, and objects nothing refers to any more are deleted once the new manifest is
      written (--keep-deleted keeps them).
    - Every object and part carries a CRC32 that S3 verifies; multipart uploads also carry
      the full-object CRC32. Failed multipart uploads are aborted.
    - Throttling, 5xx, timeouts and connection errors are retried with backoff; on SlowDown
      the number of requests in flight is halved, then grows back.
    - Progress is journaled as it happens (--state-dir): after a crash, kill -9 or Ctrl-C,
      running the same command again skips what was done, continues the multipart uploads
      of large files (parts already in S3 are verified, not re-sent) and rebuilds any shard
      that was in flight.
    - One writer at a time: an upload that will write takes DEST's lease
      (DEST/.s3xfer/lease.json) first; while another s3xfer holds it, it stops with exit 6
      and writes nothing.
    - Exit code 0 when every file was uploaded, 1 when any failed (each is named).
    - --sse encrypts every object written (PutObject and CreateMultipartUpload carry it).
    - --encryption-key FILE encrypts every file on this machine before it is sent
      (AES-256-GCM): S3 never sees its bytes; every read needs the same key.
    - --include/--exclude choose the files (download's globs); the dataset's files outside
      them are left alone. Content-Types are guessed per file as `aws s3 cp` does
      (--content-type, --no-guess-mime-type); --storage-class and --metadata go on the
      objects holding file data. Changing these on a re-run does not rewrite unchanged files.
    """
    from ..planning.plan import make_plan, parse_slice
    from ..planning.planfile import load_plan

    connection = make_connection(sse=sse, sse_kms_key_id=sse_kms_key_id)
    if broker is not None:
        check_broker(broker, slice_text)
    coded = encryption_key is not None or compress != CompressMode.NONE
    if coded and (broker is not None or slice_text is not None):
        raise UsageError("--encryption-key and --compress do not work with --broker or --slice yet")
    if keep_deleted and slice_text is not None:
        raise UsageError(
            "--keep-deleted applies where the manifest is written: give it to `s3xfer finalize`"
        )
    if break_lease and slice_text is not None:
        raise UsageError(
            "--break-lease applies where the manifest is written (a slice takes no lease): "
            "give it to `s3xfer finalize`"
        )
    selection = make_selection(include, exclude)
    if plan_file is not None:
        if path is not None or dest is not None:
            raise UsageError("give either PATH DEST or --plan, not both")
        reshaping = [name for name in _PLAN_ONLY if given(name)]
        if reshaping:
            flags = ", ".join("--" + name.replace("_", "-") for name in reshaping)
            raise UsageError(f"{flags}: give them to `s3xfer plan`, the plan keeps them")
        plan = load_plan(plan_file)
        # The budget the plan's parts were fitted to, unless one is given for this run.
        max_memory = options["max_memory"] if given("max_memory") else plan.config.max_memory
        limits = upload_limits(options, max_memory=max_memory)
    else:
        if path is None or dest is None:
            raise UsageError("missing PATH and DEST (or --plan FILE); see s3xfer upload --help")
        url = S3Url.parse(dest)
        apply_bench_profile(options, command="upload")
        config = make_config(**options)
        limits = upload_limits(options, max_memory=options["max_memory"])
        if broker is None and slice_text is None and encryption_key is None:
            # Nothing changed since the last upload? Told by one walk beside the manifest,
            # before planning anything (write/rerun.py); else planned and uploaded as usual.
            # Not with --encryption-key: whether each file is stored as the key asks is the
            # upload's to tell (files stored in the clear are sent again, encrypted).
            unchanged = runner.run(
                run_unchanged_upload,
                path,
                url,
                config,
                limits,
                connection,
                selection,
                keep_deleted,
                state_dir,
            )
            if unchanged is not None:
                present_upload(unchanged, as_json=as_json, quiet=quiet)
                return
        tree = run_survey(path, quiet=quiet or as_json, selection=selection)
        plan = make_plan(tree, url, config)
    progress = upload_progress(quiet=quiet or as_json)
    try:
        if broker is not None:
            report = upload_with_broker(
                plan,
                limits,
                connection,
                broker,
                progress,
                keep_deleted=keep_deleted,
                break_lease=break_lease,
            )
        elif slice_text is not None:
            if plan_file is None:
                raise UsageError("--slice needs --plan: every job of the array must run one plan")
            index, count = parse_slice(slice_text)
            report = runner.run(
                run_upload_slice, plan, limits, connection, progress, state_dir, index, count
            )
        else:
            report = runner.run(
                run_upload,
                plan,
                limits,
                connection,
                progress,
                state_dir,
                keep_deleted,
                break_lease,
                encryption_key,
                CompressMode(compress),
            )
    except KeyboardInterrupt:
        progress.close()
        click.echo(
            "s3xfer: interrupted; progress is journaled: run the same command again to resume",
            err=True,
        )
        sys.exit(130)
    finally:
        progress.close()
    present_upload(report, as_json=as_json, quiet=quiet, broker=broker)


def present_upload(
    report: UploadReport, *, as_json: bool, quiet: bool, broker: str | None = None
) -> None:
    """An upload's report on stdout (and its warnings and failures on stderr); exit 1 unless
    every file was uploaded."""
    for warning in report.warnings:
        click.echo(f"s3xfer: warning: {warning}", err=True)
    if as_json:
        emit_json(report.to_json())
    elif not quiet:
        click.echo(render_report(report))
        if broker is not None:
            click.echo(workers_summary(report))
    if not report.ok:
        if quiet:
            for failed_path, error in report.failures:
                click.echo(f"s3xfer: FAILED {_printable(failed_path)}: {error}", err=True)
            for skipped_path, reason in report.unreadable:
                click.echo(f"s3xfer: NOT UPLOADED {_printable(skipped_path)}: {reason}", err=True)
        sys.exit(1)


async def run_unchanged_upload(
    path: Path,
    dest: S3Url,
    config: TransferConfig,
    limits: RunLimits,
    connection: Connection,
    selection: PathFilter,
    keep_deleted: bool,
    state_dir: Path | None = None,
) -> UploadReport | None:
    from ..write.rerun import unchanged_upload

    return await unchanged_upload(
        path,
        dest,
        config,
        connection,
        selection=selection,
        keep_deleted=keep_deleted,
        state_dir=state_dir,
        limits=limits,
    )


async def run_upload_slice(
    plan: Plan,
    limits: RunLimits,
    connection: Connection,
    progress: TransferProgress,
    state_dir: Path | None,
    index: int,
    count: int,
) -> UploadReport:
    from ..distributed.slices import upload_slice

    return await upload_slice(
        plan,
        index,
        count,
        connection,
        on_start=progress.start,
        on_progress=progress.advance,
        state_dir=state_dir,
        limits=limits,
    )


@click.command("finalize")
@click.option(
    "--plan",
    "plan_file",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The plan every slice ran.",
)
@connection_options
@click.option(
    "--keep-deleted",
    is_flag=True,
    help="Keep files no longer in the plan's tree in the dataset (and their objects), as "
    "`upload --keep-deleted` does.",
)
@break_lease_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def finalize_command(
    plan_file: Path,
    keep_deleted: bool,
    break_lease: bool,
    as_json: bool,
) -> None:
    """Write the manifest and catalog of a plan uploaded in slices (upload --plan P --slice
    K/N on many machines), once every slice has run.

    \b
    Refuses, naming them, when slices have no result yet. Files a slice failed are named
    and make the exit code 1; everything else is catalogued. The dataset is made equal to
    the plan's tree, as `upload` does (--keep-deleted keeps files no longer in it). Running
    it again is harmless.
    """
    from ..distributed.slices import finalize
    from ..planning.planfile import load_plan

    connection = make_connection()
    plan = load_plan(plan_file)

    async def run() -> UploadReport:
        return await finalize(plan, connection, keep_deleted=keep_deleted, break_lease=break_lease)

    report = runner.run(run)
    for warning in report.warnings:
        click.echo(f"s3xfer: warning: {warning}", err=True)
    if as_json:
        emit_json(report.to_json())
    else:
        click.echo(render_report(report).replace("uploaded", "catalogued", 1))
    if not report.ok:
        sys.exit(1)


async def run_upload(
    plan: Plan,
    limits: RunLimits,
    connection: Connection,
    progress: TransferProgress,
    state_dir: Path | None = None,
    keep_deleted: bool = False,
    break_lease: bool = False,
    encryption_key: bytes | None = None,
    compress: CompressMode = CompressMode.NONE,
) -> UploadReport:
    from ..write.upload import upload

    return await upload(
        plan,
        connection,
        on_start=progress.start,
        on_progress=progress.advance,
        state_dir=state_dir,
        keep_deleted=keep_deleted,
        break_lease=break_lease,
        encryption_key=encryption_key,
        limits=limits,
        compress=compress,
    )

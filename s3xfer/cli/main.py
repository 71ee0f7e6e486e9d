"""The `s3xfer` command line. Presentation only: parsing (click), progress (tqdm), tables and
--json; every command is a library call first."""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import select
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from .. import __version__, runner
from ..config import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_MEMORY,
    DEFAULT_MULTIPART_THRESHOLD,
    DEFAULT_PACK_THRESHOLD,
    DEFAULT_PART_SIZE,
    DEFAULT_SHARD_SIZE,
    ObjectOptions,
    PriceTable,
    TransferConfig,
    format_size,
    parse_metadata,
    parse_size,
)
from ..dataset.keys import S3Url
from ..errors import (
    DeadlineError,
    NoDatasetError,
    NoSuchKeyError,
    NotFinalizedError,
    S3XferError,
    UsageError,
    first_leaf,
    redact_credentials,
)
from ..planning.globs import NO_FILTER, PathFilter
from ..transport.s3 import SSE_ALGORITHMS, Connection, open_s3
from .render import _printable, human_bytes, render_plan, render_report, render_survey

# Each command imports what only it needs when it runs: `s3xfer cat` or a download should not
# pay for loading the planner, the upload engine or tqdm (start-up is most of a small fetch).
if TYPE_CHECKING:
    from tqdm import tqdm

    from ..planning.plan import Plan
    from ..planning.survey import Survey
    from ..read.download import DownloadReport
    from ..read.reader import Dataset, GetReport
    from ..write.cleanup import CleanupReport
    from ..write.upload import UploadReport

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def _emit_json(data: Any) -> None:
    emit((json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode())


def emit(data: bytes) -> None:
    """Bytes to standard output, all of them (see write_all); through sys.stdout when it is
    not a real file (tests that capture it)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        buffer = getattr(sys.stdout, "buffer", None)
        if buffer is not None:
            buffer.write(data)
        else:
            sys.stdout.write(data.decode("utf-8", "replace"))
        sys.stdout.flush()
        return
    write_all(fd, data)


class SizeType(click.ParamType):  # type: ignore[type-arg]
    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except UsageError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeType()
_DEFAULT_PRICES = PriceTable()


def plan_options(function: F) -> F:
    """Options that shape a plan, shared by `plan` and `upload`."""
    options = [
        click.option(
            "--concurrency",
            "-c",
            type=click.IntRange(1, 1024),
            default=DEFAULT_CONCURRENCY,
            show_default=True,
            help="Requests in flight at once (also the connection pool size); parts of large "
            "files only as many as --max-memory holds.",
        ),
        click.option(
            "--max-memory",
            type=SIZE,
            default=format_size(DEFAULT_MAX_MEMORY),
            show_default=True,
            help="Hard budget for file bytes buffered in memory (e.g. 256MiB, 1GiB).",
        ),
        click.option(
            "--part-size",
            type=SIZE,
            default=format_size(DEFAULT_PART_SIZE),
            show_default=True,
            help="Preferred multipart part size; raised when S3's 10,000-part limit requires it.",
        ),
        click.option(
            "--multipart-threshold",
            type=SIZE,
            default=format_size(DEFAULT_MULTIPART_THRESHOLD),
            show_default=True,
            help="Files at least this large are uploaded in parallel parts.",
        ),
        click.option(
            "--bench-profile",
            metavar="NAME",
            default=None,
            help="Take concurrency and part size from a profile saved by `s3xfer bench --save "
            "NAME` (options given explicitly still win); the plan then estimates the time.",
        ),
        click.option(
            "--pack-threshold",
            type=SIZE,
            default=format_size(DEFAULT_PACK_THRESHOLD),
            show_default=True,
            help="Files smaller than this are packed into tar shards (one object per shard; "
            "each file is still fetchable alone with one ranged GET).",
        ),
        click.option(
            "--shard-size",
            type=SIZE,
            default=format_size(DEFAULT_SHARD_SIZE),
            show_default=True,
            help="Target size of a tar shard.",
        ),
        click.option(
            "--no-pack", is_flag=True, help="Upload every file as its own object (no shards)."
        ),
        click.option(
            "--key-prefix",
            type=click.Choice(["none", "hash"]),
            default="none",
            show_default=True,
            help="'hash' puts a short deterministic hash in front of each key to spread "
            "load over S3 partitions.",
        ),
        click.option(
            "--price-put",
            type=float,
            default=_DEFAULT_PRICES.put_per_1000,
            show_default=True,
            help="USD per 1,000 PUT-class requests, for the estimate.",
        ),
        click.option(
            "--price-storage",
            type=float,
            default=_DEFAULT_PRICES.storage_gb_month,
            show_default=True,
            help="USD per GB-month stored, for the estimate.",
        ),
        click.option(
            "--content-type",
            metavar="TYPE",
            default=None,
            help="Content-Type of every file (e.g. 'text/plain; charset=utf-8'). Default: "
            "guessed from each file's extension, as `aws s3 cp` does.",
        ),
        click.option(
            "--no-guess-mime-type",
            is_flag=True,
            help="Do not guess Content-Types: S3 stores its default (binary/octet-stream).",
        ),
        click.option(
            "--storage-class",
            metavar="CLASS",
            default=None,
            help="Storage class of the objects holding file data (shards and files' own "
            "objects), e.g. STANDARD_IA, INTELLIGENT_TIERING, GLACIER_IR; s3xfer's own "
            "manifest and catalog stay STANDARD. GLACIER and DEEP_ARCHIVE are refused (their "
            "objects cannot be read without a restore).",
        ),
        click.option(
            "--metadata",
            metavar="KEY=VALUE",
            multiple=True,
            help="User metadata (x-amz-meta-KEY) on the objects holding file data (repeatable).",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def selection_options(function: F) -> F:
    """--include / --exclude for the commands that read a local tree (survey, plan, upload):
    the same globs, matched the same way, as download's."""
    options = [
        click.option(
            "--include",
            multiple=True,
            metavar="GLOB",
            help="Only files whose path (relative to PATH) matches this glob (repeatable; "
            "'*' also matches '/', as for download).",
        ),
        click.option(
            "--exclude",
            multiple=True,
            metavar="GLOB",
            help="Leave out files matching this glob (repeatable). A re-upload leaves the "
            "dataset's files outside --include/--exclude alone.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def make_selection(include: tuple[str, ...], exclude: tuple[str, ...]) -> PathFilter:
    try:
        return PathFilter(include, exclude)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


_OWNER_META = "s3xfer.expected_bucket_owner"
_STALL_META = "s3xfer.stall_timeout"
_UNSIGNED_META = "s3xfer.no_sign_request"
_READ_META = "s3xfer.read_timeout"
# cat and get: a response that has not started within 10 s is cut and tried once more, then
# the read fails (RetryPolicy.max_timeouts): an endpoint that accepts connections and never
# answers fails them in about 20 s, not 10 x 60 s.
READ_TIMEOUT_FOR_READS = 10.0
TIMEOUTS_PER_READ = 2


def _remember_owner(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    ctx.meta[_OWNER_META] = value


def _remember_unsigned(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    ctx.meta[_UNSIGNED_META] = value


def _remember_stall_timeout(ctx: click.Context, _param: click.Parameter, value: float) -> None:
    ctx.meta[_STALL_META] = value


def _remember_read_timeout(
    ctx: click.Context, _param: click.Parameter, value: float | None
) -> None:
    ctx.meta[_READ_META] = value


break_lease_option = click.option(
    "--break-lease",
    is_flag=True,
    help="Take DEST's lease (DEST/.s3xfer/lease.json) even while another s3xfer holds it: "
    "only when that one was killed and you cannot wait the 5 minutes its lease takes to "
    "expire. A writer still alive whose lease is taken stops at its next renewal, writing "
    "no manifest.",
)


def connection_options(function: F) -> F:
    """Endpoint and credentials the way AWS users expect (AWS_* variables and ~/.aws work too).

    --expected-bucket-owner is not passed to the command: make_connection reads it from the
    click context, so every command built on these options (bench too) sends it."""
    options = [
        click.option(
            "--endpoint-url",
            default=None,
            help="S3-compatible endpoint, e.g. http://127.0.0.1:8333 (else, as for awscli: "
            "AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, the profile's endpoint_url or services).",
        ),
        click.option("--profile", default=None, help="Named profile from ~/.aws/config."),
        click.option("--region", default=None, help="AWS region (default from the profile)."),
        click.option(
            "--no-verify-ssl",
            is_flag=True,
            help="Do not verify TLS certificates (insecure; warns).",
        ),
        click.option(
            "--no-sign-request",
            is_flag=True,
            expose_value=False,
            callback=_remember_unsigned,
            help="Send requests unsigned, without credentials (public buckets).",
        ),
        click.option(
            "--expected-bucket-owner",
            metavar="ACCOUNT_ID",
            default=None,
            expose_value=False,
            callback=_remember_owner,
            help="Send this AWS account id with every request: S3 refuses (403) any request to "
            "a bucket owned by another account, e.g. a deleted bucket's name taken over.",
        ),
        click.option(
            "--stall-timeout",
            metavar="SECONDS",
            type=click.FloatRange(min=0.1),
            default=60.0,
            show_default=True,
            expose_value=False,
            callback=_remember_stall_timeout,
            help="Cut and retry a request whose response makes no progress for this long.",
        ),
        click.option(
            "--read-timeout",
            metavar="SECONDS",
            type=click.FloatRange(min=0.1),
            default=None,
            expose_value=False,
            callback=_remember_read_timeout,
            help="Cut and retry a response that has not started, or stopped arriving, for "
            f"this long. Default: {READ_TIMEOUT_FOR_READS:g} for cat and get (a read that "
            f"times out {TIMEOUTS_PER_READ} times fails), else --stall-timeout.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def encryption_options(function: F) -> F:
    """Server-side encryption of the objects written (upload)."""
    options = [
        click.option(
            "--sse",
            type=click.Choice(SSE_ALGORITHMS),
            default=None,
            help="Server-side encryption of every object written: AES256 (S3-managed keys) or "
            "aws:kms (with --sse-kms-key-id, or the account's default KMS key). With aws:kms, "
            "ETags are not MD5 digests; s3xfer checks CRC32 checksums instead.",
        ),
        click.option(
            "--sse-kms-key-id",
            metavar="KEY",
            default=None,
            help="KMS key id, ARN or alias for --sse aws:kms.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def make_connection(
    endpoint_url: str | None,
    profile: str | None,
    region: str | None,
    no_verify_ssl: bool,
    *,
    sse: str | None = None,
    sse_kms_key_id: str | None = None,
    read_timeout: float | None = None,
) -> Connection:
    """The Connection of a command; --expected-bucket-owner, --stall-timeout and
    --read-timeout come from the click context (see connection_options). `read_timeout`:
    the command's own default for the last."""
    if sse_kms_key_id and sse != "aws:kms":
        raise UsageError("--sse-kms-key-id needs --sse aws:kms")
    context = click.get_current_context(silent=True)
    meta = context.meta if context is not None else {}
    connection = Connection(  # checks the endpoint URL and the other values
        endpoint_url=endpoint_url or None,
        profile=profile,
        region=region,
        verify_ssl=not no_verify_ssl,
        sse=sse,
        sse_kms_key_id=sse_kms_key_id,
        expected_bucket_owner=meta.get(_OWNER_META),
        stall_timeout=meta.get(_STALL_META, 60.0),
        unsigned=bool(meta.get(_UNSIGNED_META)),
        read_timeout=meta.get(_READ_META) or read_timeout,
    )
    if no_verify_ssl:
        click.echo("s3xfer: warning: TLS certificate verification is off", err=True)
    return connection


def apply_bench_profile(options: dict[str, Any], *, command: str) -> float | None:
    """Fill options the user did not give from `--bench-profile`; the measured MB/s for the
    plan's time estimate (None without a profile)."""
    name = options.get("bench_profile")
    if not name:
        return None
    from ..bench.sweep import load_profile, settings_for

    recommendation = load_profile(name)
    context = click.get_current_context()
    for option, value in settings_for(recommendation, command=command).items():
        if option in options and (
            context.get_parameter_source(option) is click.core.ParameterSource.DEFAULT
        ):
            options[option] = value
    ops = ("put", "multipart") if command in ("upload", "plan") else ("get", "range")
    rates = [k.mb_per_s for k in recommendation.knees if k.op in ops]
    return max(rates) if rates else None


def make_config(**options: Any) -> TransferConfig:
    return TransferConfig(
        concurrency=options["concurrency"],
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
# What bounds a run, not what it sends: given with `upload --plan`, they replace the plan's.
_RUN_LIMITS = ("concurrency", "max_memory")


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


class TransferProgress:
    """One bar for bytes and files, with rate and ETA; silent when not a terminal. The same
    for uploads and downloads: `skipped_note` says what the files left alone were."""

    def __init__(self, *, quiet: bool, desc: str, skipped_note: str) -> None:
        self.quiet = quiet
        self.desc = desc
        self.skipped_note = skipped_note
        self.bar: tqdm[Any] | None = None
        self.files_total = 0
        self.files_done = 0

    def start(self, files: int, total_bytes: int, skipped: int) -> None:
        self.files_total = files
        if self.quiet or not sys.stderr.isatty():
            return  # no bar: tqdm is not even loaded
        from tqdm import tqdm

        self.bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=self.desc,
            file=sys.stderr,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        if skipped:
            self.bar.write(f"{skipped:,} files {self.skipped_note}: skipped")
        self._postfix()

    def advance(self, nbytes: int, files: int) -> None:
        if self.bar is None:
            return
        self.files_done += files
        self.bar.update(nbytes)  # negative when a failed file's parts are taken back
        if files:
            self._postfix()

    def _postfix(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(
                f"{self.files_done:,}/{self.files_total:,} files", refresh=False
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def upload_progress(*, quiet: bool) -> TransferProgress:
    return TransferProgress(
        quiet=quiet, desc="upload", skipped_note="unchanged since the last upload"
    )


class _Commands(click.Group):
    """s3xfer's commands; `bench` (with the benchmark engine behind it) loads only when named,
    or when every command is listed (--help)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), "bench"})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "bench":
            from .bench import bench_command

            return bench_command
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=_Commands,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="s3xfer")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Fast, verified, resumable bulk transfers of datasets to and from S3.

    \b
    Typical use:
      s3xfer survey ./dataset                       what is there
      s3xfer plan ./dataset s3://bucket/data        what will be sent, at what cost
      s3xfer upload ./dataset s3://bucket/data      send it, with progress
      s3xfer local-s3                               a throwaway S3 server to try it on
      s3xfer demo                                   all of the above, end to end

    Credentials and endpoint come from the usual AWS places: AWS_* environment variables,
    ~/.aws/config and ~/.aws/credentials, --profile, --endpoint-url.
    """
    ctx.obj = {"debug": debug}


@cli.command("survey")
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
        _emit_json(result.to_json())
    else:
        click.echo(render_survey(result))


@cli.command("plan")
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
@click.option("--json", "as_json", is_flag=True, help="Print the plan summary as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
def plan_command(
    path: Path,
    dest: str,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    output: Path | None,
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
    if output is not None:
        save_plan(plan, output)
    if as_json:
        summary = plan.to_json()
        del summary["units"]
        del summary["shards"]
        summary["output"] = str(output) if output else None
        summary["estimated_seconds"] = round(seconds, 1) if seconds is not None else None
        _emit_json(summary)
    else:
        click.echo(render_plan(plan))
        if seconds is not None:
            click.echo(
                f"  estimated time    {seconds:>11.1f} s at {rate:.0f} MB/s "
                f"(bench profile {options['bench_profile']})"
            )
        if output is not None:
            click.echo(f"plan written to {output}; run it with: s3xfer upload --plan {output}")


@cli.command("upload")
@click.argument("path", type=click.Path(path_type=Path), required=False)
@click.argument("dest", required=False)
@click.option(
    "--plan",
    "plan_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Execute a plan saved by `s3xfer plan --output` instead of PATH DEST.",
)
@plan_options
@selection_options
@connection_options
@encryption_options
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
    endpoint_url: str | None,
    profile: str | None,
    region: str | None,
    no_verify_ssl: bool,
    sse: str | None,
    sse_kms_key_id: str | None,
    state_dir: Path | None,
    slice_text: str | None,
    broker: str | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
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
    - --include/--exclude choose the files (download's globs); the dataset's files outside
      them are left alone. Content-Types are guessed per file as `aws s3 cp` does
      (--content-type, --no-guess-mime-type); --storage-class and --metadata go on the
      objects holding file data. Changing these on a re-run does not rewrite unchanged files.
    """
    from ..planning.plan import make_plan, parse_slice
    from ..planning.planfile import load_plan

    connection = make_connection(
        endpoint_url, profile, region, no_verify_ssl, sse=sse, sse_kms_key_id=sse_kms_key_id
    )
    if broker is not None:
        _check_broker(broker, slice_text)
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
        context = click.get_current_context()
        given = [
            name
            for name in _PLAN_ONLY
            if context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
        ]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise UsageError(f"{flags}: give them to `s3xfer plan`, the plan keeps them")
        plan = load_plan(plan_file)
        limits = {
            name: options[name]
            for name in _RUN_LIMITS
            if context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
        }
        if limits:
            plan = dataclasses.replace(plan, config=dataclasses.replace(plan.config, **limits))
    else:
        if path is None or dest is None:
            raise UsageError("missing PATH and DEST (or --plan FILE); see s3xfer upload --help")
        url = S3Url.parse(dest)
        apply_bench_profile(options, command="upload")
        tree = run_survey(path, quiet=quiet or as_json, selection=selection)
        plan = make_plan(tree, url, make_config(**options))
    progress = upload_progress(quiet=quiet or as_json)
    try:
        if broker is not None:
            report = _upload_with_broker(
                plan,
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
            report = runner.run(_upload_slice, plan, connection, progress, state_dir, index, count)
        else:
            report = runner.run(
                _upload, plan, connection, progress, state_dir, keep_deleted, break_lease
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
    for warning in report.warnings:
        click.echo(f"s3xfer: warning: {warning}", err=True)
    if as_json:
        _emit_json(report.to_json())
    elif not quiet:
        click.echo(render_report(report))
        if broker is not None:
            click.echo(_workers_summary(report))
    if not report.ok:
        if quiet:
            for failed_path, error in report.failures:
                click.echo(f"s3xfer: FAILED {_printable(failed_path)}: {error}", err=True)
            for skipped_path, reason in report.unreadable:
                click.echo(f"s3xfer: NOT UPLOADED {_printable(skipped_path)}: {reason}", err=True)
        sys.exit(1)


async def _upload_slice(
    plan: Plan,
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
    )


@cli.command("finalize")
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
    endpoint_url: str | None,
    profile: str | None,
    region: str | None,
    no_verify_ssl: bool,
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

    connection = make_connection(endpoint_url, profile, region, no_verify_ssl)
    plan = load_plan(plan_file)

    async def run() -> UploadReport:
        return await finalize(plan, connection, keep_deleted=keep_deleted, break_lease=break_lease)

    report = runner.run(run)
    for warning in report.warnings:
        click.echo(f"s3xfer: warning: {warning}", err=True)
    if as_json:
        _emit_json(report.to_json())
    else:
        click.echo(render_report(report).replace("uploaded", "catalogued", 1))
    if not report.ok:
        sys.exit(1)


async def _upload(
    plan: Plan,
    connection: Connection,
    progress: TransferProgress,
    state_dir: Path | None = None,
    keep_deleted: bool = False,
    break_lease: bool = False,
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
    )


def _check_broker(broker: str, slice_text: str | None) -> None:
    """Before any survey: the extra is installed, the URL is a Redis URL, no --slice."""
    from ..distributed.jobs import check_broker_url

    check_broker_url(broker)
    if slice_text is not None:
        raise UsageError("give either --broker or --slice, not both")


def _upload_with_broker(
    plan: Plan,
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


def _workers_summary(report: UploadReport) -> str:
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


@cli.command("worker")
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
    from ..distributed.jobs import UnitResult, run_worker
    from ..planning.plan import WorkUnit

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


def _dataset(url: str, connection: Connection, **options: Any) -> Dataset:
    from ..read.reader import Dataset

    return Dataset(S3Url.parse(url), connection=connection, **options)


unfinished_option = click.option(
    "--unfinished",
    is_flag=True,
    help="Take a prefix where an s3xfer upload has not finished (a sliced upload not "
    "finalized, no manifest yet) for a plain prefix: the objects that are there, as they are "
    "(files packed into shards are not among them), instead of refusing.",
)


@contextmanager
def unfinished_hint() -> Iterator[None]:
    """NotFinalizedError, saying how --unfinished would read the prefix anyway."""
    try:
        yield
    except NotFinalizedError as exc:
        raise NotFinalizedError(
            f"{exc}; or pass --unfinished to take the objects that are there as they are"
        ) from None


@cli.command("ls")
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
    endpoint_url: str | None,
    profile: str | None,
    region: str | None,
    no_verify_ssl: bool,
) -> None:
    """List the files of the dataset at URL (optionally matching a glob PATTERN).

    Shows each file's size, where it is stored (its own object, or a tar shard) and path.
    A prefix that holds no s3xfer dataset is listed like `aws s3 ls --recursive`: date,
    size and path of every object under it, streamed, with the total at the end. A prefix
    where an s3xfer upload has not finished (slices not finalized) is refused, exit 2, unless
    --unfinished.
    """
    connection = make_connection(endpoint_url, profile, region, no_verify_ssl)

    async def run() -> None:
        async with _dataset(url, connection, unfinished=unfinished) as ds:
            try:
                records = await ds.ls(pattern)
            except NoDatasetError:
                await _ls_objects(ds, pattern, as_json=as_json)
                return
        if as_json:
            from ..dataset import catalog

            _emit_json([catalog.to_json(r) for r in records])
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


def deadline_option(function: F) -> F:
    """--deadline: the whole command's time, for the reads a person waits on (cat, get)."""
    option = click.option(
        "--deadline",
        metavar="SECONDS",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        help="Give up after this long in all, retries included (exit 3). Default: no limit.",
    )
    return option(function)


@contextmanager
def within(deadline: float | None) -> Iterator[None]:
    """Run the block (in the event loop) under --deadline: DeadlineError once it is past."""
    if deadline is None:
        yield
        return
    import anyio

    with anyio.CancelScope(deadline=anyio.current_time() + deadline) as scope:
        yield
    if scope.cancelled_caught:
        raise DeadlineError(f"gave up after {deadline:g} s (--deadline)")


@cli.command("cat")
@click.argument("url")
@click.argument("path", required=False)
@connection_options
@deadline_option
@unfinished_option
def cat_command(
    url: str,
    path: str | None,
    unfinished: bool,
    endpoint_url: str | None,
    profile: str | None,
    region: str | None,
    no_verify_ssl: bool,
    deadline: float | None,
) -> None:
    """Write the file PATH of the dataset at URL to standard output.

    One small catalog GET finds it, one ranged GET fetches it, and its CRC32 is checked
    before a single byte is written. Without PATH, URL names one plain object (s3://bucket/key)
    or a dataset's file (s3://bucket/dataset/path: the prefixes above the key are tried for a
    dataset, nearest first, one small GET each); with PATH under a prefix that holds no
    dataset, the object URL/PATH is written. Plain
    objects are streamed in 8 MiB ranges of the one version first seen. Under a prefix where
    an s3xfer upload has not finished (slices not finalized), exit 2, unless --unfinished.
    """
    import anyio

    connection = make_connection(
        endpoint_url, profile, region, no_verify_ssl, read_timeout=READ_TIMEOUT_FOR_READS
    )

    async def write(data: bytes) -> None:
        await anyio.to_thread.run_sync(emit, data)

    async def run() -> None:
        with within(deadline):
            await cat(
                _dataset(url, connection, max_timeouts=TIMEOUTS_PER_READ, unfinished=unfinished)
            )

    async def cat(dataset: Dataset) -> None:
        async with dataset as ds:
            if path is None:
                try:
                    await ds.read_object("", write)
                except NoSuchKeyError:
                    # s3://bucket/dataset/path names a dataset's file as well as an object.
                    from ..read.reader import read_enclosed

                    found = await read_enclosed(
                        ds.url, connection=connection, max_timeouts=TIMEOUTS_PER_READ
                    )
                    if found is None:
                        raise
                    await write(found[2])
                return
            try:
                data = await ds.read(path)
            except NoDatasetError as no_dataset:
                try:
                    await ds.read_object(path, write)
                except NoSuchKeyError:
                    where = ds.url.key(path)
                    raise NoDatasetError(
                        f"{no_dataset}, and no object s3://{ds.url.bucket}/{where}"
                    ) from None
            else:
                await write(data)

    try:
        with unfinished_hint():
            runner.run(run)
    except BrokenPipeError:  # `s3xfer cat ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def write_all(fd: int, data: bytes) -> None:
    """Every byte to fd, even when it is a non-blocking pipe: the event loop can leave stdout
    non-blocking, and a buffered write would then silently stop at the pipe's capacity."""
    sys.stdout.flush()
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[written:]


@cli.command("get")
@click.argument("url")
@click.argument("args", nargs=-1, required=True)
@click.option(
    "--gap",
    type=SIZE,
    default="256KiB",
    show_default=True,
    help="Merge ranges of one shard closer than this into one GET.",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(1, 1024),
    default=16,
    show_default=True,
    help="GETs in flight at once.",
)
@click.option("--overwrite", is_flag=True, help="Replace files that already exist in DEST.")
@click.option(
    "--bench-profile",
    metavar="NAME",
    default=None,
    help="Take concurrency (and range size) from a `s3xfer bench --save NAME` profile.",
)
@connection_options
@deadline_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@unfinished_option
def get_command(
    url: str,
    args: tuple[str, ...],
    unfinished: bool,
    gap: int,
    concurrency: int,
    overwrite: bool,
    bench_profile: str | None,
    as_json: bool,
    endpoint_url: str | None,
    profile: str | None,
    region: str | None,
    no_verify_ssl: bool,
    deadline: float | None,
) -> None:
    """Fetch the files of the dataset at URL matching GLOB... into DEST.

    \b
    s3xfer get s3://bucket/data 'images/07/*' labels/000.json ./out

    Ranges of one shard closer than --gap are merged into one GET (never a multi-range
    header); every response must be 206 with the asked Content-Range, and every file's CRC32
    is checked. Files keep their mtime and mode; nothing is written outside DEST.
    """
    if len(args) < 2:
        raise UsageError("give at least one GLOB and a DEST directory")
    tuned: dict[str, Any] = {"concurrency": concurrency, "bench_profile": bench_profile}
    apply_bench_profile(tuned, command="get")
    concurrency = tuned["concurrency"]
    *patterns, dest = args
    connection = make_connection(
        endpoint_url, profile, region, no_verify_ssl, read_timeout=READ_TIMEOUT_FOR_READS
    )

    async def run() -> GetReport | DownloadReport:
        with within(deadline):
            report = await fetch()
        return report

    async def fetch() -> GetReport | DownloadReport:
        dataset = _dataset(
            url,
            connection,
            gap=gap,
            concurrency=concurrency,
            max_timeouts=TIMEOUTS_PER_READ,
            unfinished=unfinished,
        )
        async with dataset as ds:
            try:
                return await ds.get(patterns, Path(dest), overwrite=overwrite)
            except NoDatasetError:
                pass
        # A plain prefix: its objects matching the globs, as `download --include` takes them.
        return await download(
            ds.url,
            Path(dest),
            connection=connection,
            include=patterns,
            overwrite=overwrite,
            concurrency=concurrency,
            gap=gap,
            unfinished=unfinished,
        )

    from ..read.download import DownloadReport, download

    with unfinished_hint():
        report = runner.run(run)
    if isinstance(report, DownloadReport):
        _print_prefix_get(report, as_json=as_json)
        return
    if as_json:
        _emit_json(report.to_json())
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
        _emit_json(report.to_json())
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


@cli.command("download")
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
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(1, 1024),
    default=DEFAULT_CONCURRENCY,
    show_default=True,
    help="GETs in flight at once (ranges of large objects: only as many as --max-memory "
    "holds whole).",
)
@click.option(
    "--max-memory",
    type=SIZE,
    default=format_size(DEFAULT_MAX_MEMORY),
    show_default=True,
    help="Hard budget for bytes held in memory.",
)
@click.option(
    "--range-size",
    type=SIZE,
    default="16MiB",
    show_default=True,
    help="Size of the ranged GETs of large objects and shards.",
)
@click.option(
    "--bench-profile",
    metavar="NAME",
    default=None,
    help="Take concurrency (and range size) from a `s3xfer bench --save NAME` profile.",
)
@connection_options
@click.option("--json", "as_json", is_flag=True, help="Print the final report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@unfinished_option
def download_command(
    url: str,
    dest: Path,
    unfinished: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    overwrite: bool,
    concurrency: int,
    max_memory: int,
    range_size: int,
    bench_profile: str | None,
    as_json: bool,
    quiet: bool,
    endpoint_url: str | None,
    profile: str | None,
    region: str | None,
    no_verify_ssl: bool,
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
    concurrency, range_size = tuned["concurrency"], tuned["range_size"]
    connection = make_connection(endpoint_url, profile, region, no_verify_ssl)
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
            concurrency=concurrency,
            max_memory=max_memory,
            range_size=range_size,
            on_start=progress.start,
            on_progress=progress.advance,
            unfinished=unfinished,
        )

    try:
        with unfinished_hint():
            report = runner.run(run)
    finally:
        progress.close()
    if as_json:
        _emit_json(report.to_json())
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
        if report.files_downloaded == 0 and report.ok:
            click.echo("  everything was already here: nothing transferred")
    for path, reason in report.refused:
        click.echo(f"s3xfer: REFUSED {path!r}: {reason}", err=True)
    for path, error in report.failures:
        click.echo(f"s3xfer: FAILED {_printable(path)}: {error}", err=True)
    if not report.ok:
        sys.exit(1)


@cli.command("cleanup")
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
    endpoint_url: str | None,
    profile: str | None,
    region: str | None,
    no_verify_ssl: bool,
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
    connection = make_connection(endpoint_url, profile, region, no_verify_ssl)

    async def run() -> CleanupReport:
        async with open_s3(connection, max_pool_connections=16) as s3:
            return await cleanup(s3, target, older_than=age, dry_run=dry_run)

    report = runner.run(run)
    if as_json:
        _emit_json(report.to_json())
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


@cli.command("demo")
def demo_command() -> None:
    """Run the whole tool end to end against a throwaway local S3 server.

    Starts SeaweedFS on 127.0.0.1, generates a small dataset (about 4,000 files), then:
    survey, plan, upload with progress, a re-run that sends nothing, one file fetched with
    a ranged GET and verified, and a short throughput probe. Everything is removed at the end.
    """
    from .demo import run_demo

    def upload_with_progress(plan: Plan, connection: Connection) -> UploadReport:
        progress = upload_progress(quiet=False)
        try:
            return runner.run(_upload, plan, connection, progress)
        finally:
            progress.close()

    run_demo(click.echo, upload_with_progress=upload_with_progress)


@cli.command("local-s3")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Keep the server's data here (default: a fresh temporary directory, deleted on exit).",
)
@click.option("--bucket", "buckets", multiple=True, help="Create this bucket (repeatable).")
def local_s3_command(data_dir: Path | None, buckets: tuple[str, ...]) -> None:
    """Run a throwaway S3-compatible server (SeaweedFS) on 127.0.0.1 until Ctrl-C.

    Picks free ports and generates credentials, waits until the server answers, then prints
    the endpoint and the environment variables to export in another shell.
    """
    from ..locals3 import LocalS3, stop_signals, wait_until_interrupted

    server = LocalS3(data_dir, buckets=buckets)
    with server as info, stop_signals() as stop:
        click.echo(f"S3 endpoint {info.endpoint_url}  (data in {info.data_dir})")
        click.echo("In another shell:")
        for name, value in info.env().items():
            click.echo(f"  export {name}={value}")
        if buckets:
            click.echo(f"Buckets: {', '.join(buckets)}")
        click.echo("Press Ctrl-C to stop.")
        sys.stdout.flush()
        wait_until_interrupted(server, stop)
    click.echo("stopped")


def entry() -> None:
    """The `s3xfer` command: main(), then a quick exit once its output is flushed.

    When main() returns, every file it wrote is closed and no thread of ours is left; what
    the interpreter would still do after the exit handlers is tear down its few hundred
    modules: 20 ms, 2% of a 1 GiB download and a tenth of a `cat`. So the exit handlers run
    (logging's, tqdm's monitor, multiprocessing's) and then the process ends. With a
    non-daemon thread alive it exits the usual way, which waits for it."""
    try:
        main()
        code: int | str | None = 0
    except SystemExit as stop:
        code = stop.code
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's
    if isinstance(code, str) or run_exit_handlers is None or _threads_to_wait_for():
        sys.exit(code)
    run_exit_handlers()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # as the interpreter itself reports an unwritable stdout at exit
        code = code or 120
    os._exit(code or 0)


def _threads_to_wait_for() -> bool:
    """Whether a thread is alive that a usual exit would wait for (daemon threads, and the
    threads awscrt's event loops show as, it would not)."""
    main_thread = threading.main_thread()
    return any(
        thread is not main_thread and thread.is_alive() and not thread.daemon
        for thread in threading.enumerate()
    )


def main() -> None:
    """Console entry point: one clear line and an exit code for every error we expect."""
    debug = "--debug" in sys.argv[1:]
    # SIGTERM (a spot instance's notice, `kill`) stops like Ctrl-C: cleanup runs, the journal
    # is kept, and the next run resumes.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("s3xfer: interrupted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # one line, like every other error (not click's three)
        _error(f"error: {exc.format_message()}", exc.exit_code)
    except click.ClickException as exc:
        _error(f"error: {exc.format_message()}", exc.exit_code)
    except S3XferError as exc:
        if debug:
            raise
        _error(f"error: {exc}", exc.exit_code)
    except KeyboardInterrupt:
        click.echo("s3xfer: interrupted", err=True)
        sys.exit(130)
    except OSError as exc:
        if debug:
            raise
        _error(f"error: {exc}", 1)
    except SystemExit:
        raise
    except BaseException as exc:  # an exception group from a task group, or a bug
        if debug:
            raise
        leaf = first_leaf(exc)
        if isinstance(leaf, S3XferError):
            _error(f"error: {leaf}", leaf.exit_code)
        _error(
            f"internal error: {type(leaf).__name__}: {leaf} (run with --debug for the traceback)",
            70,
        )


def _error(message: str, code: int) -> NoReturn:
    """The one line of a failed command, on stderr, with no credentials of any URL in it
    (an endpoint or proxy URL may come back in a library's message), then exit."""
    click.echo(f"s3xfer: {redact_credentials(message)}", err=True)
    sys.exit(code)

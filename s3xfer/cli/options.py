"""The option blocks several commands share, each defined once: connection (endpoint,
credentials, TLS, timeouts), encryption, plan shaping, --include/--exclude, --unfinished,
--deadline; and the values read back from them (make_connection, make_selection)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from ..config import (
    AUTO_CONCURRENCY_CEILING,
    AUTO_CONCURRENCY_START,
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_MEMORY,
    DEFAULT_MULTIPART_THRESHOLD,
    DEFAULT_PACK_THRESHOLD,
    DEFAULT_PART_SIZE,
    DEFAULT_SHARD_SIZE,
    PriceTable,
    format_size,
    parse_size,
)
from ..errors import DeadlineError, EncryptionKeyError, NotFinalizedError, UsageError
from ..limits import MAX_CONCURRENCY, RunLimits
from ..planning.globs import PathFilter
from ..transport.s3 import Connection
from ..transport.session import SSE_ALGORITHMS

F = TypeVar("F", bound=Callable[..., Any])


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


def concurrency_option(requests: str, *, tuned: bool = False) -> Callable[[F], F]:
    """--concurrency (RunLimits.concurrency): the same name, default and range for every
    command that sends requests at once; `requests`: what it bounds in this command.
    `tuned`: when not given, the transfer finds its own number (upload, transport/throttle.py),
    and --help says so rather than show a default that is not used."""
    shown = f"tuned from {AUTO_CONCURRENCY_START} to {AUTO_CONCURRENCY_CEILING}" if tuned else True
    return click.option(
        "--concurrency",
        "-c",
        type=click.IntRange(1, MAX_CONCURRENCY),
        default=DEFAULT_CONCURRENCY,
        show_default=shown,
        help=requests,
    )


def memory_option(function: F) -> F:
    """--max-memory (RunLimits.max_memory): the same for every command that transfers."""
    option = click.option(
        "--max-memory",
        type=SIZE,
        default=format_size(DEFAULT_MAX_MEMORY),
        show_default=True,
        help="Hard budget for file bytes held in memory (e.g. 256MiB, 1GiB). When one part, "
        "range or file must be held whole and is larger, it is raised to that size and a "
        "warning says so.",
    )
    return option(function)


def concurrency_is_given() -> bool:
    """--concurrency N, or a --bench-profile, fixes the requests in flight; without either
    the transfer tunes them (RunLimits.auto_concurrency)."""
    context = click.get_current_context()
    return given("concurrency") or bool(context.params.get("bench_profile"))


def make_limits(
    *, concurrency: int = DEFAULT_CONCURRENCY, max_memory: int, auto_concurrency: bool = False
) -> RunLimits:
    """The RunLimits of a command, from its concurrency_option and memory_option."""
    return RunLimits(
        concurrency=concurrency, auto_concurrency=auto_concurrency, max_memory=max_memory
    )


def given(name: str) -> bool:
    """Whether the option `name` of the running command was given (not its default)."""
    source = click.get_current_context().get_parameter_source(name)
    return source is not None and source is not click.core.ParameterSource.DEFAULT


def plan_options(function: F) -> F:
    """Options that shape a plan, shared by `plan` and `upload`: --max-memory among them
    (parts are fitted to it; for upload, it is also the run's budget)."""
    options = [
        memory_option,
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


# cat and get: a response that has not started within 10 s is cut and tried once more, then
# the read fails (RetryPolicy.max_timeouts): an endpoint that accepts connections and never
# answers fails them in about 20 s, not 10 x 60 s.
READ_TIMEOUT_FOR_READS = 10.0
TIMEOUTS_PER_READ = 2

# Where the connection options wait in the click context until make_connection reads them.
_CONNECTION_META = "s3xfer.connection"


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    ctx.meta.setdefault(_CONNECTION_META, {})[param.name] = value


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

    None of them is passed to the command: make_connection reads them from the click
    context, so every command built on these options (bench too) sends all of them."""
    options = [
        click.option(
            "--endpoint-url",
            default=None,
            expose_value=False,
            callback=_remember,
            help="S3-compatible endpoint, e.g. http://127.0.0.1:8333 (else, as for awscli: "
            "AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, the profile's endpoint_url or services).",
        ),
        click.option(
            "--profile",
            default=None,
            expose_value=False,
            callback=_remember,
            help="Named profile from ~/.aws/config.",
        ),
        click.option(
            "--region",
            default=None,
            expose_value=False,
            callback=_remember,
            help="AWS region (default from the profile).",
        ),
        click.option(
            "--no-verify-ssl",
            is_flag=True,
            expose_value=False,
            callback=_remember,
            help="Do not verify TLS certificates (insecure; warns).",
        ),
        click.option(
            "--no-sign-request",
            is_flag=True,
            expose_value=False,
            callback=_remember,
            help="Send requests unsigned, without credentials (public buckets).",
        ),
        click.option(
            "--expected-bucket-owner",
            metavar="ACCOUNT_ID",
            default=None,
            expose_value=False,
            callback=_remember,
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
            callback=_remember,
            help="Cut and retry a request whose response makes no progress for this long.",
        ),
        click.option(
            "--read-timeout",
            metavar="SECONDS",
            type=click.FloatRange(min=0.1),
            default=None,
            expose_value=False,
            callback=_remember,
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


def _read_client_key(
    _context: click.Context, _parameter: click.Parameter, value: Path | None
) -> bytes | None:
    """The 32 bytes of an --encryption-key file (never echoed: a message names only the file)."""
    if value is None:
        return None
    from ..dataset.coding import KEY_SIZE

    try:
        with value.open("rb") as file:
            key = file.read(KEY_SIZE + 1)
    except OSError as exc:
        raise EncryptionKeyError(f"cannot read the encryption key {value}: {exc.strerror}") from exc
    if len(key) != KEY_SIZE:
        raise EncryptionKeyError(
            f"the encryption key {value} must hold exactly {KEY_SIZE} bytes; "
            f"make one with: head -c {KEY_SIZE} /dev/urandom > {value}"
        )
    return key


def client_key_option(function: F) -> F:
    """Client-side encryption (docs/format.md, "Coded files"): writers encrypt, readers decrypt."""
    return click.option(
        "--encryption-key",
        metavar="FILE",
        type=click.Path(path_type=Path, dir_okay=False),
        callback=_read_client_key,
        default=None,
        help="A file of 32 random bytes: files are encrypted on this machine "
        "(AES-256-GCM) before they are sent, and decrypted when read. Every command that "
        "reads the dataset's files needs the same key.",
    )(function)


def connection_setting(name: str) -> Any:
    """The value of one of the connection_options, as given (None when not)."""
    context = click.get_current_context(silent=True)
    if context is None:
        return None
    return context.meta.get(_CONNECTION_META, {}).get(name)


def make_connection(
    *,
    sse: str | None = None,
    sse_kms_key_id: str | None = None,
    read_timeout: float | None = None,
) -> Connection:
    """The Connection of a command, from its connection_options (read from the click
    context). `read_timeout`: the command's own default for --read-timeout."""
    if sse_kms_key_id and sse != "aws:kms":
        raise UsageError("--sse-kms-key-id needs --sse aws:kms")
    context = click.get_current_context(silent=True)
    given: dict[str, Any] = {}
    if context is not None:
        given = context.meta.get(_CONNECTION_META, {})
    no_verify_ssl = bool(given.get("no_verify_ssl"))
    connection = Connection(  # checks the endpoint URL and the other values
        endpoint_url=given.get("endpoint_url") or None,
        profile=given.get("profile"),
        region=given.get("region"),
        verify_ssl=not no_verify_ssl,
        sse=sse,
        sse_kms_key_id=sse_kms_key_id,
        expected_bucket_owner=given.get("expected_bucket_owner"),
        stall_timeout=given.get("stall_timeout", 60.0),
        unsigned=bool(given.get("no_sign_request")),
        read_timeout=given.get("read_timeout") or read_timeout,
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
    from ..bench.profiles import load_profile, settings_for

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


# `get` and `download`: what a saved profile sets for reads (apply_bench_profile reads it).
read_bench_profile_option = click.option(
    "--bench-profile",
    metavar="NAME",
    default=None,
    help="Take concurrency (and range size) from a `s3xfer bench --save NAME` profile.",
)

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

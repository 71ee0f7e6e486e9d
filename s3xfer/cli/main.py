"""The `s3xfer` command: the click group, `--debug`, and one clear line and an exit code for
every error (main); the commands live in the modules COMMANDS names. Presentation only:
every command is a library call first."""

from __future__ import annotations

import atexit
import importlib
import os
import signal
import sys
import threading
from typing import NoReturn

import click

from .. import __version__
from ..errors import S3XferError, first_leaf, redact_credentials

# Every command, and the module of s3xfer/cli/ that holds it (as `<name>_command`). A module is
# imported only when one of its commands runs, or when every command is listed (--help):
# `s3xfer cat` or a download should not pay for loading the planner, the upload engine, the
# benchmark or tqdm (start-up is most of a small fetch).
COMMANDS = {
    "survey": "upload",
    "plan": "upload",
    "upload": "upload",
    "finalize": "upload",
    "worker": "distributed",
    "ls": "read",
    "cat": "read",
    "get": "read",
    "download": "read",
    "cleanup": "manage",
    "bench": "bench",
    "demo": "server",
    "local-s3": "server",
}


class _Commands(click.Group):
    """s3xfer's commands, each loaded with its module when named (see COMMANDS)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module_name = COMMANDS.get(cmd_name)
        if module_name is None:
            return None
        module = importlib.import_module(f".{module_name}", __package__)
        command: click.Command = getattr(module, cmd_name.replace("-", "_") + "_command")
        return command


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

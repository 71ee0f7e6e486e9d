"""The embedded local S3 server: `local-s3` runs one until Ctrl-C, `demo` runs the whole tool
end to end against a throwaway one (demo.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .. import runner

if TYPE_CHECKING:
    from ..planning.plan import Plan
    from ..transport.s3 import Connection
    from ..write.upload import UploadReport


@click.command("demo")
def demo_command() -> None:
    """Run the whole tool end to end against a throwaway local S3 server.

    Starts SeaweedFS on 127.0.0.1, generates a small dataset (about 4,000 files), then:
    survey, plan, upload with progress, a re-run that sends nothing, one file fetched with
    a ranged GET and verified, and a short throughput probe. Everything is removed at the end.
    """
    from ..limits import DEFAULT_LIMITS
    from .demo import run_demo
    from .output import upload_progress
    from .upload import run_upload

    def upload_with_progress(plan: Plan, connection: Connection) -> UploadReport:
        progress = upload_progress(quiet=False)
        try:
            return runner.run(run_upload, plan, DEFAULT_LIMITS, connection, progress)
        finally:
            progress.close()

    run_demo(click.echo, upload_with_progress=upload_with_progress)


@click.command("local-s3")
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

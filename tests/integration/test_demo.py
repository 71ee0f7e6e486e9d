"""The README's first command: `s3xfer demo` runs the whole tool end to end."""

from __future__ import annotations

from .helpers import run_cli


def test_the_demo_runs_end_to_end() -> None:
    result = run_cli("demo", timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    text = result.stdout
    for step in ("survey", "plan", "upload", "nothing changed", "bench"):
        assert step in text, step
    assert "identical to the source: True" in text  # the file fetched by range
    assert "Traceback" not in result.stderr

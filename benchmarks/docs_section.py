"""Writing a benchmark's results into its section of a markdown file, between two markers, the
rest of the file left as it is. Shared by the benchmark scripts beside it."""

from __future__ import annotations

from pathlib import Path


def write_section(
    path: Path, section: str, *, start: str, end: str, new_file: str = "", heading: str = ""
) -> None:
    """Put `section` between the markers `start` and `end` in `path`. A file without them gets
    them appended (after `heading`, when given); a missing file starts as `new_file`."""
    text = path.read_text() if path.exists() else new_file
    if start not in text or end not in text:
        lead = f"{heading}\n\n" if heading else ""
        text = text.rstrip("\n") + f"\n\n{lead}{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{head}{start}\n{section.strip(chr(10))}\n{end}{tail}")

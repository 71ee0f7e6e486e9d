"""What the commands write: bytes and JSON to standard output (all of them, even into a
non-blocking pipe), and the progress bar of uploads and downloads (tqdm, on stderr)."""

from __future__ import annotations

import json
import os
import select
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm


def emit_json(data: Any) -> None:
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

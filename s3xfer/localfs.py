"""Reading local files for upload: one worker-thread call per range (open, check, read, CRC).

One hop to a thread per range instead of one per open/read/close keeps the per-file cost of
small files low, and the CRC is computed where the bytes already are, off the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from .checksums import crc32
from .errors import S3XferError, SourceError

if TYPE_CHECKING:  # downloads and reads never load the survey or the tar layout
    from .survey import FileEntry
    from .tarpack import FilePiece, FixedPiece


class FileChangedError(SourceError):
    """The file is not the one that was planned: it changed size or mtime, or vanished."""


class DestinationError(S3XferError):
    """The destination cannot be written (no space, no permission, not a directory)."""

    exit_code = 1


class DiskFullError(DestinationError):
    """The destination's file system is full: every other write would fail the same way."""


def destination_error(path: Path, exc: OSError) -> DestinationError:
    """The error for a failed write of path: DiskFullError when there is no space left."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return (DiskFullError if full else DestinationError)(
        f"cannot write {path}: {exc.strerror or exc}"
    )


def _read_unchanged(path: Path, size: int, mtime_ns: int, read: Callable[[int], bool]) -> None:
    """Open path, check it is still the planned file, `read(fd)` (True when it got every byte
    it wanted), and check the file did not change meanwhile. The one place reads are checked."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise FileChangedError(f"{path}: vanished after it was planned") from exc
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        before = os.fstat(fd)
        if before.st_size != size or before.st_mtime_ns != mtime_ns:
            raise FileChangedError(f"{path}: changed since it was planned (size or mtime differ)")
        complete = read(fd)
        after = os.fstat(fd)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if not complete or after.st_size != size or after.st_mtime_ns != mtime_ns:
        raise FileChangedError(f"{path}: changed while it was read")


def _read_range(
    path: Path, offset: int, length: int, size: int, mtime_ns: int
) -> tuple[bytes, int]:
    data = b""

    def read(fd: int) -> bool:
        nonlocal data
        data = os.pread(fd, length, offset)
        return len(data) == length

    _read_unchanged(path, size, mtime_ns, read)
    return data, crc32(data)


async def read_range(
    path: Path, *, offset: int, length: int, size: int, mtime_ns: int
) -> tuple[bytes, int]:
    """Bytes [offset, offset+length) of a file and their CRC32, checking the file is unchanged."""
    return await anyio.to_thread.run_sync(_read_range, path, offset, length, size, mtime_ns)


def _fill_part(
    root: Path,
    members: Sequence[FileEntry],
    make_pieces: Callable[[], Sequence[FixedPiece | FilePiece]],
) -> tuple[bytearray, list[FilePiece], list[int]]:
    from .tarpack import FilePiece, FixedPiece  # here: only uploads of shards need tarpack

    pieces = make_pieces()
    buffer = bytearray(sum(len(p.data) if isinstance(p, FixedPiece) else p.length for p in pieces))
    view = memoryview(buffer)
    crcs: list[int] = []
    position = 0
    for piece in pieces:
        if isinstance(piece, FixedPiece):
            view[position : position + len(piece.data)] = piece.data
            position += len(piece.data)
            continue
        member = members[piece.member]
        target = view[position : position + piece.length]
        _read_into(root / member.path, target, piece.offset, member.size, member.mtime_ns)
        crcs.append(crc32(target))
        position += piece.length
    return buffer, [p for p in pieces if isinstance(p, FilePiece)], crcs


def _read_into(path: Path, target: memoryview, offset: int, size: int, mtime_ns: int) -> None:
    def read(fd: int) -> bool:
        return (os.preadv(fd, [target], offset) if len(target) else 0) == len(target)

    _read_unchanged(path, size, mtime_ns, read)


async def fill_part(
    root: Path,
    members: Sequence[FileEntry],
    make_pieces: Callable[[], Sequence[FixedPiece | FilePiece]],
) -> tuple[bytearray, list[FilePiece], list[int]]:
    """A shard part built in one buffer, member ranges read straight into it (one allocation,
    no small chunks): the buffer, its FilePieces and their CRC32s. Laying out the pieces
    (tar headers) happens in the same worker-thread call, off the event loop."""
    return await anyio.to_thread.run_sync(_fill_part, root, members, make_pieces)


def _freeze(buffer: bytearray) -> tuple[bytes, int]:
    body = bytes(buffer)
    return body, crc32(body)


async def freeze(buffer: bytearray) -> tuple[bytes, int]:
    """The finished part as bytes, and its CRC32, off the event loop."""
    return await anyio.to_thread.run_sync(_freeze, buffer)


class SafeDestination:
    """Maps dataset paths to paths under one root, refusing anything that would land outside
    it: absolute paths, '..' components, drive letters, backslashes, and paths through a
    symlink (already inside the root) that leads out. Each directory is resolved once."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._checked: set[str] = set()

    def __call__(self, relative: str) -> Path:
        parts = relative.split("/")
        if (
            not relative
            or relative.startswith("/")
            or "\\" in relative
            or "\x00" in relative
            or any(part in ("", ".", "..") for part in parts)
            or (len(parts[0]) >= 2 and parts[0][1] == ":")
        ):
            raise SourceError(f"refusing unsafe path {relative!r}: it would leave the destination")
        target = self.root.joinpath(*parts)
        # Only existing components can be symlinks: check each parent directory once.
        directory = os.path.dirname(relative)
        if directory and directory not in self._checked:
            resolved = (self.root / directory).resolve()
            if resolved != self.root and self.root not in resolved.parents:
                raise SourceError(f"refusing {relative!r}: it resolves outside the destination")
            if (self.root / directory).is_dir():
                self._checked.add(directory)
        if target.is_symlink():
            resolved = target.resolve()
            if self.root not in resolved.parents:
                raise SourceError(f"refusing {relative!r}: it is a link out of the destination")
        return target


def _write_new(path: Path, data: bytes | memoryview) -> None:
    with path.open("wb") as out:
        out.write(data)


def _write_atomically(path: Path, data: bytes | memoryview, mtime_ns: int, mode: int) -> None:
    """Write under a temporary name beside path, then rename it into place. A write that
    fails (a full disk) removes its temporary file: nothing partial is left behind."""
    tmp = path.with_name(f".{path.name}.s3xfer-tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_new(tmp, data)
        _finish_write(tmp, path, mtime_ns, mode)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise destination_error(path, exc) from exc


async def write_file(path: Path, data: bytes, *, mtime_ns: int, mode: int) -> None:
    """Write a whole file atomically (a temporary name, then rename) with its mtime and mode.
    Raises DestinationError (DiskFullError when there is no space left)."""
    await anyio.to_thread.run_sync(_write_atomically, path, data, mtime_ns, mode)


def _write_files(files: Sequence[tuple[Path, bytes | memoryview, int, int]]) -> None:
    for path, data, mtime_ns, mode in files:
        _write_atomically(path, data, mtime_ns, mode)


async def write_files(files: Sequence[tuple[Path, bytes | memoryview, int, int]]) -> None:
    """Write many small files (path, data, mtime_ns, mode), each atomically, in one
    worker-thread call: restoring a shard range is hundreds of files, and a thread hop per
    file operation would cost more than the writes. Raises like write_file."""
    await anyio.to_thread.run_sync(_write_files, files)


def _finish_write(tmp: Path, path: Path, mtime_ns: int, mode: int) -> None:
    os.chmod(tmp, mode & 0o7777)
    os.utime(tmp, ns=(mtime_ns, mtime_ns))
    os.replace(tmp, path)

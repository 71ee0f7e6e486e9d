"""Reading local files for upload: one worker-thread call per range (open, check, read, CRC).

One hop to a thread per range instead of one per open/read/close keeps the per-file cost of
small files low, and the CRC is computed where the bytes already are, off the event loop.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import aiofiles
import anyio

from .errors import SourceError
from .survey import FileEntry
from .tarpack import FilePiece


class FileChangedError(SourceError):
    """The file is not the one that was planned: it changed size or mtime, or vanished."""


def _read_range(
    path: Path, offset: int, length: int, size: int, mtime_ns: int
) -> tuple[bytes, int]:
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
        data = os.pread(fd, length, offset)
        after = os.fstat(fd)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if len(data) != length or after.st_size != size or after.st_mtime_ns != mtime_ns:
        raise FileChangedError(f"{path}: changed while it was read")
    return data, zlib.crc32(data)


async def read_range(
    path: Path, *, offset: int, length: int, size: int, mtime_ns: int
) -> tuple[bytes, int]:
    """Bytes [offset, offset+length) of a file and their CRC32, checking the file is unchanged."""
    return await anyio.to_thread.run_sync(_read_range, path, offset, length, size, mtime_ns)


def _read_pieces(
    root: Path, members: Sequence[FileEntry], pieces: Sequence[FilePiece]
) -> list[tuple[bytes, int]]:
    return [
        _read_range(
            root / members[p.member].path,
            p.offset,
            p.length,
            members[p.member].size,
            members[p.member].mtime_ns,
        )
        for p in pieces
    ]


async def read_pieces(
    root: Path, members: Sequence[FileEntry], pieces: Sequence[FilePiece]
) -> list[tuple[bytes, int]]:
    """The bytes and CRC32 of several member ranges of a shard, in one worker-thread call."""
    return await anyio.to_thread.run_sync(_read_pieces, root, members, pieces)


def _join_and_crc(chunks: list[bytes]) -> tuple[bytes, int]:
    body = b"".join(chunks)
    return body, zlib.crc32(body)


async def join_and_crc(chunks: list[bytes]) -> tuple[bytes, int]:
    """Assemble a part from its pieces and checksum it, off the event loop."""
    return await anyio.to_thread.run_sync(_join_and_crc, chunks)


def safe_destination(root: Path, relative: str) -> Path:
    """`root / relative`, refusing anything that would land outside root: absolute paths,
    '..' components, drive letters, backslashes, and symlinks already inside root that point
    out of it."""
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
    base = root.resolve()
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise SourceError(f"refusing {relative!r}: it resolves outside the destination")
    return base / relative


async def write_file(path: Path, data: bytes, *, mtime_ns: int, mode: int) -> None:
    """Write a whole file atomically (a temporary name, then rename) with its mtime and mode."""
    await anyio.to_thread.run_sync(lambda: path.parent.mkdir(parents=True, exist_ok=True))
    tmp = path.with_name(f".{path.name}.s3xfer-tmp")
    async with aiofiles.open(tmp, "wb") as out:
        await out.write(data)
    await anyio.to_thread.run_sync(_finish_write, tmp, path, mtime_ns, mode)


def _finish_write(tmp: Path, path: Path, mtime_ns: int, mode: int) -> None:
    os.chmod(tmp, mode & 0o7777)
    os.utime(tmp, ns=(mtime_ns, mtime_ns))
    os.replace(tmp, path)

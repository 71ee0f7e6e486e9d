"""Local files, the reading side: reading them for upload (one worker-thread call per range:
open, check, read, CRC), and telling whether a file is still the one first looked at
(`FileIdentity`). Writing restored files is `destination.py`'s.

One hop to a thread per range instead of one per open/read/close keeps the per-file cost of
small files low, and the CRC is computed where the bytes already are, off the event loop.
"""

from __future__ import annotations

import os
import stat
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import anyio

from .checksums import crc32
from .errors import FileChangedError, MemberChangedError, SourceError

if TYPE_CHECKING:  # downloads and reads never load the survey or the tar layout
    from .dataset.coding import FileCoder
    from .dataset.tarpack import FilePiece, FixedPiece
    from .planning.survey import FileEntry


StrPath = str | os.PathLike[str]


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """What a file was when it was first looked at. Size and mtime alone miss a file replaced
    by another of the same size and mtime (a new inode) or written in place with its mtime set
    back (ctime moves: no one can set it); every later read is compared with all of it. The
    mode is kept too: a file packed as it is now gets its current mode in its tar header."""

    dev: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    mode: int  # permission bits

    @classmethod
    def of(cls, status: os.stat_result) -> FileIdentity:
        return cls(
            status.st_dev,
            status.st_ino,
            status.st_size,
            status.st_mtime_ns,
            status.st_ctime_ns,
            status.st_mode & 0o7777,
        )

    def to_json(self) -> list[int]:
        return [self.dev, self.inode, self.size, self.mtime_ns, self.ctime_ns, self.mode]

    @classmethod
    def from_json(cls, data: Any) -> FileIdentity:
        """Raises ValueError on anything but six integers."""
        if (
            not isinstance(data, list)
            or len(data) != 6
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in data)
        ):
            raise ValueError(f"file identity must be six integers, got {data!r:.100}")
        return cls(*data)


class Identities(Sequence[FileIdentity]):
    """The identities of a shard's members, six integers each in arrays: a FileIdentity
    object per member cost about 300 bytes, 31 MB for a shard of 100,000 members held while
    it is uploaded. Indexing makes the FileIdentity."""

    def __init__(self) -> None:
        # dev and inode are unsigned 64-bit numbers; times may be negative.
        self._unsigned = array("Q")  # dev, inode of each member in turn
        self._signed = array("q")  # size, mtime_ns, ctime_ns, mode

    def append(self, identity: FileIdentity) -> None:
        self._unsigned.extend((identity.dev, identity.inode))
        self._signed.extend((identity.size, identity.mtime_ns, identity.ctime_ns, identity.mode))

    def __len__(self) -> int:
        return len(self._unsigned) // 2

    @overload
    def __getitem__(self, index: int) -> FileIdentity: ...
    @overload
    def __getitem__(self, index: slice) -> list[FileIdentity]: ...
    def __getitem__(self, index: int | slice) -> FileIdentity | list[FileIdentity]:
        if isinstance(index, slice):
            return [self[n] for n in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        dev, inode = self._unsigned[2 * index : 2 * index + 2]
        size, mtime_ns, ctime_ns, mode = self._signed[4 * index : 4 * index + 4]
        return FileIdentity(dev, inode, size, mtime_ns, ctime_ns, mode)


def describe_change(path: StrPath, identity: FileIdentity, now: FileIdentity) -> str:
    """Why `now` is not the file first read as `identity`, in one line."""
    if now.inode != identity.inode or now.dev != identity.dev:
        how = "replaced by another file"
    elif (now.size, now.mtime_ns) != (identity.size, identity.mtime_ns):
        how = "size or mtime differ"
    else:
        how = "written to in place, or its mode changed: its ctime moved"
    return f"{path}: changed while it was read ({how})"


def _changed(path: StrPath, identity: FileIdentity, now: FileIdentity) -> FileChangedError:
    return FileChangedError(describe_change(path, identity, now))


def _stat_identity(path: StrPath, *, since: str = "while it was read") -> FileIdentity:
    """The identity of path now (following symlinks, as the survey does)."""
    try:
        status = os.stat(path)
    except FileNotFoundError as exc:
        raise FileChangedError(f"{path}: vanished {since}") from exc
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(status.st_mode):
        raise FileChangedError(f"{path}: changed {since} (no longer a regular file)")
    return FileIdentity.of(status)


def _check_still(path: StrPath, identity: FileIdentity) -> None:
    now = _stat_identity(path)
    if now != identity:
        raise _changed(path, identity, now)


def _read_checked(
    path: StrPath,
    read: Callable[[int], bool],
    *,
    size: int,
    mtime_ns: int,
    identity: FileIdentity | None,
) -> FileIdentity:
    """Open path, check it is the planned file (size, mtime) and, when `identity` is given,
    still the file first read; `read(fd)` (True when it got every byte it wanted); check the
    file did not change meanwhile. The identity read against. The one place reads are checked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        when = "after it was planned" if identity is None else "while it was read"
        raise FileChangedError(f"{path}: vanished {when}") from exc
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        before = FileIdentity.of(os.fstat(fd))
        if identity is None:
            if (before.size, before.mtime_ns) != (size, mtime_ns):
                raise FileChangedError(
                    f"{path}: changed since it was planned (size or mtime differ)"
                )
            identity = before
        elif before != identity:
            raise _changed(path, identity, before)
        complete = read(fd)
        after = FileIdentity.of(os.fstat(fd))
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if after != identity:
        raise _changed(path, identity, after)
    if not complete:
        raise FileChangedError(f"{path}: changed while it was read (fewer bytes than planned)")
    return identity


def _read_range(
    path: Path,
    offset: int,
    length: int,
    size: int,
    mtime_ns: int,
    identity: FileIdentity | None,
    whole: bool,
) -> tuple[bytes, int, FileIdentity]:
    data = b""

    def read(fd: int) -> bool:
        nonlocal data
        data = os.pread(fd, length, offset)
        return len(data) == length

    identity = _read_checked(path, read, size=size, mtime_ns=mtime_ns, identity=identity)
    if whole:
        # The one read of a file: what it read must still be what the path names (a copy
        # renamed over it during the read leaves the open file unchanged).
        _check_still(path, identity)
    return data, crc32(data), identity


async def read_range(
    path: Path,
    *,
    offset: int,
    length: int,
    size: int,
    mtime_ns: int,
    identity: FileIdentity | None = None,
    whole: bool = False,
) -> tuple[bytes, int, FileIdentity]:
    """Bytes [offset, offset+length) of a file, their CRC32, and the file's identity. Without
    `identity` (the first read) the file must have the planned size and mtime; with it, every
    part of it (inode, ctime...) must be unchanged. `whole`: this read is the file's only one,
    so the path is looked at again afterwards. Raises FileChangedError."""
    return await anyio.to_thread.run_sync(
        _read_range, path, offset, length, size, mtime_ns, identity, whole
    )


def _read_whole_files(
    files: Sequence[tuple[Path, int, int]],
) -> list[tuple[bytes, int] | SourceError]:
    results: list[tuple[bytes, int] | SourceError] = []
    for path, size, mtime_ns in files:
        try:
            data, crc, _identity = _read_range(path, 0, size, size, mtime_ns, None, True)
        except SourceError as error:
            results.append(error)
        else:
            results.append((data, crc))
    return results


def _read_heads(files: Sequence[tuple[Path, int, int]], length: int) -> list[bytes | SourceError]:
    results: list[bytes | SourceError] = []
    for path, size, mtime_ns in files:
        try:
            data, _crc, _identity = _read_range(
                path, 0, min(length, size), size, mtime_ns, None, False
            )
        except SourceError as error:
            results.append(error)
        else:
            results.append(data)
    return results


async def read_heads(
    files: Sequence[tuple[Path, int, int]], length: int
) -> list[bytes | SourceError]:
    """The first `length` bytes of each file (path, planned size, planned mtime), checked as
    read_range checks a first read, in one worker-thread call: bytes, or the file's error."""
    return await anyio.to_thread.run_sync(_read_heads, files, length)


async def read_whole_files(
    files: Sequence[tuple[Path, int, int]],
) -> list[tuple[bytes, int] | SourceError]:
    """Small files (path, planned size, planned mtime) read whole, each as `read_range(...,
    whole=True)` reads one, in one worker-thread call: (bytes, CRC32), or the file's own
    error (each fails alone). A thread hop per 16 KiB file cost more than reading it."""
    return await anyio.to_thread.run_sync(_read_whole_files, files)


def _identify(path: Path, size: int, mtime_ns: int) -> FileIdentity:
    identity = _stat_identity(path, since="after it was planned")
    if (identity.size, identity.mtime_ns) != (size, mtime_ns):
        raise FileChangedError(f"{path}: changed since it was planned (size or mtime differ)")
    return identity


async def identify(path: Path, *, size: int, mtime_ns: int) -> FileIdentity:
    """The identity of a file about to be read in parts, checked against the plan (size and
    mtime). Raises FileChangedError."""
    return await anyio.to_thread.run_sync(_identify, path, size, mtime_ns)


async def check_unchanged(path: Path, identity: FileIdentity) -> None:
    """The re-stat after the last part: raises FileChangedError unless path is still the file
    with this identity."""
    await anyio.to_thread.run_sync(_check_still, path, identity)


_NO_IDENTITY = FileIdentity(0, 0, 0, 0, 0, 0)


def _identify_members(
    root: Path, members: Sequence[FileEntry], since: str
) -> tuple[Identities, dict[int, str]]:
    found = Identities()
    unreadable: dict[int, str] = {}
    base = f"{root}/"  # strings: a Path join per member costs as much as its stat
    for n, member in enumerate(members):
        try:
            found.append(_stat_identity(base + member.path, since=since))
        except SourceError as exc:
            found.append(_NO_IDENTITY)
            unreadable[n] = str(exc)
    return found, unreadable


async def identify_members(
    root: Path, members: Sequence[FileEntry], *, since: str = "after it was planned"
) -> tuple[Identities, dict[int, str]]:
    """Each shard member as it is now: the identities of all (a placeholder for those that
    cannot be read), and why those cannot be read (by index: vanished `since`..., no longer a
    regular file, unreadable). One worker-thread call for the shard."""
    return await anyio.to_thread.run_sync(_identify_members, root, members, since)


def _changed_members(
    root: Path, members: Sequence[FileEntry], identities: Sequence[FileIdentity]
) -> dict[int, str]:
    changed: dict[int, str] = {}
    base = f"{root}/"
    for n, (member, identity) in enumerate(zip(members, identities, strict=True)):
        try:
            _check_still(base + member.path, identity)
        except SourceError as exc:
            changed[n] = str(exc)
    return changed


async def changed_members(
    root: Path, members: Sequence[FileEntry], identities: Sequence[FileIdentity]
) -> dict[int, str]:
    """The re-stat of a shard's members after its last part was read: the members (by index)
    that are no longer the files that were read, and why."""
    return await anyio.to_thread.run_sync(_changed_members, root, members, identities)


def _fill_part(
    root: Path,
    members: Sequence[FileEntry],
    identities: Sequence[FileIdentity],
    length: int,
    make_pieces: Callable[[], Iterable[FixedPiece | FilePiece]],
    coder_of: Callable[[int], tuple[FileCoder, int] | None] | None = None,
) -> tuple[bytearray, list[FilePiece], list[int]]:
    from .dataset.tarpack import FilePiece, FixedPiece  # here: only shard uploads need tarpack

    buffer = bytearray(length)
    view = memoryview(buffer)
    file_pieces: list[FilePiece] = []
    crcs: list[int] = []
    position = 0
    base = f"{root}/"
    # Each piece is written as it comes: a list of a part's pieces held the tar header bytes of
    # its thousands of members beside the buffer (8 MB a 16 MiB part of 1 KiB files).
    for piece in make_pieces():
        if isinstance(piece, FixedPiece):
            view[position : position + len(piece.data)] = piece.data
            position += len(piece.data)
            continue
        member = members[piece.member]
        target = view[position : position + piece.length]
        try:
            coded = coder_of(piece.member) if coder_of is not None else None
            if coded is None:
                _read_into(base + member.path, target, piece.offset, identities[piece.member])
                crcs.append(crc32(target))
                file_pieces.append(piece)
            else:
                crc = _read_coded_into(root, member.path, target, piece, identities, *coded)
                crcs.append(crc)  # of the whole original file, so the piece is made whole:
                file_pieces.append(FilePiece(piece.member, 0, identities[piece.member].size))
        except FileChangedError as exc:
            raise MemberChangedError(str(exc), member=piece.member) from exc
        position += piece.length
    if position != length:
        raise ValueError(f"the pieces of a part of {length:,} bytes add up to {position:,}")
    return buffer, file_pieces, crcs


def _read_coded_into(
    root: Path,
    relative: str,
    target: memoryview,
    piece: FilePiece,
    identities: Sequence[FileIdentity],
    coder: FileCoder,
    stored_size: int,
) -> int:
    """A piece of a coded member (its stored bytes, in the shard's coordinates): the whole
    file is read and coded (a member is small) and the piece cut from it; coding is
    deterministic, so the parts that share a member cut their pieces from the same bytes.
    The CRC32 of the whole original file."""
    identity = identities[piece.member]
    original = bytearray(identity.size)
    _read_into(f"{root}/{relative}", memoryview(original), 0, identity)
    stored = coder.encode(relative, original)
    if len(stored) != stored_size:  # compressed: not the file it was measured as
        raise FileChangedError(
            f"{root}/{relative}: changed since it was measured (compresses to "
            f"{len(stored):,} bytes, not {stored_size:,})"
        )
    target[:] = memoryview(stored)[piece.offset : piece.offset + piece.length]
    return crc32(original)


def _read_into(path: StrPath, target: memoryview, offset: int, identity: FileIdentity) -> None:
    def read(fd: int) -> bool:
        return (os.preadv(fd, [target], offset) if len(target) else 0) == len(target)

    _read_checked(path, read, size=identity.size, mtime_ns=identity.mtime_ns, identity=identity)


async def fill_part(
    root: Path,
    members: Sequence[FileEntry],
    identities: Sequence[FileIdentity],
    length: int,
    make_pieces: Callable[[], Iterable[FixedPiece | FilePiece]],
    *,
    coder_of: Callable[[int], tuple[FileCoder, int] | None] | None = None,
) -> tuple[bytearray, list[FilePiece], list[int]]:
    """A shard part of `length` bytes built in one buffer, member ranges read straight into
    it (one allocation, no small chunks): the buffer, its FilePieces and their CRC32s. Each
    member must still be the file of its identity (taken before the shard was laid out);
    MemberChangedError names the one that is not. Laying out the pieces (tar headers) happens
    in the same worker-thread call, off the event loop, each written as it is made.
    `coder_of(n)`: member n's coder and stored size when it is stored coded: each piece is cut
    from its coded member, and its CRC32 is the whole original file's (given for a piece of
    the member's whole length); a member that codes to another size has changed."""
    return await anyio.to_thread.run_sync(
        _fill_part, root, members, identities, length, make_pieces, coder_of
    )


async def buffer_crc32(buffer: bytes | bytearray) -> int:
    """The finished part's CRC32, off the event loop. The part is sent from the buffer itself:
    a bytes copy of it doubled every shard part in flight (84 MB at 100,000 files)."""
    return await anyio.to_thread.run_sync(crc32, buffer)

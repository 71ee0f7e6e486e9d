"""Local files: reading them for upload (one worker-thread call per range: open, check,
read, CRC), and writing restored ones (SafeDestination, Staging: nothing outside the
destination, no temporary name beside a user's file, no link ever followed).

One hop to a thread per range instead of one per open/read/close keeps the per-file cost of
small files low, and the CRC is computed where the bytes already are, off the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import itertools
import os
import secrets
import shutil
import stat
import tempfile
from array import array
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import anyio

from .checksums import crc32
from .dataset.validate import restored_mode
from .errors import (
    DestinationError,
    DiskFullError,
    FileChangedError,
    MemberChangedError,
    SourceError,
)

if TYPE_CHECKING:  # downloads and reads never load the survey or the tar layout
    from .dataset.coding import FileCoder
    from .dataset.tarpack import FilePiece, FixedPiece
    from .planning.survey import FileEntry


StrPath = str | os.PathLike[str]


def destination_error(path: Path, exc: OSError) -> DestinationError:
    """The error for a failed write of path: DiskFullError when there is no space left."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return (DiskFullError if full else DestinationError)(
        f"cannot write {path}: {exc.strerror or exc}"
    )


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
    coder: FileCoder | None = None,
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
            if coder is None:
                _read_into(base + member.path, target, piece.offset, identities[piece.member])
                crcs.append(crc32(target))
                file_pieces.append(piece)
            else:
                crc = _read_coded_into(root, member.path, target, piece, identities, coder)
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
) -> int:
    """A piece of a coded member (its stored bytes, in the shard's coordinates): the whole
    file is read and coded (a member is small) and the piece cut from it; coding is
    deterministic, so the parts that share a member cut their pieces from the same bytes.
    The CRC32 of the whole original file."""
    identity = identities[piece.member]
    original = bytearray(identity.size)
    _read_into(f"{root}/{relative}", memoryview(original), 0, identity)
    stored = coder.encode(relative, original)
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
    coder: FileCoder | None = None,
) -> tuple[bytearray, list[FilePiece], list[int]]:
    """A shard part of `length` bytes built in one buffer, member ranges read straight into
    it (one allocation, no small chunks): the buffer, its FilePieces and their CRC32s. Each
    member must still be the file of its identity (taken before the shard was laid out);
    MemberChangedError names the one that is not. Laying out the pieces (tar headers) happens
    in the same worker-thread call, off the event loop, each written as it is made. With a
    `coder`, members are stored coded: each piece is cut from its coded member, and its CRC32
    is the whole original file's (given for a piece of the member's whole length)."""
    return await anyio.to_thread.run_sync(
        _fill_part, root, members, identities, length, make_pieces, coder
    )


async def buffer_crc32(buffer: bytes | bytearray) -> int:
    """The finished part's CRC32, off the event loop. The part is sent from the buffer itself:
    a bytes copy of it doubled every shard part in flight (84 MB at 100,000 files)."""
    return await anyio.to_thread.run_sync(crc32, buffer)


# ---------------------------------------------------------------------------------------------
# Writing restored files


def make_directory(path: Path) -> None:
    """path and its parents, as needed. Raises DestinationError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise destination_error(path, exc) from exc


def _name_max(root: Path) -> int:
    """The longest name (in bytes) root's file system holds: 255 almost everywhere."""
    try:
        return os.pathconf(root, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


# lstat errors that mean nothing is at a path (those pathlib's exists() and is_symlink() take
# for "no").
_NOTHING_THERE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP})


class SafeDestination:
    """Maps dataset paths to paths under one root, refusing anything that would land outside
    it or that its file system cannot hold: absolute paths, empty, '.' and '..' components,
    NUL, names longer than the file system allows, and paths through a symlink (already
    inside the root) that leads out. Each directory is resolved once. A backslash or a colon
    is an ordinary byte of a POSIX name: 'a\\b.txt' and 'C:/x' are restored as they are named."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._checked: set[str] = set()
        self._name_max = _name_max(self.root)

    def __call__(self, relative: str) -> Path:
        return self.locate(relative)[0]

    def locate(self, relative: str) -> tuple[Path, bool]:
        """The target, and whether something (a file, a directory, a link) is there already:
        one lstat for both checks, not one each (a system call costs 10-40 µs here)."""
        parts = relative.split("/")
        if (
            not relative
            or relative.startswith("/")
            or "\x00" in relative
            or any(part in ("", ".", "..") for part in parts)
        ):
            raise SourceError(f"refusing unsafe path {relative!r}: it would leave the destination")
        for part in parts:
            if len(os.fsencode(part)) > self._name_max:
                raise SourceError(
                    f"refusing {relative!r}: a name of {len(os.fsencode(part))} bytes, longer "
                    f"than the {self._name_max} the destination's file system holds"
                )
        target = self.root.joinpath(*parts)
        # Only existing components can be symlinks: check each parent directory once.
        directory = os.path.dirname(relative)
        if directory and directory not in self._checked:
            resolved = (self.root / directory).resolve()
            if resolved != self.root and self.root not in resolved.parents:
                raise SourceError(f"refusing {relative!r}: it resolves outside the destination")
            if (self.root / directory).is_dir():
                self._checked.add(directory)
        try:
            status = os.lstat(target)
        except OSError as exc:
            if exc.errno in _NOTHING_THERE:
                return target, False
            raise
        if stat.S_ISLNK(status.st_mode):
            resolved = target.resolve()
            if self.root not in resolved.parents:
                raise SourceError(f"refusing {relative!r}: it is a link out of the destination")
        return target, True


STAGING_DIR = ".s3xfer-download"  # then .s3xfer-download-2, -3... when a dataset path uses it
STAGING_MARK = "s3xfer-staging"  # in a staging directory s3xfer made: only those are used
_STAGING_NAMES = 100  # names tried before giving up
_MARK_TEXT = b"s3xfer keeps unfinished downloads here; safe to delete when no s3xfer runs\n"
_RUN_PREFIX = "run-"
# A file s3xfer creates: never an existing one, never through a link.
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def partial_name(relative: str) -> str:
    """The name, in the staging directory, of the partial file of a large object restored to
    `relative`: a hash of the path (fixed length, whatever the path's length), stable from
    one run to the next so that a killed download resumes."""
    return hashlib.blake2b(relative.encode("utf-8"), digest_size=16).hexdigest() + ".part"


def staging_names(in_use: Callable[[str], bool]) -> Iterator[str]:
    """The staging directory names to try, in order, skipping those a dataset path uses."""
    for number in range(1, _STAGING_NAMES + 1):
        name = STAGING_DIR if number == 1 else f"{STAGING_DIR}-{number}"
        if not in_use(name):
            yield name


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _set_mode_and_times(fd: int, mode: int, mtime_ns: int) -> None:
    """On the open file, so that a link put in its place is never followed."""
    os.fchmod(fd, restored_mode(mode))
    os.utime(fd, ns=(mtime_ns, mtime_ns))


class Staging:
    """s3xfer's own directory inside a destination. Every file a restore writes is made there
    first (created exclusively, never through a link), given its mode and mtime on its open
    descriptor, then renamed into place: no temporary name is ever beside a user's file, so
    none can collide with one, be a planted link, or make a long name too long.

    It holds the partial files and sidecars of large objects (named by partial_name, so a
    killed download resumes) and one private directory per run (`run-XXXXXXXX`, locked while
    the run lives, removed at its end; one a killed run left is removed by the next) for
    whole files. Its name is the first of `.s3xfer-download`, `.s3xfer-download-2`, ... that
    no dataset path uses and that is not something else already there; a marker file says
    s3xfer made it, and it is removed when nothing but the marker is left."""

    def __init__(self, directory: Path, dir_fd: int, run_name: str, run_fd: int) -> None:
        self.directory = directory
        self._dir_fd = dir_fd
        self._run_name = run_name
        self._run_fd = run_fd  # holds the run's lock
        self._names = itertools.count()
        # Directories this run made or found: not made again for each of their files (three
        # system calls and an exception per small file otherwise).
        self._directories: set[Path] = set()

    @classmethod
    def open(cls, root: Path, *, in_use: Callable[[str], bool]) -> Staging:
        """The staging directory under root (an existing directory), made or adopted, with a
        fresh run directory. `in_use(name)` says whether a dataset path starts with `name`."""
        for name in staging_names(in_use):
            try:
                dir_fd = _own_directory(root, name)
            except OSError as exc:
                raise destination_error(root / name, exc) from exc
            if dir_fd is not None:
                break
        else:
            raise DestinationError(
                f"cannot make a staging directory in {root}: {STAGING_DIR} and the "
                f"{_STAGING_NAMES - 1} names after it are all taken"
            )
        try:
            _remove_stale_runs(dir_fd)
            run_name, run_fd = _make_run_directory(dir_fd)
        except OSError as exc:
            os.close(dir_fd)
            raise destination_error(root / name, exc) from exc
        return cls(root / name, dir_fd, run_name, run_fd)

    def close(self) -> None:
        """Remove this run's directory, and the staging directory when nothing else is in it
        (a large object's partial file, kept for the next run to resume, keeps it)."""
        try:
            _empty_and_remove(self._dir_fd, self._run_name, self._run_fd)
            if os.listdir(self._dir_fd) == [STAGING_MARK]:
                os.unlink(STAGING_MARK, dir_fd=self._dir_fd)
                try:
                    os.rmdir(self.directory)
                except OSError:  # another run came in meanwhile: it is still s3xfer's
                    _create_marker(self._dir_fd)
        except OSError:
            pass  # left for the next run: nothing of the user's is at stake
        finally:
            os.close(self._dir_fd)

    def partial(self, relative: str) -> Path:
        """Where the bytes of a large object restored to `relative` are gathered."""
        return self.directory / partial_name(relative)

    def write(self, target: Path, data: bytes | memoryview, *, mtime_ns: int, mode: int) -> None:
        """Write a whole file to target, atomically: nothing partial is ever at target, and a
        write that fails (a full disk) leaves nothing behind. Raises DestinationError."""
        name = str(next(self._names))
        try:
            self._make_parent(target)
            fd = os.open(name, _NEW_FILE, 0o600, dir_fd=self._run_fd)
            try:
                _write_all(fd, data)
                _set_mode_and_times(fd, mode, mtime_ns)
            finally:
                os.close(fd)
            try:
                move_into_place(name, target, dir_fd=self._run_fd)
            except FileNotFoundError:  # its directory was removed meanwhile: made again
                self._directories.discard(target.parent)
                self._make_parent(target)
                move_into_place(name, target, dir_fd=self._run_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self._run_fd)
            raise destination_error(target, exc) from exc

    def _make_parent(self, target: Path) -> None:
        parent = target.parent
        if parent not in self._directories:
            parent.mkdir(parents=True, exist_ok=True)
            self._directories.add(parent)

    def write_many(
        self, files: Sequence[tuple[Path, bytes | memoryview, int, int]]
    ) -> list[DestinationError | None]:
        """Write (target, data, mtime_ns, mode) files one by one: each fails alone, with its
        own error (None for a file written). A full disk stops it: DiskFullError is raised."""
        errors: list[DestinationError | None] = []
        for target, data, mtime_ns, mode in files:
            try:
                self.write(target, data, mtime_ns=mtime_ns, mode=mode)
            except DiskFullError:
                raise
            except DestinationError as error:
                errors.append(error)
            else:
                errors.append(None)
        return errors

    async def write_file(self, target: Path, data: bytes, *, mtime_ns: int, mode: int) -> None:
        """`write`, in a worker thread."""
        await anyio.to_thread.run_sync(
            functools.partial(self.write, target, data, mtime_ns=mtime_ns, mode=mode)
        )

    async def write_files(
        self, files: Sequence[tuple[Path, bytes | memoryview, int, int]]
    ) -> list[DestinationError | None]:
        """`write_many` in one worker-thread call: restoring a shard range is hundreds of
        files, and a thread hop per file operation would cost more than the writes."""
        return await anyio.to_thread.run_sync(self.write_many, files)


@contextlib.asynccontextmanager
async def staging_in(root: Path, *, in_use: Callable[[str], bool]) -> AsyncIterator[Staging]:
    """Staging.open for the time of a restore, closed even when it is cancelled."""
    staging = await anyio.to_thread.run_sync(functools.partial(Staging.open, root, in_use=in_use))
    try:
        yield staging
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(staging.close)


def used_by(paths: Sequence[str]) -> Callable[[str], bool]:
    """in_use for Staging.open: whether a name is one of paths' first components."""
    return lambda name: any(p == name or p.startswith(name + "/") for p in paths)


def _own_directory(root: Path, name: str) -> int | None:
    """root/name opened, when it is a staging directory s3xfer made (now, or before: it has
    the marker); None when it is anything else (a user's directory, a file, a link)."""
    path = root / name
    try:
        os.mkdir(path, 0o700)
        made = True
    except FileExistsError:
        made = False
    try:
        fd = os.open(path, _DIRECTORY)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return None  # a link, or not a directory: never ours
        raise
    if made:
        try:
            _create_marker(fd)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.rmdir(path)
            raise
        return fd
    try:
        marked = stat.S_ISREG(os.stat(STAGING_MARK, dir_fd=fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        marked = False
    if not marked:
        os.close(fd)
        return None
    return fd


def _create_marker(dir_fd: int) -> None:
    with contextlib.suppress(FileExistsError):
        fd = os.open(STAGING_MARK, _NEW_FILE, 0o644, dir_fd=dir_fd)
        try:
            _write_all(fd, _MARK_TEXT)
        finally:
            os.close(fd)


def _make_run_directory(dir_fd: int) -> tuple[str, int]:
    while True:
        name = _RUN_PREFIX + secrets.token_hex(4)
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
            break
        except FileExistsError:
            continue
    fd = os.open(name, _DIRECTORY, dir_fd=dir_fd)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new directory: nobody else holds it
    return name, fd


def _remove_stale_runs(dir_fd: int) -> None:
    """Remove the run directories of runs that are gone (killed): their lock is free."""
    for entry in os.scandir(dir_fd):
        if not entry.name.startswith(_RUN_PREFIX):
            continue
        try:
            fd = os.open(entry.name, _DIRECTORY, dir_fd=dir_fd)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # a live run holds it
            continue
        with contextlib.suppress(OSError):
            _empty_and_remove(dir_fd, entry.name, fd)


def _empty_and_remove(dir_fd: int, name: str, fd: int) -> None:
    """Remove run directory `name` (open as fd, locked) and the files in it; closes fd."""
    try:
        for entry in os.scandir(fd):
            with contextlib.suppress(OSError):
                os.unlink(entry.name, dir_fd=fd)
        os.rmdir(name, dir_fd=dir_fd)
    finally:
        os.close(fd)


def move_into_place(name: str | Path, target: Path, *, dir_fd: int | None = None) -> None:
    """Rename file `name` (of directory dir_fd, when given) to target. A target on another
    file system (a mount point inside the destination) gets a copy instead: made in a private
    directory beside target (mkdtemp: no name of the user's is touched), then renamed."""
    try:
        os.replace(name, target, src_dir_fd=dir_fd)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    holder = Path(tempfile.mkdtemp(prefix=".s3xfer-", dir=target.parent))
    try:
        source = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            copy = os.open(holder / "f", _NEW_FILE, 0o600)
            try:
                with (
                    open(source, "rb", closefd=False) as reader,
                    open(copy, "wb", closefd=False) as writer,
                ):
                    shutil.copyfileobj(reader, writer, 1024 * 1024)
                kept = os.fstat(source)
                _set_mode_and_times(copy, kept.st_mode, kept.st_mtime_ns)
            finally:
                os.close(copy)
        finally:
            os.close(source)
        os.replace(holder / "f", target)
        os.unlink(name, dir_fd=dir_fd)
    finally:
        with contextlib.suppress(OSError):
            (holder / "f").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            holder.rmdir()

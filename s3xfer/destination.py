"""Local files, the writing side: restored files written into a destination (SafeDestination,
Staging, move_into_place): nothing outside the destination, no temporary name beside a user's
file, no link ever followed. Reading local files for upload is `localfs.py`'s.
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
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import anyio

from .dataset.validate import restored_mode
from .errors import DestinationError, DiskFullError, SourceError


def destination_error(path: Path, exc: OSError) -> DestinationError:
    """The error for a failed write of path: DiskFullError when there is no space left."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return (DiskFullError if full else DestinationError)(
        f"cannot write {path}: {exc.strerror or exc}"
    )


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

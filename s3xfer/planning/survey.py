"""Survey of a local tree: one streaming walk (`scan`) and its size statistics (`survey`).

Owns what counts as an uploadable file, the order files are found in, and the problems
reported in place of files that cannot be uploaded.
"""

from __future__ import annotations

import errno
import heapq
import math
import os
import stat
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s3xfer.dataset.keys import RESERVED_REASON, is_reserved_path
from s3xfer.errors import SourceError
from s3xfer.planning.globs import NO_FILTER, PathFilter

FORMAT_VERSION = 1
DEFAULT_TOP_N = 10
PROGRESS_EVERY = 1000

# Problem reasons: short, stable strings (the CLI prints them, tests and tools match on them).
PERMISSION_DENIED = "permission denied"
BROKEN_SYMLINK = "broken symlink"
SYMLINK_LOOP = "symlink loop"
DIRECTORY_LOOP = "directory loop"
SYMLINK_SKIPPED = "symlink not followed"
FIFO = "fifo"
SOCKET = "socket"
DEVICE = "device"
UNSUPPORTED_TYPE = "unsupported file type"
VANISHED = "vanished"
NOT_UTF8 = "name is not valid UTF-8"
RESERVED = RESERVED_REASON  # `.s3xfer` at the root: its objects would overwrite s3xfer's own

_NOT_FILES = frozenset(
    {
        BROKEN_SYMLINK,
        SYMLINK_LOOP,
        DIRECTORY_LOOP,
        SYMLINK_SKIPPED,
        FIFO,
        SOCKET,
        DEVICE,
        UNSUPPORTED_TYPE,
    }
)
_ACCESS_EFFECTIVE = os.access in os.supports_effective_ids


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One regular file to transfer. `path` is relative to the survey root, '/'-separated."""

    path: str
    size: int
    mtime_ns: int
    mode: int  # permission bits only: st_mode & 0o7777

    def to_json(self) -> list[Any]:
        # A list, not a dict: a million entries should not repeat four key names each.
        return [self.path, self.size, self.mtime_ns, self.mode]

    @classmethod
    def from_json(cls, data: Any) -> FileEntry:
        if not isinstance(data, list) or len(data) != 4:
            raise ValueError(f"file entry must be [path, size, mtime_ns, mode], got {data!r}")
        path, size, mtime_ns, mode = data
        if not isinstance(path, str) or not is_safe_relative_path(path):
            raise ValueError(f"file entry path must be a safe relative path, got {path!r}")
        if is_reserved_path(path):
            raise ValueError(f"file entry path {path!r} is {RESERVED}")
        for name, value in (("size", size), ("mtime_ns", mtime_ns), ("mode", mode)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"file entry {name} must be an integer, got {value!r}")
        if size < 0 or not 0 <= mode <= 0o7777:
            raise ValueError(f"file entry out of range: {data!r}")
        return cls(path, size, mtime_ns, mode)


@dataclass(frozen=True, slots=True)
class Problem:
    """A path that was found but will not be transferred, and why (one of the reason constants,
    or the lower-cased OS message for rarer errors)."""

    path: str
    reason: str

    @property
    def unreadable(self) -> bool:
        """A file that should have been transferred but could not be read, or may not be
        (as opposed to a path that is not a regular file: links not followed, loops, fifos,
        devices): the upload names it and fails."""
        return self.reason not in _NOT_FILES

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}

    @classmethod
    def from_json(cls, data: Any) -> Problem:
        if not isinstance(data, dict) or not all(
            isinstance(data.get(key), str) for key in ("path", "reason")
        ):
            raise ValueError(f"problem must be {{'path': str, 'reason': str}}, got {data!r}")
        return cls(data["path"], data["reason"])


def is_safe_relative_path(path: str) -> bool:
    """True for a non-empty relative POSIX path with no empty, '.' or '..' component."""
    if not path or path.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


# ---------------------------------------------------------------------------------------------
# The walk


def scan(
    root: Path, *, follow_symlinks: bool = True, selection: PathFilter = NO_FILTER
) -> Iterator[FileEntry | Problem]:
    """Yield every regular file under `root`, and a Problem for everything else worth a word.

    Order: depth-first with the entries of each directory sorted so that the yielded paths
    are in plain string order (a directory sorts as "name/"), which keeps neighbours together
    and makes the order reproducible. Memory holds one sorted directory listing per level of
    the current path, never the whole tree.

    Symlinks to files are followed like `aws s3 cp`; symlinked directories are followed too,
    with a loop reported instead of descended. With follow_symlinks=False every symlink is
    reported as a Problem and not followed. The root itself is always followed.

    A root that is a regular file yields one entry named after it (relative to its parent).
    Errors about the root are raised at once as SourceError, not on the first `next()`.

    With a `selection` (--include/--exclude) only the paths it selects are yielded, files and
    problems alike, and a directory it excludes whole is not walked at all.
    """
    root_str = os.fspath(root)
    try:
        root_stat = os.stat(root_str)
    except OSError as exc:
        raise SourceError(f"{_root_error(exc)}: {root}") from exc

    if stat.S_ISREG(root_stat.st_mode):
        name = os.path.basename(os.path.normpath(root_str))
        if not os.access(root_str, os.R_OK, effective_ids=_ACCESS_EFFECTIVE):
            raise SourceError(f"permission denied: {root}")
        if not _is_utf8(name):
            return iter([Problem(_printable_name(name), NOT_UTF8)])
        if is_reserved_path(name):
            return iter([Problem(name, RESERVED)])
        if not selection.selects(name):
            return iter([])
        return iter([_file_entry(name, root_stat)])
    if not stat.S_ISDIR(root_stat.st_mode):
        raise SourceError(f"not a regular file or directory: {root}")
    try:
        listing = _sorted_listing(root_str, follow_symlinks=follow_symlinks)
    except OSError as exc:
        raise SourceError(f"{_root_error(exc)}: {root}") from exc
    root_id = (root_stat.st_dev, root_stat.st_ino)
    return _walk(listing, root_id, follow_symlinks=follow_symlinks, selection=selection)


def base_dir(root: Path) -> Path:
    """The directory that scanned paths are relative to: `root`, or its parent for a file."""
    return root if root.is_dir() else root.parent


def _walk(
    root_listing: list[os.DirEntry[str]],
    root_id: tuple[int, int],
    *,
    follow_symlinks: bool,
    selection: PathFilter,
) -> Iterator[FileEntry | Problem]:
    # One frame per directory on the current path: (relative prefix, its entries, its id).
    stack = [("", iter(root_listing), root_id)]
    on_path = {root_id}
    while stack:
        prefix, entries, dir_id = stack[-1]
        for entry in entries:
            rel = prefix + entry.name
            if not _is_utf8(entry.name):
                # S3 keys are UTF-8; below a bad directory name every path would be bad too.
                yield Problem(_printable_name(rel), NOT_UTF8)
                continue
            if selection and not _selected(entry, rel, selection, follow_symlinks):
                continue  # an excluded `.s3xfer` too: nothing of it was to be uploaded
            if not prefix and is_reserved_path(rel):
                yield Problem(rel, RESERVED)  # not walked: none of it is uploaded
                continue
            is_link = False
            try:
                is_link = entry.is_symlink()
                if is_link and not follow_symlinks:
                    yield Problem(rel, SYMLINK_SKIPPED)
                    continue
                st = entry.stat()  # follows a symlink; cached from the sort's is_dir()
            except OSError as exc:
                yield Problem(rel, _entry_error(exc, is_link=is_link))
                continue

            mode = st.st_mode
            if stat.S_ISREG(mode):
                # Cheap check first: most files are world-readable, so skip the syscall.
                if mode & 0o444 != 0o444 and not os.access(
                    entry.path, os.R_OK, effective_ids=_ACCESS_EFFECTIVE
                ):
                    yield Problem(rel, PERMISSION_DENIED)
                else:
                    yield _file_entry(rel, st)
            elif stat.S_ISDIR(mode):
                child_id = (st.st_dev, st.st_ino)
                if child_id in on_path:
                    yield Problem(rel, SYMLINK_LOOP if is_link else DIRECTORY_LOOP)
                    continue
                try:
                    children = _sorted_listing(entry.path, follow_symlinks=follow_symlinks)
                except OSError as exc:
                    yield Problem(rel, _entry_error(exc, is_link=False))
                    continue
                stack.append((rel + "/", iter(children), child_id))
                on_path.add(child_id)
                break  # descend now; this frame's iterator resumes after the child is done
            else:
                yield Problem(rel, _special_reason(mode))
        else:
            stack.pop()
            on_path.discard(dir_id)


def _selected(
    entry: os.DirEntry[str], rel: str, selection: PathFilter, follow_symlinks: bool
) -> bool:
    """Whether a directory entry is wanted, decided before it is looked at (no stat: the
    sort's is_dir() is cached): a file by its path, a directory by whether anything below it
    may be; an entry whose kind is unknown (it cannot be looked at) by either."""
    try:
        is_dir: bool | None = entry.is_dir(follow_symlinks=follow_symlinks)
    except OSError:
        is_dir = None
    if is_dir is None:
        return selection.selects(rel) or selection.may_select_under(rel)
    return selection.may_select_under(rel) if is_dir else selection.selects(rel)


def _sorted_listing(path: str, *, follow_symlinks: bool) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        entries = list(it)  # closes the directory fd now, so deep trees hold no fds open

    def key(entry: os.DirEntry[str]) -> str:
        try:
            is_dir = entry.is_dir(follow_symlinks=follow_symlinks)
        except OSError:
            is_dir = False  # reported properly when the walk reaches this entry
        return entry.name + "/" if is_dir else entry.name

    entries.sort(key=key)
    return entries


# A handful of distinct modes covers almost every tree; sharing the int objects saves
# ~32 bytes per kept FileEntry.
_MODES: dict[int, int] = {}


def _file_entry(rel: str, st: os.stat_result) -> FileEntry:
    mode = st.st_mode & 0o7777
    return FileEntry(rel, st.st_size, st.st_mtime_ns, _MODES.setdefault(mode, mode))


def _is_utf8(name: str) -> bool:
    if name.isascii():
        return True
    try:
        name.encode("utf-8")  # undecodable bytes arrive as lone surrogates (surrogateescape)
    except UnicodeEncodeError:
        return False
    return True


def _printable_name(path: str) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _entry_error(exc: OSError, *, is_link: bool) -> str:
    if isinstance(exc, FileNotFoundError):
        return BROKEN_SYMLINK if is_link else VANISHED
    if isinstance(exc, PermissionError):
        return PERMISSION_DENIED
    if exc.errno == errno.ELOOP:
        return SYMLINK_LOOP
    return (exc.strerror or type(exc).__name__).lower()


def _root_error(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file or directory"
    if isinstance(exc, NotADirectoryError):
        return "not a directory"
    return _entry_error(exc, is_link=False)


def _special_reason(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return FIFO
    if stat.S_ISSOCK(mode):
        return SOCKET
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return DEVICE
    return UNSUPPORTED_TYPE


# ---------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True, slots=True)
class HistogramBin:
    """Files with lo <= size < hi. Bin 0 is [0, 1): the empty files."""

    lo: int
    hi: int
    count: int

    def to_json(self) -> dict[str, int]:
        return {"lo": self.lo, "hi": self.hi, "count": self.count}

    @classmethod
    def from_json(cls, data: Any) -> HistogramBin:
        return cls(int(data["lo"]), int(data["hi"]), int(data["count"]))


def bin_index(size: int) -> int:
    """Log2 bucket of a size: 0 for 0, k for 2**(k-1) <= size < 2**k."""
    return size.bit_length()


def bin_bounds(index: int) -> tuple[int, int]:
    """[lo, hi) of bucket `index`."""
    return (0, 1) if index == 0 else (1 << (index - 1), 1 << index)


@dataclass(frozen=True, slots=True)
class SizeSummary:
    """A frozen snapshot of SizeStats: what a Survey carries and what `--json` prints.

    With no files every figure is 0 and the histogram and largest lists are empty.
    """

    count: int
    total_bytes: int
    min_size: int
    max_size: int
    mean: float
    median: float
    stdev: float  # population standard deviation
    histogram: list[HistogramBin]  # contiguous from the lowest to the highest non-empty bin
    largest: list[tuple[int, str]]  # (size, path), biggest first; ties in scan order

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "total_bytes": self.total_bytes,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "mean": self.mean,
            "median": self.median,
            "stdev": self.stdev,
            "histogram": [b.to_json() for b in self.histogram],
            "largest": [{"size": size, "path": path} for size, path in self.largest],
        }

    @classmethod
    def from_json(cls, data: Any) -> SizeSummary:
        try:
            return cls(
                count=int(data["count"]),
                total_bytes=int(data["total_bytes"]),
                min_size=int(data["min_size"]),
                max_size=int(data["max_size"]),
                mean=float(data["mean"]),
                median=float(data["median"]),
                stdev=float(data["stdev"]),
                histogram=[HistogramBin.from_json(b) for b in data["histogram"]],
                largest=[(int(item["size"]), str(item["path"])) for item in data["largest"]],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed size summary: {exc}") from exc


class SizeStats:
    """Streaming accumulator of file sizes.

    Memory: 8 bytes per file (sizes kept in an array('Q') for an exact median) plus the top-N
    heap. Sums are exact integers, so mean and stdev are correctly rounded, not drifted.
    """

    __slots__ = (
        "_bins",
        "_heap",
        "_max",
        "_median_cache",
        "_min",
        "_seq",
        "_sizes",
        "_sum_squares",
        "_top_n",
        "_total",
    )

    def __init__(self, *, top_n: int = DEFAULT_TOP_N) -> None:
        if top_n < 0:
            raise ValueError(f"top_n must be >= 0, got {top_n}")
        self._top_n = top_n
        self._sizes = array("Q")
        self._total = 0
        self._sum_squares = 0
        self._min = 0
        self._max = 0
        self._bins: list[int] = []
        # Min-heap of (size, -sequence, path): the root is the first to drop out, and on equal
        # sizes the later file drops first, so ties keep scan order.
        self._heap: list[tuple[int, int, str]] = []
        self._seq = 0
        self._median_cache: tuple[int, float] | None = None

    def add(self, size: int, path: str) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size} for {path!r}")
        self._sizes.append(size)
        count = len(self._sizes)
        if count == 1:
            self._min = self._max = size
        elif size < self._min:
            self._min = size
        elif size > self._max:
            self._max = size
        self._total += size
        self._sum_squares += size * size
        index = size.bit_length()
        bins = self._bins
        if index >= len(bins):
            bins.extend([0] * (index + 1 - len(bins)))
        bins[index] += 1
        self._seq += 1
        heap = self._heap
        if len(heap) < self._top_n:
            heapq.heappush(heap, (size, -self._seq, path))
        elif self._top_n and size > heap[0][0]:
            heapq.heapreplace(heap, (size, -self._seq, path))

    @property
    def count(self) -> int:
        return len(self._sizes)

    @property
    def total_bytes(self) -> int:
        return self._total

    @property
    def min_size(self) -> int:
        return self._min

    @property
    def max_size(self) -> int:
        return self._max

    @property
    def mean(self) -> float:
        return self._total / self.count if self.count else 0.0

    @property
    def median(self) -> float:
        count = self.count
        if not count:
            return 0.0
        cached = self._median_cache
        if cached is not None and cached[0] == count:
            return cached[1]
        ordered = sorted(self._sizes)  # transient: one list of (mostly shared) ints
        mid = count // 2
        value = float(ordered[mid]) if count % 2 else (ordered[mid - 1] + ordered[mid]) / 2
        self._median_cache = (count, value)
        return value

    @property
    def stdev(self) -> float:
        count = self.count
        if not count:
            return 0.0
        # Exact integer variance numerator; one rounding in the division, one in the sqrt.
        return math.sqrt((count * self._sum_squares - self._total * self._total) / (count * count))

    @property
    def histogram(self) -> list[HistogramBin]:
        bins = self._bins
        used = [i for i, n in enumerate(bins) if n]
        if not used:
            return []
        return [HistogramBin(*bin_bounds(i), bins[i]) for i in range(used[0], used[-1] + 1)]

    @property
    def largest(self) -> list[tuple[int, str]]:
        return [(size, path) for size, _, path in sorted(self._heap, reverse=True)]

    def summary(self) -> SizeSummary:
        return SizeSummary(
            count=self.count,
            total_bytes=self.total_bytes,
            min_size=self.min_size,
            max_size=self.max_size,
            mean=self.mean,
            median=self.median,
            stdev=self.stdev,
            histogram=self.histogram,
            largest=self.largest,
        )

    def to_json(self) -> dict[str, Any]:
        return self.summary().to_json()


# ---------------------------------------------------------------------------------------------
# The survey


@dataclass(frozen=True, slots=True)
class Survey:
    """What `survey` found. `root` is the directory every path is relative to (the parent
    directory when a single file was surveyed); `files` is empty when not kept; `selection`:
    the --include/--exclude globs the tree was walked with (only what they select was kept)."""

    root: Path
    files: list[FileEntry]
    problems: list[Problem]
    stats: SizeSummary
    selection: PathFilter = NO_FILTER

    def to_json(self, *, include_files: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "root": os.fspath(self.root),
            "stats": self.stats.to_json(),
            "problems": [p.to_json() for p in self.problems],
        }
        if self.selection:
            data["selection"] = self.selection.to_json()
        if include_files:
            data["files"] = [f.to_json() for f in self.files]
        return data

    @classmethod
    def from_json(cls, data: Any) -> Survey:
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            raise ValueError(f"not a survey of format {FORMAT_VERSION}")
        return cls(
            root=Path(data["root"]),
            files=[FileEntry.from_json(f) for f in data.get("files", [])],
            problems=[Problem.from_json(p) for p in data["problems"]],
            stats=SizeSummary.from_json(data["stats"]),
            selection=PathFilter.from_json(data.get("selection")),
        )


def survey(
    root: Path,
    *,
    keep_files: bool = True,
    follow_symlinks: bool = True,
    top_n: int = DEFAULT_TOP_N,
    on_progress: Callable[[int, int], None] | None = None,
    selection: PathFilter = NO_FILTER,
) -> Survey:
    """Walk `root` once (see `scan`) and summarise it: of the paths `selection` selects only.

    on_progress(files_so_far, bytes_so_far) is called every PROGRESS_EVERY files and once
    at the end. Raises SourceError when the root itself cannot be read.
    """
    entries = scan(root, follow_symlinks=follow_symlinks, selection=selection)
    stats = SizeStats(top_n=top_n)
    files: list[FileEntry] = []
    problems: list[Problem] = []
    add = stats.add
    keep = files.append
    next_report = PROGRESS_EVERY
    for item in entries:
        if isinstance(item, FileEntry):
            add(item.size, item.path)
            if keep_files:
                keep(item)
            if on_progress is not None and stats.count >= next_report:
                next_report += PROGRESS_EVERY
                on_progress(stats.count, stats.total_bytes)
        else:
            problems.append(item)
    if on_progress is not None:
        on_progress(stats.count, stats.total_bytes)
    return Survey(
        root=base_dir(Path(os.path.abspath(root))),
        files=files,
        problems=problems,
        stats=stats.summary(),
        selection=selection,
    )

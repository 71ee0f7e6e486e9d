"""Survey: the tree walk over real temporary trees, the size statistics, and their rendering."""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s3xfer.cli.render import BAR, BAR_WIDTH, MAX_PROBLEMS, bin_label, human_bytes, render_survey
from s3xfer.errors import SourceError
from s3xfer.planning.survey import (
    BROKEN_SYMLINK,
    FIFO,
    NOT_UTF8,
    PERMISSION_DENIED,
    SOCKET,
    SYMLINK_LOOP,
    SYMLINK_SKIPPED,
    VANISHED,
    FileEntry,
    HistogramBin,
    Problem,
    SizeStats,
    SizeSummary,
    Survey,
    bin_bounds,
    bin_index,
    scan,
    survey,
)

from ..integration.helpers import without_file_permission_override

RUNNING_AS_ROOT = os.geteuid() == 0


def write(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def files_of(items: Iterator[FileEntry | Problem]) -> dict[str, int]:
    return {item.path: item.size for item in items if isinstance(item, FileEntry)}


def problems_of(items: Iterator[FileEntry | Problem]) -> dict[str, str]:
    return {item.path: item.reason for item in items if isinstance(item, Problem)}


# --- what the walk finds -------------------------------------------------------------------


def test_nested_tree_yields_every_regular_file_with_relative_posix_paths(tmp_path: Path) -> None:
    long_name = "l" * 255  # NAME_MAX on Linux file systems
    write(tmp_path / "top.txt", b"12345")
    write(tmp_path / "a" / "b" / "c" / "deep.bin", b"x" * 3000)
    write(tmp_path / "a" / "empty")
    write(tmp_path / "ünïcødé" / "日本語.txt", b"hello")
    write(tmp_path / "a" / long_name, b"1")
    (tmp_path / "empty-dir" / "nested-empty").mkdir(parents=True)

    found = files_of(scan(tmp_path))

    assert found == {
        "top.txt": 5,
        "a/b/c/deep.bin": 3000,
        "a/empty": 0,
        "ünïcødé/日本語.txt": 5,
        f"a/{long_name}": 1,
    }


def test_entries_carry_mtime_and_permission_bits(tmp_path: Path) -> None:
    path = write(tmp_path / "script.sh", b"#!/bin/sh\n")
    os.chmod(path, 0o4755)
    os.utime(path, ns=(1_000_000_000, 1_234_567_891_011_121_314))

    [entry] = list(scan(tmp_path))

    assert entry == FileEntry("script.sh", 10, 1_234_567_891_011_121_314, 0o4755)


def test_order_is_plain_string_order_of_the_paths_and_repeatable(tmp_path: Path) -> None:
    # Names with characters below '/' are where depth-first and string order could disagree.
    for name in ["a.txt", "a/b", "a/c/d", "a-b", "a b", "a0", "A", "b", "a/.hidden", "_", "~"]:
        write(tmp_path / name, b"x")

    first = [item.path for item in scan(tmp_path)]
    second = [item.path for item in scan(tmp_path)]

    assert first == sorted(first)
    assert first == second
    assert len(first) == 11


def test_neighbouring_paths_stay_together(tmp_path: Path) -> None:
    for directory in ("x", "y"):
        for index in range(3):
            write(tmp_path / directory / f"{index}", b"")
    write(tmp_path / "x.txt")

    paths = [item.path for item in scan(tmp_path)]

    assert paths == ["x.txt", "x/0", "x/1", "x/2", "y/0", "y/1", "y/2"]


def test_a_tree_deeper_than_the_recursion_limit_is_walked(tmp_path: Path) -> None:
    depth = 1200  # > sys.getrecursionlimit() (1000), short names keep it under PATH_MAX
    deep = tmp_path
    for _ in range(depth):  # one level at a time: pathlib's mkdir(parents=True) recurses
        deep = deep / "d"
        deep.mkdir()
    write(deep / "f", b"bottom")

    try:
        items = list(scan(tmp_path))
    finally:
        # pytest's own cleanup (shutil.rmtree) recurses per level and would fail on this tree.
        (deep / "f").unlink()
        while deep != tmp_path:
            deep.rmdir()
            deep = deep.parent

    assert files_of(iter(items)) == {"d/" * depth + "f": 6}


# --- symlinks ------------------------------------------------------------------------------


def test_symlink_to_a_file_is_followed_under_the_links_name(tmp_path: Path) -> None:
    write(tmp_path / "real.txt", b"contents")
    (tmp_path / "link.txt").symlink_to("real.txt")

    assert files_of(scan(tmp_path)) == {"link.txt": 8, "real.txt": 8}


def test_symlinked_directory_is_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside / "f.txt", b"abc")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "linked").symlink_to(outside, target_is_directory=True)

    assert files_of(scan(tree)) == {"linked/f.txt": 3}


def test_broken_symlink_is_a_problem_and_the_walk_goes_on(tmp_path: Path) -> None:
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    write(tmp_path / "z.txt", b"z")

    items = list(scan(tmp_path))

    assert problems_of(iter(items)) == {"dangling": BROKEN_SYMLINK}
    assert files_of(iter(items)) == {"z.txt": 1}


def test_directory_link_to_its_parent_is_a_loop_not_an_endless_walk(tmp_path: Path) -> None:
    write(tmp_path / "a" / "file", b"1")
    (tmp_path / "a" / "up").symlink_to("..", target_is_directory=True)
    (tmp_path / "self").symlink_to("self")  # a link that resolves to itself: ELOOP

    items = list(scan(tmp_path))

    assert files_of(iter(items)) == {"a/file": 1}
    assert problems_of(iter(items)) == {"a/up": SYMLINK_LOOP, "self": SYMLINK_LOOP}


def test_with_follow_symlinks_false_every_link_is_reported_and_skipped(tmp_path: Path) -> None:
    write(tmp_path / "real.txt", b"contents")
    (tmp_path / "link.txt").symlink_to("real.txt")
    (tmp_path / "dirlink").symlink_to(".", target_is_directory=True)

    items = list(scan(tmp_path, follow_symlinks=False))

    assert files_of(iter(items)) == {"real.txt": 8}
    assert problems_of(iter(items)) == {"dirlink": SYMLINK_SKIPPED, "link.txt": SYMLINK_SKIPPED}


# --- things that are not regular files, and things that cannot be read ---------------------


def test_fifo_and_socket_are_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    os.mkfifo(tmp_path / "pipe")
    monkeypatch.chdir(tmp_path)  # a relative bind path dodges the 108-byte sun_path limit
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("sock")
        items = list(scan(tmp_path))

    assert problems_of(iter(items)) == {"pipe": FIFO, "sock": SOCKET}
    assert files_of(iter(items)) == {}


SCAN_IN_CHILD = (
    "import json, sys; from s3xfer.planning.survey import scan, Problem;"
    "items = list(scan(sys.argv[1]));"
    "print(json.dumps({'problems': {i.path: i.reason for i in items if isinstance(i, Problem)},"
    "'files': {i.path: i.size for i in items if not isinstance(i, Problem)}}))"
)


def test_unreadable_file_and_directory_are_problems_for_real(tmp_path: Path) -> None:
    secret = write(tmp_path / "secret", b"s")
    locked = tmp_path / "locked"
    write(locked / "inside", b"i")
    write(tmp_path / "ok", b"ok")
    secret.chmod(0)
    locked.chmod(0)
    try:
        # In a child that obeys file modes even as root (which otherwise reads anything).
        result = subprocess.run(
            [sys.executable, "-c", SCAN_IN_CHILD, str(tmp_path)],
            capture_output=True,
            text=True,
            check=True,
            preexec_fn=without_file_permission_override if RUNNING_AS_ROOT else None,
        )
    finally:
        locked.chmod(0o755)
    found = json.loads(result.stdout)

    assert found["problems"] == {"locked": PERMISSION_DENIED, "secret": PERMISSION_DENIED}
    assert found["files"] == {"ok": 2}


def test_file_the_access_check_refuses_is_permission_denied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Runs as root too: the walk asks os.access about files without read bits for everyone.
    secret = write(tmp_path / "secret", b"s")
    secret.chmod(0o600)
    write(tmp_path / "public", b"p")
    asked: list[str] = []

    def refuse(path: str, mode: int, **_: object) -> bool:
        asked.append(os.path.basename(path))
        return False

    monkeypatch.setattr(os, "access", refuse)

    items = list(scan(tmp_path))

    assert problems_of(iter(items)) == {"secret": PERMISSION_DENIED}
    assert files_of(iter(items)) == {"public": 1}
    assert asked == ["secret"]  # world-readable files skip the syscall


def test_unlistable_directory_is_a_problem_and_the_walk_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "locked" / "inside", b"i")
    write(tmp_path / "open" / "inside", b"o")
    real_scandir = os.scandir

    def scandir(path: str) -> Iterator[os.DirEntry[str]]:
        if os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)

    items = list(scan(tmp_path))

    assert problems_of(iter(items)) == {"locked": PERMISSION_DENIED}
    assert files_of(iter(items)) == {"open/inside": 1}


def test_file_deleted_during_the_walk_is_reported_as_vanished(tmp_path: Path) -> None:
    write(tmp_path / "first", b"1")
    write(tmp_path / "second", b"2")
    items = scan(tmp_path)  # the root is listed now

    first = next(items)
    (tmp_path / "second").unlink()
    rest = list(items)

    assert isinstance(first, FileEntry)
    assert first.path == "first"
    assert rest == [Problem("second", VANISHED)]


def test_name_that_is_not_utf8_is_a_problem_shown_with_escapes(tmp_path: Path) -> None:
    bad_dir = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    try:
        os.mkdir(bad_dir)
    except OSError as exc:  # some file systems refuse undecodable names outright
        pytest.skip(f"file system rejects non-UTF-8 names: {exc}")
    with open(os.path.join(bad_dir, b"inner"), "wb") as handle:
        handle.write(b"x")
    write(tmp_path / "good", b"g")

    items = list(scan(tmp_path))

    assert problems_of(iter(items)) == {"caf\\xe9": NOT_UTF8}
    assert files_of(iter(items)) == {"good": 1}
    json.dumps([p.to_json() for p in items if isinstance(p, Problem)])  # printable as JSON


# --- the root ------------------------------------------------------------------------------


def test_missing_root_raises_source_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "not-here"
    with pytest.raises(SourceError, match=r"^no such file or directory: .*not-here$"):
        scan(missing)  # raised on the call, not on the first next()
    with pytest.raises(SourceError):
        survey(missing)


def test_root_that_is_a_fifo_raises_source_error(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(SourceError, match="not a regular file or directory"):
        scan(tmp_path / "pipe")


def test_root_that_is_a_file_yields_one_entry_named_after_it(tmp_path: Path) -> None:
    path = write(tmp_path / "dir" / "one.bin", b"abcd")

    assert files_of(scan(path)) == {"one.bin": 4}
    result = survey(path)
    assert result.root == tmp_path / "dir"  # paths are relative to the parent
    assert [(result.root / f.path).read_bytes() for f in result.files] == [b"abcd"]


def test_empty_directory_gives_count_zero(tmp_path: Path) -> None:
    result = survey(tmp_path)

    assert result.files == []
    assert result.problems == []
    assert result.stats == SizeSummary(0, 0, 0, 0, 0.0, 0.0, 0.0, [], [])


# --- survey --------------------------------------------------------------------------------


def build_sample_tree(root: Path) -> None:
    for index in range(2500):
        write(root / f"d{index // 1000}" / f"f{index:04d}", b"x" * (index % 100))
    (root / "dangling").symlink_to("nowhere")


def test_survey_summarises_files_and_collects_problems(tmp_path: Path) -> None:
    build_sample_tree(tmp_path)
    sizes = [index % 100 for index in range(2500)]

    result = survey(tmp_path)

    assert result.root == tmp_path
    assert len(result.files) == 2500
    assert result.problems == [Problem("dangling", BROKEN_SYMLINK)]
    assert result.stats.count == 2500
    assert result.stats.total_bytes == sum(sizes)
    assert result.stats.median == statistics.median(sizes)
    assert result.stats.largest[0] == (99, "d0/f0099")  # ties keep scan order


def test_survey_without_keeping_files_still_counts_them(tmp_path: Path) -> None:
    build_sample_tree(tmp_path)

    result = survey(tmp_path, keep_files=False)

    assert result.files == []
    assert result.stats == survey(tmp_path).stats


def test_progress_is_reported_every_thousand_files_and_at_the_end(tmp_path: Path) -> None:
    build_sample_tree(tmp_path)
    calls: list[tuple[int, int]] = []

    result = survey(tmp_path, on_progress=lambda files, size: calls.append((files, size)))

    assert [files for files, _ in calls] == [1000, 2000, 2500]
    assert calls[-1] == (result.stats.count, result.stats.total_bytes)
    assert [size for _, size in calls] == sorted(size for _, size in calls)


def test_survey_json_round_trips(tmp_path: Path) -> None:
    build_sample_tree(tmp_path)
    result = survey(tmp_path)

    data = json.loads(json.dumps(result.to_json(include_files=True)))

    assert Survey.from_json(data) == result
    assert "files" not in result.to_json()
    assert data["files"][0] == ["d0/f0000", 0, result.files[0].mtime_ns, result.files[0].mode]


@pytest.mark.parametrize(
    "data",
    [
        ["../escape", 1, 0, 0o644],
        ["/absolute", 1, 0, 0o644],
        ["a//b", 1, 0, 0o644],
        ["a/./b", 1, 0, 0o644],
        ["", 1, 0, 0o644],
        ["ok", -1, 0, 0o644],
        ["ok", 1, 0, 0o10000],
        ["ok", True, 0, 0o644],
        ["ok", 1, 0],
        {"path": "ok"},
    ],
)
def test_file_entry_from_json_rejects_unsafe_or_malformed_input(data: object) -> None:
    with pytest.raises(ValueError):
        FileEntry.from_json(data)


def test_file_entry_from_json_accepts_dotted_names_that_are_not_dot_components() -> None:
    assert FileEntry.from_json(["..hidden/a..b", 1, 2, 0o644]).path == "..hidden/a..b"


# --- statistics ----------------------------------------------------------------------------

sizes_strategy = st.lists(
    st.one_of(st.integers(0, 4096), st.integers(0, 2**40), st.integers(0, 2**64 - 1)),
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(sizes=sizes_strategy, top_n=st.integers(0, 12))
def test_stats_agree_with_the_statistics_module(sizes: list[int], top_n: int) -> None:
    stats = SizeStats(top_n=top_n)
    for index, size in enumerate(sizes):
        stats.add(size, f"f{index}")

    assert stats.count == len(sizes)
    assert stats.total_bytes == sum(sizes)
    if not sizes:
        assert stats.summary() == SizeSummary(0, 0, 0, 0, 0.0, 0.0, 0.0, [], [])
        return
    assert stats.min_size == min(sizes)
    assert stats.max_size == max(sizes)
    assert stats.mean == sum(sizes) / len(sizes)  # exact sum, one rounding
    assert math.isclose(stats.mean, statistics.mean(sizes), rel_tol=1e-15)
    assert stats.median == float(statistics.median(sizes))  # a float, like the mean
    assert math.isclose(stats.stdev, statistics.pstdev(sizes), rel_tol=1e-12, abs_tol=1e-9)


@settings(max_examples=200, deadline=None)
@given(sizes=sizes_strategy)
def test_histogram_counts_every_file_once_in_its_bin(sizes: list[int]) -> None:
    stats = SizeStats()
    for size in sizes:
        stats.add(size, "p")
    histogram = stats.histogram

    assert sum(b.count for b in histogram) == len(sizes)
    for size in sizes:
        lo, hi = bin_bounds(bin_index(size))
        assert lo <= size < hi
        assert (lo, hi) in [(b.lo, b.hi) for b in histogram]
    for histogram_bin in histogram:
        assert histogram_bin.count == sum(
            1 for s in sizes if histogram_bin.lo <= s < histogram_bin.hi
        )
    # Contiguous powers of two from the first non-empty bin to the last.
    for left, right in itertools.pairwise(histogram):
        assert left.hi == right.lo
    if histogram:
        assert histogram[0].count and histogram[-1].count


def test_histogram_bins_are_log2_with_empty_files_first() -> None:
    assert [bin_bounds(i) for i in range(4)] == [(0, 1), (1, 2), (2, 4), (4, 8)]
    assert [bin_index(s) for s in (0, 1, 2, 3, 4, 4095, 4096)] == [0, 1, 2, 2, 3, 12, 13]


@settings(max_examples=100, deadline=None)
@given(sizes=sizes_strategy, top_n=st.integers(0, 12))
def test_largest_are_the_top_n_biggest_first_ties_in_arrival_order(
    sizes: list[int], top_n: int
) -> None:
    stats = SizeStats(top_n=top_n)
    for index, size in enumerate(sizes):
        stats.add(size, f"f{index:04d}")

    expected = sorted(((size, f"f{i:04d}") for i, size in enumerate(sizes)), key=lambda t: -t[0])
    assert stats.largest == expected[:top_n]


def test_median_follows_later_additions() -> None:
    stats = SizeStats()
    stats.add(1, "a")
    assert stats.median == 1.0
    stats.add(3, "b")
    assert stats.median == 2.0


def test_negative_size_is_refused() -> None:
    with pytest.raises(ValueError):
        SizeStats().add(-1, "x")


def test_summary_json_round_trips() -> None:
    stats = SizeStats()
    for index, size in enumerate([0, 5, 5, 70_000, 2**33]):
        stats.add(size, f"f{index}")

    data = json.loads(json.dumps(stats.to_json()))

    assert SizeSummary.from_json(data) == stats.summary()
    assert data["histogram"][0] == {"lo": 0, "hi": 1, "count": 1}


# --- rendering -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (16 * 1024, "16.0 KiB"),
        (1_503_238_553, "1.4 GiB"),
        (1024**2 - 1, "1.0 MiB"),  # never "1024.0 KiB"
        (2**64 - 1, "16.0 EiB"),
        (-2048, "-2.0 KiB"),
    ],
)
def test_human_bytes(size: int, text: str) -> None:
    assert human_bytes(size) == text


def test_bin_labels_use_exact_powers_of_two() -> None:
    assert bin_label(HistogramBin(0, 1, 3)) == "empty"
    assert bin_label(HistogramBin(4096, 8192, 3)) == "4 KiB – 8 KiB"
    assert bin_label(HistogramBin(512, 1024, 3)) == "512 B – 1 KiB"


def test_render_shows_totals_histogram_largest_and_problems(tmp_path: Path) -> None:
    write(tmp_path / "big.bin", b"x" * 5000)
    write(tmp_path / "small", b"abc")
    write(tmp_path / "empty")
    (tmp_path / "dangling").symlink_to("nowhere")

    text = render_survey(survey(tmp_path))

    assert text.startswith(f"Survey of {tmp_path}\n")
    assert "  files     3\n" in text
    assert "4.9 KiB (5,003 bytes)" in text
    histogram = [line for line in text.splitlines() if " – " in line or "empty " in line]
    assert histogram[0].split()[:2] == ["empty", "1"]
    assert histogram[-1].split()[:5] == ["4", "KiB", "–", "8", "KiB"]
    assert [line.endswith(BAR * BAR_WIDTH) for line in histogram] == [
        not line.endswith(" 0") for line in histogram
    ]
    assert "4.9 KiB  big.bin" in text
    assert "broken symlink  dangling" in text


def test_render_caps_the_problem_list_and_escapes_control_characters() -> None:
    problems = [Problem(f"bad\nname{index}", "fifo") for index in range(MAX_PROBLEMS + 5)]
    empty = SizeSummary(0, 0, 0, 0, 0.0, 0.0, 0.0, [], [])

    text = render_survey(Survey(Path("/data"), [], problems, empty))

    assert "  fifo  bad\\x0aname0\n" in text
    assert f"name{MAX_PROBLEMS - 1}\n" in text
    assert f"name{MAX_PROBLEMS}\n" not in text
    assert "  … and 5 more\n" in text
    assert "Size histogram" not in text

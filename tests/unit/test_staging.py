"""Writing restored files: SafeDestination's names, the staging directory (its name never a
dataset path's, only ever its own, stale runs removed, nothing left), writes that never follow
a link and fail one by one, the copy across file systems; and the reserved `.s3xfer` name."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from s3xfer import destination
from s3xfer.dataset.keys import is_reserved_path
from s3xfer.destination import (
    STAGING_DIR,
    STAGING_MARK,
    SafeDestination,
    Staging,
    partial_name,
    staging_names,
    used_by,
)
from s3xfer.errors import DestinationError, SourceError
from s3xfer.planning.plan import FileUnit
from s3xfer.planning.survey import RESERVED, FileEntry, Problem, scan


def nothing_in_use(_name: str) -> bool:
    return False


# --- SafeDestination ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["a\\b.txt", "C:/x", "d/e:f\\g", "..a", "a..", " "])
def test_backslashes_and_colons_are_ordinary_bytes(tmp_path: Path, path: str) -> None:
    assert SafeDestination(tmp_path)(path) == tmp_path.resolve().joinpath(*path.split("/"))


@pytest.mark.parametrize("path", ["", "/etc/x", "../x", "a/../../x", "a//b", "./a", "a\x00b"])
def test_paths_that_would_leave_the_destination_are_refused(tmp_path: Path, path: str) -> None:
    with pytest.raises(SourceError, match="unsafe path"):
        SafeDestination(tmp_path)(path)


def test_a_name_longer_than_the_file_system_holds_is_refused(tmp_path: Path) -> None:
    safe = SafeDestination(tmp_path)
    assert safe("n" * 255).name == "n" * 255
    assert safe("é" * 127 + "x").name == "é" * 127 + "x"  # 255 bytes
    with pytest.raises(SourceError, match="a name of 256 bytes, longer than the 255"):
        safe("d/" + "é" * 128)


# --- the staging directory's name -----------------------------------------------------------


def test_the_staging_name_is_never_a_dataset_paths_first_component() -> None:
    paths = [".s3xfer-download", ".s3xfer-download-2/x", ".s3xfer-download-30", "a/b"]
    names = list(staging_names(used_by(paths)))
    assert names[:3] == [".s3xfer-download-3", ".s3xfer-download-4", ".s3xfer-download-5"]
    assert not any(used_by(paths)(name) for name in names)
    assert used_by(["a/.s3xfer-download"])(STAGING_DIR) is False  # only at the root


def test_partial_names_are_short_and_stable() -> None:
    long = "d/" + "n" * 255
    assert partial_name(long) == partial_name(long) != partial_name("d/x")
    assert len(partial_name(long)) == len(partial_name("x")) == 37


# --- the staging directory ------------------------------------------------------------------


def test_a_staging_directory_is_made_used_and_removed(tmp_path: Path) -> None:
    staging = Staging.open(tmp_path, in_use=nothing_in_use)
    assert staging.directory == tmp_path / STAGING_DIR
    assert stat.S_IMODE(staging.directory.stat().st_mode) == 0o700
    staging.write(tmp_path / "d" / "a.txt", b"hello", mtime_ns=1_000_000_123, mode=0o640)
    info = (tmp_path / "d" / "a.txt").stat()
    assert (tmp_path / "d" / "a.txt").read_bytes() == b"hello"
    assert (info.st_mtime_ns, stat.S_IMODE(info.st_mode)) == (1_000_000_123, 0o640)
    staging.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_a_partial_file_keeps_the_staging_directory_for_the_next_run(tmp_path: Path) -> None:
    staging = Staging.open(tmp_path, in_use=nothing_in_use)
    staging.partial("big.bin").write_bytes(b"half")
    staging.close()
    assert sorted(p.name for p in (tmp_path / STAGING_DIR).iterdir()) == sorted(
        [STAGING_MARK, partial_name("big.bin")]
    )
    again = Staging.open(tmp_path, in_use=nothing_in_use)  # adopted: it has the marker
    assert again.directory == tmp_path / STAGING_DIR
    again.close()


def test_anything_else_of_the_staging_name_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / STAGING_DIR).mkdir()  # a user's directory: no marker
    (tmp_path / STAGING_DIR / "mine").write_text("mine")
    (tmp_path / f"{STAGING_DIR}-2").write_text("a file")
    (tmp_path / f"{STAGING_DIR}-3").symlink_to(tmp_path / STAGING_DIR)
    (tmp_path / "empty").mkdir()
    (tmp_path / f"{STAGING_DIR}-4").symlink_to(tmp_path / "empty")
    staging = Staging.open(tmp_path, in_use=nothing_in_use)
    assert staging.directory == tmp_path / f"{STAGING_DIR}-5"
    staging.close()
    assert os.listdir(tmp_path / STAGING_DIR) == ["mine"]
    assert os.listdir(tmp_path / "empty") == []
    assert not (tmp_path / f"{STAGING_DIR}-5").exists()


def test_the_run_directory_of_a_killed_run_is_removed_and_a_live_ones_kept(
    tmp_path: Path,
) -> None:
    live = Staging.open(tmp_path, in_use=nothing_in_use)
    stale = live.directory / "run-deadbeef"
    stale.mkdir()
    (stale / "7").write_bytes(b"half a file")
    other = Staging.open(tmp_path, in_use=nothing_in_use)  # a second run, while live runs
    runs = sorted(p.name for p in live.directory.iterdir() if p.name.startswith("run-"))
    assert len(runs) == 2 and "run-deadbeef" not in runs
    other.close()
    live.close()
    assert list(tmp_path.iterdir()) == []


def test_a_run_directory_is_locked_while_its_run_lives(tmp_path: Path) -> None:
    staging = Staging.open(tmp_path, in_use=nothing_in_use)
    (run,) = [p for p in staging.directory.iterdir() if p.is_dir()]
    fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
        staging.close()


def test_an_unwritable_destination_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DestinationError, match=f"cannot write {tmp_path}/nope/{STAGING_DIR}"):
        Staging.open(tmp_path / "nope", in_use=nothing_in_use)


# --- writes ---------------------------------------------------------------------------------


def test_a_write_replaces_a_link_at_the_target_and_never_follows_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    victim.chmod(0o600)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "a.txt").symlink_to(victim)
    staging = Staging.open(dest, in_use=nothing_in_use)
    staging.write(dest / "a.txt", b"new", mtime_ns=0, mode=0o777)
    staging.close()
    assert not (dest / "a.txt").is_symlink() and (dest / "a.txt").read_bytes() == b"new"
    assert victim.read_bytes() == b"precious" and stat.S_IMODE(victim.stat().st_mode) == 0o600


def test_each_file_of_a_batch_fails_alone_with_its_own_error(tmp_path: Path) -> None:
    (tmp_path / "b.txt").mkdir()
    (tmp_path / "b.txt" / "keep").write_text("keep")
    (tmp_path / "d").write_text("a file")
    staging = Staging.open(tmp_path, in_use=nothing_in_use)
    files = [(tmp_path / name, name.encode(), 0, 0o644) for name in ("a", "b.txt", "c", "d/x")]
    errors = staging.write_many(files)
    staging.close()
    assert errors[0] is None and errors[2] is None
    assert str(errors[1]) == f"cannot write {tmp_path / 'b.txt'}: Is a directory"
    assert str(errors[3]) == f"cannot write {tmp_path / 'd' / 'x'}: File exists"
    assert (tmp_path / "a").read_bytes() == b"a" and (tmp_path / "c").read_bytes() == b"c"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b.txt", "c", "d"]


def test_a_directory_removed_between_two_of_its_files_is_made_again(tmp_path: Path) -> None:
    """Directories are made once per run (not once per file): one removed meanwhile is made
    again for the next file written into it."""
    staging = Staging.open(tmp_path, in_use=nothing_in_use)
    staging.write(tmp_path / "d" / "e" / "one", b"1", mtime_ns=0, mode=0o644)
    (tmp_path / "d" / "e" / "one").unlink()
    (tmp_path / "d" / "e").rmdir()
    (tmp_path / "d").rmdir()
    staging.write(tmp_path / "d" / "e" / "two", b"2", mtime_ns=0, mode=0o644)
    staging.close()
    assert (tmp_path / "d" / "e" / "two").read_bytes() == b"2"


def test_a_target_on_another_file_system_gets_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rename(2) across file systems fails with EXDEV: the file is copied beside its target
    (in a private directory) and renamed from there."""
    real_replace = os.replace

    def across(src: Any, dst: Any, *, src_dir_fd: int | None = None, **kw: Any) -> None:
        if src_dir_fd is not None or str(src).endswith(".part"):  # from the staging directory
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        real_replace(src, dst, src_dir_fd=src_dir_fd, **kw)

    monkeypatch.setattr(os, "replace", across)
    staging = Staging.open(tmp_path, in_use=nothing_in_use)
    staging.write(tmp_path / "m" / "a.txt", b"hello", mtime_ns=5_000_000_000, mode=0o604)
    partial = staging.partial("m/big.bin")
    partial.write_bytes(b"big")
    os.utime(partial, ns=(7, 7))
    destination.move_into_place(partial, tmp_path / "m" / "big.bin")
    staging.close()
    info = (tmp_path / "m" / "a.txt").stat()
    assert (info.st_mtime_ns, stat.S_IMODE(info.st_mode)) == (5_000_000_000, 0o604)
    assert (tmp_path / "m" / "a.txt").read_bytes() == b"hello"
    assert (tmp_path / "m" / "big.bin").read_bytes() == b"big"
    assert (tmp_path / "m" / "big.bin").stat().st_mtime_ns == 7
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "big.bin", "m"]


# --- the reserved `.s3xfer` name ------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "reserved"),
    [(".s3xfer", True), (".s3xfer/manifest.json.gz", True), (".s3xferx", False),
     ("a/.s3xfer/x", False), (".s3xfer-download/x", False)],
)  # fmt: skip
def test_only_s3xfer_at_the_dataset_root_is_reserved(path: str, reserved: bool) -> None:
    assert is_reserved_path(path) is reserved


def test_the_walk_reports_a_root_s3xfer_directory_and_does_not_enter_it(tmp_path: Path) -> None:
    for rel in (".s3xfer/manifest.json.gz", ".s3xfer/sub/x", "a/.s3xfer/y", "b.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    found = list(scan(tmp_path))
    assert found[0] == Problem(".s3xfer", RESERVED)
    assert found[0].unreadable  # the upload names it and fails
    assert [f.path for f in found[1:] if isinstance(f, FileEntry)] == ["a/.s3xfer/y", "b.txt"]
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / ".s3xfer").write_text("a file")
    assert list(scan(tmp_path / "only" / ".s3xfer")) == [Problem(".s3xfer", RESERVED)]


def test_a_plan_that_names_a_reserved_path_is_refused() -> None:
    with pytest.raises(ValueError, match="reserved"):
        FileEntry.from_json([".s3xfer/catalog.json", 1, 0, 0o644])
    with pytest.raises(ValueError, match="reserved"):
        FileUnit.from_json(["put", ".s3xfer/manifest.json.gz", "p/x", 1, 0, 0o644, 0])

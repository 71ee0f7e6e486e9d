"""--include/--exclude: one matcher for upload, download, get and ls, and the walk it prunes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from s3xfer.planning.globs import PathFilter
from s3xfer.planning.survey import BROKEN_SYMLINK, FileEntry, Problem, scan


def test_a_path_is_selected_by_any_include_and_no_exclude() -> None:
    selection = PathFilter(("*.jpg", "labels/*"), ("cache/*", "*/tmp_*"))
    assert selection.selects("a.jpg") and selection.selects("deep/down/b.jpg")
    assert selection.selects("labels/x.json")
    assert not selection.selects("notes.txt")
    assert not selection.selects("cache/c.jpg") and not selection.selects("d/tmp_1.jpg")
    assert PathFilter((), ("*.tmp",)).selects("anything.txt")
    assert not PathFilter() and PathFilter(("a",))
    assert PathFilter(("*.jpg",), ("c/*",)).describe() == "--include *.jpg --exclude c/*"


def test_only_an_exclude_that_takes_everything_below_a_directory_prunes_it() -> None:
    selection = PathFilter(("*.jpg",), ("cache/*", "*.tmp", "logs/"))
    assert not selection.may_select_under("cache")
    assert selection.may_select_under("cached")
    assert selection.may_select_under("photos")  # an include never prunes: *.jpg at any depth
    assert selection.may_select_under("x.tmp")  # '*.tmp' does not match 'x.tmp/'
    assert selection.may_select_under("logs")  # a literal glob is a path, never a directory


def test_filters_round_trip_and_bad_ones_are_refused() -> None:
    selection = PathFilter(("*.jpg",), ("cache/*",))
    assert PathFilter.from_json(selection.to_json()) == selection
    assert PathFilter.from_json(None) == PathFilter()
    with pytest.raises(ValueError, match="non-empty"):
        PathFilter(("",))
    with pytest.raises(ValueError, match="lists of globs"):
        PathFilter.from_json({"include": "*.jpg"})


def write(path: Path, data: bytes = b"") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_the_walk_yields_only_what_is_selected_and_skips_excluded_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "a.jpg", b"a")
    write(tmp_path / "b.txt", b"b")
    write(tmp_path / "cache" / "c.jpg", b"c")
    (tmp_path / "cache" / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "nowhere")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "nowhere")
    locked = tmp_path / "cache" / "locked"
    locked.mkdir()

    listed: list[str] = []
    real_scandir = os.scandir

    def recording_scandir(path: str) -> Iterator[os.DirEntry[str]]:
        listed.append(os.path.relpath(path, tmp_path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", recording_scandir)
    items = list(scan(tmp_path, selection=PathFilter(("*.jpg",), ("cache/*",))))
    monkeypatch.undo()

    assert [i.path for i in items if isinstance(i, FileEntry)] == ["a.jpg"]
    assert [(i.path, i.reason) for i in items if isinstance(i, Problem)] == [
        ("dangling.jpg", BROKEN_SYMLINK)  # a selected path that cannot be read is still named
    ]
    assert listed == ["."]  # cache/ was never listed


def test_an_excluded_s3xfer_directory_is_no_problem(tmp_path: Path) -> None:
    write(tmp_path / ".s3xfer" / "old" / "manifest.json.gz")
    write(tmp_path / "a.txt")
    reserved = [i for i in scan(tmp_path) if isinstance(i, Problem)]
    assert [p.path for p in reserved] == [".s3xfer"]
    items = list(scan(tmp_path, selection=PathFilter((), (".s3xfer/*",))))
    assert [i.path for i in items] == ["a.txt"]


def test_a_plan_keeps_its_filters_and_a_re_upload_keeps_what_they_leave_out() -> None:
    from s3xfer.dataset.keys import S3Url
    from s3xfer.planning.plan import Plan, make_plan
    from s3xfer.planning.survey import SizeStats, Survey
    from s3xfer.write.upload import kept_paths

    stats = SizeStats()
    stats.add(3, "a.jpg")
    selection = PathFilter(("*.jpg",), ("cache/*",))
    tree = Survey(Path("/data"), [FileEntry("a.jpg", 3, 0, 0o644)], [], stats.summary(), selection)
    plan = make_plan(tree, S3Url("bkt", "p"))
    data = plan.to_json()
    assert data["version"] == 2 and data["selection"] == selection.to_json()
    assert Plan.from_json(data).selection == selection
    whole = Survey(Path("/data"), tree.files, [], stats.summary())
    unfiltered = make_plan(whole, S3Url("bkt", "p"))
    assert unfiltered.to_json()["version"] == 1 and "selection" not in unfiltered.to_json()

    kept = kept_paths(plan, keep_deleted=False)
    assert kept("notes.txt") and kept("cache/b.jpg")  # outside the selection: left alone
    assert not kept("gone.jpg")  # selected and no longer in the tree: removed

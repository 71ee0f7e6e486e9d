"""Names that must not collide with s3xfer's own, through the real CLI against the local
server (issue 12, cases 2, 3, 4 and 8): user files named like s3xfer's temporary files or
its staging directory round-trip; links planted in DEST are never followed; a `.s3xfer/`
directory in the source is refused by name, never written over the dataset's own objects;
long names, backslashes and drive-letter-like names are restored on POSIX; one failing write
fails alone; a packed member larger than the download's memory budget is restored.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from s3xfer.locals3 import LocalS3Info
from tests.integration.helpers import list_keys, run_cli, write_tree

RANGED = ("--range-size", "1MiB")  # big.bin (3 MiB) comes in ranged GETs, through a sidecar


def upload(src: Path, url: str, *extra: str) -> None:
    result = run_cli("upload", str(src), url, "--quiet", *extra)
    assert result.returncode == 0, result.stderr


def assert_restored(src: Path, dest: Path) -> None:
    """Every file of src is in dest with its bytes, mtime and mode; nothing else is."""
    expected = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    found = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if not p.is_dir())
    assert found == expected
    for rel in expected:
        a, b = (src / rel).stat(), (dest / rel).stat()
        assert (dest / rel).read_bytes() == (src / rel).read_bytes(), rel
        assert (b.st_mtime_ns, stat.S_IMODE(b.st_mode)) == (a.st_mtime_ns, stat.S_IMODE(a.st_mode))


# --- case 2: user files named like s3xfer's temporary and staging files ---------------------

OWN_NAMES = {
    "big.bin": 3 * 1024 * 1024,  # a large object, downloaded in ranges
    ".big.bin.s3xfer-part": 3 * 1024 * 1024,  # the old temporary file of big.bin, also large
    ".big.bin.s3xfer-part.json": 200,  # the old sidecar of big.bin
    ".big.bin.s3xfer-part.json.tmp": 100,
    "a.txt": 10,
    ".a.txt.s3xfer-tmp": 20,  # the old temporary file of a.txt
    "sub/x.bin": 1_500_000,  # its own object, whole
    "sub/.x.bin.s3xfer-tmp": 1_200_000,
    ".s3xfer-download/data.txt": 30,  # s3xfer's staging directory, as a user's directory
    ".s3xfer-download-2": 40,  # and the next name it would take, as a user's file
}


def test_files_named_like_s3xfer_temporaries_round_trip(
    s3_env: LocalS3Info, bucket: str, tmp_path: Path
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    write_tree(src, OWN_NAMES, seed=3)
    upload(src, f"s3://{bucket}/own")
    result = run_cli("download", f"s3://{bucket}/own", str(dest), "--quiet", *RANGED)
    assert result.returncode == 0, result.stderr
    assert_restored(src, dest)
    again = run_cli("download", f"s3://{bucket}/own", str(dest), "--json", *RANGED)
    assert again.returncode == 0, again.stderr
    assert '"files_skipped": 10' in again.stdout
    assert_restored(src, dest)


def test_a_users_staging_directory_in_dest_is_left_alone(
    s3_env: LocalS3Info, bucket: str, tmp_path: Path
) -> None:
    """DEST already holds a directory of the staging name that is not s3xfer's: its files stay,
    and the download still works (in a staging directory of another name)."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    write_tree(src, {"big.bin": 3 * 1024 * 1024, "a.txt": 10}, seed=4)
    upload(src, f"s3://{bucket}/ds")
    mine = write_tree(dest / ".s3xfer-download", {"notes.txt": 12, "run-abc/x": 5}, seed=5)
    result = run_cli("download", f"s3://{bucket}/ds", str(dest), "--quiet", *RANGED)
    assert result.returncode == 0, result.stderr
    for rel, data in mine.items():
        assert (dest / ".s3xfer-download" / rel).read_bytes() == data
    assert sorted(p.name for p in dest.iterdir()) == [".s3xfer-download", "a.txt", "big.bin"]


# --- case 4: links planted in DEST ----------------------------------------------------------

PLANTED = (
    ".a.txt.s3xfer-tmp",
    ".big.bin.s3xfer-part",
    ".big.bin.s3xfer-part.json",
    ".big.bin.s3xfer-part.json.tmp",
    ".s3xfer-download",
)


def test_links_at_temporary_names_are_never_followed(
    s3_env: LocalS3Info, bucket: str, tmp_path: Path
) -> None:
    src, dest, outside = tmp_path / "src", tmp_path / "dest", tmp_path / "victim"
    write_tree(src, {"a.txt": 10, "big.bin": 3 * 1024 * 1024}, seed=6)
    upload(src, f"s3://{bucket}/ds")
    dest.mkdir()
    outside.mkdir()
    victims = {}
    for name in PLANTED:
        victim = outside / name.lstrip(".")
        victim.write_bytes(b"precious " + name.encode())
        victim.chmod(0o600)
        victims[victim] = victim.read_bytes()
        (dest / name).symlink_to(victim)
    (dest / ".s3xfer-download-2").symlink_to(outside, target_is_directory=True)
    result = run_cli("download", f"s3://{bucket}/ds", str(dest), "--quiet", *RANGED)
    assert result.returncode == 0, result.stderr
    for victim, data in victims.items():
        assert victim.read_bytes() == data
        assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert sorted(p.name for p in outside.iterdir()) == sorted(v.name for v in victims)
    for rel in ("a.txt", "big.bin"):
        assert (dest / rel).read_bytes() == (src / rel).read_bytes()
    assert all((dest / name).is_symlink() for name in PLANTED)


# --- case 3: a .s3xfer/ directory in the source ---------------------------------------------


def test_a_source_s3xfer_directory_is_refused_by_name(
    s3_env: LocalS3Info, bucket: str, sync_s3_client: object, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    write_tree(src, {"a.txt": 10, "big.bin": 2 * 1024 * 1024}, seed=7)
    write_tree(src / ".s3xfer", {"manifest.json.gz": 100, "catalog.json": 50, "x.txt": 5}, seed=8)
    url = f"s3://{bucket}/ds"
    for _run in range(2):  # a re-run says the same: never "nothing changed"
        result = run_cli("upload", str(src), url, "--quiet")
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip() == (
            "s3xfer: NOT UPLOADED .s3xfer: reserved for s3xfer's own objects at the dataset root"
        )
    keys = list_keys(sync_s3_client, bucket, "ds/")
    assert not any(k.endswith(".s3xfer/x.txt") for k in keys), keys
    dest = tmp_path / "dest"
    result = run_cli("download", url, str(dest), "--quiet")
    assert result.returncode == 0, result.stderr  # the dataset's own objects are intact
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt", "big.bin"]
    listing = run_cli("ls", url)
    assert listing.returncode == 0 and ".s3xfer" not in listing.stdout, listing.stdout
    survey = run_cli("survey", str(src))
    assert "reserved for s3xfer's own objects" in survey.stdout


# --- case 8: long names, backslashes, drive letters; one failing write; a large member ------

NAME_MAX = 255


def long_name(length: int, suffix: str = ".txt") -> str:
    return "n" * (length - len(suffix)) + suffix


def test_names_up_to_the_limit_round_trip(s3_env: LocalS3Info, bucket: str, tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    files = {long_name(n): 100 + n for n in (243, 244, 250, NAME_MAX)}
    files[f"d/{long_name(NAME_MAX, '.bin')}"] = 3 * 1024 * 1024  # ranged, beside its sidecar
    files[f"{'é' * 126}.tx"] = 10  # 129 characters, 255 bytes
    write_tree(src, files, seed=9)
    upload(src, f"s3://{bucket}/long")
    result = run_cli("download", f"s3://{bucket}/long", str(dest), "--quiet", *RANGED)
    assert result.returncode == 0, result.stderr
    assert_restored(src, dest)


def test_backslash_and_drive_letter_names_restore_on_posix(
    s3_env: LocalS3Info, bucket: str, tmp_path: Path
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    write_tree(src, {"a\\b.txt": 10, "C:/x.txt": 20, "d/e:f\\g.txt": 30, "ok.txt": 5}, seed=10)
    upload(src, f"s3://{bucket}/win")
    result = run_cli("download", f"s3://{bucket}/win", str(dest), "--quiet")
    assert result.returncode == 0, result.stderr
    assert_restored(src, dest)
    got = run_cli("get", f"s3://{bucket}/win", "*", str(tmp_path / "got"))
    assert got.returncode == 0, got.stderr
    assert_restored(src, tmp_path / "got")


def test_one_failing_write_fails_alone(s3_env: LocalS3Info, bucket: str, tmp_path: Path) -> None:
    """Packed neighbours in one ranged GET: b.txt cannot be written (a directory is in its
    way, and stays), d/x.txt neither (d is a file); the others are written and not failed."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    write_tree(src, {"a.txt": 10, "b.txt": 20, "c.txt": 30, "d/x.txt": 40, "e.txt": 50}, seed=11)
    upload(src, f"s3://{bucket}/batch")
    write_tree(dest, {"b.txt/keep": 3, "d": 4}, seed=12)
    result = run_cli("download", f"s3://{bucket}/batch", str(dest), "--quiet", "--overwrite")
    assert result.returncode == 1
    lines = sorted(result.stderr.splitlines())
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith(f"s3xfer: FAILED b.txt: cannot write {dest / 'b.txt'}: ")
    assert lines[1].startswith(f"s3xfer: FAILED d/x.txt: cannot write {dest / 'd' / 'x.txt'}: ")
    for rel in ("a.txt", "c.txt", "e.txt"):
        assert (dest / rel).read_bytes() == (src / rel).read_bytes()
    assert (dest / "b.txt" / "keep").is_file()


def test_a_packed_member_larger_than_the_memory_budget(
    s3_env: LocalS3Info, bucket: str, tmp_path: Path
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    write_tree(src, {"a.txt": 10, "huge.bin": 12 * 1024 * 1024, "z.txt": 20}, seed=13)
    pack = ("--pack-threshold", "16MiB", "--multipart-threshold", "16MiB")
    upload(src, f"s3://{bucket}/packed", *pack)
    limits = ("--max-memory", "6MiB", "--range-size", "2MiB")
    result = run_cli("download", f"s3://{bucket}/packed", str(dest), "--quiet", *limits)
    assert result.returncode == 0, result.stderr
    assert_restored(src, dest)


@pytest.mark.parametrize("name", ["get", "download"])
def test_nothing_of_s3xfers_is_left_in_dest(
    name: str, s3_env: LocalS3Info, bucket: str, tmp_path: Path
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    write_tree(src, {"a.txt": 10, "big.bin": 3 * 1024 * 1024}, seed=14)
    upload(src, f"s3://{bucket}/ds")
    argv = ["get", f"s3://{bucket}/ds", "*", str(dest)] if name == "get" else []
    argv = argv or ["download", f"s3://{bucket}/ds", str(dest), "--quiet", *RANGED]
    result = run_cli(*argv)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(dest)) == ["a.txt", "big.bin"]

"""The upload journal: lines are whole or detected as torn, replay is a pure fold, a crash
mid-write costs at most the torn line, and two uploads of one pair cannot share a journal."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import overload

import pytest
from hypothesis import given
from hypothesis import strategies as st

from s3xfer.dataset.manifest import ManifestRecord, ShardRecord
from s3xfer.errors import UsageError
from s3xfer.localfs import FileIdentity
from s3xfer.write.journal import (
    Journal,
    decode_line,
    encode_line,
    journal_path,
    replay,
)

SOURCE = Path("/data/src")
DEST = "s3://bucket/prefix"


def record(path: str, **changes: object) -> ManifestRecord:
    fields: dict[str, object] = {
        "path": path,
        "key": f"prefix/{path}",
        "size": 10,
        "mtime_ns": 1,
        "mode": 0o644,
        "crc32": "AAAAAA==",
        "part_size": 0,
    }
    fields.update(changes)
    return ManifestRecord(**fields)  # type: ignore[arg-type]


def write_sample(journal: Journal) -> None:
    journal.file_done(record("a.txt"))
    journal.multipart_created(
        key="prefix/big.bin", upload_id="U1", path="big.bin", size=100, mtime_ns=5, part_size=40
    )
    journal.part_done(upload_id="U1", number=1, etag='"e1"', crc=7, length=40)
    journal.multipart_created(
        key="prefix/shard-0.tar", upload_id="S1", path=None, size=0, mtime_ns=0, part_size=0
    )
    members = [record("small/1", key="prefix/shard-0.tar", offset=512)]
    journal.shard_done(ShardRecord("prefix/shard-0.tar", 4096, '"s"', 1), members)
    journal.multipart_closed("S1")


def test_a_line_round_trips_and_any_damage_is_detected() -> None:
    line = encode_line({"e": "file", "r": ["ü", 1]})
    assert decode_line(line) == {"e": "file", "r": ["ü", 1]}
    assert decode_line(line[:-1]) is None  # torn: no newline
    for position in range(len(line) - 1):
        damaged = bytearray(line)
        damaged[position] ^= 0x01
        assert decode_line(bytes(damaged)) is None, position


def test_replay_folds_the_events_into_what_was_done(tmp_path: Path) -> None:
    path = journal_path(SOURCE, DEST, state_dir=tmp_path)
    journal = Journal.open(path, source=SOURCE, dest=DEST)
    write_sample(journal)
    journal.close()
    state = replay(path.read_bytes()).state
    assert set(state.records) == {"a.txt", "small/1"}
    assert set(state.shards) == {"prefix/shard-0.tar"}
    assert list(state.uploads) == ["U1"]  # the shard's upload was closed
    upload = state.uploads["U1"]
    assert upload.parts == {1: ('"e1"', 7, 40)}
    assert state.open_upload_for(
        "big.bin", key="prefix/big.bin", size=100, mtime_ns=5, part_size=40
    )
    # Another version of the file (mtime) or another shape (part size) is not resumed.
    assert not state.open_upload_for(
        "big.bin", key="prefix/big.bin", size=100, mtime_ns=6, part_size=40
    )
    assert not state.open_upload_for(
        "big.bin", key="prefix/big.bin", size=100, mtime_ns=5, part_size=50
    )


def test_a_multipart_upload_remembers_the_identity_of_its_file(tmp_path: Path) -> None:
    path = journal_path(SOURCE, DEST, state_dir=tmp_path)
    journal = Journal.open(path, source=SOURCE, dest=DEST)
    identity = FileIdentity(dev=2049, inode=77, size=100, mtime_ns=5, ctime_ns=9, mode=0o640)
    journal.multipart_created(
        key="prefix/big.bin",
        upload_id="U2",
        path="big.bin",
        size=100,
        mtime_ns=5,
        part_size=40,
        identity=identity,
    )
    journal.close()
    assert replay(path.read_bytes()).state.uploads["U2"].identity == identity


def test_a_journal_written_before_identities_were_recorded_still_resumes() -> None:
    header = {"e": "run", "format": "s3xfer-journal", "version": 1, "dest": DEST, "source": "/s"}
    mpu = {
        "e": "mpu", "key": "prefix/big.bin", "id": "U1", "path": "big.bin",
        "size": 100, "mtime_ns": 5, "part_size": 40,
    }  # fmt: skip
    state = replay(encode_line(header) + encode_line(mpu)).state
    assert state.uploads["U1"].identity is None
    assert state.open_upload_for(
        "big.bin", key="prefix/big.bin", size=100, mtime_ns=5, part_size=40
    )


def test_a_damaged_identity_is_damage(tmp_path: Path) -> None:
    header = {"e": "run", "format": "s3xfer-journal", "version": 1, "dest": DEST, "source": "/s"}
    mpu = {
        "e": "mpu", "key": "k", "id": "U1", "path": "p", "size": 1, "mtime_ns": 1,
        "part_size": 1, "ident": [1, 2, "3"],
    }  # fmt: skip
    result = replay(encode_line(header) + encode_line(mpu))
    assert result.damaged_at == 2 and not result.state.uploads


def test_reopening_keeps_what_was_done_and_appends(tmp_path: Path) -> None:
    path = journal_path(SOURCE, DEST, state_dir=tmp_path)
    journal = Journal.open(path, source=SOURCE, dest=DEST)
    write_sample(journal)
    journal.close()
    again = Journal.open(path, source=SOURCE, dest=DEST)
    assert set(again.state.records) == {"a.txt", "small/1"} and not again.warnings
    again.file_done(record("b.txt"))
    again.close()
    assert set(replay(path.read_bytes()).state.records) == {"a.txt", "small/1", "b.txt"}


@given(cut=st.integers(min_value=0, max_value=10_000))
def test_a_crash_mid_write_loses_at_most_the_torn_line(
    cut: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = tmp_path_factory.mktemp("j")
    path = journal_path(SOURCE, DEST, state_dir=base)
    journal = Journal.open(path, source=SOURCE, dest=DEST)
    write_sample(journal)
    journal.close()
    raw = path.read_bytes()
    cut = cut % (len(raw) + 1)
    path.write_bytes(raw[:cut])  # what a kill -9 in the middle of a write leaves
    whole_lines = raw[:cut].count(b"\n")
    reopened = Journal.open(path, source=SOURCE, dest=DEST)
    assert not reopened.warnings  # a torn tail is normal, not damage
    reopened.file_done(record("after.txt"))
    reopened.close()
    result = replay(path.read_bytes())
    assert result.damaged_at is None and result.good_bytes == len(path.read_bytes())
    expected = replay(raw[: raw.rfind(b"\n", 0, cut) + 1] if whole_lines else b"").state
    assert set(result.state.records) == set(expected.records) | {"after.txt"}
    assert set(result.state.uploads) == set(expected.uploads)


def test_damage_in_the_middle_is_reported_and_the_rest_redone(tmp_path: Path) -> None:
    path = journal_path(SOURCE, DEST, state_dir=tmp_path)
    journal = Journal.open(path, source=SOURCE, dest=DEST)
    write_sample(journal)
    journal.close()
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = b"garbage that is not a journal line\n"
    path.write_bytes(b"".join(lines))
    reopened = Journal.open(path, source=SOURCE, dest=DEST)
    assert len(reopened.warnings) == 1 and "damaged at line 3" in reopened.warnings[0]
    assert set(reopened.state.records) == {"a.txt"}  # line 2 only
    reopened.close()


def test_a_journal_of_another_upload_is_set_aside(tmp_path: Path) -> None:
    path = journal_path(SOURCE, DEST, state_dir=tmp_path)
    other = Journal.open(path, source=SOURCE, dest="s3://other/place")
    write_sample(other)
    other.close()
    journal = Journal.open(path, source=SOURCE, dest=DEST)
    assert "not for this upload" in journal.warnings[0]
    assert not journal.state.records
    journal.close()
    assert replay(path.read_bytes()).header is not None


def test_two_uploads_of_the_same_pair_cannot_run_at_once(tmp_path: Path) -> None:
    path = journal_path(SOURCE, DEST, state_dir=tmp_path)
    first = Journal.open(path, source=SOURCE, dest=DEST)
    with pytest.raises(UsageError, match="is running"):
        Journal.open(path, source=SOURCE, dest=DEST)
    first.close(remove=True)
    assert not path.exists()
    Journal.open(path, source=SOURCE, dest=DEST).close()


def test_the_path_depends_on_source_and_destination_and_holds_no_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("S3XFER_STATE_DIR", str(tmp_path / "state"))
    a = journal_path(SOURCE, DEST)
    assert a.parent == tmp_path / "state" / "journals"
    assert a != journal_path(SOURCE, "s3://bucket/other")
    assert a != journal_path(Path("/data/other"), DEST)
    journal = Journal.open(a, source=SOURCE, dest=DEST)
    write_sample(journal)
    journal.close()
    assert os.stat(a).st_mode & 0o077 == 0  # private to the user


class OnlySlices(Sequence[ManifestRecord]):
    """Members that may be taken SHARD_ROWS_AT_ONCE at a time only, never all at once."""

    def __init__(self, members: list[ManifestRecord]) -> None:
        self._members = members

    def __len__(self) -> int:
        return len(self._members)

    @overload
    def __getitem__(self, index: int) -> ManifestRecord: ...
    @overload
    def __getitem__(self, index: slice) -> list[ManifestRecord]: ...
    def __getitem__(self, index: int | slice) -> ManifestRecord | list[ManifestRecord]:
        if not isinstance(index, slice) or len(range(*index.indices(len(self)))) > 10_000:
            raise AssertionError(f"members taken as {index!r}")
        return self._members[index]

    def __iter__(self) -> Iterator[ManifestRecord]:
        raise AssertionError("every member taken at once")


@pytest.mark.parametrize("count", [0, 1, 10_000, 25_001])
def test_a_finished_shard_is_written_ten_thousand_members_at_a_time(
    tmp_path: Path, count: int
) -> None:
    """The line of a shard of 100,000 members was about 60 MB while it was made: now a slice
    of members at a time, and still the very line encode_line makes of the whole event."""
    members = [record(f"m/{n:06d}", key="prefix/s.tar", offset=512 * (n + 1)) for n in range(count)]
    shard = ShardRecord("prefix/s.tar", 512 * (count + 3), '"s"', count)
    path = journal_path(SOURCE, DEST, state_dir=tmp_path)
    journal = Journal.open(path, source=SOURCE, dest=DEST)
    journal.shard_done(shard, OnlySlices(members))
    journal.close()
    last = path.read_bytes().splitlines(keepends=True)[-1]
    assert last == encode_line(
        {"e": "shard", "s": shard.to_json(), "r": [m.to_json() for m in members]}
    )
    again = Journal.open(path, source=SOURCE, dest=DEST)
    assert len(again.state.records) == count
    again.close()

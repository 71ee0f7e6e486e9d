"""The byte budget (FIFO, hard limit, cancellation-safe) and manifest change detection."""

from __future__ import annotations

import gzip
import json

import anyio
import pytest

from s3xfer.budget import ByteBudget
from s3xfer.dataset.manifest import Manifest, ManifestRecord, ShardRecord
from s3xfer.errors import IntegrityError
from s3xfer.planning.plan import FileUnit, Kind

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_budget_never_exceeds_capacity_and_serves_in_order() -> None:
    budget = ByteBudget(100)
    order: list[str] = []

    async def hold(name: str, amount: int, delay: float) -> None:
        await budget.acquire(amount)
        order.append(name)
        assert budget.used <= budget.capacity
        await anyio.sleep(delay)
        budget.release(amount)

    async with anyio.create_task_group() as group:
        group.start_soon(hold, "big-first", 80, 0.05)
        await anyio.sleep(0.01)
        group.start_soon(hold, "large-waits", 90, 0.0)
        await anyio.sleep(0.01)
        # Fits right now (80 + 10 ≤ 100) but must queue behind the 90-byte waiter.
        group.start_soon(hold, "small-after", 10, 0.0)
    assert order == ["big-first", "large-waits", "small-after"]
    assert budget.peak <= 100 and budget.used == 0


async def test_a_cancelled_waiter_gives_nothing_away() -> None:
    budget = ByteBudget(10)
    await budget.acquire(10)
    with anyio.move_on_after(0.05):
        await budget.acquire(5)
    budget.release(10)
    assert budget.used == 0
    await budget.acquire(10)
    assert budget.used == 10


async def test_impossible_requests_fail_instead_of_waiting_forever() -> None:
    with pytest.raises(ValueError):
        await ByteBudget(10).acquire(11)


def unit(path: str, size: int = 5, mtime_ns: int = 1) -> FileUnit:
    return FileUnit(Kind.PUT, path, f"p/{path}", size, mtime_ns, 0o644, 0)


def record(u: FileUnit) -> ManifestRecord:
    return ManifestRecord(u.path, u.key, u.size, u.mtime_ns, u.mode, "AAAAAA==", u.part_size)


def test_only_changed_or_new_files_are_selected() -> None:
    same, grown, touched, new = unit("same"), unit("grown"), unit("touched"), unit("new")
    manifest = Manifest("s3://b/p", {u.path: record(u) for u in (same, grown, touched)})
    todo, unchanged = manifest.select_changed(
        [same, unit("grown", size=6), unit("touched", mtime_ns=2), new]
    )
    assert [u.path for u in unchanged] == ["same"]
    assert [u.path for u in todo] == ["grown", "touched", "new"]


def test_manifest_round_trip_and_corruption() -> None:
    manifest = Manifest("s3://b/p", {"a": record(unit("a"))})
    again = Manifest.from_bytes(manifest.to_bytes(), where="x")
    assert again.records == manifest.records
    with pytest.raises(IntegrityError, match="corrupt dataset metadata: manifest"):
        Manifest.from_bytes(b"\x1f\x8bgarbage", where="s3://b/p/.s3xfer/manifest.json.gz")


def test_records_pointing_into_a_rewritten_shard_are_stale() -> None:
    def packed(path: str, offset: int, etag: str) -> ManifestRecord:
        return ManifestRecord(path, "p/s.tar", 2, 1, 0o644, "x", 0, offset, etag)

    manifest = Manifest(
        "s3://b/p",
        {
            "a": packed("a", 512, '"v2"'),
            "b": packed("b", 1536, '"v1"'),  # deleted, and its shard rewritten without it
            "loose": ManifestRecord("loose", "p/loose", 5, 1, 0o644, "x", 0, -1, '"l"'),
            "unknown": ManifestRecord("unknown", "p/t.tar", 2, 1, 0o644, "x", 0, 512, '"t"'),
        },
        {"p/s.tar": ShardRecord("p/s.tar", 10240, '"v2"', 1)},
    )
    assert manifest.drop_stale() == ["b"]
    assert sorted(manifest.records) == ["a", "loose", "unknown"]


def test_records_read_from_a_manifest_share_their_shard_key_etag_and_mode() -> None:
    """A shard's members repeat its key and ETag, and most files one mode: decoded from JSON,
    each row would hold copies of its own (about 200 bytes a file); read back, they are one
    object each, and the records still equal what was written."""
    shard = ShardRecord("p/.s3xfer/shards/ab/cd.tar", 10_240, '"e-1"', 2)
    members = {
        path: ManifestRecord(
            path, shard.key, 5, 1, 0o644, "AAAAAA==", 0, 512 * (2 * n + 1), '"e-1"'
        )
        for n, path in enumerate(["a", "b"])
    }
    loose = ManifestRecord("c", "p/c", 5, 1, 0o644, "AAAAAA==", 0)
    written = Manifest("s3://b/p", {**members, "c": loose}, {shard.key: shard})
    read = Manifest.from_bytes(written.to_bytes(), where="x")
    assert read.same_as(written)
    a, b, c = read.records["a"], read.records["b"], read.records["c"]
    assert a.key is b.key and a.etag is b.etag
    assert a.mode is b.mode is c.mode


def _gzipped(data: dict[str, object], *, indent: int | None = None) -> bytes:
    return gzip.compress(json.dumps(data, indent=indent).encode("utf-8"))


def test_a_manifest_is_read_row_by_row_as_any_json_writer_may_lay_it_out() -> None:
    """Manifest.from_bytes decodes the files one row at a time (validate.json_object_rows),
    never the whole list at once: any layout of the same JSON still reads the same, the
    fields in any order, with any spacing, and the checks of each row stay."""
    shard = ShardRecord("p/s.tar", 10_240, '"e"', 1)
    record = ManifestRecord("a", shard.key, 5, 1, 0o644, "AAAAAA==", 0, 512, '"e"', "text/plain")
    written = Manifest("s3://b/p", {"a": record}, {shard.key: shard})
    fields = json.loads(gzip.decompress(written.to_bytes()))
    reordered = {"files": fields["files"], "shards": fields["shards"], "dest": "s3://b/p"}
    for data, indent in (
        (fields, 2),
        ({**reordered, "format": "s3xfer-manifest", "version": 2}, None),
        ({**fields, "files": []}, None),
    ):
        read = Manifest.from_bytes(_gzipped(data, indent=indent), where="x")
        assert read.records == ({"a": record} if data["files"] else {})
    past_shard = {**fields, "shards": [[shard.key, 516, '"e"', 1]]}
    bad: list[tuple[dict[str, object], str]] = [
        ({**fields, "version": 4, "files": [[*fields["files"][0], "new"]]}, "version"),
        ({**fields, "files": [fields["files"][0]] * 2}, "listed twice"),
        (past_shard, "past the end of its shard"),
        ({**fields, "files": {}}, "files is not a list"),
        ({**fields, "files": [[1]]}, "file record has 1 fields"),
    ]
    for data, reason in bad:
        with pytest.raises(IntegrityError, match=reason):
            Manifest.from_bytes(_gzipped(data), where="x")
    for raw in (b"[1]", b'{"files":[1,]}', b'{"format":1} x', b'{"files":[[1]'):
        with pytest.raises(IntegrityError, match=r"not JSON|not a JSON object"):
            Manifest.from_bytes(gzip.compress(raw), where="x")


@pytest.mark.parametrize("files", [0, 1, 3, 7])
def test_a_manifest_is_written_rows_at_a_time_as_json_dumps_writes_it_whole(
    files: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Manifest.to_bytes encodes and compresses a few rows at a time (ROWS_AT_ONCE), never the
    list of every row and its whole text: what it inflates to is still exactly the JSON of
    the whole manifest, which is what today's readers read."""
    monkeypatch.setattr("s3xfer.dataset.manifest.ROWS_AT_ONCE", 3)
    shard = ShardRecord("p/s.tar", 10**6, '"e"', files)
    records = {
        path: ManifestRecord(path, shard.key, 5, 1, 0o644, "AAAAAA==", 0, 512 * (2 * n + 1), '"e"')
        for n, path in enumerate(sorted(f'd/é{n}\t"' for n in range(files)))
    }
    manifest = Manifest("s3://b/p", records, {shard.key: shard} if files else {})
    whole = {
        "format": "s3xfer-manifest",
        "version": 2,
        "dest": "s3://b/p",
        "files": [r.to_json() for r in sorted(records.values(), key=lambda r: r.path)],
        "shards": [shard.to_json()] if files else [],
    }
    raw = manifest.to_bytes()
    assert gzip.decompress(raw) == json.dumps(
        whole, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    assert Manifest.from_bytes(raw, where="x").same_as(manifest)

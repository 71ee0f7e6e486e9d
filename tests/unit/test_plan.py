"""The planner is pure: properties of part sizes, classification, keys and estimates."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from s3xfer.config import (
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    GiB,
    MiB,
    TransferConfig,
)
from s3xfer.dataset.keys import S3Url, hashed_prefix, object_key
from s3xfer.errors import SourceError, UsageError
from s3xfer.planning.plan import (
    Kind,
    UploadKeys,
    classify,
    fit_part_size,
    make_plan,
    parts_of,
)
from s3xfer.planning.planfile import load_plan, save_plan
from s3xfer.planning.survey import FileEntry, SizeStats, Survey

TiB = 1024 * GiB
sizes = st.integers(min_value=0, max_value=5 * TiB)
preferred_parts = st.integers(min_value=MIN_PART_SIZE, max_value=MAX_PART_SIZE)


def make_survey(entries: list[FileEntry]) -> Survey:
    stats = SizeStats()
    for entry in entries:
        stats.add(entry.size, entry.path)
    return Survey(root=Path("/data"), files=entries, problems=[], stats=stats.summary())


@given(size=sizes, preferred=preferred_parts)
def test_part_size_respects_s3_limits(size: int, preferred: int) -> None:
    part = fit_part_size(size, preferred=preferred, max_memory=8 * GiB)
    assert MIN_PART_SIZE <= part <= MAX_PART_SIZE
    assert math.ceil(size / part) <= MAX_PARTS
    assert part >= preferred or part == MAX_PART_SIZE
    assert part % MiB == 0


@given(size=st.integers(min_value=0, max_value=64 * GiB), part=preferred_parts)
def test_parts_cover_the_file_exactly(size: int, part: int) -> None:
    parts = list(parts_of(size, part))
    assert parts[0].offset == 0 and parts[0].number == 1
    for previous, current in itertools.pairwise(parts):
        assert current.offset == previous.offset + previous.length
        assert current.number == previous.number + 1
    assert parts[-1].offset + parts[-1].length == size
    assert all(p.length == part for p in parts[:-1])
    assert 0 < parts[-1].length <= part or size == 0


def test_part_size_grows_for_huge_files() -> None:
    # 1 TiB at 8 MiB would be 131,072 parts: the part size must grow to stay under 10,000.
    part = fit_part_size(TiB, preferred=8 * MiB, max_memory=4 * GiB)
    assert part == 105 * MiB
    assert math.ceil(TiB / part) <= MAX_PARTS


def test_part_that_cannot_fit_the_memory_budget_is_refused() -> None:
    with pytest.raises(UsageError, match="raise --max-memory"):
        fit_part_size(TiB, preferred=8 * MiB, max_memory=64 * MiB)


def test_classification_at_the_threshold() -> None:
    config = TransferConfig(multipart_threshold=16 * MiB, pack=False)
    assert classify(0, config) is Kind.PUT
    assert classify(16 * MiB - 1, config) is Kind.PUT
    assert classify(16 * MiB, config) is Kind.MULTIPART


@given(path=st.text(min_size=1, max_size=200).filter(lambda p: "\x00" not in p))
def test_hashed_keys_are_deterministic_and_keep_the_path(path: str) -> None:
    dest = S3Url("bucket", "prefix")
    key = object_key(dest, path, style="hash")
    assert key == object_key(dest, path, style="hash")
    assert key == f"prefix/{hashed_prefix(path)}/{path}"
    assert object_key(dest, path, style="none") == f"prefix/{path}"


def test_hashed_prefixes_spread_over_many_values() -> None:
    prefixes = {hashed_prefix(f"images/{n:06d}.jpg") for n in range(2000)}
    assert len(prefixes) > 1500


def test_plan_estimate_counts_requests_and_cost() -> None:
    entries = [
        FileEntry("a.txt", 10, 1, 0o644),
        FileEntry("b.bin", 100 * MiB, 2, 0o600),
        FileEntry("c/empty", 0, 3, 0o644),
    ]
    config = TransferConfig(part_size=8 * MiB, multipart_threshold=16 * MiB, pack=False)
    plan = make_plan(make_survey(entries), S3Url.parse("s3://bucket/data/"), config)
    est = plan.estimate
    assert [u.kind for u in plan.units] == [Kind.PUT, Kind.MULTIPART, Kind.PUT]
    assert plan.units[1].part_count == 13  # 100 MiB / 8 MiB, rounded up
    assert est.parts == 13
    assert est.requests == 2 + (13 + 2) + 2  # two PUTs, one multipart, manifest read + write
    assert est.request_cost_usd == pytest.approx(est.requests * 0.005 / 1000)
    assert est.bytes == 10 + 100 * MiB
    assert [u.key for u in plan.units] == ["data/a.txt", "data/b.bin", "data/c/empty"]


def test_plan_round_trips_through_json(tmp_path: Path) -> None:
    entries = [FileEntry(f"d/{n}", n * MiB, n, 0o644) for n in range(40)]
    plan = make_plan(make_survey(entries), S3Url.parse("s3://b-1/p"), TransferConfig())
    for name in ("plan.json", "plan.json.gz"):
        save_plan(plan, tmp_path / name)
        loaded = load_plan(tmp_path / name)
        assert loaded.units == plan.units
        assert loaded.config == plan.config
        assert loaded.dest == plan.dest


def test_a_corrupt_plan_file_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "plan.json"
    bad.write_text('{"format": "s3xfer-plan", "version": 1, "units": [[1]]}')
    with pytest.raises(UsageError, match="corrupt plan"):
        load_plan(bad)
    bad.write_text("not json")
    with pytest.raises(UsageError, match="corrupt plan"):
        load_plan(bad)


def test_an_empty_tree_has_nothing_to_plan() -> None:
    with pytest.raises(SourceError, match="nothing to upload"):
        make_plan(make_survey([]), S3Url.parse("s3://bucket/x"))


def many_small(n: int, *, size: int = 16 * 1024, prefix: str = "img") -> list[FileEntry]:
    return [FileEntry(f"{prefix}/{i:06d}.jpg", size, i, 0o644) for i in range(n)]


def test_small_files_are_packed_into_shards_near_the_target_size() -> None:
    config = TransferConfig(shard_size=8 * MiB, part_size=5 * MiB)
    plan = make_plan(make_survey(many_small(3000)), S3Url.parse("s3://bkt/p"), config)
    assert plan.units == []
    sizes = [shard.layout().size for shard in plan.shards]
    assert all(size <= 8 * MiB + 64 * 1024 for size in sizes)  # + the index and end blocks
    assert all(size >= 6 * MiB for size in sizes[:-1])  # cut no earlier than 3/4 full
    members = [m.path for shard in plan.shards for m in shard.members]
    assert members == [e.path for e in many_small(3000)]  # every file once, neighbours together
    est = plan.estimate
    assert (est.files, est.packed_files, est.shards) == (3000, 3000, len(plan.shards))
    assert est.requests < 3000 // 50  # versus 3,000 PUTs unpacked


def test_shard_keys_are_deterministic_and_hashed() -> None:
    config = TransferConfig(shard_size=8 * MiB)
    dest = S3Url.parse("s3://bkt/p")
    first = make_plan(make_survey(many_small(2000)), dest, config)
    again = make_plan(make_survey(many_small(2000)), dest, config)
    assert [s.key for s in first.shards] == [s.key for s in again.shards]
    assert all(
        re.fullmatch(r"p/\.s3xfer/shards/[0-9a-f]{4}/[0-9a-f]{16}\.tar", s.key)
        for s in first.shards
    )


def test_a_shard_laid_out_again_has_a_key_of_its_own_for_each_layout() -> None:
    config = TransferConfig(shard_size=8 * MiB)
    (shard,) = make_plan(make_survey(many_small(100)), S3Url.parse("s3://bkt/p"), config).shards
    assert shard.relaid(list(shard.members), max_memory=config.max_memory) is shard
    touched = [*shard.members[:5], replace(shard.members[5], mtime_ns=7), *shard.members[6:]]
    without = shard.members[1:]
    relaid = [shard.relaid(m, max_memory=config.max_memory) for m in (touched, without)]
    assert [r.members for r in relaid] == [touched, without]
    assert len({shard.key, *(r.key for r in relaid)}) == 3  # one key, one layout
    assert [r.key for r in relaid] == [  # and the same members give the same key
        shard.relaid(m, max_memory=config.max_memory).key for m in (touched, without)
    ]
    assert all(r.key.startswith(shard.key.removesuffix(".tar") + "-") for r in relaid)
    # Uploads left behind under a re-laid key are found by the planned one.
    keys = UploadKeys(frozenset([shard.key]))
    assert all(r.key in keys for r in relaid) and shard.key in keys
    assert "p/.s3xfer/shards/0000/0000000000000000.tar" not in keys


def test_adding_a_file_moves_few_shard_boundaries() -> None:
    config = TransferConfig(shard_size=5 * MiB)
    dest = S3Url.parse("s3://bkt/p")
    files = many_small(4000)
    before = make_plan(make_survey(files), dest, config).shards
    inserted = [*files[:100], FileEntry("img/000099x.jpg", 16 * 1024, 1, 0o644), *files[100:]]
    after = make_plan(make_survey(inserted), dest, config).shards
    unchanged = {tuple(m.path for m in s.members) for s in before} & {
        tuple(m.path for m in s.members) for s in after
    }
    assert len(unchanged) >= len(before) - 2  # only the shard around the new file changes


def test_no_pack_and_thresholds() -> None:
    entries = [FileEntry("a", 10, 0, 0o644), FileEntry("b", 2 * MiB, 0, 0o644)]
    dest = S3Url.parse("s3://bkt/p")
    packed = make_plan(make_survey(entries), dest, TransferConfig())
    assert [m.path for s in packed.shards for m in s.members] == ["a"]
    assert [u.path for u in packed.units] == ["b"]
    loose = make_plan(make_survey(entries), dest, TransferConfig(pack=False))
    assert loose.shards == [] and [u.path for u in loose.units] == ["a", "b"]


def test_packed_plan_round_trips(tmp_path: Path) -> None:
    plan = make_plan(make_survey(many_small(500)), S3Url.parse("s3://bkt/p"), TransferConfig())
    save_plan(plan, tmp_path / "plan.json.gz")
    loaded = load_plan(tmp_path / "plan.json.gz")
    assert loaded.shards == plan.shards


def test_shard_keys_name_the_content_as_json_lines_of_its_members() -> None:
    """A shard's key is the digest of its members as json.dumps lines: the keys of every
    shard already stored depend on it, so the direct writing of plain names must give the
    very same digest as json.dumps for every kind of name."""
    from s3xfer.planning.plan import _content_digest

    names = ["a/b.jpg", 'a"b', "a\\b", "é/ü", "tab\tx", "del\x7f", "~!@#$%^&*()[]{}", ""]
    members = [FileEntry(n, 10**12 + i, -(10**18) + i, 0o644) for i, n in enumerate(names)]
    digest = hashlib.blake2b(digest_size=8)
    for member in members:
        line = json.dumps(member.to_json(), ensure_ascii=False) + "\n"
        digest.update(line.encode("utf-8"))
    assert _content_digest(members) == digest.hexdigest()
    for member in members:
        one = hashlib.blake2b(digest_size=8)
        one.update((json.dumps(member.to_json(), ensure_ascii=False) + "\n").encode("utf-8"))
        assert _content_digest([member]) == one.hexdigest()


def test_a_planned_shard_keeps_its_size_not_its_layout() -> None:
    """A layout holds a header offset and a member record per file: kept on every ShardUnit
    of a plan, it was about 130 bytes a file for the whole upload. The size is kept (the
    plan's estimate and the upload's progress ask for it), the layout made when needed."""
    from s3xfer.dataset.tarpack import ShardLayout

    entries = [FileEntry(f"d/f{n:05d}", 100, 10**18, 0o644) for n in range(500)]
    plan = make_plan(make_survey(entries), S3Url.parse("s3://b-1/p"), TransferConfig())
    assert plan.estimate.shards == len(plan.shards) >= 1
    for shard in plan.shards:
        assert shard.size == shard.layout().size
        assert not any(isinstance(value, ShardLayout) for value in vars(shard).values())

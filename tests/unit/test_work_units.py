"""Work units and slices: every file in exactly one unit, slices disjoint and complete,
the same on every machine."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from s3xfer.config import MiB, TransferConfig
from s3xfer.dataset.keys import S3Url
from s3xfer.errors import UsageError
from s3xfer.planning.plan import Kind, WorkUnit, make_plan, parse_slice, slice_of, work_units
from s3xfer.planning.survey import FileEntry

from .test_plan import make_survey

CONFIG = TransferConfig(part_size=5 * MiB, multipart_threshold=8 * MiB, shard_size=5 * MiB)


def planned(sizes: list[int]) -> tuple[list[WorkUnit], int]:
    files = [FileEntry(f"f/{n:05d}", size, 1, 0o644) for n, size in enumerate(sizes)]
    plan = make_plan(make_survey(files), S3Url.parse("s3://bucket/p"), CONFIG)
    return work_units(plan.units, plan.shards, batch_files=7, batch_bytes=3 * MiB), len(files)


def paths(units: list[WorkUnit]) -> list[str]:
    return [f.path for u in units for f in u.files] + [
        m.path for u in units for s in u.shards for m in s.members
    ]


sizes = st.lists(
    st.one_of(st.integers(0, 2000), st.integers(MiB, 3 * MiB), st.integers(9 * MiB, 12 * MiB)),
    min_size=1,
    max_size=60,
)


@given(sizes=sizes, count=st.integers(1, 9))
def test_slices_cover_every_file_exactly_once(sizes: list[int], count: int) -> None:
    units, total = planned(sizes)
    assert sorted(paths(units)) == sorted(f"f/{n:05d}" for n in range(total))
    sliced = [paths(slice_of(units, k, count)) for k in range(1, count + 1)]
    assert sorted(p for s in sliced for p in s) == sorted(paths(units))
    for unit in units:  # one shard, one multipart file, or a batch of single PUTs
        kinds = {f.kind for f in unit.files}
        assert (len(unit.shards), kinds) in [(1, set()), (0, {Kind.MULTIPART}), (0, {Kind.PUT})]
        assert len(unit.files) == 1 or Kind.MULTIPART not in kinds
        assert len(unit.files) <= 7


@given(sizes=sizes)
def test_units_are_the_same_after_a_round_trip(sizes: list[int]) -> None:
    units, _ = planned(sizes)
    again = [WorkUnit.from_json(u.to_json()) for u in units]
    assert [u.to_json() for u in again] == [u.to_json() for u in units]
    assert [u.size for u in again] == [u.size for u in units]


def test_parse_slice() -> None:
    assert parse_slice("3/8") == (3, 8)
    for bad in ("0/4", "5/4", "x/4", "3", "3/", "-1/2"):
        with pytest.raises(UsageError):
            parse_slice(bad)

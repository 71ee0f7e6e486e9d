"""Range coalescing covers every request exactly, and ranged responses are checked strictly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from s3xfer.errors import IntegrityError
from s3xfer.read.ranges import RangeGet, Wanted, check_ranged_response, coalesce

wanted_lists = st.lists(
    st.builds(
        Wanted,
        path=st.uuids().map(str),
        key=st.sampled_from(["a.tar", "b.tar", "c"]),
        offset=st.integers(0, 10**7).map(lambda n: n * 512),
        size=st.integers(0, 300_000),
    ),
    max_size=40,
)


@given(wanted=wanted_lists, gap=st.integers(0, 10**6), max_span=st.integers(1, 10**7))
def test_every_wanted_range_is_served_by_exactly_one_get(
    wanted: list[Wanted], gap: int, max_span: int
) -> None:
    gets = coalesce(wanted, gap=gap, max_span=max_span)
    served = [m for g in gets for m in g.members]
    assert sorted(served, key=id) == sorted([w for w in wanted if w.size], key=id)
    for get in gets:
        assert all(m.key == get.key for m in get.members)
        assert get.start == min(m.offset for m in get.members)
        assert get.end == max(m.offset + m.size for m in get.members)
        spans_overlap = any(
            a is not b and a.offset < b.offset + b.size and b.offset < a.offset + a.size
            for a in get.members
            for b in get.members
        )
        assert len(get.members) == 1 or get.end - get.start <= max_span or spans_overlap
    # GETs of one object never overlap, so no byte is fetched twice.
    for a in gets:
        for b in gets:
            if a is not b and a.key == b.key:
                assert a.end <= b.start or b.end <= a.start


def test_neighbours_merge_and_far_ranges_do_not() -> None:
    wanted = [
        Wanted("x", "s.tar", 512, 100),
        Wanted("y", "s.tar", 1536, 100),  # 924 bytes after x ends
        Wanted("z", "s.tar", 10_000_000, 100),
        Wanted("e", "s.tar", 4096, 0),  # empty: no bytes to fetch
    ]
    gets = coalesce(wanted, gap=1024)
    assert [(g.start, g.end, [m.path for m in g.members]) for g in gets] == [
        (512, 1636, ["x", "y"]),
        (10_000_000, 10_000_100, ["z"]),
    ]
    assert gets[0].header == "bytes=512-1635"
    assert gets[0].slice_of(bytes(range(256)) * 5, wanted[1]) == (bytes(range(256)) * 5)[1024:1124]


def test_records_of_one_shard_with_different_etags_never_share_a_get() -> None:
    # A stale record (its shard rewritten since) must not make If-Match refuse its neighbours.
    wanted = [
        Wanted("a", "s.tar", 512, 100, '"new"'),
        Wanted("b", "s.tar", 1024, 100, '"old"'),
        Wanted("c", "s.tar", 1536, 100, '"new"'),
    ]
    gets = coalesce(wanted, gap=1024)
    assert sorted((g.etag, [m.path for m in g.members]) for g in gets) == [
        ('"new"', ["a", "c"]),
        ('"old"', ["b"]),
    ]


def test_ranged_responses_are_checked() -> None:
    get = RangeGet("k", 100, 200, ())
    check_ranged_response(
        get, status=206, content_range="bytes 100-199/5000", body_length=100, where="k"
    )
    with pytest.raises(IntegrityError, match="expected 206"):
        check_ranged_response(get, status=200, content_range=None, body_length=5000, where="k")
    with pytest.raises(IntegrityError, match="Content-Range"):
        check_ranged_response(
            get, status=206, content_range="bytes 0-99/5000", body_length=100, where="k"
        )
    with pytest.raises(IntegrityError, match="truncated"):
        check_ranged_response(
            get, status=206, content_range="bytes 100-199/5000", body_length=42, where="k"
        )


def test_path_matcher_mixes_literal_paths_and_globs() -> None:
    from s3xfer.planning.globs import path_matcher

    matches = path_matcher(["img/00/a.jpg", "labels/*.json", "x?.txt"])
    assert matches("img/00/a.jpg") and matches("labels/1.json") and matches("x1.txt")
    assert not matches("img/00/b.jpg") and not matches("labels/1.txt") and not matches("x12.txt")
    assert matches("labels/sub/2.json")  # like fnmatch, '*' also crosses '/'

"""The shuffled epoch's pure parts (s3xfer/read/epoch.py): blocks, block order, each reader's share,
the bounded shuffle buffer, resuming, and the state a reader keeps."""

from __future__ import annotations

import itertools
import json
import random
import sys
import types
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s3xfer.dataset.manifest import ManifestRecord
from s3xfer.errors import UsageError
from s3xfer.read.epoch import (
    BufferShuffle,
    EpochState,
    block_order,
    block_starts,
    plan_reader,
    reader_share,
)
from s3xfer.read.epoch_iter import dataloader_worker
from s3xfer.read.reader import Dataset

GAP = 256 * 1024


def record(path: str, *, size: int, key: str, offset: int = -1, etag: str = "e") -> ManifestRecord:
    return ManifestRecord(path, key, size, 0, 0o644, "AAAAAA==", 0, offset, etag)


@st.composite
def catalogs(draw: st.DrawFn) -> list[ManifestRecord]:
    """A catalog in path order: runs of members of one shard (laid out as tar lays them:
    a 512-byte header before each, data padded to 512) and files that are objects."""
    groups = draw(
        st.lists(
            st.tuples(st.booleans(), st.lists(st.integers(0, 6000), min_size=1, max_size=9)),
            max_size=10,
        )
    )
    records: list[ManifestRecord] = []
    for shard, (packed, sizes) in enumerate(groups):
        offset = 512
        for size in sizes:
            path = f"f{len(records):05d}"
            if packed:
                key = f"shards/{shard}.tar"
                records.append(record(path, size=size, key=key, offset=offset, etag=f"t{shard}"))
                offset += size + (-size % 512) + 512
            else:
                records.append(record(path, size=size, key=path))
    return records


def order_of(records: list[ManifestRecord], state: EpochState) -> list[str]:
    """The paths one reader yields, in order."""
    plan = state.plan(records, gap=GAP)
    return [plan.records[item].path for item in state.shuffle(plan)]


def states(
    seed: int, *, world_size: int, num_workers: int = 1, block_bytes: int, buffer_bytes: int
) -> list[EpochState]:
    return [
        EpochState(
            seed,
            rank=rank,
            world_size=world_size,
            worker=worker,
            num_workers=num_workers,
            block_bytes=block_bytes,
            buffer_bytes=buffer_bytes,
        )
        for rank in range(world_size)
        for worker in range(num_workers)
    ]


SHAPE = st.fixed_dictionaries(
    {
        "block_bytes": st.sampled_from([1, 4096, 20_000]),
        "buffer_bytes": st.sampled_from([80_000, 200_000]),
    }
)


@given(catalogs(), st.integers(0, 2**32), st.sampled_from([1, 3, 4]), SHAPE)
def test_every_file_comes_exactly_once_across_the_readers(
    records: list[ManifestRecord], seed: int, readers: int, shape: dict[str, int]
) -> None:
    seen = Counter(
        path
        for state in states(seed, world_size=readers, **shape)
        for path in order_of(records, state)
    )
    assert sorted(seen) == [r.path for r in records]
    assert set(seen.values()) <= {1}


@given(catalogs(), st.integers(0, 2**32), SHAPE)
def test_ranks_and_their_dataloader_workers_split_the_files_between_them(
    records: list[ManifestRecord], seed: int, shape: dict[str, int]
) -> None:
    every = [
        path
        for state in states(seed, world_size=2, num_workers=3, **shape)
        for path in order_of(records, state)
    ]
    assert sorted(every) == [r.path for r in records]
    sizes = [len(order_of(records, s)) for s in states(seed, world_size=3, **shape)]
    assert max(sizes) - min(sizes) <= 1  # DDP ranks take the same number of steps (±1)


@given(catalogs(), st.integers(0, 2**32), SHAPE)
def test_the_same_seed_gives_the_same_order(
    records: list[ManifestRecord], seed: int, shape: dict[str, int]
) -> None:
    for state in states(seed, world_size=3, **shape):
        assert order_of(records, state) == order_of(records, EpochState.from_json(state.to_json()))


def test_other_seeds_and_other_epochs_give_other_orders() -> None:
    records = [record(f"f{n:03d}", size=1000, key=f"f{n:03d}") for n in range(41)]
    by_seed = {tuple(order_of(records, EpochState(seed))) for seed in range(5)}
    by_epoch = {tuple(order_of(records, EpochState(7, epoch=e))) for e in range(5)}
    assert len(by_seed) == 5
    assert len(by_epoch) == 5


@given(catalogs(), st.integers(0, 2**32), st.sampled_from([1, 3, 4]), SHAPE, st.data())
def test_resuming_after_n_files_yields_exactly_the_rest(
    records: list[ManifestRecord],
    seed: int,
    readers: int,
    shape: dict[str, int],
    data: st.DataObject,
) -> None:
    state = states(seed, world_size=readers, **shape)[data.draw(st.integers(0, readers - 1))]
    full = order_of(records, state)
    done = data.draw(st.integers(0, len(full)))
    plan = state.plan(records, gap=GAP)
    shuffle = state.shuffle(plan)
    shuffle.skip(done)
    assert [plan.records[i].path for i in shuffle] == full[done:]
    # What the reader fetches again on resuming is exactly what it has not yielded yet.
    resumed = state.shuffle(plan)
    resumed.skip(done)
    wanted = [plan.records[i].path for _, items in plan.still_wanted(resumed) for i in items]
    assert sorted(wanted) == sorted(full[done:])


def test_resuming_past_the_end_of_the_share_is_refused() -> None:
    records = [record(f"f{n}", size=10, key=f"f{n}") for n in range(5)]
    state = EpochState(1)
    shuffle = state.shuffle(state.plan(records, gap=GAP))
    with pytest.raises(UsageError, match="past the end"):
        shuffle.skip(6)


@given(
    st.lists(st.integers(0, 5000), max_size=60),
    st.integers(0, 20_000),
    st.integers(0, 2**32),
)
def test_the_buffer_holds_at_most_its_capacity_and_gives_out_every_item(
    sizes: list[int], capacity: int, seed: int
) -> None:
    shuffle = BufferShuffle(sizes, capacity=capacity, rng=random.Random(seed))
    out: list[int] = []
    for item in shuffle:
        out.append(item)
        alone = len(shuffle.pool) == 1  # an item larger than the capacity enters alone
        assert shuffle.pool_bytes <= capacity or alone
        assert shuffle.pool_bytes == sum(size for _, size in shuffle.pool)
    assert sorted(out) == list(range(len(sizes)))


def test_a_buffer_that_holds_one_file_keeps_the_stream_order() -> None:
    shuffle = BufferShuffle([10] * 6, capacity=10, rng=random.Random(0))
    assert list(shuffle) == list(range(6))


@given(catalogs(), st.sampled_from([1, 600, 4096, 20_000]))
def test_blocks_are_runs_of_neighbouring_members_of_one_shard(
    records: list[ManifestRecord], block_bytes: int
) -> None:
    starts = block_starts(records, block_bytes=block_bytes, gap=GAP)
    assert starts[0] == 0 if records else starts == [0]
    assert starts[-1] == len(records)
    assert starts == sorted(set(starts))
    for begin, end in itertools.pairwise(starts):
        block = records[begin:end]
        if not block[0].packed:
            assert len(block) == 1  # an object is a block alone
            continue
        assert {(r.key, r.etag) for r in block} == {(block[0].key, block[0].etag)}
        span = block[-1].offset + block[-1].size - block[0].offset
        assert len(block) == 1 or span <= block_bytes
    # Blocks are as long as they may be: a member that could have joined the previous block
    # (same shard, within block_bytes) did.
    for begin in starts[1:-1]:
        previous, first = records[begin - 1], records[begin]
        same_shard = previous.packed and first.packed and previous.key == first.key
        block_start = records[max(s for s in starts if s < begin)]
        assert not (same_shard and first.offset + first.size - block_start.offset <= block_bytes)


def test_block_order_is_a_permutation_fixed_by_seed_and_epoch() -> None:
    assert sorted(block_order(50, seed=3, epoch=1)) == list(range(50))
    assert block_order(50, seed=3, epoch=1) == block_order(50, seed=3, epoch=1)
    assert block_order(50, seed=3, epoch=1) != block_order(50, seed=3, epoch=2)


def test_a_share_splits_at_most_its_two_end_blocks() -> None:
    starts = [0, 10, 20, 30, 40, 50]
    shares = [reader_share(starts, [4, 2, 0, 3, 1], reader=r, readers=3) for r in range(3)]
    assert [[(s.first, s.count) for s in share] for share in shares] == [
        [(40, 10), (20, 6)],
        [(26, 4), (0, 10), (30, 3)],
        [(33, 7), (10, 10)],
    ]


def test_a_shard_read_in_blocks_of_neighbours() -> None:
    # 8 members of 1,000 bytes, 1,536 apart (header and padding): 2,600-byte blocks hold 2.
    records = [
        record(f"f{n}", size=1000, key="s.tar", offset=512 + n * 1536, etag="t") for n in range(8)
    ]
    plan = plan_reader(records, seed=0, epoch=0, reader=0, readers=1, block_bytes=2600, gap=GAP)
    assert len(plan.starts) - 1 == 4
    assert all(b - a == 2 for a, b in itertools.pairwise(plan.starts))


def test_the_state_is_small_json_and_the_same_size_for_any_dataset() -> None:
    state = EpochState(12, epoch=3, rank=1, world_size=4, position=10**9, catalog="0a1b2c3d")
    text = json.dumps(state.to_json())
    assert len(text) < 400
    assert EpochState.from_json(json.loads(text)) == state


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "other"}, "not an s3xfer epoch state"),
        ({"version": 9}, "version 9"),
        ({"position": "3"}, "corrupt epoch state"),
        ({"rank": 4}, "rank 4 is not one of world_size 4"),
        ({"patterns": "*.jpg"}, "corrupt epoch state"),
    ],
)
def test_a_bad_state_is_refused_in_one_line(change: dict[str, object], message: str) -> None:
    data = EpochState(1, rank=1, world_size=4).to_json() | change
    with pytest.raises(UsageError, match=message):
        EpochState.from_json(data)


def test_a_block_larger_than_a_quarter_of_the_buffer_is_refused() -> None:
    with pytest.raises(UsageError, match="at most a quarter of buffer_bytes"):
        EpochState(1, block_bytes=1000, buffer_bytes=3999)


def test_resuming_takes_seed_epoch_and_position_but_only_for_the_same_reader() -> None:
    mine = EpochState(1, rank=2, world_size=4)
    saved = EpochState(5, epoch=2, rank=2, world_size=4, position=77, catalog="ab")
    assert mine.resumed_from(saved) == saved
    with pytest.raises(UsageError, match="another reader's: rank 3"):
        mine.resumed_from(EpochState(5, rank=3, world_size=4, position=7))


class FakeWorkerInfo:
    def __init__(self, worker_id: int, num_workers: int) -> None:
        self.id, self.num_workers = worker_id, num_workers


def fake_torch_data(info: FakeWorkerInfo | None) -> types.ModuleType:
    module = types.ModuleType("torch.utils.data")
    module.get_worker_info = lambda: info  # type: ignore[attr-defined]
    return module


def test_outside_a_dataloader_worker_a_reader_is_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch.utils.data", raising=False)
    assert dataloader_worker() == (0, 1)
    monkeypatch.setitem(sys.modules, "torch.utils.data", fake_torch_data(None))
    assert dataloader_worker() == (0, 1)  # torch loaded, but this is the main process


def test_inside_a_dataloader_worker_the_epoch_is_split_by_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.data", fake_torch_data(FakeWorkerInfo(2, 3)))
    state = Dataset("s3://bucket/data").iter_epoch(5, rank=1, world_size=2).state_dict()
    assert (state["rank"], state["world_size"], state["worker"], state["num_workers"]) == (
        1,
        2,
        2,
        3,
    )


@settings(max_examples=30)
@given(st.integers(1, 400), st.integers(0, 2**32))
def test_odd_sized_datasets_split_over_four_readers(files: int, seed: int) -> None:
    records = [record(f"f{n:04d}", size=700, key="s", offset=512 + n * 1536) for n in range(files)]
    orders = [
        order_of(records, state)
        for state in states(seed, world_size=4, block_bytes=5000, buffer_bytes=40_000)
    ]
    assert sorted(p for order in orders for p in order) == [r.path for r in records]

"""Shuffled epochs (Dataset.iter_epoch / SyncDataset.iter_epoch) against the real local S3
server: every file once across readers, a fixed order per seed, resuming from a small state
(also after SIGKILL), memory within the buffer, blocks read with one GET each."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import signal
import subprocess
import sys
import textwrap
import types
from collections import Counter
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

import anyio
import pytest

from s3xfer import S3Url, TransferConfig, make_plan, survey, upload
from s3xfer.checksums import crc32
from s3xfer.config import KiB, MiB
from s3xfer.errors import PartialReadError, UsageError
from s3xfer.locals3 import LocalS3Info
from s3xfer.read.epoch import block_starts
from s3xfer.read.reader import Dataset
from s3xfer.read.sync import SyncDataset

from .helpers import connection, write_tree
from .test_sync import spoil_crc32

SHAPED = TransferConfig(
    max_memory=64 * MiB,
    part_size=5 * MiB,
    multipart_threshold=8 * MiB,
    pack_threshold=48 * KiB,
    shard_size=5 * MiB,
)
# Small blocks and buffer, so a dataset of a few MB has many blocks and fills the buffer.
SMALL: dict[str, Any] = {"block_bytes": 32 * KiB, "buffer_bytes": 256 * KiB}


def tree() -> dict[str, int]:
    files = {f"img/{n // 40:02d}/{n:04d}.jpg": 200 + (n * 7919) % 40_000 for n in range(301)}
    files |= {"loose/a.bin": 60 * KiB, "loose/b.bin": 70 * KiB + 3, "loose/c.bin": 99 * KiB}
    files |= {"empty.txt": 0, "labels.json": 777}
    return files


def do_upload(src: Path, url: str, info: LocalS3Info) -> None:
    plan = make_plan(survey(src), S3Url.parse(url), SHAPED)

    async def main() -> None:
        report = await upload(plan, connection(info))
        assert report.ok, report.failures

    anyio.run(main)


@pytest.fixture(scope="module")
def dataset(
    tmp_path_factory: pytest.TempPathFactory, local_s3: LocalS3Info, sync_s3_client: Any
) -> tuple[str, dict[str, bytes]]:
    bucket = "epoch-dataset"
    sync_s3_client.create_bucket(Bucket=bucket)
    src = tmp_path_factory.mktemp("epoch") / "src"
    contents = write_tree(src, tree(), seed=18)
    do_upload(src, f"s3://{bucket}/ds", local_s3)
    return f"s3://{bucket}/ds", contents


def read_share(ds: SyncDataset, seed: int, **options: Any) -> list[tuple[str, bytes]]:
    with ds.iter_epoch(seed, **options) as epoch:
        return list(epoch)


@pytest.mark.parametrize("readers", [1, 3, 4])
def test_every_file_comes_exactly_once_per_epoch_across_the_readers(
    readers: int, dataset: tuple[str, dict[str, bytes]], local_s3: LocalS3Info
) -> None:
    url, contents = dataset
    with SyncDataset(url, connection=connection(local_s3)) as ds:
        shares = [
            read_share(ds, 11, rank=rank, world_size=readers, **SMALL) for rank in range(readers)
        ]
    seen = Counter(path for share in shares for path, _ in share)
    assert sorted(seen) == sorted(contents)  # the loose files and the empty one too
    assert set(seen.values()) == {1}
    assert all(contents[path] == data for share in shares for path, data in share)
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1


def test_the_same_seed_gives_the_same_order_and_another_seed_another(
    dataset: tuple[str, dict[str, bytes]], local_s3: LocalS3Info
) -> None:
    url, contents = dataset
    with SyncDataset(url, connection=connection(local_s3)) as ds:
        first = [path for path, _ in read_share(ds, 5, **SMALL)]
        again = [path for path, _ in read_share(ds, 5, **SMALL)]
        other = [path for path, _ in read_share(ds, 6, **SMALL)]
        next_epoch = [path for path, _ in read_share(ds, 5, epoch=1, **SMALL)]
    assert first == again
    assert sorted(first) == sorted(other) == sorted(next_epoch) == sorted(contents)
    assert other != first
    assert next_epoch != first
    # Shuffled, not read in storage order.
    assert first != sorted(first)


def test_the_async_twin_yields_the_same_order(
    dataset: tuple[str, dict[str, bytes]], local_s3: LocalS3Info
) -> None:
    url, contents = dataset

    async def main() -> list[tuple[str, bytes]]:
        async with (
            Dataset(url, connection=connection(local_s3)) as ds,
            ds.iter_epoch(9, rank=1, world_size=3, **SMALL) as epoch,
        ):
            return [item async for item in epoch]

    got = anyio.run(main)
    with SyncDataset(url, connection=connection(local_s3)) as ds:
        assert got == read_share(ds, 9, rank=1, world_size=3, **SMALL)
    assert all(contents[path] == data for path, data in got)


def test_an_async_epoch_iterated_outside_its_block_says_how(
    dataset: tuple[str, dict[str, bytes]], local_s3: LocalS3Info
) -> None:
    url, _ = dataset

    async def main() -> None:
        async with Dataset(url, connection=connection(local_s3)) as ds:
            async for _ in ds.iter_epoch(1):
                pass

    with pytest.raises(UsageError, match=r"inside `async with ds.iter_epoch"):
        anyio.run(main)


@pytest.mark.parametrize("done", [0, 1, 57, 100])
def test_resuming_after_n_files_yields_exactly_the_rest(
    done: int, dataset: tuple[str, dict[str, bytes]], local_s3: LocalS3Info
) -> None:
    url, _ = dataset
    with SyncDataset(url, connection=connection(local_s3)) as ds:
        full = [path for path, _ in read_share(ds, 3, rank=0, world_size=3, **SMALL)]
        with ds.iter_epoch(3, rank=0, world_size=3, **SMALL) as epoch:
            head = [path for _, (path, _) in zip(range(done), epoch, strict=False)]
            saved = json.loads(json.dumps(epoch.state_dict()))
        assert saved["position"] == done
        resumed = ds.iter_epoch(0, rank=0, world_size=3, **SMALL)  # the state's seed wins
        resumed.load_state_dict(saved)
        rest = [path for path, _ in resumed]
    assert head + rest == full


def test_a_reader_killed_mid_epoch_resumes_without_losing_or_repeating_a_file(
    dataset: tuple[str, dict[str, bytes]], s3_env: LocalS3Info, tmp_path: Path
) -> None:
    url, contents = dataset
    script = tmp_path / "reader.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys
            from s3xfer.checksums import crc32
            from s3xfer.read.sync import SyncDataset

            epoch = SyncDataset({url!r}).iter_epoch(
                21, rank=1, world_size=3, block_bytes={SMALL["block_bytes"]},
                buffer_bytes={SMALL["buffer_bytes"]},
            )
            if len(sys.argv) > 1:
                epoch.load_state_dict(json.loads(sys.argv[1]))
            for path, data in epoch:
                print("FILE", crc32(data), path, flush=True)
                print("STATE", json.dumps(epoch.state_dict()), flush=True)
                if len(sys.argv) == 1:
                    sys.stdin.readline()  # paced by the test, so it dies mid-epoch
            print("END", flush=True)
            """
        )
    )
    killed = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert killed.stdin is not None and killed.stdout is not None
    before: list[tuple[str, int]] = []
    saved = ""
    for _ in range(40):
        kind, crc, path = killed.stdout.readline().split(" ", 2)
        assert kind == "FILE"
        before.append((path.rstrip("\n"), int(crc)))
        kind, saved = killed.stdout.readline().split(" ", 1)
        assert kind == "STATE"
        killed.stdin.write("\n")
        killed.stdin.flush()
    killed.send_signal(signal.SIGKILL)  # blocked on its 41st line, blocks read ahead
    assert killed.wait(timeout=60) == -signal.SIGKILL
    killed.stdout.close()
    killed.stdin.close()

    resumed = subprocess.run(
        [sys.executable, str(script), saved], capture_output=True, text=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr
    lines = resumed.stdout.splitlines()
    assert lines[-1] == "END"
    after = [
        (path, int(crc))
        for kind, crc, path in (line.split(" ", 2) for line in lines[:-1])
        if kind == "FILE"
    ]
    with SyncDataset(url) as ds:
        full = [
            (path, crc32(data)) for path, data in read_share(ds, 21, rank=1, world_size=3, **SMALL)
        ]
    assert before + after == full
    assert all(crc32(contents[path]) == crc for path, crc in full)


def test_the_bytes_held_stay_within_the_buffer(
    dataset: tuple[str, dict[str, bytes]], local_s3: LocalS3Info
) -> None:
    url, contents = dataset
    buffer = 160 * KiB
    with (
        SyncDataset(url, connection=connection(local_s3)) as ds,
        ds.iter_epoch(4, block_bytes=40 * KiB, buffer_bytes=buffer) as epoch,
    ):
        held = [epoch.stats.bytes_held for _ in epoch]
        peak = epoch.stats.peak_bytes_held
    assert len(held) == len(contents)
    assert max(held) <= buffer
    assert buffer // 2 < peak <= buffer  # the buffer was used, and no more


def test_neighbouring_members_are_read_with_one_get_per_block(
    dataset: tuple[str, dict[str, bytes]], local_s3: LocalS3Info
) -> None:
    url, contents = dataset
    block = 256 * KiB
    with SyncDataset(url, connection=connection(local_s3)) as ds:
        records = ds.ls()
        gets_before = ds.stats.gets
        with ds.iter_epoch(2, block_bytes=block, buffer_bytes=2 * MiB) as epoch:
            assert len(list(epoch)) == len(contents)
            blocks = epoch.stats.blocks
        gets = ds.stats.gets - gets_before
    starts = block_starts(records, block_bytes=block, gap=256 * KiB)
    empty_blocks = sum(
        1 for a, b in itertools.pairwise(starts) if sum(r.size for r in records[a:b]) == 0
    )
    assert blocks == len(starts) - 1
    assert gets == blocks - empty_blocks  # an empty file needs no GET
    assert gets < len(contents) / 5


def test_a_glob_picks_the_files_of_the_epoch(
    dataset: tuple[str, dict[str, bytes]], local_s3: LocalS3Info
) -> None:
    url, contents = dataset
    with SyncDataset(url, connection=connection(local_s3)) as ds:
        one = [path for path, _ in read_share(ds, 1, pattern="img/0[0-2]/*", **SMALL)]
        two = [
            path
            for rank in range(2)
            for path, _ in read_share(
                ds, 1, rank=rank, world_size=2, pattern=["loose/*", "*.json"], **SMALL
            )
        ]
    assert sorted(one) == sorted(
        p for p in contents if p.startswith(("img/00/", "img/01/", "img/02/"))
    )
    assert sorted(two) == ["labels.json", "loose/a.bin", "loose/b.bin", "loose/c.bin"]


def read_as_dataloader_worker(
    dataset: SyncDataset, worker: int, workers: int, results: Queue[Any]
) -> None:
    """A DataLoader worker, as torch.utils.data.get_worker_info() describes it (no torch)."""
    info = types.SimpleNamespace(id=worker, num_workers=workers)
    fake = types.ModuleType("torch.utils.data")
    fake.get_worker_info = lambda: info  # type: ignore[attr-defined]
    sys.modules["torch.utils.data"] = fake
    try:
        results.put([path for path, _ in dataset.iter_epoch(8, rank=1, world_size=2, **SMALL)])
    except BaseException as exc:
        results.put(repr(exc))


def test_dataloader_workers_split_each_rank_s_share_by_themselves(
    dataset: tuple[str, dict[str, bytes]], local_s3: LocalS3Info
) -> None:
    url, _ = dataset
    ds = SyncDataset(url, connection=connection(local_s3))
    try:
        rank_share = [path for path, _ in read_share(ds, 8, rank=1, world_size=2, **SMALL)]
        context: Any = multiprocessing.get_context("fork")
        results: Queue[Any] = context.Queue()
        workers = [
            context.Process(target=read_as_dataloader_worker, args=(ds, n, 3, results))
            for n in range(3)
        ]
        for worker in workers:
            worker.start()
        got = [results.get(timeout=120) for _ in workers]
        for worker in workers:
            worker.join(timeout=60)
            assert worker.exitcode == 0
    finally:
        ds.close()
    assert all(isinstance(share, list) and share for share in got), got
    merged = Counter(path for share in got for path in share)
    assert sorted(merged) == sorted(rank_share)
    assert set(merged.values()) == {1}


def test_an_iterator_started_before_fork_goes_on_in_the_child_from_where_it_stood(
    dataset: tuple[str, dict[str, bytes]], local_s3: LocalS3Info
) -> None:
    url, _ = dataset
    with SyncDataset(url, connection=connection(local_s3)) as ds:
        full = [path for path, _ in read_share(ds, 13, **SMALL)]
        epoch = ds.iter_epoch(13, **SMALL)
        head = [path for _, (path, _) in zip(range(30), epoch, strict=False)]
        context: Any = multiprocessing.get_context("fork")
        results: Queue[Any] = context.Queue()
        child = context.Process(target=lambda: results.put([p for p, _ in epoch]))
        child.start()
        rest = results.get(timeout=120)
        child.join(timeout=60)
        epoch.close()
    assert head + rest == full


def test_resuming_after_the_dataset_changed_is_refused(
    s3_env: LocalS3Info, bucket: str, tmp_path: Path
) -> None:
    url = f"s3://{bucket}/ds"
    write_tree(tmp_path / "src", {f"f{n:02d}": 100 for n in range(20)})
    do_upload(tmp_path / "src", url, s3_env)
    with SyncDataset(url) as ds, ds.iter_epoch(1) as epoch:
        next(epoch)
        saved = epoch.state_dict()
    write_tree(tmp_path / "src", {"new": 5}, seed=2)
    do_upload(tmp_path / "src", url, s3_env)
    with SyncDataset(url) as ds:
        resumed = ds.iter_epoch(1)
        resumed.load_state_dict(saved)
        with pytest.raises(UsageError, match="changed since this epoch state was saved"):
            next(resumed)


def test_a_state_of_another_reader_is_refused(
    dataset: tuple[str, dict[str, bytes]], local_s3: LocalS3Info
) -> None:
    url, _ = dataset
    with SyncDataset(url, connection=connection(local_s3)) as ds:
        saved = ds.iter_epoch(1, rank=0, world_size=2).state_dict()
        with pytest.raises(UsageError, match="another reader's: rank 0"):
            ds.iter_epoch(1, rank=1, world_size=2).load_state_dict(saved)


def test_closing_the_dataset_stops_an_unfinished_epoch(
    dataset: tuple[str, dict[str, bytes]], local_s3: LocalS3Info
) -> None:
    url, _ = dataset
    ds = SyncDataset(url, connection=connection(local_s3))
    epoch = ds.iter_epoch(1, **SMALL)
    next(epoch)  # its producer now waits for the reader to take the next batch
    ds.close()  # does not wait for that producer forever
    with pytest.raises(Exception, match="closed"):
        ds.read("labels.json")


def test_a_file_that_fails_its_checksum_stops_the_epoch_naming_it(
    s3_env: LocalS3Info, bucket: str, tmp_path: Path, sync_s3_client: Any
) -> None:
    url = f"s3://{bucket}/ds"
    contents = write_tree(tmp_path / "src", {f"f{n:02d}": 300 + n for n in range(30)})
    do_upload(tmp_path / "src", url, s3_env)
    spoil_crc32(sync_s3_client, bucket, "ds", "f17")
    got: list[tuple[str, bytes]] = []
    with (
        SyncDataset(url) as ds,
        ds.iter_epoch(3, block_bytes=2 * KiB, buffer_bytes=8 * KiB) as epoch,
    ):
        with pytest.raises(PartialReadError) as failed:
            got.extend(epoch)
        assert epoch.state_dict()["position"] == len(got)
    assert list(failed.value.failures) == ["f17"]
    assert "checksum mismatch" in str(failed.value)
    assert 0 < len(got) < len(contents)
    assert all(contents[path] == data for path, data in got)

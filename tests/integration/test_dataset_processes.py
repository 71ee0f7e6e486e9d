"""SyncDataset across processes, as DataLoader workers use it: one instance made in the parent
serves children started by fork, spawn and forkserver, and a script that never closes it exits."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import textwrap
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

import pytest

from s3xfer.locals3 import LocalS3Info
from s3xfer.read.sync import SyncDataset

from .helpers import connection, run_cli, write_tree


@pytest.fixture
def small_dataset(s3_env: LocalS3Info, bucket: str, tmp_path: Path) -> tuple[str, dict[str, bytes]]:
    contents = write_tree(tmp_path / "src", {f"img/{n:03d}.jpg": 500 + n for n in range(40)})
    result = run_cli("upload", str(tmp_path / "src"), f"s3://{bucket}/ds")
    assert result.returncode == 0, result.stderr
    return f"s3://{bucket}/ds", contents


def read_in_child(dataset: SyncDataset, paths: list[str], results: Queue[Any]) -> None:
    try:
        results.put(dataset.read_many(paths))
    except BaseException as exc:  # the parent fails the test with it
        results.put(repr(exc))


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_one_dataset_made_in_the_parent_serves_workers_of_every_start_method(
    method: str, small_dataset: tuple[str, dict[str, bytes]], s3_env: LocalS3Info
) -> None:
    url, contents = small_dataset
    paths = sorted(contents)
    dataset = SyncDataset(url, connection=connection(s3_env))
    try:
        # Used in the parent first: its loop thread and connections exist when the child starts.
        assert dataset.read(paths[0]) == contents[paths[0]]
        context: Any = multiprocessing.get_context(method)  # typeshed: Process per method
        results: Queue[Any] = context.Queue()
        workers = [
            context.Process(target=read_in_child, args=(dataset, paths[n::2], results))
            for n in range(2)
        ]
        for worker in workers:
            worker.start()
        got = [results.get(timeout=120) for _ in workers]
        for worker in workers:
            worker.join(timeout=60)
            assert worker.exitcode == 0
        merged: dict[str, bytes] = {}
        for result in got:
            assert isinstance(result, dict), result
            merged.update(result)
        assert merged == contents
        # The parent's own instance still works after its children used theirs.
        assert dataset.read(paths[-1]) == contents[paths[-1]]
    finally:
        dataset.close()


def test_a_script_that_never_closes_its_dataset_exits(
    small_dataset: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    url, contents = small_dataset
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            from s3xfer.read.sync import SyncDataset

            DATASET = SyncDataset({url!r})  # module level, never closed
            sys.stdout.buffer.write(DATASET.read("img/007.jpg"))
            """
        )
    )
    # The environment points at the local server (s3_env). Before, this hung at exit.
    result = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == contents["img/007.jpg"]


def test_a_closed_dataset_says_so(small_dataset: tuple[str, dict[str, bytes]]) -> None:
    url, _ = small_dataset
    dataset = SyncDataset(url)
    dataset.close()
    with pytest.raises(Exception, match="closed"):
        dataset.read("img/000.jpg")

"""`s3xfer upload --broker` with `s3xfer worker` processes on a real Redis: a dataset arrives
complete and verified; a worker killed with SIGKILL in the middle of a unit costs nothing
(its unit is delivered again, its multipart upload adopted, nothing lost or duplicated); a
producer killed mid-job is run again and waits for the same units instead of sending them
twice. Every worker and producer is the real CLI in its own process."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from s3xfer.bench.netem import start_in_thread
from s3xfer.config import MiB, TransferConfig
from s3xfer.dataset.keys import S3Url
from s3xfer.locals3 import LocalS3Info
from s3xfer.planning.plan import Kind, Plan, WorkUnit, make_plan, work_units
from s3xfer.planning.survey import survey

from .helpers import list_keys, run_cli, write_tree
from .redis_server import redis_url_fixture  # noqa: F401  (the `redis_url` fixture)
from .test_sync import referenced_keys, tree_of

SIZES = ["--part-size", "5MiB", "--multipart-threshold", "8MiB", "--shard-size", "5MiB"]
CONFIG = TransferConfig(part_size=5 * MiB, multipart_threshold=8 * MiB, shard_size=5 * MiB)
WORKER_READY = re.compile(r"^s3xfer worker \S+ ready: ", re.M)
UNIT_DONE = re.compile(r"^unit (\d+) of job \w+: ", re.M)
UNIT_STARTED = re.compile(r"^unit (\d+) of job \w+ started: ", re.M)


def wait_for(condition: Callable[[], Any], *, timeout: float, what: str) -> Any:
    """Poll until `condition()` is truthy; its value. Fails the test, saying what, after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@contextmanager
def workers(
    count: int, broker: str, env: dict[str, str], logs: Path, *extra: str
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`count` workers, each ready (its ready line printed) when the block starts; stopped
    with SIGTERM at the end (a warm shutdown: exit 0)."""
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    for n in range(count):
        with (
            (logs / f"worker{n}.out").open("wb") as out,
            (logs / f"worker{n}.err").open("wb") as err,
        ):
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "s3xfer", "worker", "--broker", broker, *extra],
                    env={**os.environ, **env},
                    stdout=out,
                    stderr=err,
                )
            )
    try:
        for n, process in enumerate(processes):

            def ready(n: int = n, process: subprocess.Popen[bytes] = process) -> bool:
                return bool(WORKER_READY.search(worker_log(logs, n))) or process.poll() is not None

            wait_for(ready, timeout=60, what=f"worker {n} to be ready")
            assert process.poll() is None, (logs / f"worker{n}.err").read_text()
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for n, process in enumerate(processes):
            try:
                code = process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                pytest.fail(f"worker {n} did not stop on SIGTERM")
            assert code in (0, -signal.SIGKILL), (logs / f"worker{n}.err").read_text()


def worker_log(logs: Path, n: int) -> str:
    return (logs / f"worker{n}.out").read_text(errors="replace")


def units_run(logs: Path, line: re.Pattern[str] = UNIT_DONE) -> Counter[int]:
    """How many times each unit index was finished (or started), over every worker's log."""
    counts: Counter[int] = Counter()
    for out in logs.glob("worker*.out"):
        counts.update(int(n) for n in line.findall(out.read_text(errors="replace")))
    return counts


def each_once(counts: Counter[int], units: int) -> bool:
    return sorted(counts.items()) == [(n, 1) for n in range(units)]


def start_producer(args: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen[bytes]:
    with (logs / "producer.out").open("wb") as out, (logs / "producer.err").open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "s3xfer", "upload", *args, "--json"],
            env={**os.environ, **env},
            stdout=out,
            stderr=err,
        )


def producer_report(process: subprocess.Popen[bytes], logs: Path) -> dict[str, Any]:
    try:
        code = process.wait(timeout=150)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail("the producer never finished: " + (logs / "producer.err").read_text())
    assert code == 0, (logs / "producer.err").read_text()
    report: dict[str, Any] = json.loads((logs / "producer.out").read_text())
    return report


def expected_plan(src: Path, dest: str) -> tuple[Plan, list[WorkUnit]]:
    """The plan the producer makes (same sizes), and its work units in the job's order."""
    plan = make_plan(survey(src), S3Url.parse(dest), CONFIG)
    return plan, work_units(plan.units, plan.shards)


def check_bucket(
    client: Any, bucket: str, plan: Plan, src: Path, tmp: Path, env: dict[str, str]
) -> None:
    """Every file back byte for byte; exactly the planned objects; no upload left open."""
    out = tmp / "restored"
    restored = run_cli("download", f"s3://{bucket}/ds", str(out), "--json", env=env)
    assert restored.returncode == 0, restored.stderr
    report = json.loads(restored.stdout)
    files = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    assert report["files_downloaded"] == len(files) and report["files_failed"] == 0
    for rel in files:
        assert (out / rel).read_bytes() == (src / rel).read_bytes(), rel
    keys = list_keys(client, bucket, "ds/")
    meta = "ds/.s3xfer/"
    assert {k for k in keys if not k.startswith(meta)} == {u.key for u in plan.units}
    shard_keys = {s.key for s in plan.shards} | {s.index_key for s in plan.shards}
    assert {k for k in keys if k.startswith(meta + "shards/")} == shard_keys
    assert meta + "manifest.json.gz" in keys
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def job_progress(client: redis.Redis) -> dict[int, dict[str, Any]]:
    """The progress hash of the only job on this Redis database: unit index → entry."""
    keys = client.keys("s3xfer:*:progress")
    if not keys:
        return {}
    return {int(k): json.loads(v) for k, v in client.hgetall(keys[0]).items()}


def database(redis_url: str, number: int) -> str:
    """A database of its own for each test: its queue, results and job keys apart."""
    return redis_url.rsplit("/", 1)[0] + f"/{number}"


@pytest.fixture
def slow_endpoint(local_s3: LocalS3Info) -> Iterator[str]:
    """The local server behind a 3 MB/s-per-connection path: a 12 MiB file takes a worker
    (2 connections) about two seconds, long enough to be killed in the middle."""
    host, port = local_s3.endpoint_url.removeprefix("http://").split(":")
    url, stop = start_in_thread(host, int(port), bandwidth=3e6)
    try:
        yield url
    finally:
        stop()


def test_workers_upload_a_dataset_completely_and_verified(
    tmp_path: Path, local_s3: LocalS3Info, sync_s3_client: Any, bucket: str, redis_url: str
) -> None:
    broker = database(redis_url, 1)
    env = local_s3.env()
    src = tmp_path / "src"
    write_tree(
        src,
        {
            **{f"big/{n}.bin": 12 * MiB + n for n in range(3)},
            **{f"loose/{n}.dat": 1200 * 1024 + n for n in range(5)},
            **{f"small/{n // 100}/{n}.txt": 20_000 + n for n in range(400)},
        },
        seed=7,
    )
    plan, work = expected_plan(src, f"s3://{bucket}/ds")
    assert len(plan.shards) == 2 and len(work) == 6
    # What a worker killed in the middle of a shard leaves behind: the redelivered shard is
    # built under a new upload, and the old one is aborted once every unit is done.
    left = sync_s3_client.create_multipart_upload(Bucket=bucket, Key=plan.shards[0].key)
    sync_s3_client.upload_part(
        Bucket=bucket,
        Key=plan.shards[0].key,
        UploadId=left["UploadId"],
        PartNumber=1,
        Body=b"half a shard",
    )

    logs = tmp_path / "logs"
    logs.mkdir()
    producer = start_producer(
        [str(src), f"s3://{bucket}/ds", *SIZES, "--broker", broker], env, logs
    )
    client = redis.Redis.from_url(broker)
    wait_for(lambda: client.llen("s3xfer") == 6, timeout=60, what="the units to be queued")
    # One message lost (as with a Redis restarted empty): the producer, seeing nothing move,
    # finds the unit neither queued nor at a worker and sends it again.
    assert client.rpop("s3xfer")

    def said(text: str) -> bool:
        assert producer.poll() is None, (logs / "producer.err").read_text()
        return text in (logs / "producer.err").read_text()

    # No worker yet: the producer says so, and keeps waiting.
    wait_for(lambda: said("no worker has taken a unit"), timeout=60, what="the no-worker notice")
    wait_for(lambda: said("1 unit was neither queued"), timeout=60, what="the lost unit sent again")
    # The queued units name the endpoint and carry no credentials.
    queued: list[bytes] = client.lrange("s3xfer", 0, -1)  # type: ignore[assignment]
    assert len(queued) == 6
    for message in queued:
        body = base64.b64decode(json.loads(message)["body"])
        assert local_s3.endpoint_url.encode() in body
        assert local_s3.secret_key.encode() not in message + body
        assert local_s3.access_key.encode() not in message + body
    with workers(3, broker, env, logs):
        report = producer_report(producer, logs)
    stderr = (logs / "producer.err").read_text()
    for out in logs.iterdir():
        assert local_s3.secret_key not in out.read_text(errors="replace"), out
    assert "s3xfer worker --broker redis://127.0.0.1:" in stderr
    assert "a worker is at work on this job: going on" in stderr

    assert report["files_uploaded"] == len(plan.units) + sum(len(s.members) for s in plan.shards)
    assert report["files_failed"] == 0 and report["manifest_written"]
    assert report["units"] == 6 and report["workers"] >= 1 and report["uploads_aborted"] == 1
    assert report["units_redelivered"] == 0 and report["shards_uploaded"] == 2
    assert each_once(units_run(logs), 6) and each_once(units_run(logs, UNIT_STARTED), 6)
    check_bucket(sync_s3_client, bucket, plan, src, tmp_path, env)
    # The job's keys and task results are gone from Redis.
    assert client.keys("s3xfer:*") == [] and client.keys("celery-task-meta-*") == []

    # Run again: nothing changed, nothing enqueued, no PUT.
    again = run_cli(
        "upload", str(src), f"s3://{bucket}/ds", *SIZES, "--broker", broker, "--json", env=env
    )
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)
    assert second["files_uploaded"] == 0 and second["write_requests"] == 0
    assert second["units"] == 0


def test_a_broker_upload_makes_the_dataset_equal_the_tree(
    tmp_path: Path, local_s3: LocalS3Info, sync_s3_client: Any, bucket: str, redis_url: str
) -> None:
    broker = database(redis_url, 7)
    env = local_s3.env()
    src, url = tmp_path / "src", f"s3://{bucket}/ds"
    write_tree(
        src,
        {**{f"loose/{n}.dat": 1200 * 1024 + n for n in range(3)}, "small/a.txt": 10},
        seed=8,
    )
    (src / "small/b.txt").write_text("b\n")

    def upload(logs: str) -> dict[str, Any]:
        with workers(1, broker, env, tmp_path / logs):
            result = run_cli("upload", str(src), url, *SIZES, "--broker", broker, "--json", env=env)
        assert result.returncode == 0, result.stderr
        report: dict[str, Any] = json.loads(result.stdout)
        return report

    upload("first")
    (src / "loose/0.dat").unlink()
    (src / "small/b.txt").unlink()
    report = upload("second")

    # The producer's commit removed them; their objects went after the manifest was written.
    assert (report["files_removed"], report["objects_deleted"]) == (2, 3)  # file, shard, index
    assert set(list_keys(sync_s3_client, bucket, "ds/")) == referenced_keys(
        sync_s3_client, bucket, "ds"
    )
    restored = run_cli("download", url, str(tmp_path / "out"), env=env)
    assert restored.returncode == 0, restored.stderr
    assert tree_of(tmp_path / "out") == tree_of(src)


def test_a_worker_killed_mid_unit_loses_and_duplicates_nothing(
    tmp_path: Path,
    local_s3: LocalS3Info,
    sync_s3_client: Any,
    bucket: str,
    redis_url: str,
    slow_endpoint: str,
) -> None:
    broker = database(redis_url, 2)
    env = local_s3.env()
    src = tmp_path / "src"
    write_tree(
        src,
        {
            **{f"big/{n}.bin": 12 * MiB + n for n in range(4)},
            **{f"loose/{n}.dat": 1200 * 1024 + n for n in range(3)},
            **{f"small/{n}.txt": 20_000 + n for n in range(200)},
        },
        seed=8,
    )
    plan, work = expected_plan(src, f"s3://{bucket}/ds")
    large = {
        n for n, unit in enumerate(work) if unit.files and unit.files[0].kind is Kind.MULTIPART
    }
    assert len(large) == 4

    logs = tmp_path / "logs"
    logs.mkdir()
    client = redis.Redis.from_url(broker)
    options = ["--concurrency", "2", "--visibility-timeout", "5"]
    with workers(3, broker, env, logs, *options) as processes:
        pids = {str(p.pid): p for p in processes}
        args = [str(src), f"s3://{bucket}/ds", *SIZES, "--broker", broker]
        producer = start_producer([*args, "--endpoint-url", slow_endpoint], env, logs)

        def busy_with_a_large_file() -> tuple[int, subprocess.Popen[bytes]] | None:
            for index, entry in job_progress(client).items():
                pid = str(entry["worker"]).rsplit(":", 1)[1]
                # some of its parts acknowledged, not all (so not completed yet)
                if index in large and 0 < entry["bytes"] < work[index].size and pid in pids:
                    return index, pids[pid]
            return None

        index, victim = wait_for(
            busy_with_a_large_file, timeout=60, what="a worker in the middle of a large file"
        )
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        report = producer_report(producer, logs)

    assert report["files_failed"] == 0, report["failures"]
    assert report["files_uploaded"] == len(plan.units) + sum(len(s.members) for s in plan.shards)
    assert report["units_redelivered"] >= 1
    # The file's multipart upload was taken over: the parts already in S3 verified, not re-sent.
    assert report["uploads_resumed"] >= 1 and report["bytes_reused"] > 0
    # Every unit finished once, the victim's by another worker, as a second delivery.
    assert each_once(units_run(logs), len(work))
    started = units_run(logs, UNIT_STARTED)
    assert started[index] == 2 and each_once(started - Counter({index: 1}), len(work))
    killed = processes.index(victim)
    assert str(index) not in UNIT_DONE.findall(worker_log(logs, killed))  # started, not done
    others = "".join(worker_log(logs, n) for n in range(3) if n != killed)
    assert re.search(rf"^unit {index} of job \w+: .*\(delivered again\)$", others, re.M)
    check_bucket(sync_s3_client, bucket, plan, src, tmp_path, env)


def test_a_unit_longer_than_the_visibility_timeout_is_not_delivered_twice(
    tmp_path: Path,
    local_s3: LocalS3Info,
    sync_s3_client: Any,
    bucket: str,
    redis_url: str,
    slow_endpoint: str,
) -> None:
    """The worker's heartbeat keeps its unit's delivery fresh: the idle worker sweeping for
    lost units every second leaves alone a unit that runs for longer than the timeout."""
    broker = database(redis_url, 4)
    env = local_s3.env()
    src = tmp_path / "src"
    write_tree(src, {"big.bin": 24 * MiB}, seed=10)  # 1 connection at 3 MB/s: 8 s
    plan, _ = expected_plan(src, f"s3://{bucket}/ds")
    logs = tmp_path / "logs"
    logs.mkdir()
    args = [str(src), f"s3://{bucket}/ds", *SIZES, "--broker", broker]
    options = ["--concurrency", "1", "--visibility-timeout", "5"]
    with workers(2, broker, env, logs, *options):
        report = producer_report(
            start_producer([*args, "--endpoint-url", slow_endpoint], env, logs), logs
        )
    assert report["seconds"] > 5 + 1  # longer than the timeout and one sweep
    assert report["files_uploaded"] == 1 and report["units_redelivered"] == 0
    assert each_once(units_run(logs), 1) and each_once(units_run(logs, UNIT_STARTED), 1)
    assert "delivered again" not in worker_log(logs, 0) + worker_log(logs, 1)
    check_bucket(sync_s3_client, bucket, plan, src, tmp_path, env)


def test_a_frozen_worker_whose_unit_runs_twice_at_once_counts_each_file_once(
    tmp_path: Path,
    local_s3: LocalS3Info,
    sync_s3_client: Any,
    bucket: str,
    redis_url: str,
    slow_endpoint: str,
) -> None:
    """A worker stopped (SIGSTOP: a paused VM, a worker cut off from Redis) for longer than
    the visibility timeout: its unit goes to the other worker, which adopts its multipart
    upload; then it wakes up and both race on the same upload. One wins, the other fails;
    the producer counts the file once, as uploaded, and nothing is left open."""
    broker = database(redis_url, 5)
    env = local_s3.env()
    src = tmp_path / "src"
    write_tree(src, {"big.bin": 30 * MiB}, seed=11)  # 6 parts, 1 connection at 3 MB/s
    plan, work = expected_plan(src, f"s3://{bucket}/ds")
    logs = tmp_path / "logs"
    logs.mkdir()
    client = redis.Redis.from_url(broker)
    args = [str(src), f"s3://{bucket}/ds", *SIZES, "--broker", broker]
    options = ["--concurrency", "1", "--visibility-timeout", "5"]
    with workers(2, broker, env, logs, *options) as processes:
        pids = {str(p.pid): p for p in processes}
        producer = start_producer([*args, "--endpoint-url", slow_endpoint], env, logs)

        def holder(least: int) -> subprocess.Popen[bytes] | None:
            entry = job_progress(client).get(0)
            if entry is None or not least <= entry["bytes"] < work[0].size:
                return None
            return pids.get(str(entry["worker"]).rsplit(":", 1)[1])

        frozen = wait_for(lambda: holder(5 * MiB), timeout=60, what="a part of the file sent")
        frozen.send_signal(signal.SIGSTOP)
        try:
            wait_for(
                lambda: holder(0) not in (None, frozen),
                timeout=60,
                what="the other worker to take the unit over",
            )
        finally:
            frozen.send_signal(signal.SIGCONT)
        report = producer_report(producer, logs)

    # Either run may win the race; the producer takes the one that completed.
    assert report["files_failed"] == 0, report["failures"]
    assert report["files_uploaded"] == 1
    assert units_run(logs, UNIT_STARTED) == Counter({0: 2})
    assert "(delivered again)" in worker_log(logs, 0) + worker_log(logs, 1)
    check_bucket(sync_s3_client, bucket, plan, src, tmp_path, env)


def test_a_newer_job_of_the_same_source_and_destination_supersedes_an_abandoned_one(
    tmp_path: Path, local_s3: LocalS3Info, sync_s3_client: Any, bucket: str, redis_url: str
) -> None:
    """A producer dies with its units queued, then the files change and a new upload
    starts: the old job's units are skipped (an old shard layout must not land over the
    new one), the new job's run once."""
    broker = database(redis_url, 6)
    env = local_s3.env()
    src = tmp_path / "src"
    tree = {
        **{f"big/{n}.bin": 9 * MiB + n for n in range(2)},
        **{f"small/{n}.txt": 20_000 + n for n in range(50)},
    }
    write_tree(src, tree, seed=12)
    logs = tmp_path / "logs"
    logs.mkdir()
    client = redis.Redis.from_url(broker)
    args = [str(src), f"s3://{bucket}/ds", *SIZES, "--broker", broker]
    old = start_producer(args, env, logs)
    wait_for(lambda: client.llen("s3xfer") == 3, timeout=60, what="the old job's units queued")
    old.send_signal(signal.SIGKILL)
    old.wait(timeout=30)
    (src / "small/7.txt").write_bytes(b"changed since")  # a shard's layout changes
    plan, work = expected_plan(src, f"s3://{bucket}/ds")
    new = start_producer(args, env, logs)
    wait_for(lambda: client.llen("s3xfer") == 6, timeout=60, what="the new job's units queued")
    with workers(2, broker, env, logs):
        report = producer_report(new, logs)

    assert report["files_failed"] == 0 and report["files_uploaded"] == len(tree)
    logged = worker_log(logs, 0) + worker_log(logs, 1)
    assert logged.count("skipped (job over or superseded)") == 3  # the old job's
    mine = re.compile(rf"^unit (\d+) of job {report['job']}: ", re.M)
    assert each_once(units_run(logs, mine), len(work))
    check_bucket(sync_s3_client, bucket, plan, src, tmp_path, env)


def test_a_producer_killed_mid_job_is_run_again_and_sends_nothing_twice(
    tmp_path: Path,
    local_s3: LocalS3Info,
    sync_s3_client: Any,
    bucket: str,
    redis_url: str,
    slow_endpoint: str,
) -> None:
    broker = database(redis_url, 3)
    env = local_s3.env()
    src = tmp_path / "src"
    write_tree(
        src,
        {
            **{f"big/{n}.bin": 12 * MiB + n for n in range(4)},
            **{f"small/{n}.txt": 20_000 + n for n in range(100)},
        },
        seed=9,
    )
    plan, work = expected_plan(src, f"s3://{bucket}/ds")
    logs = tmp_path / "logs"
    logs.mkdir()
    client = redis.Redis.from_url(broker)
    args = [str(src), f"s3://{bucket}/ds", *SIZES, "--broker", broker]
    args += ["--endpoint-url", slow_endpoint]
    with workers(2, broker, env, logs, "--concurrency", "2"):
        producer = start_producer(args, env, logs)
        wait_for(
            lambda: any(entry["files"] for entry in job_progress(client).values()),
            timeout=60,
            what="a first unit done",
        )
        producer.send_signal(signal.SIGKILL)
        producer.wait(timeout=30)
        assert len(units_run(logs)) < len(work), "the job ended before the producer was killed"
        report = producer_report(start_producer(args, env, logs), logs)

    assert report["files_failed"] == 0
    assert report["files_uploaded"] == len(plan.units) + sum(len(s.members) for s in plan.shards)
    # Each unit ran once: the second producer found the first one's queued units and results.
    assert each_once(units_run(logs), len(work))
    assert each_once(units_run(logs, UNIT_STARTED), len(work))
    check_bucket(sync_s3_client, bucket, plan, src, tmp_path, env)

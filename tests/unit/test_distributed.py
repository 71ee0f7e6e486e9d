"""The pure parts of the distributed mode: what travels through the broker (no credentials,
round trips), how unit results merge into one upload's, the redelivery settings, and the
notice given when no worker shows up."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from s3xfer.config import TransferConfig
from s3xfer.dataset.keys import S3Url
from s3xfer.dataset.manifest import ManifestRecord, ShardRecord
from s3xfer.distributed import units as d
from s3xfer.distributed.worker import make_app
from s3xfer.errors import S3XferError, UnitFailed, UsageError
from s3xfer.limits import RunLimits
from s3xfer.planning.plan import FileUnit, Kind, Plan, ShardUnit, WorkUnit
from s3xfer.planning.survey import FileEntry
from s3xfer.transport.s3 import Connection

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY"


def sample_work() -> list[WorkUnit]:
    big = FileUnit(Kind.MULTIPART, "big.bin", "ds/big.bin", 40 << 20, 7, 0o644, 16 << 20)
    loose = FileUnit(Kind.PUT, "a.txt", "ds/a.txt", 2 << 20, 8, 0o600, 0)
    members = [FileEntry(f"s/{n}", 100 + n, 9, 0o644) for n in range(3)]
    shard = ShardUnit("ds/.s3xfer/shards/ab/abcd.tar", 16 << 20, members)
    return [WorkUnit([], [shard]), WorkUnit([big], []), WorkUnit([loose], [])]


def sample_plan(work: list[WorkUnit]) -> Plan:
    return Plan(
        source=Path("/data/src"),
        dest=S3Url.parse("s3://bucket/ds"),
        config=TransferConfig(part_size=8 * 1024 * 1024),
        units=[f for u in work for f in u.files],
        shards=[s for u in work for s in u.shards],
    )


def test_a_unit_payload_carries_no_credentials_and_round_trips() -> None:
    work = sample_work()
    connection = Connection(
        endpoint_url="http://127.0.0.1:9000",
        region="eu-west-1",
        profile="prod-admin",
        access_key="AKIAEXAMPLEEXAMPLE",
        secret_key=SECRET,
        sse="AES256",
        expected_bucket_owner="123456789012",
        stall_timeout=12.5,
        read_timeout=4.0,
        unsigned=True,
    )
    limits = RunLimits(concurrency=8, max_attempts=3)
    payload = d.unit_payload(
        job="j",
        index=1,
        plan=sample_plan(work),
        limits=limits,
        connection=connection,
        unit=work[1],
    )
    text = json.dumps(payload)  # JSON only: the only serializer the app accepts
    for secret in (SECRET, "AKIAEXAMPLEEXAMPLE", "prod-admin"):
        assert secret not in text
    back = json.loads(text)
    assert WorkUnit.from_json(back["unit"]) == work[1]
    assert TransferConfig.from_json(back["config"]) == TransferConfig(part_size=8 * 1024 * 1024)
    assert RunLimits.from_json(back["limits"]) == limits
    assert d.connection_from_json(back["connection"]) == Connection(
        endpoint_url="http://127.0.0.1:9000",
        region="eu-west-1",
        sse="AES256",
        expected_bucket_owner="123456789012",
        stall_timeout=12.5,
        read_timeout=4.0,
        unsigned=True,
    )


def test_every_connection_setting_is_either_sent_to_workers_or_a_credential() -> None:
    # A setting added to Connection and forgotten here would leave workers connecting
    # differently from the producer (as --no-sign-request once did).
    names = {field.name for field in dataclasses.fields(Connection)}
    shared, own = set(d.SHARED_CONNECTION_FIELDS), set(d.WORKER_OWN_CONNECTION_FIELDS)
    assert not shared & own
    assert shared | own == names


def test_a_job_is_named_by_its_source_destination_and_units() -> None:
    work = sample_work()
    plan = sample_plan(work)
    assert d.job_id(plan, work) == d.job_id(sample_plan(sample_work()), sample_work())
    assert d.job_id(plan, work[:2]) != d.job_id(plan, work)
    assert d.task_id("abc", 3) == "s3xfer-abc-3"


def test_unit_results_round_trip_through_json() -> None:
    record = ManifestRecord("s/0", "ds/.s3xfer/shards/ab/abcd.tar", 100, 9, 0o644, "AAAAAA==", 0)
    result = d.UnitResult(
        "j",
        0,
        "host:1",
        records=[record],
        shards=[ShardRecord("ds/.s3xfer/shards/ab/abcd.tar", 4096, '"e-1"', 3)],
        failures=[("s/1", "gone")],
        files_done=2,
        files_failed=1,
        bytes_done=4096,
        redelivered=True,
        seconds=1.5,
    )
    back = d.UnitResult.from_json(json.loads(json.dumps(result.to_json())))
    assert back == result
    assert not back.complete
    with pytest.raises(S3XferError, match="unknown result format"):
        d.UnitResult.from_json({**result.to_json(), "version": 99})


def test_a_failed_unit_fails_every_file_it_holds() -> None:
    shard_unit = sample_work()[0]
    failed = d.UnitResult.failed(shard_unit, "no credentials", job="j", index=0, worker="w")
    assert failed.failures == [(f"s/{n}", "no credentials") for n in range(3)]
    assert failed.files_failed == 3 and failed.error == "no credentials" and not failed.complete


def test_results_merge_into_one_uploads_counters() -> None:
    work = sample_work()
    ok = d.UnitResult(
        "j",
        1,
        "a:1",
        files_done=1,
        bytes_done=40 << 20,
        bytes_reused=16 << 20,
        uploads_resumed=1,
        retries=2,
        throttled=1,
        requests=5,
        write_requests=4,
        peak_buffered_bytes=32 << 20,
        lowest_concurrency=4,
        redelivered=True,
    )
    other = d.UnitResult("j", 2, "b:2", files_done=1, bytes_done=2 << 20, requests=2)
    failed = d.UnitResult.failed(work[0], "boom", job="j", index=0, worker="b:2")
    merged = d.merge_results([ok, other, failed])
    counters = merged.counters
    assert counters.files_done == 2 and counters.files_failed == 3
    assert counters.bytes_done == (42 << 20) and counters.bytes_reused == 16 << 20
    assert (counters.retries, counters.throttled) == (2, 1)
    assert counters.requests == 7 and counters.write_requests == 4
    assert counters.peak_buffered_bytes == 32 << 20 and counters.lowest_concurrency == 4
    assert merged.workers == 2 and merged.redelivered == 1
    assert len(counters.failures) == 3
    assert d.merge_results([]).counters.lowest_concurrency == 0  # the report says the plan's


def test_progress_counts_each_unit_once_and_ignores_garbage() -> None:
    values = [
        json.dumps({"bytes": 10, "files": 1, "worker": "a", "beat": 3}),
        json.dumps({"bytes": 5, "files": 0, "worker": "b", "beat": 1}),
        "not json",
        json.dumps({"bytes": 7}),
    ]
    assert d.progress_totals(values) == (15, 1)


def test_redelivery_settings_scan_on_every_sweep() -> None:
    options = d.transport_options(120)
    assert options["visibility_timeout"] == 120
    assert options["unacked_restore_throttle"] == 1
    assert options["unacked_restore_interval"] == 12
    assert options["unacked_index_key"] == d.UNACKED_INDEX_KEY
    assert d.transport_options(5)["unacked_restore_interval"] == 1
    assert d.transport_options(3600)["unacked_restore_interval"] == 30
    with pytest.raises(UsageError, match="at least 5 s"):
        d.transport_options(2)


def test_the_app_acknowledges_late_and_speaks_json_only() -> None:
    app = make_app("redis://127.0.0.1:6379/0", visibility_timeout=30)
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert list(conf.accept_content) == ["json"] and conf.task_serializer == "json"
    assert conf.broker_transport_options["visibility_timeout"] == 30
    assert d.TASK_NAME in app.tasks
    with pytest.raises(UsageError, match="not a Redis URL"):
        make_app("amqp://localhost")


def test_no_sign_of_a_worker_is_said_once_then_cleared() -> None:
    watch = d.WorkerWatch("s3xfer worker --broker redis://h/0", notice_after=10, last_sign=0)
    assert not watch.should_ping(5)
    assert watch.should_ping(10)
    notice = watch.pinged(0, 10)
    assert notice is not None and "s3xfer worker --broker redis://h/0" in notice
    assert "still waiting" in notice
    assert not watch.should_ping(15)  # pings are spaced too
    assert watch.should_ping(20) and watch.pinged(0, 20) is None  # said once
    assert watch.activity(21) == "a worker is at work on this job: going on"
    assert watch.activity(22) is None
    assert watch.pinged(2, 40) is None  # idle workers answering: no notice...
    assert watch.stalled(40)  # ...and no progress either: lost units are looked for


def test_lost_units_are_sent_again_only_when_missing_twice() -> None:
    lost = d.LostUnits(confirm_after=2, period=30)
    assert lost.due(0)
    assert lost.checked({"a", "b"}, 0) == set()  # suspects: one more look, soon
    assert not lost.due(1) and lost.due(2)
    assert lost.checked({"b", "c"}, 2) == {"b"}  # "a" reached a worker meanwhile
    assert lost.due(4)  # "c" is a suspect now
    assert lost.checked(set(), 4) == set()
    assert not lost.due(30) and lost.due(34)  # nothing suspect: the long period


def test_a_failure_waits_while_another_run_of_the_unit_beats() -> None:
    failed = d.UnitResult("j", 0, "a:1", files_failed=1, run="r1")
    assert d.failure_is_final(failed, {}, now=100)
    assert d.failure_is_final(failed, {"r1": 99}, now=100)  # its own beats
    assert not d.failure_is_final(failed, {"r1": 99, "r2": 97}, now=100)
    assert d.failure_is_final(failed, {"r1": 99, "r2": 100 - d.STALE_AFTER}, now=100)


def test_a_tasks_stored_state_becomes_the_units_result() -> None:
    unit = sample_work()[0]  # a shard of three files
    done = d.UnitResult("j", 0, "a:1", files_done=3, run="r1")
    ok = d.unit_outcome(unit, {"status": "SUCCESS", "result": done.to_json()}, job="j", index=0)
    assert ok == done and ok.complete
    # A unit that did not complete is stored as FAILURE (a later success may replace it).
    whole = d.UnitResult("j", 0, "a:1", error="no AWS credentials found", run="r2")
    failed = d.unit_outcome(
        unit, {"status": "FAILURE", "result": UnitFailed(whole.to_json())}, job="j", index=0
    )
    assert failed.failures == [(f"s/{n}", "no AWS credentials found") for n in range(3)]
    assert failed.run == "r2" and failed.worker == "a:1" and not failed.complete
    crashed = d.unit_outcome(unit, {"status": "FAILURE", "result": KeyError("x")}, job="j", index=0)
    assert crashed.files_failed == 3 and "the worker failed (FAILURE): KeyError" in crashed.error
    garbage = d.unit_outcome(unit, {"status": "SUCCESS", "result": {"x": 1}}, job="j", index=0)
    assert garbage.files_failed == 3 and "unreadable result" in garbage.error
    assert "no AWS credentials" in repr(UnitFailed(whole.to_json()))
    assert "files" not in repr(UnitFailed(whole.to_json()))  # a summary, no records


def test_the_distributed_mode_without_its_extra_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from s3xfer.cli import main as cli

    for module in ("broker", "worker", "jobs"):  # imported afresh, without celery
        monkeypatch.delitem(sys.modules, f"s3xfer.distributed.{module}", raising=False)
    monkeypatch.setitem(sys.modules, "celery", None)  # import celery now fails
    monkeypatch.setattr(sys, "argv", ["s3xfer", "worker", "--broker", "redis://127.0.0.1:1/0"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "s3xfer: error: the distributed mode needs the extra: pip install 's3xfer[distributed]'"
    ]

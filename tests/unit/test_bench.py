"""Specification of the pure parts of `s3xfer bench`: sweep fitting, warm-up and stop rules,
the JSON / CSV shapes, the plot, named profiles and the settings they give each command."""

from __future__ import annotations

import csv
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner

from s3xfer.bench.profiles import (
    load_profile,
    profile_path,
    profile_settings,
    profiles_dir,
    save_profile,
    settings_for,
)
from s3xfer.bench.recorder import BenchListener, PointRecorder, reached_cap, warmed_up
from s3xfer.bench.results import (
    CSV_COLUMNS,
    BenchResult,
    CleanupReport,
    EmulatedPath,
    MeasuredPoint,
    csv_rows,
    require_matplotlib,
    write_csv,
    write_plot,
)
from s3xfer.bench.settings import (
    MIN_POINT_SECONDS,
    PER_POINT_OVERHEAD_SECONDS,
    RANGE_SOURCE_BYTES,
    READ_SET_BYTES,
    BenchPlan,
    BenchSettings,
    plan_bench,
    read_set_count,
    sample_interval,
)
from s3xfer.bench.stats import (
    MIB,
    OP_GET,
    OP_MULTIPART,
    OP_PUT,
    Point,
    Recommendation,
    SweepPoint,
    latency_summary,
    recommend,
)
from s3xfer.bench.sweep import STOP_STABLE, STOP_TIME, _Runner, _Written, emulation_upstream
from s3xfer.cli import bench as benchcli
from s3xfer.dataset.keys import S3Url
from s3xfer.errors import UsageError

URL = S3Url("bench", "tmp")
KIB = 1024


def a_point(
    op: str = OP_PUT, size: int = MIB, concurrency: int = 4, mb_per_s: float = 100.0
) -> Point:
    nbytes = round(mb_per_s * 1e6 * 2)
    reads = op in (OP_GET, "range")
    return Point(
        op=op,
        object_size=size,
        concurrency=concurrency,
        seconds=2.0,
        bytes=nbytes,
        objects=max(1, nbytes // size),
        errors=1,
        retries=2,
        latency=latency_summary([0.030, 0.031, 0.040]),
        ttfb=latency_summary([0.020, 0.021]) if reads else None,
    )


def a_curve(op: str, size: int, rates: dict[int, float]) -> list[Point]:
    return [a_point(op, size, c, rate) for c, rate in rates.items()]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("S3XFER_HOME", str(tmp_path / "s3xfer-home"))
    return tmp_path / "s3xfer-home"


# --------------------------------------------------------------------------- settings, plan


@pytest.mark.parametrize(
    "change",
    [
        {"ops": ("put", "copy")},
        {"ops": ()},
        {"sizes": (0,)},
        {"sizes": (6 * 1024 * MIB,)},
        {"concurrencies": (0, 4)},
        {"concurrencies": (2048,)},
        {"point_seconds": 0.01},
        {"max_seconds": 0.0},
        {"tolerance": 1.0},
    ],
)
def test_settings_reject_what_cannot_be_measured(change: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        BenchSettings(url=URL, **change)  # type: ignore[arg-type]


def test_multipart_alone_accepts_part_sizes_above_one_put() -> None:
    BenchSettings(url=URL, ops=(OP_MULTIPART,), sizes=(6 * 1024 * MIB,))


def test_a_sweep_that_fits_keeps_its_point_time_and_bounds_the_run() -> None:
    settings = BenchSettings(
        url=URL, ops=(OP_PUT,), sizes=(KIB,), concurrencies=(1, 2, 4), point_seconds=2.0
    )
    plan = plan_bench(settings)
    assert [p.concurrency for p in plan.sweep] == [1, 2, 4]
    assert plan.point_seconds == 2.0
    assert plan.estimate_seconds == pytest.approx(3 * (2.0 + PER_POINT_OVERHEAD_SECONDS))
    assert plan.prepare_bytes == 0  # nothing to read


def test_a_sweep_too_long_for_max_seconds_gets_shorter_points_not_fewer() -> None:
    settings = BenchSettings(
        url=URL,
        ops=(OP_PUT,),
        sizes=(KIB, MIB),
        concurrencies=(1, 2),
        point_seconds=10.0,
        max_seconds=12.0,
    )
    plan = plan_bench(settings)
    assert len(plan.sweep) == 4
    assert plan.point_seconds == pytest.approx(12.0 / 4 - PER_POINT_OVERHEAD_SECONDS)
    assert all(p.max_seconds == plan.point_seconds for p in plan.sweep)
    assert plan.estimate_seconds <= settings.max_seconds + 1e-9


def test_a_sweep_that_cannot_fit_at_all_is_refused_before_any_request() -> None:
    settings = BenchSettings(
        url=URL, ops=(OP_PUT,), sizes=(KIB,), concurrencies=(1, 2, 4, 8), max_seconds=4.0
    )
    with pytest.raises(UsageError, match="--max-seconds"):
        plan_bench(settings)


def test_reads_prepare_a_bounded_set_and_ranges_read_from_shard_sized_objects() -> None:
    settings = BenchSettings(
        url=URL, ops=(OP_GET, "range"), sizes=(16 * KIB, 64 * MIB), concurrencies=(1, 8)
    )
    plan = plan_bench(settings)
    gets = 16 * KIB * 8 + 64 * MIB * 4  # 8 small objects (the top concurrency), 256 MiB cap
    ranges = RANGE_SOURCE_BYTES * 8 + 64 * MIB * 4  # 16 KiB ranges share 16 MiB sources
    # The 64 MiB get and the 64 MiB range read the same size of object: one set for both.
    assert plan.prepare_bytes == gets + ranges - 64 * MIB * 4
    assert read_set_count(64 * MIB, max_concurrency=128) * 64 * MIB == READ_SET_BYTES
    assert read_set_count(16 * KIB, max_concurrency=8) == 8


def test_multipart_sizes_below_the_s3_part_minimum_are_left_out() -> None:
    settings = BenchSettings(url=URL, ops=(OP_PUT, OP_MULTIPART), sizes=(KIB, 5 * MIB))
    plan = plan_bench(settings)
    assert {p.object_size for p in plan.sweep if p.op == OP_MULTIPART} == {5 * MIB}


@pytest.mark.parametrize(("cap", "interval"), [(0.2, 0.05), (1.0, 0.1), (5.0, 0.5), (60, 0.5)])
def test_sampling_interval_gives_about_ten_samples_within_bounds(
    cap: float, interval: float
) -> None:
    assert sample_interval(cap) == pytest.approx(interval)


# --------------------------------------------------------------------------- warm-up, stop

PLANNED = SweepPoint(op=OP_PUT, object_size=MIB, concurrency=2, max_seconds=1.0)


def test_only_completions_inside_the_measured_interval_count() -> None:
    recorder = PointRecorder()
    recorder.completed(0.1, worker=0, nbytes=100, latency=0.5, ttfb=None)  # warm-up
    recorder.failed(0.1, RuntimeError("early"), worker=1)
    recorder.begin(1.0)
    recorder.completed(1.5, worker=0, nbytes=10, latency=0.02, ttfb=None)
    recorder.completed(1.6, worker=1, nbytes=30, latency=0.04, ttfb=None)
    recorder.failed(1.7, RuntimeError("late"), worker=1)
    recorder.retried(1.8)
    recorder.end(3.0)
    recorder.completed(3.1, worker=0, nbytes=1000, latency=0.01, ttfb=None)  # after the end
    point = recorder.point(PLANNED, reads=False)
    assert (point.bytes, point.objects, point.errors, point.retries) == (40, 2, 1, 1)
    assert point.seconds == pytest.approx(2.0)
    assert point.latency.max == pytest.approx(0.04)
    assert point.ttfb is None
    assert recorder.last_error == "late"
    # The stability window counts warm-up too (it is sampled from the start).
    assert recorder.take_window() == 140 and recorder.take_window() == 0


def test_long_requests_count_for_the_part_of_them_inside_the_interval() -> None:
    # Two workers moving in waves of 1 s requests: the interval [1.5, 3.5] holds two full
    # seconds of each worker's transfer, whatever the waves' phase: 4 requests' worth of
    # bytes, not the 2 (or 4, or 6) that complete inside it.
    recorder = PointRecorder()
    for worker in (0, 1):
        recorder.started(0.0, worker=worker)
        recorder.completed(1.0, worker=worker, nbytes=100, latency=1.0, ttfb=None)
        recorder.started(1.0, worker=worker)
    recorder.begin(1.5)
    for worker in (0, 1):
        recorder.completed(2.0, worker=worker, nbytes=100, latency=1.0, ttfb=None)  # half in
        recorder.started(2.0, worker=worker)
        recorder.completed(3.0, worker=worker, nbytes=100, latency=1.0, ttfb=None)  # all in
        recorder.started(3.0, worker=worker)  # still running at the end: half of it in
    recorder.end(3.5)
    point = recorder.point(PLANNED, reads=False)
    assert point.bytes == 400 and point.objects == 4
    assert point.mb_per_s == pytest.approx(400 / 2.0 / 1e6)


def test_reads_report_time_to_first_byte() -> None:
    recorder = PointRecorder()
    recorder.begin(0.0)
    recorder.completed(0.5, worker=0, nbytes=10, latency=0.05, ttfb=0.03)
    recorder.end(1.0)
    point = recorder.point(PLANNED, reads=True)
    assert point.ttfb is not None and point.ttfb.p50 == pytest.approx(0.03)


def test_warm_up_lasts_until_every_worker_has_finished_a_request() -> None:
    recorder = PointRecorder()
    assert not warmed_up(PLANNED, recorder, windows=1, elapsed=0.1, cap=1.0)
    recorder.completed(0.1, worker=0, nbytes=1, latency=0.1, ttfb=None)
    assert not warmed_up(PLANNED, recorder, windows=2, elapsed=0.2, cap=1.0)
    recorder.failed(0.2, RuntimeError("x"), worker=1)  # a failed first request also warms
    assert warmed_up(PLANNED, recorder, windows=2, elapsed=0.2, cap=1.0)


def test_warm_up_ends_at_half_the_cap_even_if_a_worker_is_still_busy() -> None:
    recorder = PointRecorder()
    assert not warmed_up(PLANNED, recorder, windows=5, elapsed=0.49, cap=1.0)
    assert warmed_up(PLANNED, recorder, windows=5, elapsed=0.5, cap=1.0)


def test_a_point_runs_past_its_cap_until_each_worker_has_one_measured_request() -> None:
    recorder = PointRecorder()
    kwargs = {"start": 0.0, "cap": 1.0, "hard_cap": 3.0}
    assert not reached_cap(PLANNED, recorder, now=1.5, **kwargs)  # measuring has not begun
    recorder.begin(0.5)
    recorder.completed(0.9, worker=0, nbytes=1, latency=0.1, ttfb=None)
    assert not reached_cap(PLANNED, recorder, now=0.9, **kwargs)  # before the cap
    assert not reached_cap(PLANNED, recorder, now=1.2, **kwargs)  # 1 of 2 measured
    recorder.completed(1.3, worker=1, nbytes=1, latency=0.1, ttfb=None)
    assert reached_cap(PLANNED, recorder, now=1.3, **kwargs)
    slow = PointRecorder()
    slow.begin(0.5)
    assert reached_cap(PLANNED, slow, now=3.0, **kwargs)  # the hard cap always ends it


# --------------------------------------------------------------------------- JSON and CSV


def a_result(points: list[MeasuredPoint]) -> BenchResult:
    settings = BenchSettings(url=URL, ops=(OP_PUT, OP_GET), sizes=(MIB,), concurrencies=(1, 4))
    return BenchResult(
        settings=settings,
        plan=BenchPlan(sweep=(), point_seconds=5.0, estimate_seconds=24.0, prepare_bytes=MIB),
        endpoint="http://127.0.0.1:8333",
        emulated=EmulatedPath(rtt=0.03, bandwidth=50e6),
        started_at="2025-01-01T00:00:00+00:00",
        seconds=12.5,
        points=tuple(points),
        skipped=(SweepPoint(op=OP_GET, object_size=MIB, concurrency=4, max_seconds=5.0),),
        cleanup=CleanupReport(objects_deleted=10, uploads_aborted=1, left_behind=0),
        recommendation=recommend([m.point for m in points]),
    )


def test_the_json_report_holds_every_point_and_survives_a_round_trip() -> None:
    points = [
        MeasuredPoint(a_point(OP_PUT, MIB, 1, 50.0), STOP_STABLE),
        MeasuredPoint(a_point(OP_GET, MIB, 4, 80.0), STOP_TIME, last_error="503 SlowDown"),
    ]
    data = json.loads(json.dumps(a_result(points).to_json()))
    assert data["format"] == 1 and data["kind"] == "s3xfer-bench"
    assert data["settings"]["url"] == "s3://bench/tmp"
    assert data["emulated_path"] == {
        "rtt_seconds": 0.03,
        "bandwidth_bytes_per_s": 50e6,
        "link_bytes_per_s": None,
    }
    assert data["skipped"] == [{"op": "get", "object_size": MIB, "concurrency": 4}]
    assert data["cleanup"]["left_behind"] == 0
    assert [MeasuredPoint.from_json(p) for p in data["points"]] == points
    put, get = data["points"]
    assert put["ttfb"] is None and get["ttfb"]["p50"] == pytest.approx(0.020, abs=1e-3)
    assert put["mb_per_s"] == pytest.approx(50.0, rel=1e-3)
    assert Recommendation.from_json(data["recommendation"]).concurrency == {"get": 4, "put": 1}
    assert EmulatedPath.from_json(data["emulated_path"]) == EmulatedPath(0.03, 50e6)


def test_csv_has_one_row_per_point_with_fixed_columns(tmp_path: Path) -> None:
    points = [
        MeasuredPoint(a_point(OP_PUT, MIB, 1, 50.0), STOP_STABLE),
        MeasuredPoint(a_point("range", 16 * KIB, 8, 3.0), STOP_TIME),
    ]
    rows = csv_rows(points)
    assert all(tuple(row) == CSV_COLUMNS for row in rows)
    assert rows[0]["ttfb_p50_s"] == "" and rows[1]["ttfb_p50_s"] == pytest.approx(0.0205)
    path = tmp_path / "points.csv"
    write_csv(points, path)
    with path.open(newline="") as handle:
        read = list(csv.DictReader(handle))
    assert [r["op"] for r in read] == ["put", "range"]
    assert float(read[0]["mb_per_s"]) == pytest.approx(50.0, rel=1e-3)
    assert int(read[1]["concurrency"]) == 8 and read[1]["stop"] == STOP_TIME


def test_plot_draws_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    points = a_curve(OP_PUT, MIB, {1: 20, 2: 40, 4: 75, 8: 80}) + a_curve(
        OP_GET, 16 * KIB, {1: 0.5, 2: 1.0, 4: 1.1, 8: 1.1}
    )
    path = tmp_path / "curve.png"
    write_plot(points, path, title="test")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_plot_without_matplotlib_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(UsageError, match=r"s3xfer\[plot\]"):
        require_matplotlib()


# --------------------------------------------------------------------------- profiles


def test_profile_round_trip_in_s3xfer_home(home: Path) -> None:
    points = a_curve(OP_PUT, 16 * MIB, {1: 20, 2: 40, 4: 75, 8: 77}) + a_curve(
        OP_MULTIPART, 16 * MIB, {1: 30, 2: 60, 4: 90, 8: 120}
    )
    recommendation = recommend(points)
    path = save_profile("office", recommendation, source={"endpoint": "http://127.0.0.1:1"})
    assert path == home / "profiles" / "office.json" == profile_path("office")
    assert load_profile("office") == recommendation
    stored = json.loads(path.read_text())
    assert stored["name"] == "office" and stored["source"] == {"endpoint": "http://127.0.0.1:1"}
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    # upload runs single PUTs and parts together: the larger knee of the two.
    assert profile_settings("office", command="upload") == {
        "concurrency": 8,
        "part_size": 16 * MIB,
    }


def test_saving_a_profile_again_replaces_it(home: Path) -> None:
    save_profile("p", recommend(a_curve(OP_PUT, MIB, {1: 10, 2: 20})))
    save_profile("p", recommend(a_curve(OP_PUT, MIB, {1: 10, 2: 10, 4: 5})))
    assert load_profile("p").concurrency == {"put": 2}


def test_profiles_default_to_the_user_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("S3XFER_HOME", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert profiles_dir() == tmp_path / "xdg" / "s3xfer" / "profiles"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert profiles_dir() == tmp_path / "home" / ".config" / "s3xfer" / "profiles"


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "-dash", "x" * 101])
def test_profile_names_stay_inside_the_profile_directory(name: str, home: Path) -> None:
    with pytest.raises(UsageError, match="profile name"):
        profile_path(name)


def test_a_missing_profile_says_how_to_make_it(home: Path) -> None:
    with pytest.raises(UsageError, match="--save nope"):
        load_profile("nope")


@pytest.mark.parametrize("content", ["{not json", '{"format": 99}', '{"format": 1}', "[]"], ids=str)
def test_a_damaged_or_foreign_profile_is_one_clear_error(home: Path, content: str) -> None:
    (home / "profiles").mkdir(parents=True)
    (home / "profiles" / "bad.json").write_text(content)
    with pytest.raises(UsageError, match=r"bad\.json"):
        load_profile("bad")


def test_get_reads_members_so_prefers_the_ranged_get_knee_and_download_whole_gets() -> None:
    recommendation = recommend(
        a_curve(OP_GET, 16 * MIB, {1: 100, 4: 300, 16: 305})
        + a_curve("range", 64 * KIB, {1: 2, 4: 8, 16: 30, 32: 31})
    )
    # Knees at 16 (range) and 4 (get), each with one step of headroom on the flat top.
    assert settings_for(recommendation, command="get") == {
        "concurrency": 32,
        "range_size": 16 * MIB,
    }
    assert settings_for(recommendation, command="download")["concurrency"] == 16
    assert settings_for(recommendation, command="upload") == {}  # nothing measured for it


def test_profiles_apply_only_to_transfer_commands() -> None:
    with pytest.raises(UsageError):
        settings_for(recommend(a_curve(OP_PUT, MIB, {1: 1})), command="survey")


# --------------------------------------------------------------------------- emulator guard


@pytest.mark.parametrize(
    ("url", "upstream"),
    [
        ("http://127.0.0.1:8333", ("127.0.0.1", 8333)),
        ("http://localhost:9000/", ("127.0.0.1", 9000)),
    ],
)
def test_the_emulator_fronts_a_loopback_http_endpoint(url: str, upstream: tuple[str, int]) -> None:
    assert emulation_upstream(url) == upstream


@pytest.mark.parametrize(
    "url", [None, "https://127.0.0.1:8333", "http://10.0.0.5:8333", "http://s3.amazonaws.com"]
)
def test_the_emulator_never_relays_to_anything_but_loopback(url: str | None) -> None:
    with pytest.raises(UsageError, match=r"127\.0\.0\.1"):
        emulation_upstream(url)


# --------------------------------------------------------------------------- the command line


def test_command_line_rejects_bad_lists_before_any_request() -> None:
    runner = CliRunner()
    bad_op = runner.invoke(benchcli.bench_command, ["s3://bench/x", "--ops", "put,copy"])
    assert bad_op.exit_code == 2 and "unknown operation 'copy'" in bad_op.output
    bad_size = runner.invoke(benchcli.bench_command, ["s3://bench/x", "--sizes", "1MiB,lots"])
    assert bad_size.exit_code == 2 and "not a size" in bad_size.output
    bad_rtt = runner.invoke(benchcli.bench_command, ["s3://bench/x", "--emulate-rtt", "30"])
    assert bad_rtt.exit_code == 2 and "needs a unit" in bad_rtt.output


def test_emulation_against_a_remote_endpoint_is_refused() -> None:
    result = CliRunner().invoke(
        benchcli.bench_command,
        ["s3://bench/x", "--endpoint-url", "https://s3.amazonaws.com", "--emulate-rtt", "30ms"],
    )
    assert isinstance(result.exception, UsageError)
    assert "127.0.0.1" in str(result.exception)


def test_table_rows_and_recommendations_read_plainly() -> None:
    measured = MeasuredPoint(a_point(OP_GET, 16 * MIB, 8, 123.4), STOP_STABLE)
    row = benchcli.point_row(measured, 3, 40)
    assert row.split()[:6] == ["3/40", "get", "16", "MiB", "8", "123.4"]
    assert row.endswith("stable")
    text = benchcli.recommendation_text(
        recommend(a_curve(OP_PUT, 16 * MIB, {1: 20, 2: 40, 4: 75, 8: 77}))
    )
    assert "upload / plan: --concurrency 8 --part-size 16MiB" in text  # knee 4, + headroom
    assert benchcli.duration_text(672) == "11 min 12 s"
    assert benchcli.duration_text(3.25) == "3.2 s"


def test_min_point_seconds_is_what_the_option_accepts() -> None:
    result = CliRunner().invoke(
        benchcli.bench_command, ["s3://bench/x", "--point-seconds", str(MIN_POINT_SECONDS / 2)]
    )
    assert result.exit_code == 2


def test_a_point_ends_by_letting_requests_in_flight_finish_not_by_cancelling_them() -> None:
    # A PUT cancelled with its body already on the wire still lands on the server, after the
    # cleanup has listed the prefix: a point must let its requests in flight finish.
    settings = BenchSettings(url=URL, ops=(OP_PUT,), sizes=(KIB,), concurrencies=(4,))
    planned = plan_bench(settings).sweep[0]
    started: list[int] = []
    finished: list[int] = []

    class SlowRequest:
        async def once(self, worker: int, seq: int, retrying: Any) -> tuple[int, float | None]:
            started.append(worker)
            await anyio.sleep(0.05)
            finished.append(worker)
            return KIB, None

    runner = _Runner(
        None,  # type: ignore[arg-type]  # the operation below sends nothing
        settings,
        listener=BenchListener(),
        clock=time.perf_counter,
        run_prefix="p",
    )
    runner.operation = lambda *_, **__: SlowRequest()  # type: ignore[method-assign]
    anyio.run(
        functools.partial(
            runner.measure,
            planned,
            keys=[],
            written=_Written(),
            cap=MIN_POINT_SECONDS,
            deadline_left=10.0,
        )
    )
    assert len(started) > 4  # several requests per worker were measured
    assert sorted(started) == sorted(finished)

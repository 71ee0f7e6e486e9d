"""Specification of the bench statistics: percentiles, knees, stability, recommendations."""

from __future__ import annotations

import dataclasses
import json
import random
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from s3xfer.bench.stats import (
    GIB,
    MIB,
    OP_GET,
    OP_MULTIPART,
    OP_PUT,
    LatencySummary,
    Point,
    Recommendation,
    StabilityTracker,
    SweepPoint,
    estimate_sweep_seconds,
    find_knee,
    latency_summary,
    percentile,
    plan_sweep,
    recommend,
)

CONCURRENCIES = (1, 2, 4, 8, 16, 32, 64, 128)
finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)
quantile = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)
NO_LATENCY = latency_summary([])


def point(
    concurrency: int,
    mb_per_s: float,
    *,
    op: str = OP_PUT,
    object_size: int = 64 * MIB,
) -> Point:
    """A 10-second point whose throughput is `mb_per_s`."""
    nbytes = round(mb_per_s * 1e6 * 10)
    return Point(
        op=op,
        object_size=object_size,
        concurrency=concurrency,
        seconds=10.0,
        bytes=nbytes,
        objects=nbytes // object_size,
        errors=0,
        retries=0,
        latency=latency_summary([0.1, 0.2]),
        ttfb=None,
    )


def saturating(capacity: float, half: float) -> list[Point]:
    """T(c) = B * c / (c + k) at c = 1, 2, 4 .. 128."""
    return [point(c, capacity * c / (c + half)) for c in CONCURRENCIES]


# --------------------------------------------------------------------------- percentiles


def test_percentile_hand_computed() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 10.0
    assert percentile(values, 50) == 3.0
    assert percentile(values, 25) == 2.0
    assert percentile(values, 90) == pytest.approx(4.0 + 0.6 * 6.0)  # position 3.6
    assert percentile([7.0], 37) == 7.0
    assert percentile([0.0, 10.0], 33) == pytest.approx(3.3)


def test_percentile_matches_statistics_quantiles_inclusive() -> None:
    rng = random.Random(7)
    for n in (2, 3, 10, 101, 1000):
        values = sorted(rng.expovariate(10.0) for _ in range(n))
        cuts = statistics.quantiles(values, n=100, method="inclusive")
        for q, expected in enumerate(cuts, start=1):
            assert percentile(values, q) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("q", [-0.1, 100.1, float("nan")])
def test_percentile_rejects_q_outside_0_100(q: float) -> None:
    with pytest.raises(ValueError, match="q must be in"):
        percentile([1.0, 2.0], q)


def test_percentile_rejects_empty_and_unsorted() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="sorted"):
        percentile([2.0, 1.0], 50)


@given(st.lists(finite, min_size=1, max_size=50), quantile, quantile)
def test_percentile_is_monotone_in_q(values: list[float], q1: float, q2: float) -> None:
    values.sort()
    low, high = sorted((q1, q2))
    assert percentile(values, low) <= percentile(values, high)


@given(st.lists(finite, min_size=1, max_size=50), quantile)
def test_percentile_lies_within_min_and_max(values: list[float], q: float) -> None:
    values.sort()
    assert values[0] <= percentile(values, q) <= values[-1]


def test_latency_summary() -> None:
    summary = latency_summary([0.5, 0.1, 0.4, 0.2, 0.3])
    assert summary == LatencySummary(p50=0.3, p90=0.46, p99=0.496, max=0.5, mean=0.3, count=5)
    assert LatencySummary.from_json(json.loads(json.dumps(summary.to_json()))) == summary


def test_latency_summary_of_nothing_has_count_zero() -> None:
    assert latency_summary([]) == LatencySummary(0.0, 0.0, 0.0, 0.0, 0.0, 0)


# --------------------------------------------------------------------------- points


def test_point_rates_use_decimal_megabytes() -> None:
    p = Point(
        op=OP_GET,
        object_size=MIB,
        concurrency=4,
        seconds=2.0,
        bytes=300_000_000,
        objects=286,
        errors=1,
        retries=3,
        latency=latency_summary([0.01]),
        ttfb=latency_summary([0.002]),
    )
    assert p.mb_per_s == 150.0
    assert p.objects_per_s == 143.0


def test_point_json_round_trip() -> None:
    p = point(8, 123.4)
    q = dataclasses.replace(p, ttfb=latency_summary([0.01, 0.02]))
    for original in (p, q):
        assert Point.from_json(json.loads(json.dumps(original.to_json()))) == original
    assert p.to_json()["mb_per_s"] == pytest.approx(123.4)


@pytest.mark.parametrize(
    ("seconds", "concurrency", "nbytes"), [(0.0, 1, 0), (1.0, 0, 0), (1.0, 1, -1)]
)
def test_point_rejects_impossible_values(seconds: float, concurrency: int, nbytes: int) -> None:
    with pytest.raises(ValueError, match="point put"):
        Point(OP_PUT, 1, concurrency, seconds, nbytes, 0, 0, 0, NO_LATENCY)


# --------------------------------------------------------------------------- knee


@pytest.mark.parametrize("half", [0.5, 2.0, 8.0])
def test_knee_of_a_saturating_curve_is_first_point_within_tolerance(half: float) -> None:
    capacity = 1000.0
    points = saturating(capacity, half)
    best = max(p.mb_per_s for p in points)
    knee = find_knee(points)
    assert knee.mb_per_s >= 0.95 * best
    below = [p for p in points if p.concurrency < knee.concurrency]
    assert all(p.mb_per_s < 0.95 * best for p in below)


def test_knee_of_a_known_curve() -> None:
    # 1000 * c / (c + 4) peaks at 969.7 (c=128); 95 % of it is 921.2:
    # c=64 gives 941.2, c=32 gives 888.9, so the knee is 64.
    assert find_knee(saturating(1000.0, 4.0)).concurrency == 64
    assert find_knee(saturating(1000.0, 4.0), tolerance=0.10).concurrency == 32


def test_flat_curve_has_knee_at_lowest_concurrency() -> None:
    assert find_knee([point(c, 500.0) for c in CONCURRENCIES]).concurrency == 1


def test_knee_of_a_curve_that_falls_again_ignores_the_tail() -> None:
    rates = {1: 100.0, 2: 190.0, 4: 350.0, 8: 400.0, 16: 380.0, 32: 250.0}
    assert find_knee([point(c, r) for c, r in rates.items()]).concurrency == 8


def test_knee_of_a_noisy_curve_stays_near_the_true_knee() -> None:
    rng = random.Random(1234)
    for _ in range(50):
        noisy = [
            point(c, 1000.0 * c / (c + 4.0) * (1 + rng.uniform(-0.01, 0.01))) for c in CONCURRENCIES
        ]
        # 2 % noise moves the threshold by about one step either way, never further.
        assert find_knee(noisy).concurrency in (32, 64, 128)


def test_knee_by_objects_per_second() -> None:
    points = [point(c, r, object_size=16 * 1024) for c, r in [(1, 10.0), (8, 50.0), (16, 51.0)]]
    assert find_knee(points, metric="objects_per_s").concurrency == 8


def test_knee_rejects_mixed_curves_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match="one \\(op, object_size\\)"):
        find_knee([point(1, 10.0), point(2, 20.0, object_size=MIB)])
    with pytest.raises(ValueError, match="at least one"):
        find_knee([])
    with pytest.raises(ValueError, match="unknown metric"):
        find_knee([point(1, 1.0)], metric="iops")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- stability


def feed(tracker: StabilityTracker, samples: list[float]) -> list[bool]:
    verdicts = []
    for sample in samples:
        tracker.add(sample)
        verdicts.append(tracker.is_stable())
    return verdicts


def test_stable_sequence_becomes_stable_after_warmup_and_window() -> None:
    tracker = StabilityTracker(window=5, max_cv=0.05, warmup=2)
    samples = [10.0, 80.0, 100.0, 101.0, 99.0, 100.0, 102.0, 98.0]
    # Warm-up samples (10, 80) would ruin the CV if they counted.
    assert feed(tracker, samples) == [False] * 6 + [True, True]
    assert tracker.mean() == pytest.approx(100.0)
    assert tracker.windows_seen == 8


def test_trending_sequence_never_becomes_stable() -> None:
    tracker = StabilityTracker(window=5, max_cv=0.05, warmup=0)
    assert not any(feed(tracker, [100.0 + 10.0 * i for i in range(40)]))
    # Late in the ramp the CV alone would pass; the drift across the window does not.
    cv, drift = tracker.cv(), tracker.drift()
    assert cv is not None and cv < 0.05
    assert drift is not None and drift > 0.05


def test_falling_sequence_never_becomes_stable() -> None:
    tracker = StabilityTracker(window=5, max_cv=0.05, warmup=0)
    assert not any(feed(tracker, [1000.0 * 0.97**i for i in range(40)]))


def test_alternating_sequence_is_not_stable() -> None:
    tracker = StabilityTracker(window=4, max_cv=0.05, warmup=0)
    assert not any(feed(tracker, [80.0, 120.0] * 10))


def test_min_windows_delays_the_verdict() -> None:
    tracker = StabilityTracker(window=3, warmup=1, min_windows=6)
    assert feed(tracker, [50.0] + [100.0] * 7) == [False] * 6 + [True, True]


def test_zero_throughput_is_never_stable() -> None:
    tracker = StabilityTracker(window=3, warmup=0)
    assert not any(feed(tracker, [0.0] * 10))


def test_stability_rejects_bad_samples() -> None:
    with pytest.raises(ValueError, match="finite"):
        StabilityTracker().add(float("nan"))
    with pytest.raises(ValueError, match="window"):
        StabilityTracker(window=1)


# --------------------------------------------------------------------------- recommend


def curve(op: str, object_size: int, capacity: float, half: float) -> list[Point]:
    return [
        point(c, capacity * c / (c + half), op=op, object_size=object_size) for c in CONCURRENCIES
    ]


def test_recommend_takes_concurrency_from_the_largest_size_per_op() -> None:
    points = [
        *curve(OP_PUT, 16 * 1024, 50.0, 30.0),  # small objects: knee at 128
        *curve(OP_PUT, 64 * MIB, 1000.0, 1.0),  # knee: 95 % of 992.2 -> c=32 (969.7)
        *curve(OP_GET, 64 * MIB, 2000.0, 0.5),
    ]
    rec = recommend(points)
    # Knees at 16 (get) and 32 (put), each one step up: still on the flat top of the curve.
    assert rec.concurrency == {OP_GET: 32, OP_PUT: 64}
    assert {(k.op, k.object_size) for k in rec.knees} == {
        (OP_PUT, 16 * 1024),
        (OP_PUT, 64 * MIB),
        (OP_GET, 64 * MIB),
    }


def test_part_size_is_the_smallest_upload_size_near_the_best_knee() -> None:
    points = [
        *curve(OP_PUT, MIB, 5000.0, 1.0),  # fastest, but below the 5 MiB part minimum
        *curve(OP_MULTIPART, 8 * MIB, 600.0, 1.0),
        *curve(OP_MULTIPART, 16 * MIB, 980.0, 1.0),
        *curve(OP_MULTIPART, 64 * MIB, 1000.0, 1.0),  # within 5 % of 16 MiB: not worth it
        *curve(OP_GET, 4 * MIB, 500.0, 1.0),
        *curve(OP_GET, 16 * MIB, 900.0, 1.0),
    ]
    rec = recommend(points)
    assert rec.part_size == 16 * MIB
    assert rec.range_size == 16 * MIB


def test_part_size_is_clamped_to_s3_limits() -> None:
    rec = recommend(curve(OP_PUT, 6 * GIB, 1000.0, 1.0))
    assert rec.part_size == 5 * GIB


def test_headroom_is_one_step_on_the_flat_top_never_down_the_slope() -> None:
    flat = [point(c, v) for c, v in {1: 10.0, 2: 19.0, 4: 20.0, 8: 20.0}.items()]
    assert find_knee(flat).concurrency == 2
    assert recommend(flat).concurrency == {OP_PUT: 4}
    falling = [point(c, v) for c, v in {1: 10.0, 2: 20.0, 4: 15.0}.items()]
    assert recommend(falling).concurrency == {OP_PUT: 2}  # the step up is slower: the knee
    top = [point(c, v) for c, v in {1: 10.0, 2: 20.0}.items()]
    assert recommend(top).concurrency == {OP_PUT: 2}  # nothing measured above the knee


def test_recommend_without_suitable_sizes_leaves_them_unset() -> None:
    rec = recommend(curve(OP_PUT, MIB, 100.0, 1.0))
    assert rec.part_size is None
    assert rec.range_size is None
    knee = find_knee(curve(OP_PUT, MIB, 100.0, 1.0)).concurrency
    assert rec.concurrency == {OP_PUT: knee * 2}  # the next measured step


def test_recommendation_json_round_trip_and_version() -> None:
    rec = recommend([*curve(OP_MULTIPART, 8 * MIB, 600.0, 1.0), *curve(OP_GET, MIB, 1.0, 1.0)])
    data = json.loads(json.dumps(rec.to_json()))
    assert data["format"] == Recommendation.FORMAT_VERSION
    assert Recommendation.from_json(data) == rec
    with pytest.raises(ValueError, match="format 99"):
        Recommendation.from_json({**data, "format": 99})


def test_recommend_needs_points() -> None:
    with pytest.raises(ValueError, match="at least one"):
        recommend([])


# --------------------------------------------------------------------------- sweep plan


def test_plan_sweep_orders_each_curve_left_to_right() -> None:
    plan = plan_sweep([OP_PUT, OP_GET], [MIB, 1024, MIB], [4, 1, 2], point_seconds=5.0)
    assert [(p.op, p.object_size, p.concurrency) for p in plan] == [
        (op, size, c) for op in (OP_PUT, OP_GET) for size in (1024, MIB) for c in (1, 2, 4)
    ]
    assert all(p.max_seconds == 5.0 for p in plan)


def test_plan_sweep_leaves_out_impossible_part_sizes() -> None:
    plan = plan_sweep([OP_PUT, OP_MULTIPART], [MIB, 8 * MIB], [1], point_seconds=1.0)
    assert [(p.op, p.object_size) for p in plan] == [
        (OP_PUT, MIB),
        (OP_PUT, 8 * MIB),
        (OP_MULTIPART, 8 * MIB),
    ]
    with pytest.raises(ValueError, match="part limits"):
        plan_sweep([OP_MULTIPART], [MIB], [1], point_seconds=1.0)


@pytest.mark.parametrize(
    ("ops", "sizes", "concurrencies", "seconds"),
    [([], [1], [1], 1.0), ([OP_PUT], [0], [1], 1.0), ([OP_PUT], [1], [0], 1.0),
     ([OP_PUT], [1], [1], 0.0)],
)  # fmt: skip
def test_plan_sweep_rejects_empty_or_invalid_axes(
    ops: list[str], sizes: list[int], concurrencies: list[int], seconds: float
) -> None:
    with pytest.raises(ValueError):
        plan_sweep(ops, sizes, concurrencies, point_seconds=seconds)


def test_estimate_is_an_upper_bound_including_overhead() -> None:
    plan = plan_sweep([OP_PUT, OP_GET], [1024, MIB], [1, 2, 4], point_seconds=5.0)
    assert len(plan) == 12
    assert estimate_sweep_seconds(plan, per_point_overhead=1.0) == 72.0
    assert estimate_sweep_seconds(plan, per_point_overhead=0.0) == 60.0
    assert estimate_sweep_seconds([]) == 0.0
    assert estimate_sweep_seconds([SweepPoint(OP_PUT, 1, 1, 2.5)]) == 3.5

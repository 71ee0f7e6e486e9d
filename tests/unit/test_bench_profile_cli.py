"""`--bench-profile` fills the options a user did not give, and the plan estimates the time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from s3xfer.bench.profiles import save_profile
from s3xfer.bench.stats import Knee, Recommendation
from s3xfer.config import MiB

from ..integration.helpers import run_cli, write_tree


@pytest.fixture
def profile_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("S3XFER_HOME", str(home))
    recommendation = Recommendation(
        concurrency={"put": 12, "multipart": 24, "get": 6},
        part_size=8 * MiB,
        range_size=4 * MiB,
        knees=(Knee("multipart", 16 * MiB, 24, 200.0, 12.5), Knee("put", MiB, 12, 80.0, 80.0)),
        tolerance=0.05,
    )
    save_profile("lab", recommendation)
    return home


def test_plan_takes_the_profile_and_estimates_time(profile_home: Path, tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {"big.bin": 40 * MiB, "a.txt": 10})
    env = {"S3XFER_HOME": str(profile_home)}
    result = run_cli(
        "plan", str(tmp_path / "src"), "s3://bkt/p", "--bench-profile", "lab", "--json", env=env
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    # A plan takes the profile's part size (its concurrency is upload's: a run limit).
    assert summary["config"]["part_size"] == 8 * MiB
    assert summary["estimated_seconds"] == pytest.approx((40 * MiB + 10) / 200e6, abs=0.1)
    explicit = run_cli(
        "plan",
        str(tmp_path / "src"),
        "s3://bkt/p",
        "--bench-profile",
        "lab",
        "--part-size",
        "32MiB",
        "--json",
        env=env,
    )
    assert json.loads(explicit.stdout)["config"]["part_size"] == 32 * MiB  # explicit wins


def test_unknown_profile_is_one_clear_line(profile_home: Path, tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {"a.txt": 10})
    result = run_cli(
        "plan",
        str(tmp_path / "src"),
        "s3://bkt/p",
        "--bench-profile",
        "nope",
        env={"S3XFER_HOME": str(profile_home)},
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "nope" in result.stderr

"""URLs, sizes and settings: what users type must parse, or fail with a clear message."""

from __future__ import annotations

import pytest

from s3xfer.config import MiB, TransferConfig, format_size, parse_size
from s3xfer.dataset.keys import S3Url, enclosing_prefixes
from s3xfer.errors import UsageError


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://bucket", "bucket", ""),
        ("s3://bucket/", "bucket", ""),
        ("s3://my.bucket-1/a/b/", "my.bucket-1", "a/b"),
        ("s3://abc/ünï cødé", "abc", "ünï cødé"),
    ],
)
def test_good_urls(url: str, bucket: str, prefix: str) -> None:
    parsed = S3Url.parse(url)
    assert (parsed.bucket, parsed.prefix) == (bucket, prefix)
    assert parsed.key("x") == (f"{prefix}/x" if prefix else "x")


@pytest.mark.parametrize(
    "url",
    [
        "bucket/prefix",
        "s3:/bucket",
        "s3://",
        "s3://Bad_Bucket/x",
        "s3://ab",
        "s3://b..c/x",
        "s3://bucket/a//b",
        "s3://bucket/a/../b",
        "http://bucket/x",
    ],
)
def test_bad_urls_are_usage_errors(url: str) -> None:
    with pytest.raises(UsageError):
        S3Url.parse(url)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1234", 1234),
        ("8MiB", 8 * MiB),
        ("64MB", 64_000_000),
        ("1.5GiB", 1536 * MiB),
        ("5 mib", 5 * MiB),
    ],
)
def test_sizes_parse(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "MiB", "-5", "5 parsecs", "1e9"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(UsageError, match="not a size"):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(8 * MiB) == "8 MiB"
    assert format_size(1536 * MiB) == "1.5 GiB"
    assert format_size(17) == "17 B"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"part_size": MiB},
        {"max_memory": MiB},
        {"key_prefix": "random"},
        {"multipart_threshold": 0},
    ],
)
def test_invalid_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        TransferConfig(**kwargs)  # type: ignore[arg-type]


def test_settings_round_trip() -> None:
    config = TransferConfig(max_memory=64 * 1024 * 1024, key_prefix="hash")
    assert TransferConfig.from_json(config.to_json()) == config


def test_the_prefixes_above_a_key_are_tried_nearest_first() -> None:
    assert list(enclosing_prefixes(S3Url.parse("s3://bkt/ds/img/1.jpg"))) == [
        (S3Url("bkt", "ds/img"), "1.jpg"),
        (S3Url("bkt", "ds"), "img/1.jpg"),
        (S3Url("bkt", ""), "ds/img/1.jpg"),
    ]
    assert list(enclosing_prefixes(S3Url.parse("s3://bkt"))) == []

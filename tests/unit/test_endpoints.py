"""The endpoint matrix: for each setting awscli honours, the URL (and signing region) the
transport sends a GetObject to equals the one botocore's own client sends it to, with the
same environment and config files. No network: botocore's request is caught before it
leaves, and s3xfer's address is only resolved."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from botocore.awsrequest import AWSResponse, HTTPHeaders

from s3xfer.transport.endpoints import configured_endpoint, direct_base
from s3xfer.transport.s3 import Connection, open_s3

KEY = "dir/a b+c~é.txt"


@pytest.fixture(autouse=True)
def clean_aws_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import os

    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    yield


def botocore_request(bucket: str, *, profile: str | None, region: str | None) -> tuple[str, str]:
    """(URL, signing region) of the GetObject botocore's own client would send."""
    session = botocore.session.Session(profile=profile)
    client: Any = session.create_client("s3", region_name=region)
    seen: dict[str, Any] = {}

    def catch(request: Any, **_: Any) -> Any:
        seen["url"] = request.url
        seen["auth"] = request.headers.get("Authorization", b"")
        return AWSResponse(request.url, 200, HTTPHeaders(), None)

    client.meta.events.register("before-send.s3.GetObject", catch)
    client.get_object(Bucket=bucket, Key=KEY)
    auth = seen["auth"].decode() if isinstance(seen["auth"], bytes) else seen["auth"]
    scope = re.search(r"Credential=[^/]+/[0-9]{8}/([^/]+)/s3/", auth)
    assert scope is not None, auth
    return seen["url"], scope.group(1)


def s3xfer_request(bucket: str, *, profile: str | None, region: str | None) -> tuple[str, str]:
    async def resolve() -> tuple[str, str]:
        async with open_s3(Connection(profile=profile, region=region)) as s3:
            address = await s3.transport.endpoints.address(bucket)
            return address.origin + address.target(KEY), address.region

    return asyncio.run(resolve())


CONFIG_CASES: dict[str, tuple[dict[str, str], str, str | None]] = {
    # name: (environment, config file, region given)
    "aws default region": ({"AWS_DEFAULT_REGION": "eu-west-1"}, "", None),
    "us-east-1": ({}, "", "us-east-1"),
    "region given": ({"AWS_DEFAULT_REGION": "eu-west-1"}, "", "ap-southeast-2"),
    "fips": ({"AWS_USE_FIPS_ENDPOINT": "true"}, "", "us-east-2"),
    "dual-stack": ({"AWS_USE_DUALSTACK_ENDPOINT": "true"}, "", "eu-central-1"),
    "china": ({}, "", "cn-north-1"),
    "govcloud": ({}, "", "us-gov-west-1"),
    "endpoint url s3 (ip)": ({"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000"}, "", None),
    "endpoint url s3 (ip, path)": (
        {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000/base/"},
        "",
        "eu-west-3",
    ),
    "endpoint url s3 (name)": ({"AWS_ENDPOINT_URL_S3": "https://s3.example.test"}, "", None),
    "endpoint url s3 over global": (
        {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ENDPOINT_URL_S3": "http://127.0.0.2:2"},
        "",
        None,
    ),
    "endpoint url global": ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}, "", None),
    "endpoint urls ignored": (
        {
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
            "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true",
        },
        "",
        "eu-west-1",
    ),
    "profile endpoint_url": (
        {},
        "[default]\nregion = eu-west-1\nendpoint_url = https://minio.example.test:9000\n",
        None,
    ),
    "profile services section": (
        {},
        "[default]\nregion = eu-west-1\nservices = local\n\n"
        "[services local]\ns3 =\n  endpoint_url = http://127.0.0.1:8333\n",
        None,
    ),
    "profile region": ({}, "[default]\nregion = sa-east-1\n", None),
    "addressing style path": (
        {},
        "[default]\nregion = eu-west-1\ns3 =\n  addressing_style = path\n",
        None,
    ),
    "addressing style virtual on an endpoint": (
        {"AWS_ENDPOINT_URL_S3": "https://s3.example.test"},
        "[default]\ns3 =\n  addressing_style = virtual\n",
        None,
    ),
    "accelerate": (
        {},
        "[default]\nregion = eu-west-1\ns3 =\n  use_accelerate_endpoint = true\n",
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
@pytest.mark.parametrize("bucket", ["plain-bucket", "dotted.bucket.name"])
def test_the_url_and_region_are_botocores(
    name: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    environment, config, region = CONFIG_CASES[name]
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    (tmp_path / "config").write_text(config)
    if name == "accelerate" and "." in bucket:
        pytest.skip("S3 refuses accelerate for dotted bucket names (botocore raises too)")
    expected = botocore_request(bucket, profile=None, region=region)
    assert s3xfer_request(bucket, profile=None, region=region) == expected


def test_a_named_profiles_endpoint_and_region(tmp_path: Path) -> None:
    (tmp_path / "config").write_text(
        "[profile other]\nregion = eu-north-1\nendpoint_url = http://127.0.0.1:7000\n"
    )
    # A named profile takes its own credentials, not the environment's.
    (tmp_path / "credentials").write_text(
        "[other]\naws_access_key_id = AKIDOTHER\naws_secret_access_key = other\n"
    )
    expected = botocore_request("bucket", profile="other", region=None)
    assert s3xfer_request("bucket", profile="other", region=None) == expected
    assert expected[0].startswith("http://127.0.0.1:7000/bucket/")


def test_an_ip_endpoint_over_http_is_addressed_without_botocore() -> None:
    assert direct_base("http://127.0.0.1:9000/", "b") == "http://127.0.0.1:9000/b"
    assert direct_base("http://[::1]:9000", "b") == "http://[::1]:9000/b"
    assert direct_base("https://127.0.0.1:9000", "b") is None  # TLS: botocore's CA settings
    assert direct_base("http://localhost:9000", "b") is None
    assert direct_base(None, "b") is None


def test_the_configured_endpoint_follows_botocores_precedence() -> None:
    both = {"AWS_ENDPOINT_URL": "http://a", "AWS_ENDPOINT_URL_S3": "http://b"}
    assert configured_endpoint(None, both) == "http://b"
    assert configured_endpoint("http://given", both) == "http://given"
    assert configured_endpoint(None, {"AWS_ENDPOINT_URL": "http://a"}) == "http://a"
    ignored = {**both, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"}
    assert configured_endpoint(None, ignored) is None


@pytest.mark.parametrize(
    "value",
    ["2026-12-07T13:40:17.000Z", "2026-12-07T13:40:17Z", "Mon, 07 Dec 2026 13:40:17 GMT", "0"],
)
def test_listing_timestamps_parse_as_botocore_parses_them(value: str) -> None:
    from botocore.utils import parse_timestamp

    from s3xfer.transport.session import parse_timestamp as ours

    assert ours(value) == parse_timestamp(value)
    assert ours(value).tzinfo is not None

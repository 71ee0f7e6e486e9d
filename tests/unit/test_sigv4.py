"""The lean SigV4 signer gives exactly the Authorization header botocore computes."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

from s3xfer.sigv4 import Credentials, quote_key, sign

NOW = datetime.datetime(2026, 11, 22, 1, 2, 3, tzinfo=datetime.UTC)


def botocore_signature(url: str, headers: dict[str, str], token: str | None) -> str:
    """botocore's own SigV4 steps (canonical request, string to sign, signature) on the same
    request, with the same date and an unsigned payload."""
    amz_date = NOW.strftime("%Y%m%dT%H%M%SZ")
    all_headers = {**headers, "X-Amz-Date": amz_date, "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"}
    if token:
        all_headers["X-Amz-Security-Token"] = token
    request: Any = AWSRequest(method="PUT", url=url, headers=all_headers, data=b"payload")
    request.context["timestamp"] = amz_date
    auth: Any = S3SigV4Auth(
        BotoCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", token), "s3", "eu-west-3"
    )
    auth.payload = lambda _request: "UNSIGNED-PAYLOAD"
    canonical = auth.canonical_request(request)
    return str(auth.signature(auth.string_to_sign(request, canonical), request))


@pytest.mark.parametrize("token", [None, "session-token"])
@pytest.mark.parametrize(
    "key", ["plain.txt", "dir/sub dir/ünï cødé (1).jpg", "a+b=c&d/~tilde*star'quote"]
)
def test_signature_matches_botocore(key: str, token: str | None) -> None:
    url = "https://bucket.s3.eu-west-3.amazonaws.com/" + quote_key(key)
    headers = {"x-amz-checksum-crc32": "DUoRhQ==", "Content-Type": "application/octet-stream"}
    ours = sign(
        "PUT",
        url,
        headers,
        credentials=Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", token),
        region="eu-west-3",
        now=NOW,
    )
    assert ours["authorization"].endswith("Signature=" + botocore_signature(url, headers, token))
    assert ours["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    assert ("x-amz-security-token" in ours) == (token is not None)


def test_credentials_keep_secrets_out_of_repr() -> None:
    text = repr(Credentials("AKID", "very-secret", "token-secret"))
    assert "very-secret" not in text and "token-secret" not in text


def test_signature_with_a_query_matches_botocore() -> None:
    from s3xfer.sigv4 import canonical_query

    query = canonical_query({"uploadId": "2~a/b+c=", "partNumber": "7"})
    assert query == "?partNumber=7&uploadId=2~a%2Fb%2Bc%3D"
    url = "https://bucket.s3.eu-west-3.amazonaws.com/" + quote_key("big file.bin") + query
    ours = sign(
        "PUT",
        url,
        {"x-amz-checksum-crc32": "DUoRhQ=="},
        credentials=Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG"),
        region="eu-west-3",
        now=NOW,
    )
    expected = botocore_signature(url, {"x-amz-checksum-crc32": "DUoRhQ=="}, None)
    assert ours["authorization"].endswith("Signature=" + expected)

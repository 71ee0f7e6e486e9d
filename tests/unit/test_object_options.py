"""What data objects carry (Content-Type, storage class, user metadata): settings checked on
construction, kept in plans, and sent the same way on both of the transport's paths."""

from __future__ import annotations

import mimetypes

import pytest
from hypothesis import given
from hypothesis import strategies as st

from s3xfer.config import ObjectOptions, TransferConfig, parse_metadata, storage_classes
from s3xfer.errors import UsageError
from s3xfer.transport.s3 import ObjectAttributes


def test_content_types_are_guessed_as_awscli_guesses_them() -> None:
    options = ObjectOptions()
    assert options.content_type_of("img/a.jpg") == "image/jpeg"
    assert options.content_type_of("A.JPG") == "image/jpeg"
    assert options.content_type_of("x/data.json") == "application/json"
    assert options.content_type_of("data:odd.html") == "text/html"  # a name, not a URL
    assert options.content_type_of("backup.tar.gz") == "application/x-tar"  # awscli's too
    assert options.content_type_of("README") == ""
    assert options.content_type_of("blob.zzqx") == ""
    assert ObjectOptions(guess_content_type=False).content_type_of("a.jpg") == ""
    assert options.content_type_of(".bashrc") == options.content_type_of("d/.jpg") == ""
    assert options.content_type_of("d/.hidden.png") == "image/png"
    assert options.content_type_of("a.b.c.json") == "application/json"
    assert options.content_type_of("logs.d/x") == ""  # a directory's dot is not the file's
    assert ObjectOptions(content_type="text/plain").content_type_of("a.jpg") == "text/plain"


@given(
    st.from_regex(
        r"([a-z.]{0,6}/){0,2}[a-zA-Z.]{0,4}(\.(jpg|gz|tar|tgz|html|json|Z|bz2))*", fullmatch=True
    )
)
def test_the_guess_by_ending_is_mimetypes_own(path: str) -> None:
    assert ObjectOptions().content_type_of(path) == (mimetypes.guess_type("/" + path)[0] or "")


def test_storage_classes_are_botocores_and_offline_ones_are_refused() -> None:
    assert {"STANDARD", "STANDARD_IA", "GLACIER_IR", "INTELLIGENT_TIERING"} <= set(
        storage_classes()
    )
    assert ObjectOptions(storage_class="ONEZONE_IA").storage_class == "ONEZONE_IA"
    for offline in ("GLACIER", "DEEP_ARCHIVE"):
        with pytest.raises(UsageError, match="offline until each is restored"):
            ObjectOptions(storage_class=offline)
    with pytest.raises(UsageError, match="unknown storage class"):
        ObjectOptions(storage_class="standard")  # the CLI upper-cases; the API is exact


def test_metadata_is_checked_and_kept_lower_case() -> None:
    assert parse_metadata(["Owner=alice", "k=a=b"]) == (("owner", "alice"), ("k", "a=b"))
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_metadata(["owner"])
    for bad in ((("x y", "1"),), (("a", "é"),), (("a", "1"), ("a", "2")), (("a", " 1"),)):
        with pytest.raises(UsageError):
            ObjectOptions(metadata=bad)
    with pytest.raises(UsageError, match="2,048"):
        ObjectOptions(metadata=(("a", "x" * 2048),))
    with pytest.raises(UsageError, match="not a content type"):
        ObjectOptions(content_type="text/plain\r\nx-amz-meta-a: 1")


def test_object_options_round_trip_in_a_plans_config() -> None:
    config = TransferConfig(
        objects=ObjectOptions(
            content_type="text/csv",
            guess_content_type=False,
            storage_class="STANDARD_IA",
            metadata=(("owner", "alice"),),
        )
    )
    assert TransferConfig.from_json(config.to_json()) == config
    old = config.to_json()
    del old["objects"]  # a plan written before these options
    assert TransferConfig.from_json(old).objects == ObjectOptions()


def test_headers_and_botocore_parameters_say_the_same() -> None:
    attributes = ObjectAttributes("image/jpeg", "STANDARD_IA", (("owner", "alice"),))
    assert attributes.headers() == {
        "content-type": "image/jpeg",
        "x-amz-storage-class": "STANDARD_IA",
        "x-amz-meta-owner": "alice",
    }
    assert attributes.parameters() == {
        "ContentType": "image/jpeg",
        "StorageClass": "STANDARD_IA",
        "Metadata": {"owner": "alice"},
    }
    assert ObjectAttributes().headers() == {} and ObjectAttributes().parameters() == {}

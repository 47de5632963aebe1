"""A real S3-compatible server (moto, in its own process) for tests.

In-process mocks cannot reach Ray workers, which are separate processes, so tests talk to
``python -m moto.server`` listening on 127.0.0.1 through the ordinary AWS environment
variables, exactly as production code talks to S3.

Usage: ``tests/conftest.py`` registers this module as a plugin::

    pytest_plugins = ["tests.s3_server"]

then ``def test_x(s3_server): s3_server.create_bucket("b")``. For Ray, start the cluster
*after* the fixture (workers inherit the driver's environment) or pass
``runtime_env={"env_vars": s3_server.env}``.

One moto process serves the whole test session (started on first use, stopped at exit);
each test gets a freshly reset server, its own AWS environment, and the previous one back
afterwards. :func:`moto_server` starts an extra, private server for tests that change
server-wide settings (e.g. turning on IAM enforcement).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

# Fake credentials: moto accepts anything, but botocore refuses to sign without some.
TEST_ENV_BASE = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Variables that would silently redirect or re-credential requests away from the server.
_CLEARED = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
    "BIFTA_S3_ANON",
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Loaded in the parent: the pre-exec hook runs between fork and exec, where loading a
# library could deadlock on a lock held by another thread.
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:
    _LIBC = None


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM the server if pytest dies without running its cleanup."""
    if _LIBC is not None:
        pr_set_pdeathsig = 1
        _LIBC.prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass
class MotoProcess:
    """A running ``moto.server`` subprocess."""

    endpoint: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        """Terminate the server and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def reset(self) -> None:
        """Drop all buckets, objects, IAM users... so each test starts clean."""
        request = urllib.request.Request(self.endpoint + "/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass


def start_moto(timeout: float = 60.0, extra_env: dict[str, str] | None = None) -> MotoProcess:
    """Start ``python -m moto.server`` on a free 127.0.0.1 port and wait until it answers."""
    last_error = "did not start"
    for _ in range(3):  # the free port can be taken between probing and binding
        port = free_port()
        env = {**os.environ, **(extra_env or {})}
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            preexec_fn=_die_with_parent,
        )
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                last_error = (process.stderr.read() if process.stderr else b"").decode()[-2000:]
                break
            try:
                with urllib.request.urlopen(endpoint + "/moto-api/data.json", timeout=2):
                    pass
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
                continue
            if process.stderr:  # moto logs every request; never let a full pipe block it
                process.stderr.close()
            return MotoProcess(endpoint=endpoint, process=process)
        else:
            last_error = f"no answer on {endpoint} within {timeout:.0f}s"
        with contextlib.suppress(Exception):
            process.kill()
            process.wait(timeout=5)
    raise RuntimeError(f"moto server failed to start: {last_error}")


@contextlib.contextmanager
def aws_env(endpoint: str, **overrides: str) -> Iterator[dict[str, str]]:
    """Point the AWS environment at *endpoint* for the block; restore it afterwards."""
    wanted = {**TEST_ENV_BASE, "AWS_ENDPOINT_URL": endpoint, **overrides}
    saved = {name: os.environ.get(name) for name in (*wanted, *_CLEARED)}
    try:
        for name in _CLEARED:
            os.environ.pop(name, None)
        os.environ.update(wanted)
        yield wanted
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def moto_server(**extra_env: str) -> Iterator[MotoProcess]:
    """A private moto server for one test; *extra_env* goes to the server process only."""
    server = start_moto(extra_env=extra_env)
    try:
        yield server
    finally:
        server.stop()


_SHARED: MotoProcess | None = None


def shared_moto() -> MotoProcess:
    """The session-wide moto server, started on first use and stopped at interpreter exit.

    A module-level singleton (instead of a session fixture) keeps a single process even
    when several conftest/test modules import the fixture.
    """
    global _SHARED
    if _SHARED is None or _SHARED.process.poll() is not None:
        _SHARED = start_moto()
        atexit.register(_SHARED.stop)
    return _SHARED


@dataclass
class S3Server:
    """What the ``s3_server`` fixture yields."""

    endpoint: str
    env: dict[str, str] = field(default_factory=dict)

    def client(self, **kwargs: Any) -> Any:
        """A boto3 S3 client bound to this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", **kwargs)

    def create_bucket(self, name: str) -> str:
        """Create bucket *name*; returns ``s3://name``."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def put(self, uri: str, data: bytes) -> None:
        """Upload *data* to ``s3://bucket/key`` directly, bypassing bifta_core.io.storage."""
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        self.client().put_object(Bucket=bucket, Key=key, Body=data)


@pytest.fixture
def s3_server() -> Iterator[S3Server]:
    """A clean moto S3 server with the AWS environment pointing at it for this test."""
    server = shared_moto()
    server.reset()
    with aws_env(server.endpoint) as env:
        yield S3Server(endpoint=server.endpoint, env=dict(env))


# ---------------------------------------------------------------------------------------------- faults
class _FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of an S3 server that answers a share of requests with
    503 SlowDown or 500 InternalError instead of forwarding them (seeded, so a run is repeatable)."""

    def __init__(self, upstream: str, share: float, seed: int) -> None:
        import http.server
        import random
        import threading
        from urllib.parse import urlsplit

        self.upstream = urlsplit(upstream)
        self.share = share
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"forwarded": 0, "failed": 0}
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _handle(self) -> None:
                import http.client

                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy.lock:
                    fail = proxy.rng.random() < proxy.share
                    proxy.counts["failed" if fail else "forwarded"] += 1
                if fail:
                    code, name = (503, "SlowDown") if proxy.rng.random() < 0.7 else (500, "InternalError")
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{name}</Code>'
                               f"<Message>injected by the test's fault proxy</Message></Error>").encode()
                    self.send_response(code)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "_FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def fault_proxy(upstream: str, share: float = 0.2, seed: int = 0) -> _FaultProxy:
    """``with fault_proxy(server.endpoint, 0.2) as proxy:`` point clients at ``proxy.endpoint``."""
    return _FaultProxy(upstream, share, seed)

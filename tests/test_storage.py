"""Tests for bifta_core.io.storage on local paths and on a real S3-compatible server (moto)."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bifta_core.io import storage
from bifta_core.errors import StorageError
from tests.s3_server import S3Server, aws_env, free_port, moto_server

# A distinctive fake secret: if it ever shows up in an error message, the test fails.
SECRET = "bifta-test-secret-DO-NOT-PRINT-0123456789"


# ------------------------------------------------------------------ URI helpers


def test_is_remote() -> None:
    assert storage.is_remote("s3://bucket/key")
    assert storage.is_remote("gs://bucket")
    assert storage.is_remote("simplecache::s3://bucket/key")
    assert not storage.is_remote("/data/images")
    assert not storage.is_remote("relative/dir")
    assert not storage.is_remote("file:///data/images")


def test_join() -> None:
    assert storage.join("s3://bucket", "a", "b.jpg") == "s3://bucket/a/b.jpg"
    assert storage.join("s3://bucket/out/", "/part-0.parquet") == "s3://bucket/out/part-0.parquet"
    assert storage.join("s3://bucket/out") == "s3://bucket/out"
    assert storage.join("/data", "x", "y.png") == "/data/x/y.png"
    assert storage.join("/data/", "/abs") == "/data/abs"  # parts are always relative


def test_s3_options_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "BIFTA_S3_ANON", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    assert "endpoint_url" not in storage.s3_options()
    assert storage.s3_options()["anon"] is False

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://general:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    monkeypatch.setenv("BIFTA_S3_ANON", "1")
    opts = storage.s3_options()
    assert opts["endpoint_url"] == "http://s3-specific:2"
    assert opts["client_kwargs"] == {"region_name": "eu-central-1"}
    assert opts["anon"] is True
    assert storage.s3_options(anon=False)["anon"] is False
    assert SECRET not in json.dumps(opts)  # credentials are left to botocore


# ------------------------------------------------------------------------ local


def _make_tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.jpg").write_bytes(b"a")
    (root / "B.JPG").write_bytes(b"b")
    (root / "notes.txt").write_bytes(b"t")
    (root / "sub" / "c.png").write_bytes(b"c")
    (root / "sub" / "deeper" / "d.jpeg").write_bytes(b"d")


def test_local_list_files(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    everything = storage.list_files(str(tmp_path))
    assert everything == sorted(everything)
    assert all(os.path.isabs(p) for p in everything)
    assert len(everything) == 5
    images = storage.list_files(str(tmp_path), {".jpg", "png", ".JPEG"})
    assert [os.path.relpath(p, tmp_path) for p in images] == [
        "B.JPG", "a.jpg", "sub/c.png", "sub/deeper/d.jpeg",
    ]
    assert storage.list_files(f"file://{tmp_path}/sub", {"png"}) == [str(tmp_path / "sub" / "c.png")]
    with pytest.raises(StorageError, match="no such file or directory"):
        storage.list_files(str(tmp_path / "missing"))


def test_local_glob(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    assert storage.glob(str(tmp_path / "**" / "*.png")) == [str(tmp_path / "sub" / "c.png")]


def test_local_read_write_exists_remove(tmp_path: Path) -> None:
    target = tmp_path / "out" / "result.bin"
    storage.write_bytes_atomic(str(target), b"first")
    storage.write_bytes_atomic(str(target), b"second")
    assert storage.read_bytes(str(target)) == b"second"
    assert os.listdir(target.parent) == ["result.bin"]  # no temp files left behind
    assert storage.exists(str(target)) and not storage.isdir(str(target))
    assert storage.isdir(str(tmp_path / "out"))
    storage.remove(str(target))
    storage.remove(str(target))  # idempotent
    assert not storage.exists(str(target))
    with pytest.raises(StorageError, match="no such file or directory"):
        storage.read_bytes(str(target))


def test_local_open_output_is_all_or_nothing(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.bin", tmp_path / "bad.bin"
    with storage.open_output(str(good)) as f:
        f.write(b"payload")
    with storage.open_input(str(good)) as f:
        assert f.read() == b"payload"
    with pytest.raises(RuntimeError), storage.open_output(str(bad)) as f:
        f.write(b"partial")
        raise RuntimeError("writer failed")
    assert sorted(os.listdir(tmp_path)) == ["good.bin"]


def test_local_cached_download_returns_path(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"w")
    assert storage.cached_download(str(path)) == str(path)
    with pytest.raises(StorageError):
        storage.cached_download(str(tmp_path / "nope.pt"))


def test_local_check_writable(tmp_path: Path) -> None:
    storage.check_writable(str(tmp_path / "new" / "out"))
    assert os.listdir(tmp_path / "new" / "out") == []  # probe removed
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StorageError, match="not writable"):
        storage.check_writable(str(blocker / "out"))


# --------------------------------------------------------------------- S3 (moto)


def test_s3_list_files(s3_server: S3Server) -> None:
    bucket = s3_server.create_bucket("images")
    for key in ("set/a.jpg", "set/B.PNG", "set/x/y/c.jpeg", "set/readme.txt", "set/x/", "setb/z.jpg"):
        s3_server.put(f"{bucket}/{key}", b"" if key.endswith("/") else key.encode())
    assert storage.list_files("s3://images/set", {"jpg", ".png", "jpeg"}) == [
        "s3://images/set/B.PNG", "s3://images/set/a.jpg", "s3://images/set/x/y/c.jpeg",
    ]
    assert len(storage.list_files("s3://images/set/")) == 4  # marker "x/" is not a file
    assert len(storage.list_files("s3://images")) == 5
    assert storage.list_files("s3://images/empty/") == []
    assert storage.glob("s3://images/set/**/*.jpeg") == ["s3://images/set/x/y/c.jpeg"]
    with pytest.raises(StorageError, match="no such bucket"):
        storage.list_files("s3://no-such-bucket/prefix")


def test_s3_read_write_exists_remove(s3_server: S3Server) -> None:
    s3_server.create_bucket("work")
    uri = storage.join("s3://work", "out", "x.bin")
    storage.write_bytes_atomic(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert storage.exists(uri) and storage.isdir("s3://work/out")
    storage.makedirs("s3://work/never-created")  # no-op on object stores
    with storage.open_output("s3://work/out/stream.bin") as f:
        f.write(b"streamed")
    with storage.open_input("s3://work/out/stream.bin") as f:
        assert f.read() == b"streamed"
    with pytest.raises(RuntimeError), storage.open_output("s3://work/out/broken.bin") as f:
        f.write(b"partial")
        raise RuntimeError("writer failed")
    assert not storage.exists("s3://work/out/broken.bin")
    storage.remove(uri)
    storage.remove(uri)
    assert not storage.exists(uri)
    storage.check_writable("s3://work/results")
    assert storage.list_files("s3://work/results") == []


def test_s3_missing_key_fails_fast(s3_server: S3Server) -> None:
    s3_server.create_bucket("work")
    start = time.monotonic()
    with pytest.raises(StorageError, match=r"^s3://work/absent\.jpg: no such key$"):
        storage.read_bytes("s3://work/absent.jpg", retries=4, backoff=2.0)
    assert time.monotonic() - start < 2.0  # a retry would have slept
    with pytest.raises(StorageError, match="no such bucket"):
        storage.read_bytes("s3://no-such-bucket/k")
    with pytest.raises(StorageError, match="no such key"):
        storage.cached_download("s3://work/absent.pt")
    with pytest.raises(StorageError, match="not writable.*no such bucket"):
        storage.check_writable("s3://no-such-bucket/out")


def test_s3_parquet_through_arrow_fs(s3_server: S3Server) -> None:
    s3_server.create_bucket("tables")
    fs, path = storage.get_arrow_fs("s3://tables/run/part-0.parquet")
    assert isinstance(fs, pa.fs.S3FileSystem)
    table = pa.table({"path": ["s3://images/a.jpg"], "label": ["cat"], "score": [0.9]})
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    # The same object is visible through the fsspec side of the layer.
    assert storage.list_files("s3://tables/run", {"parquet"}) == ["s3://tables/run/part-0.parquet"]


def test_s3_cached_download_once(s3_server: S3Server, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    s3_server.create_bucket("models")
    s3_server.put("s3://models/ckpt/model.pt", b"weights" * 1000)
    first = storage.cached_download("s3://models/ckpt/model.pt", str(tmp_path))
    assert Path(first).read_bytes() == b"weights" * 1000
    assert os.path.basename(first).endswith("-model.pt")
    # Point S3 at a closed port: any request would now fail, so success proves none is made.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    assert storage.cached_download("s3://models/ckpt/model.pt", str(tmp_path)) == first


def test_s3_access_denied_without_leaking_credentials() -> None:
    """Real 403s: a private moto server enforcing IAM, a user allowed one bucket only."""
    import boto3

    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*",
                       "Resource": ["arn:aws:s3:::mine", "arn:aws:s3:::mine/*"]}],
    }
    with moto_server() as server, aws_env(server.endpoint):
        admin = S3Server(server.endpoint)
        admin.create_bucket("mine")
        admin.create_bucket("theirs")
        admin.put("s3://theirs/private.jpg", b"x")
        iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1")
        iam.create_user(UserName="labeller")
        iam.put_user_policy(UserName="labeller", PolicyName="own-bucket",
                            PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="labeller")["AccessKey"]
        # From now on moto checks signatures and IAM policies on every request.
        urllib.request.urlopen(urllib.request.Request(
            server.endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
            headers={"Content-Type": "application/octet-stream"}), timeout=10).close()

        with aws_env(server.endpoint, AWS_ACCESS_KEY_ID=key["AccessKeyId"],
                     AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"]):
            storage.write_bytes_atomic("s3://mine/ok.bin", b"1")
            assert storage.read_bytes("s3://mine/ok.bin") == b"1"
            failures = [
                lambda: storage.read_bytes("s3://theirs/private.jpg"),
                lambda: storage.list_files("s3://theirs/"),
                lambda: storage.cached_download("s3://theirs/private.jpg"),
                lambda: storage.check_writable("s3://theirs/out"),
            ]
            for failing in failures:
                start = time.monotonic()
                with pytest.raises(StorageError, match="access denied") as info:
                    failing()
                assert time.monotonic() - start < 5.0
                message = str(info.value)
                assert "\n" not in message
                assert key["SecretAccessKey"] not in message
                assert key["AccessKeyId"] not in message


# --------------------------------------------- transient errors (stub S3 endpoint)


class _FlakyS3(ThreadingHTTPServer):
    """Serves one object; the first ``failures`` GETs answer 503 SlowDown like real S3."""

    daemon_threads = True

    def __init__(self, body: bytes, failures: int) -> None:
        super().__init__(("127.0.0.1", 0), _FlakyHandler)
        self.body, self.failures = body, failures
        self.requests: list[str] = []
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _FlakyHandler(BaseHTTPRequestHandler):
    server: _FlakyS3

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _headers(self, status: int, length: int, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("ETag", '"0123456789abcdef"')
        self.send_header("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802 (http.server naming)
        with self.server.lock:
            self.server.requests.append("HEAD " + self.path)
        self._headers(200, len(self.server.body), "application/octet-stream")

    def do_GET(self) -> None:  # noqa: N802
        with self.server.lock:
            self.server.requests.append("GET " + self.path)
            fail = self.server.failures > 0
            self.server.failures -= fail
        if fail:
            xml = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                   b"<Message>Please reduce your request rate.</Message></Error>")
            self._headers(503, len(xml), "application/xml")
            self.wfile.write(xml)
            return
        self._headers(200, len(self.server.body), "application/octet-stream")
        self.wfile.write(self.server.body)


@pytest.fixture
def flaky_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[_FlakyS3]:
    server = _FlakyS3(b"image-bytes", failures=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    with aws_env(server.endpoint, AWS_SECRET_ACCESS_KEY=SECRET):
        # botocore would otherwise retry each 503 itself; one attempt per call lets the
        # test see read_bytes' own retry policy.
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        yield server
    server.shutdown()
    server.server_close()


def test_transient_503_is_retried(flaky_s3: _FlakyS3) -> None:
    flaky_s3.failures = 2
    assert storage.read_bytes("s3://bucket/img.jpg", retries=3, backoff=0.01) == b"image-bytes"
    assert flaky_s3.requests == ["GET /bucket/img.jpg"] * 3  # one GET per try, no HEAD


def test_transient_503_gives_up_with_clear_error(flaky_s3: _FlakyS3) -> None:
    flaky_s3.failures = 10
    with pytest.raises(StorageError) as info:
        storage.read_bytes("s3://bucket/img.jpg", retries=2, backoff=0.01)
    assert str(info.value) == "s3://bucket/img.jpg: unavailable after 3 attempts (SlowDown)"
    assert SECRET not in str(info.value)
    assert len(flaky_s3.requests) == 3


def test_cached_download_concurrent_workers_fetch_once(flaky_s3: _FlakyS3, tmp_path: Path) -> None:
    flaky_s3.failures = 1  # the single download also survives a throttled first try
    results: list[str] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(storage.cached_download("s3://bucket/model.pt", str(tmp_path)))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert len(set(results)) == 1 and Path(results[0]).read_bytes() == b"image-bytes"
    gets = [r for r in flaky_s3.requests if r.startswith("GET")]
    assert len(gets) == 2  # one throttled attempt + one successful download, not four
    before = len(flaky_s3.requests)
    storage.cached_download("s3://bucket/model.pt", str(tmp_path))
    assert len(flaky_s3.requests) == before

"""One storage layer for local paths, ``s3://`` and any other fsspec URI.

Everything in bifta that touches bytes (image reads, checkpoint downloads, label sets,
Parquet output) goes through this module so that S3 configuration, retries and error
messages are decided in exactly one place.

S3 configuration comes from the standard AWS environment:

* ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``: custom endpoint (MinIO, moto, Ceph...).
* ``AWS_REGION`` / ``AWS_DEFAULT_REGION``: region.
* ``BIFTA_S3_ANON=1``: unsigned requests, for public buckets.
* credentials: left to botocore / the AWS SDK (env vars, profile, instance role, IRSA).

Errors a user can act on (missing object, access denied, unreachable storage after the
retries ran out) are raised as :class:`~bifta_core.errors.StorageError` with a one-line
message built from the URI and the server's error code only, so credentials never leak.

Caches: downloaded objects go to the ``downloads`` folder of the cache root
(:mod:`bifta_core.io.cache`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob as _glob
import hashlib
import http.client
import json
import logging
import os
import random
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any, Literal, TypeVar
from urllib.parse import urlsplit

import fsspec
import pyarrow.fs as pafs

from bifta_core.errors import ConfigError, StorageError

__all__ = [
    "cached_download",
    "check_writable",
    "exists",
    "get_arrow_fs",
    "get_fs",
    "glob",
    "is_remote",
    "isdir",
    "join",
    "list_dir",
    "list_files",
    "makedirs",
    "open_input",
    "open_output",
    "read_bytes",
    "remove",
    "s3_options",
    "write_bytes_atomic",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")
# s3a/s3n are Hadoop spellings users paste from Spark jobs; s3fs serves all of them.
_S3_PROTOCOLS = frozenset({"s3", "s3a", "s3n"})
_TRUE = frozenset({"1", "true", "yes", "on"})

# Server error codes, grouped by what the caller should do about them.
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404", "NoSuchUpload"})
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "Forbidden",
        "403",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "TooManyRequestsException",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "429",
        "500",
        "502",
        "503",
        "504",
    }
)
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EBUSY,  # s3fs maps SlowDown/ServiceUnavailable to EBUSY
        errno.EREMOTEIO,  # s3fs maps 5xx to EREMOTEIO
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.EAGAIN,
    }
)

_Kind = Literal["missing", "denied", "transient", "other", "bug"]


# --------------------------------------------------------------------------- URIs


def is_remote(uri: str) -> bool:
    """Return True when *uri* names a non-local location (``s3://``, ``gs://``, ``a::b``...).

    ``file://`` URIs and plain paths are local.
    """
    if "::" in uri:  # fsspec chained URL, e.g. "simplecache::s3://b/k"
        return True
    match = _SCHEME_RE.match(uri)
    return bool(match) and match.group(1).lower() != "file"


def join(base: str, *parts: str) -> str:
    """Join path components onto a local path or a URI.

    Parts are always treated as relative (leading slashes are dropped), unlike
    :func:`os.path.join`, so ``join("s3://b/out", "/x")`` is ``s3://b/out/x``.
    """
    cleaned = [p.strip("/") for p in parts if p and p.strip("/")]
    if is_remote(base) or base.startswith("file://"):
        head = base if base.endswith("://") else base.rstrip("/")
        sep = "" if head.endswith("://") else "/"
        return head + sep + "/".join(cleaned) if cleaned else base
    return os.path.join(base, *cleaned)


def _protocol(uri: str) -> str:
    """Canonical protocol of *uri*: ``"file"`` for local paths, ``"s3"`` for s3/s3a/s3n."""
    if not is_remote(uri):
        return "file"
    proto = uri.split("://", 1)[0].lower()
    return "s3" if proto in _S3_PROTOCOLS else proto


def _local_path(uri: str) -> str:
    """Absolute local path for a plain path or ``file://`` URI."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return os.path.abspath(os.path.expanduser(uri))


def _redact(uri: str) -> str:
    """Drop any ``user:secret@`` part of a URI so it is safe to put in messages and logs."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.\-]*://)[^/@]*@", r"\1", uri)


def _s3_path(uri: str) -> str:
    """``bucket/key`` part of an S3 URI."""
    return _redact(uri).split("://", 1)[1]


# ----------------------------------------------------------------- configuration


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _first_env(*names: str) -> str | None:
    """The first of ``names`` set to a non-blank value."""
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _endpoint_url() -> str | None:
    # The service-specific variable wins, as in botocore's own resolution order.
    return _first_env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def _region() -> str | None:
    return _first_env("AWS_REGION", "AWS_DEFAULT_REGION")


def s3_env(endpoint_url: str | None = None, region: str | None = None, anon: bool = False) -> dict[str, str]:
    """The environment variables that carry S3 flags (``--s3-endpoint-url`` …) to this process and
    to Ray workers; credentials are never among them (botocore resolves those in each process)."""
    env: dict[str, str] = {}
    if endpoint_url:
        env["AWS_ENDPOINT_URL"] = endpoint_url
    if region:
        env["AWS_REGION"] = env["AWS_DEFAULT_REGION"] = region
    if anon:
        env["BIFTA_S3_ANON"] = "1"
    return env


def s3_options(anon: bool | None = None) -> dict[str, Any]:
    """s3fs storage options derived from the standard AWS environment.

    Args:
        anon: force unsigned (anonymous) requests on or off; ``None`` reads ``BIFTA_S3_ANON``.

    Returns:
        A dict usable as ``fsspec.filesystem("s3", **opts)`` or as ``storage_options``.
        It never contains credentials: those are resolved by botocore in each process
        (env vars, shared config/profile, instance or pod role).
    """
    opts: dict[str, Any] = {
        "anon": _env_flag("BIFTA_S3_ANON") if anon is None else bool(anon),
        # Listings are cached forever by default; other processes (Ray workers, later
        # jobs) write to the same prefixes, so a stale listing would hide their output.
        "use_listings_cache": False,
    }
    endpoint = _endpoint_url()
    if endpoint:
        opts["endpoint_url"] = endpoint
    region = _region()
    if region:
        opts["client_kwargs"] = {"region_name": region}
    if "AWS_RETRY_MODE" not in os.environ and "AWS_MAX_ATTEMPTS" not in os.environ:
        # botocore's default "legacy" mode backs off for up to ~15 s per request;
        # "standard" retries the same errors (throttling, 5xx, resets) with capped jitter.
        opts["config_kwargs"] = {"retries": {"mode": "standard", "max_attempts": 3}}
    return opts


def _credential_fingerprint() -> str:
    """Short hash of the credential *identity* in the env, so rotated keys get a new client.

    Only a digest is kept in memory; the values themselves never leave the environment.
    """
    names = ("AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    raw = "\0".join(os.environ.get(n, "") for n in names)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


_FS_CACHE: dict[tuple[Any, ...], Any] = {}
_FS_CACHE_LOCK = threading.Lock()


def _cached(key: tuple[Any, ...], factory: Callable[[], T]) -> T:
    # The pid is part of every key: clients hold sockets and event loops that must not
    # be shared across fork().
    full_key = (os.getpid(), *key)
    with _FS_CACHE_LOCK:
        if full_key not in _FS_CACHE:
            _FS_CACHE[full_key] = factory()
        return _FS_CACHE[full_key]


def _new_s3fs(opts: dict[str, Any]) -> fsspec.AbstractFileSystem:
    # skip_instance_cache: our own cache decides identity, including credentials.
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **opts)
    # s3fs retries on top of botocore, and read_bytes retries on top of both; a single
    # s3fs attempt keeps the total bounded and the back-off policy in one place.
    fs.retries = 1
    return fs


def get_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem for *uri* and the path without its protocol.

    Instances are cached per process, protocol and options (S3 options are re-read from
    the environment on every call, so a changed endpoint or key pair gets a new client).
    """
    proto = _protocol(uri)
    if proto == "file":
        fs = _cached(("file",), lambda: fsspec.filesystem("file"))
        return fs, _local_path(uri)
    if proto == "s3":
        opts = s3_options()
        key = ("s3", json.dumps(opts, sort_keys=True), _credential_fingerprint())
        fs = _cached(key, lambda: _new_s3fs(opts))
        return fs, _s3_path(uri)
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def get_arrow_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem for *uri* (for Parquet I/O and Ray Data) and the bare path.

    S3 uses Arrow's native :class:`pyarrow.fs.S3FileSystem`, configured explicitly from
    the same environment as :func:`s3_options` because Arrow does not apply
    ``AWS_ENDPOINT_URL``/``BIFTA_S3_ANON`` by itself. Native beats wrapping s3fs in a
    ``PyFileSystem``: multi-threaded C++ I/O without the GIL, and it pickles to Ray
    workers without credentials (each worker resolves its own from its environment).
    Other remote protocols are wrapped from fsspec.
    """
    proto = _protocol(uri)
    if proto == "file":
        return pafs.LocalFileSystem(), _local_path(uri)
    if proto == "s3":
        opts = s3_options()
        kwargs: dict[str, Any] = {"anonymous": opts["anon"]}
        endpoint = opts.get("endpoint_url")
        if endpoint:
            parts = urlsplit(endpoint if "://" in endpoint else "https://" + endpoint)
            kwargs["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
            kwargs["scheme"] = parts.scheme or "https"
        region = _region()
        if region:
            kwargs["region"] = region
        key = ("arrow-s3", json.dumps(kwargs, sort_keys=True), _credential_fingerprint())
        fs = _cached(key, lambda: pafs.S3FileSystem(**kwargs))
        return fs, _s3_path(uri)
    fsspec_fs, path = get_fs(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs)), path


# ------------------------------------------------------------------------ errors


def _error_code(exc: BaseException) -> tuple[str | None, int | None]:
    """Server error code and HTTP status carried by a botocore-style exception, if any."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None, None
    code = (response.get("Error") or {}).get("Code")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return (str(code) if code else None), (int(status) if status else None)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """*exc* and its causes/contexts (bounded, cycle-safe)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _transient_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "try again" from the network stacks s3fs sits on."""
    types: list[type[BaseException]] = [
        TimeoutError,
        ConnectionError,
        socket.timeout,
        http.client.IncompleteRead,
        fsspec.exceptions.FSTimeoutError,
    ]
    with contextlib.suppress(ImportError):
        import botocore.exceptions as bex

        import botocore.parsers as bparsers

        # Throttled S3 sometimes answers with truncated XML, hence the parser error.
        types += [bex.HTTPClientError, bex.IncompleteReadError, bparsers.ResponseParserError]
    with contextlib.suppress(ImportError):
        import aiohttp

        types += [aiohttp.ClientPayloadError, aiohttp.ClientConnectionError]
    return tuple(types)


def _classify(exc: BaseException) -> tuple[_Kind, str | None]:
    """Decide what a failure means: missing, denied, transient, other (permanent) or bug.

    Returns the kind and the most specific reason seen (a server error code such as
    ``SlowDown``, or a short OS/library description), for messages.
    """
    chain = list(_chain(exc))
    for item in chain:  # a server answer is the most precise signal
        code, status = _error_code(item)
        if code is None and status is None:
            continue
        if code in _MISSING_CODES or status == 404:
            return "missing", code
        if code in _DENIED_CODES or status == 403:
            return "denied", code
        if code in _TRANSIENT_CODES or status == 429 or (status is not None and status >= 500):
            return "transient", code
        return "other", code
    transient = _transient_types()
    for item in chain:
        if isinstance(item, FileNotFoundError):
            return "missing", None
        if isinstance(item, PermissionError):
            return "denied", None
        if isinstance(item, transient):
            return "transient", type(item).__name__
        if isinstance(item, OSError) and item.errno in _TRANSIENT_ERRNOS:
            return "transient", errno.errorcode.get(item.errno or 0)
    with contextlib.suppress(ImportError):
        import botocore.exceptions as bex

        for item in chain:
            if isinstance(item, bex.NoCredentialsError):
                return "denied", "no credentials found"
            if isinstance(item, bex.BotoCoreError):
                return "other", type(item).__name__
    if isinstance(exc, OSError):
        # Local failures: the OS wording ("Not a directory", "No space left on device")
        # is the clearest reason; it never contains secrets.
        return "other", (exc.strerror or type(exc).__name__).lower()
    return "bug", None


def _storage_error(uri: str, kind: _Kind, code: str | None, attempts: int) -> StorageError:
    """One-line, credential-free StorageError for a classified failure."""
    where = _redact(uri)
    remote = is_remote(uri)
    if kind == "missing":
        if not remote:
            what = "no such file or directory"
        elif code == "NoSuchBucket":
            what = "no such bucket"
        else:
            what = "no such key" if _protocol(uri) == "s3" else "no such object"
    elif kind == "denied":
        what = "access denied" + (f" ({code})" if code and code not in {"AccessDenied", "403"} else "")
    elif kind == "transient":
        what = f"unavailable after {attempts} attempt{'s' if attempts != 1 else ''}"
        what += f" ({code})" if code else ""
    elif code and " " in code:  # already a readable phrase (see _classify)
        what = code
    else:
        what = "storage error" + (f" ({code})" if code else "")
    return StorageError(f"{where}: {what}")


def _with_retries(uri: str, op: Callable[[], T], *, retries: int, backoff: float) -> T:
    """Run *op*, retrying transient failures with exponential back-off and full jitter.

    Permanent failures become StorageError at once; programming errors propagate as-is.
    """
    if retries < 0:
        raise ConfigError(f"retries must be >= 0, got {retries}")
    attempt = 0
    while True:
        try:
            return op()
        except StorageError:
            raise
        except Exception as exc:
            kind, code = _classify(exc)
            if kind == "bug":
                raise
            if kind == "transient" and attempt < retries:
                # Full jitter keeps thousands of Ray tasks that were throttled together
                # from retrying in lockstep.
                delay = random.uniform(0, backoff * (2**attempt))
                attempt += 1
                log.warning(
                    "%s: transient storage error (%s), retry %d/%d in %.2fs",
                    _redact(uri), code or type(exc).__name__, attempt, retries, delay,
                )
                time.sleep(delay)
                continue
            raise _storage_error(uri, kind, code, attempt + 1) from exc


# ------------------------------------------------------------------------- reads


def read_bytes(uri: str, *, retries: int = 4, backoff: float = 0.2) -> bytes:
    """Whole content of one object or file.

    Transient failures (connection resets, timeouts, throttling, 5xx) are retried up to
    *retries* times, waiting a random time up to ``backoff * 2**n`` seconds before retry
    n+1; when they run out, or at once for a missing object or denied access, it raises
    :class:`StorageError`. Remote reads are one GET each (no HEAD).
    """
    if not is_remote(uri):
        path = _local_path(uri)

        def read_local() -> bytes:
            with open(path, "rb") as f:
                return f.read()

        return _with_retries(uri, read_local, retries=0, backoff=backoff)
    fs, path = get_fs(uri)
    # s3fs otherwise sends a HEAD before every GET to decide on a parallel ranged read;
    # for images that doubles the request count (S3 bills and throttles per request).
    kwargs: dict[str, Any] = {"max_concurrency": 1} if _protocol(uri) == "s3" else {}
    return _with_retries(
        uri, lambda: fs.cat_file(path, **kwargs), retries=retries, backoff=backoff
    )


def _to_uri(fs: fsspec.AbstractFileSystem, proto: str, path: str) -> str:
    """Full URI (or absolute local path) for a protocol-less path returned by *fs*."""
    if proto == "file":
        return path
    if proto == "s3":
        return "s3://" + path
    return fs.unstrip_protocol(path)


def _normalise_extensions(extensions: set[str] | None) -> frozenset[str] | None:
    if extensions is None:
        return None
    return frozenset(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)


def _wanted(name: str, exts: frozenset[str] | None) -> bool:
    return exts is None or os.path.splitext(name)[1].lower() in exts


def list_files(uri: str, extensions: set[str] | None = None) -> list[str]:
    """Recursive, sorted listing of the files under a local folder or a remote prefix.

    Args:
        uri: a folder, a prefix (``s3://bucket/images/``) or a single file.
        extensions: keep only these (case-insensitive) extensions, with or without dot.

    Returns:
        Absolute local paths or full URIs. A remote prefix with no objects gives ``[]``;
        a missing local path, a missing bucket or denied access raise StorageError.
    """
    exts = _normalise_extensions(extensions)
    proto = _protocol(uri)
    if proto == "file":
        root = _local_path(uri)
        if os.path.isfile(root):
            return [root] if _wanted(root, exts) else []
        if not os.path.isdir(root):
            raise StorageError(f"{uri}: no such file or directory")
        found: list[str] = []
        # followlinks=False avoids cycles; symlinked *files* are still listed.
        for dirpath, _dirs, files in os.walk(root):
            found.extend(os.path.join(dirpath, f) for f in files if _wanted(f, exts))
        return sorted(found)

    fs, path = get_fs(uri)
    # One paginated ListObjectsV2 walk; directory-marker keys ("x/") are not files.
    names = _with_retries(uri, lambda: fs.find(path.rstrip("/")), retries=4, backoff=0.2)
    return sorted(
        _to_uri(fs, proto, n) for n in names if not n.endswith("/") and _wanted(n, exts)
    )


def list_dir(uri: str) -> tuple[list[str], list[str]]:
    """One level of a local folder or remote prefix → (files, sub-folders), each sorted, as URIs.

    Not recursive: on S3 it is a delimiter listing, so the sub-folders (common prefixes) of a large
    prefix can be listed in parallel by whoever calls this. A missing local folder raises
    StorageError; a remote prefix with no objects gives ``([], [])``.
    """
    proto = _protocol(uri)
    if proto == "file":
        root = _local_path(uri)
        if not os.path.isdir(root):
            raise StorageError(f"{uri}: no such file or directory")
        files, dirs = [], []
        with os.scandir(root) as entries:
            for entry in entries:
                (dirs if entry.is_dir() else files).append(os.path.join(root, entry.name))
        return sorted(files), sorted(dirs)
    fs, path = get_fs(uri)
    entries = _with_retries(uri, lambda: fs.ls(path.rstrip("/"), detail=True, refresh=True), retries=4, backoff=0.2)
    files = [_to_uri(fs, proto, e["name"]) for e in entries if e.get("type") != "directory" and not e["name"].endswith("/")]
    dirs = [_to_uri(fs, proto, e["name"]) for e in entries if e.get("type") == "directory"]
    return sorted(files), sorted(dirs)


def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob pattern (``**`` recurses) for local paths or remote URIs."""
    proto = _protocol(pattern)
    if proto == "file":
        return sorted(os.path.abspath(p) for p in _glob.glob(_local_path(pattern), recursive=True))
    fs, path = get_fs(pattern)
    matches = _with_retries(pattern, lambda: fs.glob(path), retries=4, backoff=0.2)
    return sorted(_to_uri(fs, proto, m) for m in matches)


def exists(uri: str) -> bool:
    """Whether a file/object or folder/prefix exists at *uri* (denied access raises)."""
    if not is_remote(uri):
        return os.path.exists(_local_path(uri))
    fs, path = get_fs(uri)
    return bool(_with_retries(uri, lambda: fs.exists(path), retries=4, backoff=0.2))


def isdir(uri: str) -> bool:
    """Whether *uri* is a local directory or a non-empty remote prefix / bucket."""
    if not is_remote(uri):
        return os.path.isdir(_local_path(uri))
    fs, path = get_fs(uri)
    return bool(_with_retries(uri, lambda: fs.isdir(path), retries=4, backoff=0.2))


@contextlib.contextmanager
def open_input(uri: str) -> Iterator[IO[bytes]]:
    """Binary, seekable reader for *uri*; a missing or forbidden object raises StorageError.

    Remote objects are read lazily in ranged blocks, suited to large files; for small
    objects :func:`read_bytes` is cheaper (one request) and retries.
    """
    if not is_remote(uri):
        path = _local_path(uri)
        handle = _with_retries(uri, lambda: open(path, "rb"), retries=0, backoff=0.0)
    else:
        fs, path = get_fs(uri)
        handle = _with_retries(uri, lambda: fs.open(path, "rb"), retries=4, backoff=0.2)
    with handle:
        yield handle


# ------------------------------------------------------------------------ writes


def makedirs(uri: str) -> None:
    """Create a local folder (and parents); a no-op for object stores, which have no folders."""
    proto = _protocol(uri)
    if proto == "file":
        path = _local_path(uri)
        _with_retries(uri, lambda: os.makedirs(path, exist_ok=True), retries=0, backoff=0.0)
    elif proto != "s3":  # s3fs would try to *create a bucket* here, which we never want
        fs, path = get_fs(uri)
        _with_retries(uri, lambda: fs.makedirs(path, exist_ok=True), retries=4, backoff=0.2)


def _local_tmp_beside(path: str) -> tuple[int, str]:
    """Open a hidden temp file in the destination's folder so os.replace stays atomic."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)


def _publish_local(tmp: str, path: str) -> None:
    """Give *tmp* normal permissions (mkstemp makes it 0600) and move it onto *path*."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write *data* so readers see either the old content or all of the new one.

    Local: temp file in the same folder, fsync, ``os.replace``. S3: one PUT (or a
    multipart upload) becomes visible only when complete, which is atomic already.
    """
    if not is_remote(uri):
        def write_local() -> None:
            with open_output(uri) as f:  # temp file beside the target, fsync, rename
                f.write(data)

        # retries=0: no retry for local disks, only the translation of OS errors into StorageError.
        _with_retries(uri, write_local, retries=0, backoff=0.0)
        return
    fs, path = get_fs(uri)
    _with_retries(uri, lambda: fs.pipe_file(path, data), retries=4, backoff=0.2)


@contextlib.contextmanager
def open_output(uri: str) -> Iterator[IO[bytes]]:
    """Binary writer whose content appears at *uri* only if the ``with`` block succeeds.

    Local files are written beside the target and renamed; remote objects are spooled to
    a local temp file and uploaded on success, so a failure never leaves a partial object.
    """
    if not is_remote(uri):
        path = _local_path(uri)
        fd, tmp = _with_retries(uri, lambda: _local_tmp_beside(path), retries=0, backoff=0.0)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            _publish_local(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    fs, path = get_fs(uri)
    with tempfile.NamedTemporaryFile(prefix="bifta-upload-", suffix=".tmp") as spool:
        yield spool  # type: ignore[misc]
        spool.flush()
        _with_retries(uri, lambda: fs.put_file(spool.name, path), retries=4, backoff=0.2)


def remove(uri: str, *, recursive: bool = False) -> None:
    """Delete a file/object (or, with *recursive*, a folder/prefix). Missing is not an error."""
    if not is_remote(uri):
        path = _local_path(uri)

        def remove_local() -> None:
            if os.path.isdir(path) and not os.path.islink(path):
                if not recursive:
                    raise IsADirectoryError(errno.EISDIR, "is a directory", path)
                shutil.rmtree(path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)

        _with_retries(uri, remove_local, retries=0, backoff=0.0)
        return
    fs, path = get_fs(uri)

    def remove_remote() -> None:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=recursive)

    _with_retries(uri, remove_remote, retries=4, backoff=0.2)


def check_writable(uri: str) -> None:
    """Fail fast, before a job starts, if output cannot be written under *uri*.

    Writes and deletes a small probe object/file inside *uri* (treated as a folder or
    prefix). Raises StorageError naming the location and the reason (no such bucket,
    access denied...).
    """
    probe = join(uri, f".bifta-write-check-{uuid.uuid4().hex}")
    try:
        makedirs(uri)
        write_bytes_atomic(probe, b"ok")
    except StorageError as exc:
        reason = str(exc).split(": ", 1)[-1]
        raise StorageError(f"{_redact(uri)}: output location is not writable ({reason})") from exc
    try:
        remove(probe)
    except StorageError as exc:  # write-only credentials: harmless, but say so
        log.warning("could not delete write probe %s: %s", _redact(probe), exc)


# ------------------------------------------------------------------------- cache


def _default_cache_dir() -> str:
    from bifta_core.io.cache import cache_dir

    return cache_dir("downloads")


def cached_download(uri: str, cache_dir: str | None = None) -> str:
    """Local path of *uri*, downloading a remote object once per node.

    Remote objects land in ``<cache_dir>/<sha256(uri)[:16]>-<basename>`` (default: the
    ``downloads`` folder of :mod:`bifta_core.io.cache`). An ``fcntl`` lock
    makes concurrent Ray workers on one node wait for a single download instead of each
    fetching a multi-GB checkpoint. Objects are treated as immutable: a cached copy is
    never re-validated, so publish new weights under a new key. Local paths are returned
    as given (``file://`` stripped). A missing object or file raises StorageError.
    """
    if not is_remote(uri):
        path = _local_path(uri) if uri.startswith("file://") else uri
        if not os.path.exists(path):
            raise StorageError(f"{uri}: no such file or directory")
        return path

    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    basename = os.path.basename(_s3_path(uri).rstrip("/")) or "object"
    folder = os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else _default_cache_dir()
    target = os.path.join(folder, f"{digest}-{basename}")
    if os.path.isfile(target):  # fast path: no lock, no request
        return target

    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"{folder}: cannot create download cache ({exc.strerror})") from exc
    fs, path = get_fs(uri)
    with open(target + ".lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
        try:
            if os.path.isfile(target):  # another worker finished while we waited
                return target

            def download() -> None:
                fd, tmp = _local_tmp_beside(target)
                os.close(fd)
                try:
                    # One streamed GET straight to disk: checkpoints can exceed free memory.
                    fs.get_file(path, tmp)
                    # Synced before the rename, or a crash could publish a truncated file
                    # that every later run would trust.
                    with open(tmp, "rb+") as written:
                        os.fsync(written.fileno())
                    _publish_local(tmp, target)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise

            log.info("downloading %s to %s", _redact(uri), target)
            _with_retries(uri, download, retries=4, backoff=0.5)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return target

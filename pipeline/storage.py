"""All I/O goes through here: local paths, file://, s3:// (s3fs), gs:// and az:// (fsspec
extras), and http(s):// media (off by default, SSRF-guarded in `httpfetch`).

- **Clients.** One filesystem client per (protocol, storage options, AWS environment) per
  process, reused for every row. Options come from the spec's `storage:` section; anything it
  leaves unset comes from the standard chains (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL,
  AWS_PROFILE, AWS_REGION, credentials from the environment, a profile or an instance role).
- **Retries.** Exactly one layer retries: this one. botocore's and s3fs's own retries are
  switched off on our clients so attempts never multiply. Throttling (503 SlowDown, 429), 5xx,
  timeouts and broken connections are retried with exponential backoff and jitter; 403 and
  404 never are. Media fetches follow `media.fetch_retries`, manifest and result I/O
  `storage.retries`.
- **Errors.** A media fetch that fails becomes an `ItemError` with a fetch code
  (`fetch.not_found`, `fetch.denied`, `fetch.timeout`, `fetch.too_large`, `fetch.error`), so a
  missing object is a row, not a crash. Messages name the object, never a credential: URLs
  lose their user info and query string, and credential values from the environment are
  masked.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import json
import os
import posixpath
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import s3fs
from fsspec.asyn import AsyncFileSystem, sync
from fsspec.core import split_protocol

from pipeline import httpfetch
from schemas.errors import ErrorCode, ItemError
from schemas.spec import JobSpec, StorageSpec

T = TypeVar("T")

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_S3 = ("s3", "s3a")
_HTTP = ("http", "https")
_EXTRAS = {"gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure", "adl": "azure"}
# Parts of this size go up in parallel; files of two parts or more use a multipart upload.
MULTIPART_CHUNK_BYTES = 16 * 2**20
# Manifests are read in blocks of this size (s3fs's default, 50 MB, is a lot per read task).
MANIFEST_BLOCK_BYTES = 8 * 2**20
# botocore's socket timeouts for manifest and result I/O (media fetches add a total deadline).
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60


# --- URIs -------------------------------------------------------------------------------------


def is_remote(uri: str) -> bool:
    return bool(_SCHEME.match(uri)) and not uri.startswith("file://")


def scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if _SCHEME.match(uri) else "file"


def local_path(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(local_path(base), *parts)


def resolve_relative(uri: str, manifest_uri: str) -> str:
    """A relative media uri in a manifest resolves against the manifest's own folder, as in a
    URL: in a manifest on s3://b/m/, `x.jpg` is s3://b/m/x.jpg, `../x.jpg` s3://b/x.jpg and
    `/x.jpg` s3://b/x.jpg (a manifest in object storage never points at a worker's disk
    without saying file://)."""
    if _SCHEME.match(uri):
        return uri
    if not is_remote(manifest_uri):
        return uri if os.path.isabs(uri) else os.path.join(os.path.dirname(local_path(manifest_uri)), uri)
    root, _, rest = manifest_uri.partition("://")
    bucket, _, key = rest.partition("/")
    path = uri if uri.startswith("/") else posixpath.join("/", posixpath.dirname(key), uri)
    return f"{root}://{bucket}{posixpath.normpath(path)}"


def display_uri(uri: str) -> str:
    """A uri safe to show, in the `uri` column, messages and logs: no user info and no query
    string on any remote scheme (signed URLs and SAS tokens keep their secrets there); a
    dropped query shows as `?…`. Local paths are shown as they are."""
    if scheme(uri) in _HTTP:
        return httpfetch.display_url(uri)
    if not is_remote(uri):
        return uri
    # No fragments: `#` is an ordinary character in object keys.
    parts = urlsplit(uri, allow_fragments=False)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}" + ("?…" if parts.query else "")


_SECRET_ENV = re.compile(r"(^|_)(SECRET|TOKEN|PASSWORD|CREDENTIALS?|KEY|SAS|CONNECTION_STRING)(_|$)", re.IGNORECASE)
# Up to the last `@` before the path: a password may itself hold an `@`.
_URL_USERINFO = re.compile(r"(?<=://)[^/\s]*@")
_URL_QUERY = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^\s?\"']+)\?[^\s\"']*")


def redact(text: str) -> str:
    """Remove user info and query strings from URLs and mask credential values of the
    environment (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AZURE_STORAGE_KEY…)."""
    text = _URL_QUERY.sub(r"\1?…", _URL_USERINFO.sub("", text))
    for name, value in os.environ.items():
        if value and len(value) >= 6 and (_SECRET_ENV.search(name) or name == "AWS_ACCESS_KEY_ID") and value in text:
            text = text.replace(value, "***")
    return text


# --- clients ----------------------------------------------------------------------------------


class _S3FileSystem(s3fs.S3FileSystem):
    """s3fs without its own retry loop (ours decides). A class attribute, so that it also
    holds in copies of the client that pickling makes in other processes."""

    retries = 1


_AWS_ENV = (
    "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION",
    "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
)


def _aws_env_fingerprint() -> str:
    """Changes when the AWS environment does, so a changed environment gets a fresh client."""
    digest = hashlib.sha256()
    for name in _AWS_ENV:
        digest.update(f"{name}={os.environ.get(name, '')}\0".encode())
    return digest.hexdigest()[:16]


def storage_options(protocol: str, storage: StorageSpec, library_retries: int = 0) -> dict:
    """fsspec options for one protocol, from the spec's `storage:` section.

    `library_retries` > 0 lets botocore retry by itself (standard mode): only for clients we
    hand to pyarrow or Ray, whose calls we cannot wrap in our own retries."""
    extra = dict(storage.options.get(protocol, {}))
    if protocol not in _S3:
        return extra
    client_kwargs = dict(storage.client_kwargs)
    if storage.endpoint_url:
        client_kwargs["endpoint_url"] = storage.endpoint_url
    if storage.region:
        client_kwargs["region_name"] = storage.region
    retries = {"mode": "standard", "total_max_attempts": 1 + library_retries}
    options: dict = {
        "client_kwargs": client_kwargs,
        "config_kwargs": {"retries": retries, "connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S},
        # Listings must see what other workers just wrote (the sink, resume): no listing cache.
        "use_listings_cache": False,
    }
    if storage.profile:
        options["profile"] = storage.profile
    if storage.anonymous:
        options["anon"] = True
    if storage.requester_pays:
        options["requester_pays"] = True
    options.update(extra)
    return options


@functools.lru_cache(maxsize=16)
def _filesystem(protocol: str, options_json: str, _env: str) -> fsspec.AbstractFileSystem:
    if protocol in _HTTP:
        # fsspec's HTTP client has no SSRF guard: http(s) is read only through httpfetch.
        raise ValueError(f"{protocol}:// is only read as media (input.allow_http), not as a manifest, result or model location")
    options = json.loads(options_json)
    if protocol in _S3:
        return _S3FileSystem(skip_instance_cache=True, **options)
    try:
        return fsspec.filesystem(protocol, skip_instance_cache=True, **options)
    except ImportError as exc:
        extra = _EXTRAS.get(protocol)
        hint = f": pip install 'tessera[{extra}]'" if extra else ""
        raise ImportError(f"{protocol}:// needs an fsspec driver that is not installed{hint} ({exc})") from None


def filesystem(uri: str, storage: StorageSpec | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The (cached) filesystem for `uri` and the path within it."""
    protocol, path = split_protocol(uri)
    protocol = (protocol or "file").lower()
    options = storage_options(protocol, storage or StorageSpec())
    fs = _filesystem(protocol, json.dumps(options, sort_keys=True, default=str), _aws_env_fingerprint())
    if protocol != "file":
        path = fs._strip_protocol(uri)
    return fs, path


def arrow_filesystem(uri: str, storage: StorageSpec | None = None):
    """A pyarrow filesystem for `uri` (for `pyarrow.dataset` / `ray.data.read_parquet`), with
    botocore's own retries on since we cannot wrap the calls pyarrow makes; None for local
    paths. Paths given with it drop their scheme: `bucket/key`."""
    protocol = (split_protocol(uri)[0] or "file").lower()
    if protocol == "file":
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    storage = storage or StorageSpec()
    options = storage_options(protocol, storage, library_retries=storage.retries)
    fs = _filesystem(protocol, json.dumps(options, sort_keys=True, default=str), _aws_env_fingerprint())
    return PyFileSystem(FSSpecHandler(fs))


def strip_scheme(uri: str) -> str:
    return local_path(uri) if not is_remote(uri) else uri.split("://", 1)[1]


# --- retries ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with "equal jitter": the wait before retry i is uniform in
    [d/2, d], d = min(cap_s, base_s * 2**i). The floor makes the budget predictable (it rides
    out an outage of at least sum(d/2)); the jitter keeps many workers from retrying in step."""

    retries: int
    base_s: float = 0.25
    cap_s: float = 10.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.cap_s, self.base_s * 2**attempt)
        return (rng or random).uniform(ceiling / 2, ceiling)

    def budget_s(self) -> tuple[float, float]:
        """(least, most) total wait over all retries."""
        most = sum(min(self.cap_s, self.base_s * 2**i) for i in range(self.retries))
        return most / 2, most


@dataclass(frozen=True)
class Failure:
    """What went wrong, in words safe to show, and whether another attempt may help."""

    code: ErrorCode
    transient: bool
    reason: str


_THROTTLING = {
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestLimitExceeded", "TooManyRequestsException", "ProvisionedThroughputExceededException",
    "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeoutException",
}
_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NotFound", "NoSuchVersion", "404"}
_DENIED = {
    "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "InvalidToken", "AccountProblem", "InvalidObjectState", "RequestTimeTooSkewed", "403", "401",
}
_TRANSIENT_ERRNO = {errno.EBUSY, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT,
                    errno.EAGAIN, errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EREMOTEIO}


def _chain(exc: BaseException):
    seen = 0
    while exc is not None and seen < 8:
        yield exc
        exc = exc.__cause__ or exc.__context__
        seen += 1


def _from_status(status: int | None, code: str) -> Failure | None:
    label = f"HTTP {status}" + (f" {code}" if code and code != str(status) else "") if status else code
    if code in _NOT_FOUND or status in (404, 410):
        return Failure(ErrorCode.FETCH_NOT_FOUND, False, f"does not exist ({label})")
    if code in _DENIED or status in (401, 403):
        return Failure(ErrorCode.FETCH_DENIED, False, f"access denied ({label})")
    if code in _THROTTLING or status == 429 or (status is not None and status >= 500):
        return Failure(ErrorCode.FETCH_ERROR, True, label)
    if status is not None or code:
        return Failure(ErrorCode.FETCH_ERROR, False, label)
    return None


def classify(exc: BaseException) -> Failure:
    """Map any storage exception (s3fs, botocore, aiohttp, gcsfs, adlfs, urllib3, OS) to a
    fetch code and whether it is worth another attempt."""
    from botocore import exceptions as boto

    for link in _chain(exc):  # the server's own answer, where there is one, says the most
        if isinstance(link, ItemError):
            return Failure(link.code, False, link.message)
        if isinstance(link, boto.ClientError):
            response = link.response or {}
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            failure = _from_status(status, str(response.get("Error", {}).get("Code", "")))
            if failure:
                return failure
        status = getattr(link, "status_code", None) or getattr(link, "status", None) or getattr(link, "code", None)
        if isinstance(status, int) and 400 <= status < 600:
            return _from_status(status, "")
    for link in _chain(exc):
        if isinstance(link, (boto.NoCredentialsError, boto.PartialCredentialsError, boto.CredentialRetrievalError)):
            return Failure(
                ErrorCode.FETCH_DENIED, False,
                "no usable credentials (environment, profile or instance role); for a public bucket set storage.anonymous: true",
            )
        if isinstance(link, (boto.ReadTimeoutError, boto.ConnectTimeoutError, TimeoutError)):
            return Failure(ErrorCode.FETCH_TIMEOUT, True, "timed out")
        if isinstance(link, (boto.EndpointConnectionError, boto.ConnectionClosedError, ConnectionError)):
            return Failure(ErrorCode.FETCH_ERROR, True, "cannot connect to the storage endpoint")
        if isinstance(link, httpfetch.TransientHTTPError):
            return Failure(ErrorCode.FETCH_ERROR, True, str(link))  # built from display_url: safe to show
        if isinstance(link, boto.HTTPClientError) or _is_aiohttp_error(link):
            return Failure(ErrorCode.FETCH_ERROR, True, f"the connection failed ({type(link).__name__})")
        if isinstance(link, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
            return Failure(ErrorCode.FETCH_NOT_FOUND, False, "does not exist")
        if isinstance(link, PermissionError):
            return Failure(ErrorCode.FETCH_DENIED, False, "access denied")
        if isinstance(link, ImportError):
            return Failure(ErrorCode.FETCH_ERROR, False, redact(str(link)))
        if isinstance(link, OSError) and link.errno in _TRANSIENT_ERRNO:
            return Failure(ErrorCode.FETCH_ERROR, True, f"{type(link).__name__} ({errno.errorcode.get(link.errno, link.errno)})")
    return Failure(ErrorCode.FETCH_ERROR, False, f"{type(exc).__name__}: {redact(str(exc))[:200]}")


def _is_aiohttp_error(exc: BaseException) -> bool:
    try:
        import aiohttp
    except ImportError:
        return False
    return isinstance(exc, aiohttp.ClientError)


def with_retries(op: Callable[[], T], policy: RetryPolicy, sleep: Callable[[float], None] = time.sleep) -> T:
    """Run `op`; on a transient failure wait and run it again, up to `policy.retries` times.
    A permanent failure, or the last transient one, is raised as it came."""
    attempt = 0
    while True:
        try:
            return op()
        except Exception as exc:
            if attempt >= policy.retries or not classify(exc).transient:
                raise
            sleep(policy.delay(attempt))
            attempt += 1


class StorageError(OSError):
    """Manifest or result I/O failed after every retry. The message is safe to show."""


def _io(what: str, uri: str, storage: StorageSpec | None, op: Callable[[], T]) -> T:
    """Manifest and result I/O under `storage.retries`. Not-found and denied keep their
    Python types (callers tell them apart); anything else becomes a StorageError."""
    policy = RetryPolicy(retries=(storage or StorageSpec()).retries)
    try:
        return with_retries(op, policy)
    except (FileNotFoundError, PermissionError, IsADirectoryError, StorageError):
        raise
    except ImportError as exc:
        raise StorageError(str(exc)) from None
    except Exception as exc:
        failure = classify(exc)
        if failure.code is ErrorCode.FETCH_NOT_FOUND:
            raise FileNotFoundError(f"{display_uri(uri)} does not exist") from None
        if failure.code is ErrorCode.FETCH_DENIED:
            raise PermissionError(f"{what} {display_uri(uri)}: {failure.reason}") from None
        tries = f" after {policy.retries + 1} attempts" if failure.transient else ""
        raise StorageError(f"{what} {display_uri(uri)} failed{tries}: {failure.reason}") from None


# --- media fetch --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchPolicy:
    """How one media object is fetched: size bound, per-request deadline, retries, http(s)."""

    max_bytes: int = 64 * 2**20
    timeout_s: float = 30.0
    retries: int = 5
    allow_http: bool = False
    allow_private_http: bool = False

    @classmethod
    def from_spec(cls, spec: JobSpec) -> "FetchPolicy":
        return cls(
            max_bytes=spec.media.max_bytes,
            timeout_s=spec.media.fetch_timeout_s,
            retries=spec.media.fetch_retries,
            allow_http=spec.input.allow_http,
            allow_private_http=spec.input.allow_private_http,
        )


@dataclass(frozen=True)
class Fetched:
    data: bytes
    version: str | None  # ETag, or size+mtime: what makes a changed object due again


def object_version(info: dict) -> str | None:
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return "etag:" + str(etag).strip('"')
    size, mtime = info.get("size"), info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if size is None:
        return None
    return f"size:{size}" + (f",mtime:{mtime}" if mtime is not None else "")


def fetch(uri: str, storage: StorageSpec, policy: FetchPolicy) -> Fetched:
    """Read a whole media object: refused before download when it is larger than
    `policy.max_bytes`, each attempt bounded by `policy.timeout_s`, transient failures retried
    `policy.retries` times. Every failure is an ItemError with a fetch code."""
    shown = display_uri(uri)
    if scheme(uri) in _HTTP:
        _check_http_allowed(uri, policy)
        op = functools.partial(
            httpfetch.fetch, uri, max_bytes=policy.max_bytes, timeout_s=policy.timeout_s,
            allow_private=policy.allow_private_http,
        )
    else:
        try:
            fs, path = filesystem(uri, storage)
        except (ImportError, ValueError) as exc:
            raise ItemError(ErrorCode.FETCH_ERROR, f"cannot read {shown}: {redact(str(exc))}") from None
        op = functools.partial(_read_object, fs, path, policy.max_bytes, policy.timeout_s, shown)
    retry = RetryPolicy(retries=policy.retries)
    try:
        data, version = with_retries(op, retry)
    except ItemError:
        raise
    except Exception as exc:
        failure = classify(exc)
        if failure.transient and policy.retries:
            reason = f"{failure.reason} (after {policy.retries + 1} attempts)"
        else:
            reason = failure.reason
        if failure.code is ErrorCode.FETCH_TIMEOUT:
            reason = f"no complete answer within media.fetch_timeout_s={policy.timeout_s:g}s" + (
                f" (after {policy.retries + 1} attempts)" if policy.retries else ""
            )
        raise ItemError(failure.code, f"fetching {shown} failed: {reason}") from None
    return Fetched(data=data, version=version)


def _check_http_allowed(uri: str, policy: FetchPolicy) -> None:
    if not policy.allow_http:
        raise ItemError(ErrorCode.FETCH_DENIED, f"{display_uri(uri)}: http(s) media is off; set input.allow_http: true to fetch it")


def current_version(uri: str, storage: StorageSpec | None = None, policy: FetchPolicy | None = None) -> str | None:
    """The object's version now (one metadata request, no download): what resume compares
    with the version committed earlier. http(s) is asked with a HEAD through httpfetch's
    guard, under `policy` like a fetch; a refused one raises ItemError."""
    if scheme(uri) in _HTTP:
        policy = policy or FetchPolicy()
        _check_http_allowed(uri, policy)
        op = functools.partial(httpfetch.head, uri, timeout_s=policy.timeout_s, allow_private=policy.allow_private_http)
        return with_retries(op, RetryPolicy(retries=policy.retries))
    fs, path = filesystem(uri, storage)
    return object_version(_io("stat", uri, storage, lambda: fs.info(path)))


def _too_large(shown: str, size: int, max_bytes: int) -> ItemError:
    return ItemError(ErrorCode.FETCH_TOO_LARGE, f"{shown} is {size} bytes, over media.max_bytes={max_bytes}")


def _read_object(fs, path: str, max_bytes: int, timeout_s: float, shown: str) -> tuple[bytes, str | None]:
    """One attempt: (bytes, version)."""
    if isinstance(fs, s3fs.S3FileSystem):
        return sync(fs.loop, _s3_get, fs, path, max_bytes, shown, timeout=timeout_s)
    if isinstance(fs, AsyncFileSystem):
        return sync(fs.loop, _async_get, fs, path, max_bytes, shown, timeout=timeout_s)
    info = fs.info(path)
    if info.get("type") == "directory":
        raise ItemError(ErrorCode.FETCH_NOT_FOUND, f"{shown} is a directory, not a file")
    if (info.get("size") or 0) > max_bytes:
        raise _too_large(shown, info["size"], max_bytes)
    with fs.open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _too_large(shown, len(data), max_bytes)
    return data, object_version(info)


async def _s3_get(fs: s3fs.S3FileSystem, path: str, max_bytes: int, shown: str) -> tuple[bytes, str | None]:
    """One GET: the size comes with the response headers, so an object over the bound is
    refused before its body is read (one request per object, not a HEAD and a GET)."""
    bucket, key, version_id = fs.split_path(path)
    if not key:
        raise ItemError(ErrorCode.FETCH_NOT_FOUND, f"{shown} names a bucket, not an object")
    response = await fs._call_s3(
        "get_object", Bucket=bucket, Key=key, **({"VersionId": version_id} if version_id else {})
    )
    body = response["Body"]
    try:
        size = response.get("ContentLength")
        if size is not None and size > max_bytes:
            raise _too_large(shown, size, max_bytes)
        data = await body.read()
    finally:
        body.close()
    if len(data) > max_bytes:
        raise _too_large(shown, len(data), max_bytes)
    return data, object_version({"ETag": response.get("ETag"), "size": size})


async def _async_get(fs: AsyncFileSystem, path: str, max_bytes: int, shown: str) -> tuple[bytes, str | None]:
    info = await fs._info(path)
    if info.get("type") == "directory":
        raise ItemError(ErrorCode.FETCH_NOT_FOUND, f"{shown} is a directory, not a file")
    if (info.get("size") or 0) > max_bytes:
        raise _too_large(shown, info["size"], max_bytes)
    data = await fs._cat_file(path)
    if len(data) > max_bytes:
        raise _too_large(shown, len(data), max_bytes)
    return data, object_version(info)


# --- manifests and results -----------------------------------------------------------------------


def expand(uri: str, storage: StorageSpec, suffixes: tuple[str, ...]) -> list[str]:
    """A file, a directory (its files with one of `suffixes`) or a glob -> sorted file uris."""
    fs, path = filesystem(uri, storage)
    protocol = split_protocol(uri)[0]

    def full(p: str) -> str:
        return fs.unstrip_protocol(p) if protocol and protocol != "file" else p

    def find() -> list[str]:
        if any(ch in path for ch in "*?["):
            return sorted(full(p) for p in fs.glob(path) if not _hidden(p) and fs.isfile(p))
        if fs.isdir(path):
            found = fs.find(path)
            return sorted(full(p) for p in found if p.endswith(suffixes) and not _hidden(p[len(path) :]))
        if fs.isfile(path):
            return [full(path)]
        raise FileNotFoundError(f"manifest {display_uri(uri)} does not exist")

    return _io("listing", uri, storage, find)


def _hidden(path: str) -> bool:
    return any(part.startswith(("_", ".")) for part in path.strip("/").split("/") if part)


def open_file(uri: str, mode: str = "rb", storage: StorageSpec | None = None):
    """A file object. Remote reads survive broken connections: a read that fails on a
    transient error reopens the object at the same offset (under `storage.retries`)."""
    fs, path = filesystem(uri, storage)
    if not is_remote(uri) or "r" not in mode or "b" not in mode:
        return fs.open(path, mode)
    raw = _ResumableReader(fs, path, uri, storage or StorageSpec())
    return io.BufferedReader(raw, buffer_size=1 << 20)


class _ResumableReader(io.RawIOBase):
    def __init__(self, fs, path: str, uri: str, storage: StorageSpec):
        super().__init__()
        self._fs, self._path, self._uri, self._storage = fs, path, uri, storage
        self._pos = 0
        self._handle = _io("opening", uri, storage, self._open)
        self._size = self._handle.size

    def _open(self):
        return self._fs.open(self._path, "rb", block_size=MANIFEST_BLOCK_BYTES)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        first = [True]

        def read() -> bytes:
            if not first[0]:  # a retry: the old handle may hold a dead connection
                self._handle = self._open()
            first[0] = False
            self._handle.seek(self._pos)
            return self._handle.read(len(buffer))

        data = _io("reading", self._uri, self._storage, read)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._handle.close()
        super().close()


def write_bytes(uri: str, data: bytes, storage: StorageSpec | None = None) -> None:
    """Write a whole object. On S3 an object appears whole or not at all; large ones go up as
    a multipart upload in MULTIPART_CHUNK_BYTES parts."""
    fs, path = filesystem(uri, storage)
    if not is_remote(uri):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fs.pipe_file(path, data)
        return
    kwargs = {"chunksize": MULTIPART_CHUNK_BYTES} if isinstance(fs, s3fs.S3FileSystem) else {}
    _io("writing", uri, storage, lambda: fs.pipe_file(path, data, **kwargs))


def read_bytes(uri: str, storage: StorageSpec | None = None) -> bytes:
    fs, path = filesystem(uri, storage)
    return _io("reading", uri, storage, lambda: fs.cat_file(path))


def read_parquet_columns(uri: str, columns: list[str], storage: StorageSpec | None = None) -> pa.Table:
    """Only `columns` of one Parquet file (only their column chunks are read), under `storage.retries`."""
    path, fs = strip_scheme(uri), arrow_filesystem(uri, storage)
    return _io("reading", uri, storage, lambda: pq.read_table(path, columns=columns, filesystem=fs))


def exists(uri: str, storage: StorageSpec | None = None) -> bool:
    fs, path = filesystem(uri, storage)
    return _io("checking", uri, storage, lambda: fs.exists(path))


def size(uri: str, storage: StorageSpec | None = None) -> int:
    fs, path = filesystem(uri, storage)
    return int(_io("checking", uri, storage, lambda: fs.info(path)).get("size") or 0)


def rename(src: str, dst: str, storage: StorageSpec | None = None) -> None:
    """Atomic on local disks (os.replace); on object stores a server-side copy then a delete
    (a finished object appears whole or not at all). Safe to retry: when an earlier attempt
    already moved the object, there is nothing left to do."""
    fs, src_path = filesystem(src, storage)
    _, dst_path = filesystem(dst, storage)
    if not is_remote(src):
        parent = os.path.dirname(dst_path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        os.replace(src_path, dst_path)
        return

    def move() -> None:
        try:
            fs.mv(src_path, dst_path)
        except FileNotFoundError:
            if fs.exists(dst_path) and not fs.exists(src_path):
                return
            raise

    _io("renaming", src, storage, move)


def list_files(uri: str, storage: StorageSpec | None = None, suffix: str = "") -> list[str]:
    fs, path = filesystem(uri, storage)
    protocol = split_protocol(uri)[0]

    def find() -> list[str]:
        if not is_remote(uri) and not fs.exists(path):
            return []
        try:
            return [p for p in fs.find(path) if p.endswith(suffix)]
        except FileNotFoundError:
            return []

    found = _io("listing", uri, storage, find)
    return sorted(fs.unstrip_protocol(p) if protocol and protocol != "file" else p for p in found)


def remove(uri: str, storage: StorageSpec | None = None, recursive: bool = False) -> None:
    fs, path = filesystem(uri, storage)

    def rm() -> None:
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

    _io("removing", uri, storage, rm)



def list_objects(uri: str, storage: StorageSpec | None = None) -> dict[str, dict]:
    """Every object under the prefix `uri`, by path relative to it: {"size", "version"} (the
    version is the ETag, or size and mtime): what keys a cached copy of a folder
    (pipeline/model_cache.py)."""
    fs, path = filesystem(uri, storage)
    root = path.rstrip("/") + "/"

    def find() -> dict:
        return fs.find(path, detail=True)

    found = _io("listing", uri, storage, find)
    return {
        name[len(root) :]: {"size": int(info.get("size") or 0), "version": object_version(info)}
        for name, info in found.items()
        if name.startswith(root) and info.get("type", "file") != "directory"
    }


def download(uri: str, local_file: str, storage: StorageSpec | None = None) -> None:
    """Copy one object to a local file, streaming (model weights are GBs), under `storage.retries`."""
    fs, path = filesystem(uri, storage)
    os.makedirs(os.path.dirname(local_file) or ".", exist_ok=True)
    _io("downloading", uri, storage, lambda: fs.get_file(path, local_file))

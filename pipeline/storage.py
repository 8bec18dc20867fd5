"""All I/O goes through here: local paths, file://, s3:// (s3fs), and any other fsspec protocol.

One filesystem client per (protocol, storage options) per process, reused for every row.
Errors become `ItemError`s with a fetch code, so a missing object is a row, not a crash.
Credentials come from the standard chains (environment, profile, instance role); they are
never put in messages.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import re
from dataclasses import dataclass

import fsspec
from fsspec.core import split_protocol

from schemas.errors import ErrorCode, ItemError
from schemas.spec import StorageSpec

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(uri: str) -> bool:
    return bool(_SCHEME.match(uri)) and not uri.startswith("file://")


def local_path(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(local_path(base), *parts)


def resolve_relative(uri: str, manifest_uri: str) -> str:
    """A relative media uri in a manifest resolves against the manifest's own folder."""
    if _SCHEME.match(uri) or os.path.isabs(uri):
        return uri
    folder = posixpath.dirname(manifest_uri) if is_remote(manifest_uri) else os.path.dirname(local_path(manifest_uri))
    return join(folder, uri)


def storage_options(protocol: str, storage: StorageSpec) -> dict:
    """fsspec options for one protocol, from the spec's `storage:` section."""
    if protocol not in ("s3", "s3a"):
        return dict(storage.client_kwargs)
    client_kwargs = dict(storage.client_kwargs)
    if storage.endpoint_url:
        client_kwargs["endpoint_url"] = storage.endpoint_url
    if storage.region:
        client_kwargs["region_name"] = storage.region
    options: dict = {"client_kwargs": client_kwargs}
    if storage.profile:
        options["profile"] = storage.profile
    if storage.anonymous:
        options["anon"] = True
    if storage.requester_pays:
        options["requester_pays"] = True
    return options


@functools.lru_cache(maxsize=16)
def _filesystem(protocol: str, options_json: str) -> fsspec.AbstractFileSystem:
    return fsspec.filesystem(protocol, **json.loads(options_json))


def filesystem(uri: str, storage: StorageSpec | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The (cached) filesystem for `uri` and the path within it."""
    protocol, path = split_protocol(uri)
    protocol = protocol or "file"
    options = storage_options(protocol, storage or StorageSpec())
    fs = _filesystem(protocol, json.dumps(options, sort_keys=True, default=str))
    if protocol != "file":
        path = fs._strip_protocol(uri)
    return fs, path


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


def fetch(uri: str, storage: StorageSpec, max_bytes: int) -> Fetched:
    """Read a whole object, refusing it before download when it is larger than `max_bytes`."""
    fs, path = filesystem(uri, storage)
    try:
        info = fs.info(path)
        if info.get("type") == "directory":
            raise ItemError(ErrorCode.FETCH_NOT_FOUND, f"{uri} is a directory, not a file")
        size = info.get("size")
        if size is not None and size > max_bytes:
            raise ItemError(
                ErrorCode.FETCH_TOO_LARGE, f"{uri} is {size} bytes, over media.max_bytes={max_bytes}"
            )
        data = fs.cat_file(path)
    except ItemError:
        raise
    except FileNotFoundError:
        raise ItemError(ErrorCode.FETCH_NOT_FOUND, f"{uri} does not exist") from None
    except PermissionError:
        raise ItemError(ErrorCode.FETCH_DENIED, f"access to {uri} was denied") from None
    except TimeoutError:
        raise ItemError(ErrorCode.FETCH_TIMEOUT, f"fetching {uri} timed out") from None
    except OSError as exc:
        raise ItemError(ErrorCode.FETCH_ERROR, f"fetching {uri} failed: {type(exc).__name__}") from None
    if len(data) > max_bytes:
        raise ItemError(ErrorCode.FETCH_TOO_LARGE, f"{uri} is over media.max_bytes={max_bytes}")
    return Fetched(data=data, version=object_version(info))


def expand(uri: str, storage: StorageSpec, suffixes: tuple[str, ...]) -> list[str]:
    """A file, a directory (its files with one of `suffixes`) or a glob -> sorted file uris."""
    fs, path = filesystem(uri, storage)
    protocol = split_protocol(uri)[0]

    def full(p: str) -> str:
        return fs.unstrip_protocol(p) if protocol and protocol != "file" else p

    if any(ch in path for ch in "*?["):
        return sorted(full(p) for p in fs.glob(path) if not _hidden(p) and fs.isfile(p))
    if fs.isdir(path):
        found = fs.find(path)
        return sorted(full(p) for p in found if p.endswith(suffixes) and not _hidden(p[len(path) :]))
    if fs.isfile(path):
        return [full(path)]
    raise FileNotFoundError(f"manifest {uri} does not exist")


def _hidden(path: str) -> bool:
    return any(part.startswith(("_", ".")) for part in path.strip("/").split("/") if part)


def open_file(uri: str, mode: str = "rb", storage: StorageSpec | None = None):
    fs, path = filesystem(uri, storage)
    return fs.open(path, mode)


def write_bytes(uri: str, data: bytes, storage: StorageSpec | None = None) -> None:
    fs, path = filesystem(uri, storage)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)


def read_bytes(uri: str, storage: StorageSpec | None = None) -> bytes:
    fs, path = filesystem(uri, storage)
    return fs.cat_file(path)


def exists(uri: str, storage: StorageSpec | None = None) -> bool:
    fs, path = filesystem(uri, storage)
    return fs.exists(path)


def rename(src: str, dst: str, storage: StorageSpec | None = None) -> None:
    """Atomic on local disks (os.replace); copy-then-delete on object stores, where a
    finished object appears whole or not at all."""
    fs, src_path = filesystem(src, storage)
    _, dst_path = filesystem(dst, storage)
    parent = posixpath.dirname(dst_path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if not is_remote(src):
        os.replace(src_path, dst_path)
    else:
        fs.mv(src_path, dst_path)


def list_files(uri: str, storage: StorageSpec | None = None, suffix: str = "") -> list[str]:
    fs, path = filesystem(uri, storage)
    if not fs.exists(path):
        return []
    protocol = split_protocol(uri)[0]
    found = [p for p in fs.find(path) if p.endswith(suffix)]
    return sorted(fs.unstrip_protocol(p) if protocol and protocol != "file" else p for p in found)


def remove(uri: str, storage: StorageSpec | None = None, recursive: bool = False) -> None:
    fs, path = filesystem(uri, storage)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)

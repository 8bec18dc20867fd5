"""http(s):// media, fetched with a guard against server-side request forgery (SSRF).

A manifest is data, often from someone else: a URI in it must not make a worker read the
cloud metadata service (169.254.169.254), a database on the private network or a port on
localhost. So the host is resolved here, every address is checked, and the connection goes
to the address that was checked (no second lookup that DNS rebinding could change). Each
redirect is a new request and goes through the same check. Private, loopback, link-local
and other non-global destinations are refused unless `input.allow_private_http` is set.

Only `storage` calls this (`fetch`, and `head` for resume's version check); it owns the
retries. One attempt here raises `ItemError`
(permanent) or `TransientHTTPError` (worth another attempt).
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections import OrderedDict
from urllib.parse import urljoin, urlsplit

import urllib3

from schemas.errors import ErrorCode, ItemError

MAX_REDIRECTS = 5
_CHUNK = 1 << 16
_POOLS_PER_PROCESS = 32
_USER_AGENT = "tessera (batch vision-language inference)"


class TransientHTTPError(OSError):
    """A 429/5xx answer or a broken connection: another attempt may succeed."""


def display_url(url: str) -> str:
    """The URL without credentials, query string or fragment (signed URLs carry their
    secrets in the query: X-Amz-Signature, sig=, token=…); a dropped query shows as `?…`."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not host:port, so the authority may be a mangled password: show none of it
        return f"{parts.scheme}://(invalid address)"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}" + ("?…" if parts.query else "")


def address_allowed(address: str, allow_private: bool) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast:
        return False
    return allow_private or ip.is_global


def resolve(host: str, port: int, allow_private: bool) -> str:
    """The first address of `host` a request may go to; ItemError(fetch.denied) if none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_AGAIN,):
            raise TransientHTTPError(f"cannot resolve {host} right now") from None
        raise ItemError(ErrorCode.FETCH_NOT_FOUND, f"host {host} does not resolve") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        if address_allowed(address, allow_private):
            return address
    raise ItemError(
        ErrorCode.FETCH_DENIED,
        f"host {host} resolves to a private, loopback or link-local address; "
        "set input.allow_private_http: true to allow it",
    )


_POOLS: OrderedDict[tuple, urllib3.HTTPConnectionPool] = OrderedDict()


def _pool(scheme: str, address: str, port: int, host: str, timeout_s: float) -> urllib3.HTTPConnectionPool:
    """One keep-alive pool per (destination address, host name), reused across rows."""
    key = (scheme, address, port, host, timeout_s)
    pool = _POOLS.get(key)
    if pool is not None:
        _POOLS.move_to_end(key)
        return pool
    timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
    if scheme == "https":
        pool = urllib3.HTTPSConnectionPool(
            address, port, timeout=timeout, retries=False, maxsize=2,
            server_hostname=host, assert_hostname=host, cert_reqs="CERT_REQUIRED",
        )
    else:
        pool = urllib3.HTTPConnectionPool(address, port, timeout=timeout, retries=False, maxsize=2)
    _POOLS[key] = pool
    while len(_POOLS) > _POOLS_PER_PROCESS:
        _POOLS.popitem(last=False)[1].close()
    return pool


def fetch(url: str, *, max_bytes: int, timeout_s: float, allow_private: bool) -> tuple[bytes, str | None]:
    """GET one URL (following up to MAX_REDIRECTS checked redirects): (body, version)."""
    deadline = time.monotonic() + timeout_s
    response, url = _request("GET", url, timeout_s, allow_private)
    try:
        _check_status(response.status, url)
        data = _read_body(response, url, max_bytes, deadline, timeout_s)
    except BaseException:
        _discard(response)
        raise
    response.release_conn()  # fully read: the connection can serve the next row
    return data, _version(response.headers)


def head(url: str, *, timeout_s: float, allow_private: bool) -> str | None:
    """The version `fetch` would report (ETag, or size and Last-Modified), from a HEAD with
    the same address checks and redirects: what resume compares, without a download."""
    response, url = _request("HEAD", url, timeout_s, allow_private)
    try:
        _check_status(response.status, url)
    except BaseException:
        _discard(response)
        raise
    response.release_conn()  # a HEAD answer has no body
    return _version(response.headers)


def _request(method: str, url: str, timeout_s: float, allow_private: bool):
    """(response, final url): the first answer that is not a redirect, every hop checked."""
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ItemError(ErrorCode.FETCH_DENIED, f"refusing to follow a redirect to {display_url(url)}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:  # the message would quote the bad port, which may be part of a password
            raise ItemError(ErrorCode.FETCH_ERROR, f"{display_url(url)} is not a valid URL") from None
        address = resolve(parts.hostname, port, allow_private)
        host_header = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        headers = {"Host": host_header, "User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
        if parts.username is not None:
            headers.update(urllib3.make_headers(basic_auth=f"{parts.username}:{parts.password or ''}"))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            response = _pool(parts.scheme, address, port, parts.hostname, timeout_s).urlopen(
                method, target, headers=headers, redirect=False, preload_content=False,
                assert_same_host=False, retries=False,
            )
        except urllib3.exceptions.TimeoutError:
            raise TimeoutError(f"{display_url(url)} did not answer within {timeout_s:g}s") from None
        except urllib3.exceptions.SSLError:
            raise ItemError(ErrorCode.FETCH_ERROR, f"TLS verification failed for {display_url(url)}") from None
        except urllib3.exceptions.HTTPError as exc:
            raise TransientHTTPError(f"{display_url(url)}: {type(exc).__name__}") from None
        if response.status in (301, 302, 303, 307, 308) and response.headers.get("Location"):
            _discard(response)
            url = urljoin(url, response.headers["Location"])
            continue
        return response, url
    raise ItemError(ErrorCode.FETCH_ERROR, f"more than {MAX_REDIRECTS} redirects from {display_url(url)}")


def _discard(response) -> None:
    """Drop a response whose body was not read: its connection cannot be reused."""
    response.close()
    response.release_conn()


def _check_status(status: int, url: str) -> None:
    if status == 200:
        return
    where = display_url(url)
    if status in (404, 410):
        raise ItemError(ErrorCode.FETCH_NOT_FOUND, f"{where} does not exist (HTTP {status})")
    if status in (401, 403):
        raise ItemError(ErrorCode.FETCH_DENIED, f"access to {where} was denied (HTTP {status})")
    if status == 429 or status >= 500:
        raise TransientHTTPError(f"{where} answered HTTP {status}")
    raise ItemError(ErrorCode.FETCH_ERROR, f"{where} answered HTTP {status}")


def _read_body(response, url: str, max_bytes: int, deadline: float, timeout_s: float) -> bytes:
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise ItemError(
            ErrorCode.FETCH_TOO_LARGE, f"{display_url(url)} is {int(length)} bytes, over media.max_bytes={max_bytes}"
        )
    chunks, size = [], 0
    try:
        while True:
            chunk = response.read1(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise ItemError(ErrorCode.FETCH_TOO_LARGE, f"{display_url(url)} is over media.max_bytes={max_bytes}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{display_url(url)} took longer than {timeout_s:g}s")
            chunks.append(chunk)
    except urllib3.exceptions.TimeoutError:
        raise TimeoutError(f"{display_url(url)} stalled for {timeout_s:g}s") from None
    except (urllib3.exceptions.HTTPError, ConnectionError) as exc:
        raise TransientHTTPError(f"{display_url(url)}: the connection broke ({type(exc).__name__})") from None
    return b"".join(chunks)


def _version(headers) -> str | None:
    etag = headers.get("ETag")
    if etag:
        return "etag:" + etag.strip('"')
    if headers.get("Last-Modified"):
        return f"size:{headers.get('Content-Length', '?')},mtime:{headers['Last-Modified']}"
    return None

"""The storage layer against real servers on loopback: moto's S3 (tests/s3server.py) and a
small HTTP server. Faults are made on the server side (errors, stalls, a stopped server);
nothing in boto/aiobotocore is mocked. No test asserts on wall-clock time.
"""

from __future__ import annotations

import io
import json
import os
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import httpfetch, storage
from pipeline.storage import FetchPolicy, RetryPolicy
from schemas.errors import ErrorCode, ItemError
from schemas.spec import StorageSpec, parse_spec
from s3server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server, credentials_env

PUBLIC, PRIVATE, DENIED = "tessera-st-public", "tessera-st-private", "tessera-st-denied"


@pytest.fixture(scope="module")
def s3():
    with pytest.MonkeyPatch.context() as env:
        for name, value in credentials_env().items():
            env.setenv(name, value)
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            env.delenv(name, raising=False)
        with S3Server() as server:
            fs = server.filesystem()
            for bucket in (PUBLIC, PRIVATE, DENIED):
                fs.mkdir(bucket)
            fs.pipe(f"{PUBLIC}/cat.jpg", b"\xff\xd8 public bytes", ACL="public-read")
            fs.pipe(f"{PRIVATE}/cat.jpg", b"\xff\xd8 private bytes")
            fs.pipe(f"{PRIVATE}/big.bin", b"\0" * (2 * 2**20))
            fs.pipe(f"{DENIED}/cat.jpg", b"\xff\xd8 denied bytes")
            deny = {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:GetObject",
                               "Resource": f"arn:aws:s3:::{DENIED}/*"}],
            }
            fs.call_s3("put_bucket_policy", Bucket=DENIED, Policy=json.dumps(deny))
            yield server


@pytest.fixture
def spec_storage(s3) -> StorageSpec:
    s3.clear_faults()
    s3.requests.clear()
    return StorageSpec(endpoint_url=s3.endpoint_url)


def fetch_error(uri: str, storage_spec: StorageSpec, policy: FetchPolicy = FetchPolicy()) -> ItemError:
    with pytest.raises(ItemError) as caught:
        storage.fetch(uri, storage_spec, policy)
    return caught.value


# --- uris ---------------------------------------------------------------------------------------


def test_relative_uris_resolve_like_urls_against_the_manifest():
    m = "s3://bucket/jobs/a/manifest.jsonl"
    assert storage.resolve_relative("x.jpg", m) == "s3://bucket/jobs/a/x.jpg"
    assert storage.resolve_relative("media/x.jpg", m) == "s3://bucket/jobs/a/media/x.jpg"
    assert storage.resolve_relative("../x.jpg", m) == "s3://bucket/jobs/x.jpg"
    assert storage.resolve_relative("../../../../x.jpg", m) == "s3://bucket/x.jpg"
    assert storage.resolve_relative("/media/x.jpg", m) == "s3://bucket/media/x.jpg"
    assert storage.resolve_relative("s3://other/x.jpg", m) == "s3://other/x.jpg"
    assert storage.resolve_relative("file:///data/x.jpg", m) == "file:///data/x.jpg"
    assert storage.resolve_relative("x.jpg", "/data/m.jsonl") == "/data/x.jpg"
    assert storage.resolve_relative("/abs/x.jpg", "/data/m.jsonl") == "/abs/x.jpg"


def test_shown_uris_and_messages_carry_no_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    assert storage.display_uri("https://u:pw@host/a.jpg?X-Amz-Signature=abc") == "https://host/a.jpg?…"
    assert storage.display_uri("s3://key:secret@bucket/a.jpg") == "s3://bucket/a.jpg"
    text = storage.redact("failed https://u:pw@h/x?sig=1 with very-secret-value")
    assert "pw" not in text and "sig=1" not in text and "very-secret-value" not in text


def test_shown_uris_drop_user_info_and_query_on_every_scheme():
    """What lands in the `uri` column, messages and logs: the path stays, secrets do not."""
    shown = {
        "https://u:p@ss@host:8443/x.jpg?sig=s3cr3t#frag": "https://host:8443/x.jpg?…",
        "http://user:hunter2@host:bad/x.jpg": "http://(invalid address)",
        "s3://key:secret@bucket/a#b.jpg?versionId=1": "s3://bucket/a#b.jpg?…",
        "az://container/blob.jpg?sv=2024&sig=s3cr3t": "az://container/blob.jpg?…",
        "s3://bucket/plain.jpg": "s3://bucket/plain.jpg",
        "/data/local?name.jpg": "/data/local?name.jpg",
    }
    for uri, expected in shown.items():
        assert storage.display_uri(uri) == expected
    text = storage.redact("at https://u:p@ss@h/x?X-Amz-Signature=s3cr3t and az://c/b?sig=s3cr3t")
    assert "p@ss" not in text and "s3cr3t" not in text and "https://h/x?…" in text


def test_credentials_in_a_spec_are_refused():
    base = {"name": "j", "input": {"manifest": "m.jsonl"}, "output": {"path": "o"}, "task": {"preset": "caption"}}
    for storage_section in (
        {"client_kwargs": {"aws_secret_access_key": "x"}},
        {"client_kwargs": {"config": {"aws_session_token": "x"}}},
        {"options": {"s3": {"secret": "x"}}},
        {"options": {"az": {"account_key": "x"}}},
    ):
        with pytest.raises(ValueError, match="credential") as caught:
            parse_spec({**base, "storage": storage_section})
        assert "'x'" not in str(caught.value)
    parse_spec({**base, "storage": {"options": {"gs": {"project": "p"}}, "client_kwargs": {"verify": False}}})


# --- fetch from S3 ------------------------------------------------------------------------------


def test_fetch_is_one_get_with_a_version(s3, spec_storage):
    fetched = storage.fetch(f"s3://{PRIVATE}/cat.jpg", spec_storage, FetchPolicy())
    assert fetched.data == b"\xff\xd8 private bytes"
    assert fetched.version.startswith("etag:")
    assert s3.requests.entries == [("GET", f"/{PRIVATE}/cat.jpg")]


def test_missing_objects_and_buckets_are_not_found_without_retries(s3, spec_storage):
    for uri in (f"s3://{PRIVATE}/nope.jpg", "s3://tessera-no-such-bucket/cat.jpg"):
        s3.requests.clear()
        error = fetch_error(uri, spec_storage)
        assert error.code is ErrorCode.FETCH_NOT_FOUND
        assert len(s3.requests.entries) == 1


def test_an_object_over_max_bytes_is_refused_from_its_size(s3, spec_storage):
    error = fetch_error(f"s3://{PRIVATE}/big.bin", spec_storage, FetchPolicy(max_bytes=2**20))
    assert error.code is ErrorCode.FETCH_TOO_LARGE
    assert f"{2 * 2**20} bytes" in error.message  # the size the server announced, not a count of bytes read
    assert len(s3.requests.entries) == 1


def test_a_private_bucket_without_credentials_is_denied(s3, spec_storage):
    anonymous = StorageSpec(endpoint_url=s3.endpoint_url, anonymous=True)
    assert storage.fetch(f"s3://{PUBLIC}/cat.jpg", anonymous, FetchPolicy()).data == b"\xff\xd8 public bytes"
    s3.requests.clear()
    error = fetch_error(f"s3://{PRIVATE}/cat.jpg", anonymous)
    assert error.code is ErrorCode.FETCH_DENIED
    assert len(s3.requests.entries) == 1  # never retried


def test_a_bucket_policy_deny_is_denied(s3, spec_storage):
    error = fetch_error(f"s3://{DENIED}/cat.jpg", spec_storage)
    assert error.code is ErrorCode.FETCH_DENIED
    assert len(s3.requests.entries) == 1


def test_no_credentials_at_all_is_denied_with_a_hint(s3, spec_storage, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    error = fetch_error(f"s3://{PRIVATE}/cat.jpg", spec_storage)
    assert error.code is ErrorCode.FETCH_DENIED
    assert "storage.anonymous" in error.message


def test_throttling_and_5xx_are_retried_until_they_pass(s3, spec_storage):
    s3.fail_next(503, "SlowDown", count=2, path="cat.jpg")
    s3.fail_next(500, "InternalError", count=1, path="cat.jpg")
    fetched = storage.fetch(f"s3://{PRIVATE}/cat.jpg", spec_storage, FetchPolicy(retries=5))
    assert fetched.data == b"\xff\xd8 private bytes"
    assert s3.requests.count("GET", "cat.jpg") == 4


def test_retries_stop_at_the_budget_with_fetch_error(s3, spec_storage):
    s3.fail_next(503, "SlowDown", count=10, path="cat.jpg")
    error = fetch_error(f"s3://{PRIVATE}/cat.jpg", spec_storage, FetchPolicy(retries=2))
    assert error.code is ErrorCode.FETCH_ERROR
    assert "after 3 attempts" in error.message and "SlowDown" in error.message
    assert s3.requests.count("GET", "cat.jpg") == 3


def test_403_and_404_answers_are_never_retried(s3, spec_storage):
    for status, code, expected in ((403, "AccessDenied", ErrorCode.FETCH_DENIED), (404, "NoSuchKey", ErrorCode.FETCH_NOT_FOUND)):
        s3.requests.clear()
        s3.fail_next(status, code, count=1, path="cat.jpg")
        assert fetch_error(f"s3://{PRIVATE}/cat.jpg", spec_storage, FetchPolicy(retries=5)).code is expected
        assert s3.requests.count("GET", "cat.jpg") == 1


def test_a_stalled_request_times_out_and_the_retry_succeeds(s3, spec_storage):
    s3.stall(5.0, count=1, path="cat.jpg")
    error = fetch_error(f"s3://{PRIVATE}/cat.jpg", spec_storage, FetchPolicy(timeout_s=0.5, retries=0))
    assert error.code is ErrorCode.FETCH_TIMEOUT
    s3.stall(5.0, count=1, path="cat.jpg")
    fetched = storage.fetch(f"s3://{PRIVATE}/cat.jpg", spec_storage, FetchPolicy(timeout_s=0.5, retries=1))
    assert fetched.data == b"\xff\xd8 private bytes"


def test_a_stopped_server_is_a_fetch_error_and_clients_recover_after_restart(s3, spec_storage):
    uri = f"s3://{PRIVATE}/cat.jpg"
    storage.fetch(uri, spec_storage, FetchPolicy())  # a pooled keep-alive connection now exists
    s3.stop()
    try:
        error = fetch_error(uri, spec_storage, FetchPolicy(retries=0))
        assert error.code is ErrorCode.FETCH_ERROR
    finally:
        s3.start()
    assert storage.fetch(uri, spec_storage, FetchPolicy(retries=2)).data == b"\xff\xd8 private bytes"


def test_error_messages_never_carry_credentials(s3, spec_storage):
    messages = []
    s3.fail_next(500, "InternalError", count=5, path="cat.jpg")
    for uri, policy in (
        (f"s3://{PRIVATE}/cat.jpg", FetchPolicy(retries=1)),
        (f"s3://{PRIVATE}/nope.jpg", FetchPolicy()),
        (f"s3://{DENIED}/cat.jpg", FetchPolicy()),
        (f"s3://{PRIVATE}/big.bin", FetchPolicy(max_bytes=10)),
    ):
        messages.append(fetch_error(uri, spec_storage, policy).message)
    for message in messages:
        assert ACCESS_KEY_ID not in message and SECRET_ACCESS_KEY not in message


def test_the_endpoint_may_come_from_the_aws_environment(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint_url)
    fetched = storage.fetch(f"s3://{PRIVATE}/cat.jpg", StorageSpec(), FetchPolicy())
    assert fetched.data == b"\xff\xd8 private bytes"


def test_a_protocol_whose_driver_is_missing_says_which_extra_to_install(spec_storage):
    try:
        import gcsfs  # noqa: F401

        pytest.skip("gcsfs is installed here")
    except ImportError:
        pass
    error = fetch_error("gs://bucket/x.jpg", spec_storage)
    assert error.code is ErrorCode.FETCH_ERROR
    assert "tessera[gcs]" in error.message


def test_a_local_file_obeys_the_same_bound(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"a" * 100)
    assert storage.fetch(str(path), StorageSpec(), FetchPolicy()).data == b"a" * 100
    assert fetch_error(str(path), StorageSpec(), FetchPolicy(max_bytes=99)).code is ErrorCode.FETCH_TOO_LARGE
    assert fetch_error(str(tmp_path / "nope"), StorageSpec()).code is ErrorCode.FETCH_NOT_FOUND


# --- manifests and results ------------------------------------------------------------------------


def test_large_writes_are_multipart_uploads_and_small_ones_single_puts(s3, spec_storage):
    big = os.urandom(2 * storage.MULTIPART_CHUNK_BYTES + 1024)
    storage.write_bytes(f"s3://{PRIVATE}/out/big.parquet", big, spec_storage)
    storage.write_bytes(f"s3://{PRIVATE}/out/small.parquet", b"small", spec_storage)
    fs = s3.filesystem()
    assert fs.info(f"{PRIVATE}/out/big.parquet")["ETag"].strip('"').endswith("-3")  # 3 parts
    assert "-" not in fs.info(f"{PRIVATE}/out/small.parquet")["ETag"]
    assert fs.cat_file(f"{PRIVATE}/out/big.parquet") == big
    assert s3.requests.count("POST", "big.parquet") == 2  # create + complete the upload


def test_result_io_rides_out_transient_errors(s3, spec_storage):
    s3.fail_next(503, "SlowDown", count=2, path="_staging", method="PUT")
    staged = f"s3://{PRIVATE}/out/_staging/run1/part-1.parquet.tmp"
    final = f"s3://{PRIVATE}/out/run-run1/part-1.parquet"
    storage.write_bytes(staged, b"PAR1 bytes", spec_storage)
    s3.fail_next(500, "InternalError", count=1, path="_staging", method="DELETE")
    storage.rename(staged, final, spec_storage)
    assert storage.read_bytes(final, spec_storage) == b"PAR1 bytes"
    assert not storage.exists(staged, spec_storage)
    storage.rename(staged, final, spec_storage)  # already moved: a retry finds nothing left to do
    assert storage.list_files(f"s3://{PRIVATE}/out/run-run1", spec_storage) == [final]
    assert storage.list_files(f"s3://{PRIVATE}/out/run-nothing", spec_storage) == []
    storage.remove(f"s3://{PRIVATE}/out/run-run1", spec_storage, recursive=True)
    assert storage.list_files(f"s3://{PRIVATE}/out/run-run1", spec_storage) == []


def test_result_io_that_keeps_failing_says_what_and_where(s3, spec_storage):
    s3.fail_next(503, "SlowDown", count=10, path="doomed")
    with pytest.raises(storage.StorageError, match="doomed.*after 3 attempts") as caught:
        storage.write_bytes(f"s3://{PRIVATE}/doomed", b"x", spec_storage.model_copy(update={"retries": 2}))
    assert SECRET_ACCESS_KEY not in str(caught.value)


def test_manifests_expand_from_files_dirs_and_globs(s3, spec_storage):
    fs = s3.filesystem()
    for name in ("a.jsonl", "b.csv", "c.txt", "_hidden/d.jsonl", "sub/e.jsonl"):
        fs.pipe(f"{PRIVATE}/manifests/{name}", b"{}\n")
    suffixes = (".jsonl", ".csv")
    root = f"s3://{PRIVATE}/manifests"
    assert storage.expand(f"{root}/a.jsonl", spec_storage, suffixes) == [f"{root}/a.jsonl"]
    assert storage.expand(root, spec_storage, suffixes) == [f"{root}/a.jsonl", f"{root}/b.csv", f"{root}/sub/e.jsonl"]
    assert storage.expand(f"{root}/*.jsonl", spec_storage, suffixes) == [f"{root}/a.jsonl"]
    with pytest.raises(FileNotFoundError):
        storage.expand(f"{root}/nope.jsonl", spec_storage, suffixes)


def test_a_manifest_read_survives_a_broken_connection(s3, spec_storage):
    data = b"".join(json.dumps({"id": str(i), "uri": f"{i}.jpg"}).encode() + b"\n" for i in range(300_000))
    s3.filesystem().pipe(f"{PRIVATE}/manifests/long.jsonl", data)
    uri = f"s3://{PRIVATE}/manifests/long.jsonl"
    with storage.open_file(uri, "rb", spec_storage) as handle:
        head = handle.read(1000)
        s3.fail_next(503, "SlowDown", count=2, method="GET", path="long.jsonl")
        rest = handle.read()
    assert head + rest == data
    # More than one block, so the read after the fault needed a new request: 2 refused, 1 served.
    assert len(data) > storage.MANIFEST_BLOCK_BYTES
    assert s3.requests.count("GET", "long.jsonl") >= 4


def test_parquet_through_the_arrow_filesystem(s3, spec_storage):
    table = pa.table({"id": ["a", "b"], "n": [1, 2]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(f"s3://{PRIVATE}/pq/part-0.parquet", buffer.getvalue(), spec_storage)
    fs = storage.arrow_filesystem(f"s3://{PRIVATE}/pq", spec_storage)
    assert pq.read_table(storage.strip_scheme(f"s3://{PRIVATE}/pq"), filesystem=fs).equals(table)
    assert storage.arrow_filesystem("/tmp/x", spec_storage) is None


def test_results_out_writes_to_object_storage(s3, spec_storage):
    """`tessera results --out s3://…` goes through the storage layer, like every other write."""
    from jobs.tables import write_table

    table = pa.table({"id": ["a", "b"], "status": ["ok", "error"]})
    write_table(table, "parquet", f"s3://{PRIVATE}/exports/results.parquet", spec_storage)
    write_table(table, "jsonl", f"s3://{PRIVATE}/exports/results.jsonl", spec_storage)
    fs = s3.filesystem()
    assert pq.read_table(io.BytesIO(fs.cat(f"{PRIVATE}/exports/results.parquet"))).equals(table)
    assert [json.loads(line)["id"] for line in fs.cat(f"{PRIVATE}/exports/results.jsonl").splitlines()] == ["a", "b"]


# --- retry policy -------------------------------------------------------------------------------


def test_backoff_is_exponential_with_bounded_jitter():
    policy = RetryPolicy(retries=6, base_s=0.25, cap_s=4.0)
    rng = random.Random(7)
    for attempt in range(6):
        ceiling = min(4.0, 0.25 * 2**attempt)
        for _ in range(50):
            assert ceiling / 2 <= policy.delay(attempt, rng) <= ceiling
    assert policy.budget_s() == ((0.25 + 0.5 + 1 + 2 + 4 + 4) / 2, 0.25 + 0.5 + 1 + 2 + 4 + 4)


def test_with_retries_stops_on_permanent_failures():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("x")

    with pytest.raises(FileNotFoundError):
        storage.with_retries(missing, RetryPolicy(retries=5), sleep=lambda s: None)
    assert len(calls) == 1

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionResetError("reset")
        return "ok"

    calls.clear()
    assert storage.with_retries(flaky, RetryPolicy(retries=5), sleep=lambda s: None) == "ok"
    assert len(calls) == 4


# --- http(s) media --------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    flaky_left = 0
    seen: list[tuple[str, str]] = []  # (method, path) of every request served

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        type(self).seen.append((self.command, self.path))
        port = self.server.server_address[1]
        routes = {
            "/ok.jpg": lambda: self._send(200, b"http bytes", {"ETag": '"v1"'}),
            "/missing.jpg": lambda: self._send(404, b"no"),
            "/secret.jpg": lambda: self._send(403, b"no"),
            "/big.jpg": lambda: self._send(200, b"x" * 5000),
            "/chunked-big.jpg": self._chunked,
            "/redirect.jpg": lambda: self._send(302, b"", {"Location": "/ok.jpg"}),
            "/redirect-file.jpg": lambda: self._send(302, b"", {"Location": "file:///etc/passwd"}),
            "/redirect-other.jpg": lambda: self._send(302, b"", {"Location": f"http://127.0.0.2:{port}/ok.jpg"}),
            "/loop.jpg": lambda: self._send(302, b"", {"Location": "/loop.jpg"}),
            "/flaky.jpg": self._flaky,
        }
        routes.get(self.path.split("?")[0], lambda: self._send(404, b"no"))()

    def _send(self, status, body, headers=None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _chunked(self):
        self.send_response(200)
        self.end_headers()  # no Content-Length: the size is only known by reading (HTTP/1.0: until close)
        for _ in range(10):
            self.wfile.write(b"y" * 1000)

    def _flaky(self):
        if type(self).flaky_left > 0:
            type(self).flaky_left -= 1
            self._send(503, b"busy")
        else:
            self._send(200, b"finally")


@pytest.fixture(scope="module")
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


LOCAL_HTTP = FetchPolicy(allow_http=True, allow_private_http=True, max_bytes=4096, retries=3)


def test_http_media_is_off_by_default(http_server):
    error = fetch_error(f"{http_server}/ok.jpg", StorageSpec(), FetchPolicy())
    assert error.code is ErrorCode.FETCH_DENIED and "input.allow_http" in error.message


def test_http_to_private_addresses_is_refused_unless_allowed(http_server):
    policy = FetchPolicy(allow_http=True)
    for url in (f"{http_server}/ok.jpg", f"http://localhost:{http_server.rsplit(':', 1)[1]}/ok.jpg"):
        error = fetch_error(url, StorageSpec(), policy)
        assert error.code is ErrorCode.FETCH_DENIED and "allow_private_http" in error.message
    fetched = storage.fetch(f"{http_server}/ok.jpg", StorageSpec(), LOCAL_HTTP)
    assert fetched.data == b"http bytes" and fetched.version == "etag:v1"


@pytest.mark.parametrize(
    "address, allowed",
    [
        ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
        ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("::1", False),
        ("fe80::1", False), ("fd00::1", False), ("::ffff:127.0.0.1", False), ("::ffff:169.254.169.254", False),
        ("224.0.0.1", False), ("93.184.216.34", True), ("2606:2800:220:1:248:1893:25c8:1946", True),
    ],
)
def test_which_destinations_count_as_private(address, allowed):
    assert httpfetch.address_allowed(address, allow_private=False) is allowed


def test_redirects_are_followed_and_checked_at_every_hop(http_server, monkeypatch):
    assert storage.fetch(f"{http_server}/redirect.jpg", StorageSpec(), LOCAL_HTTP).data == b"http bytes"
    error = fetch_error(f"{http_server}/redirect-file.jpg", StorageSpec(), LOCAL_HTTP)
    assert error.code is ErrorCode.FETCH_DENIED
    assert fetch_error(f"{http_server}/loop.jpg", StorageSpec(), LOCAL_HTTP).code is ErrorCode.FETCH_ERROR
    # Our own destination policy (not a network library) narrowed to exactly 127.0.0.1: the
    # first hop passes, the redirect to 127.0.0.2 must be refused before any connection.
    monkeypatch.setattr(httpfetch, "address_allowed", lambda address, allow_private: address == "127.0.0.1")
    error = fetch_error(f"{http_server}/redirect-other.jpg", StorageSpec(), FetchPolicy(allow_http=True))
    assert error.code is ErrorCode.FETCH_DENIED


def test_http_status_size_and_retries(http_server):
    assert fetch_error(f"{http_server}/missing.jpg", StorageSpec(), LOCAL_HTTP).code is ErrorCode.FETCH_NOT_FOUND
    assert fetch_error(f"{http_server}/secret.jpg", StorageSpec(), LOCAL_HTTP).code is ErrorCode.FETCH_DENIED
    assert fetch_error(f"{http_server}/big.jpg", StorageSpec(), LOCAL_HTTP).code is ErrorCode.FETCH_TOO_LARGE
    assert fetch_error(f"{http_server}/chunked-big.jpg", StorageSpec(), LOCAL_HTTP).code is ErrorCode.FETCH_TOO_LARGE
    _Handler.flaky_left = 2
    assert storage.fetch(f"{http_server}/flaky.jpg", StorageSpec(), LOCAL_HTTP).data == b"finally"
    _Handler.flaky_left = 10
    error = fetch_error(f"{http_server}/flaky.jpg?X-Amz-Signature=s3cr3t", StorageSpec(), LOCAL_HTTP)
    assert error.code is ErrorCode.FETCH_ERROR and "s3cr3t" not in error.message
    _Handler.flaky_left = 0


def test_http_versions_are_asked_through_the_guard(http_server, monkeypatch):
    """Resume's version check of an http(s) row is a HEAD with the fetch's checks; fsspec's
    HTTP client (no address check, its own redirects) is not reachable at all."""
    url = f"{http_server}/ok.jpg"
    for make in (storage.filesystem, storage.arrow_filesystem):
        with pytest.raises(ValueError, match="only read as media"):
            make(url)
    _Handler.seen.clear()
    for policy in (FetchPolicy(), FetchPolicy(allow_http=True)):  # http off; then a loopback address
        with pytest.raises(ItemError) as caught:
            storage.current_version(url, StorageSpec(), policy)
        assert caught.value.code is ErrorCode.FETCH_DENIED
    assert _Handler.seen == []  # refused before any request
    assert storage.current_version(url, StorageSpec(), LOCAL_HTTP) == "etag:v1"
    assert storage.current_version(f"{http_server}/redirect.jpg", StorageSpec(), LOCAL_HTTP) == "etag:v1"
    assert _Handler.seen == [("HEAD", "/ok.jpg"), ("HEAD", "/redirect.jpg"), ("HEAD", "/ok.jpg")]
    monkeypatch.setattr(httpfetch, "address_allowed", lambda address, allow_private: address == "127.0.0.1")
    with pytest.raises(ItemError) as caught:
        storage.current_version(f"{http_server}/redirect-other.jpg", StorageSpec(), FetchPolicy(allow_http=True))
    assert caught.value.code is ErrorCode.FETCH_DENIED


def test_manifests_in_every_format_read_from_s3(s3, spec_storage):
    from pipeline.manifests import iter_raw_rows

    rows = [{"id": f"r{i}", "uri": f"media/{i}.jpg"} for i in range(50)]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    fs = s3.filesystem()
    fs.pipe(f"{PRIVATE}/formats/m.parquet", buffer.getvalue())
    fs.pipe(f"{PRIVATE}/formats/m.csv", ("id,uri\n" + "".join(f"{r['id']},{r['uri']}\n" for r in rows)).encode())
    fs.pipe(f"{PRIVATE}/formats/m.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    for fmt in ("parquet", "csv", "jsonl"):
        read = [raw for _, raw in iter_raw_rows(f"s3://{PRIVATE}/formats/m.{fmt}", fmt, spec_storage)]
        assert read == rows, fmt


def test_https_certificates_are_verified_against_the_host_name(tmp_path):
    """The connection goes to a checked IP address, but TLS still verifies the certificate
    for the URL's host: a self-signed one is refused."""
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"https://localhost:{server.server_address[1]}/ok.jpg"
        error = fetch_error(url, StorageSpec(), LOCAL_HTTP)
        assert error.code is ErrorCode.FETCH_ERROR and "TLS" in error.message
    finally:
        server.shutdown()
        server.server_close()


def test_a_profile_supplies_credentials_and_endpoint(s3, tmp_path, monkeypatch):
    """storage.profile (or AWS_PROFILE) reads ~/.aws-style files: credentials and endpoint."""
    (tmp_path / "config").write_text(
        f"[profile tessera-test]\nregion = us-east-1\nendpoint_url = {s3.endpoint_url}\n"
    )
    (tmp_path / "credentials").write_text(
        f"[tessera-test]\naws_access_key_id = {ACCESS_KEY_ID}\naws_secret_access_key = {SECRET_ACCESS_KEY}\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    uri = f"s3://{PRIVATE}/cat.jpg"
    assert storage.fetch(uri, StorageSpec(profile="tessera-test"), FetchPolicy()).data == b"\xff\xd8 private bytes"
    monkeypatch.setenv("AWS_PROFILE", "tessera-test")
    assert storage.fetch(uri, StorageSpec(), FetchPolicy()).data == b"\xff\xd8 private bytes"

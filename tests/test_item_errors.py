"""Failed items through the CPU stage and the sink, without Ray: what their rows and log
lines say, and what they never say (passwords, signatures from signed URLs)."""

from __future__ import annotations

import dataclasses
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import structlog
from structlog.testing import capture_logs

from schemas.errors import SKIPPED

PASSWORD, SIGNATURE = "hunter2-pw", "f00dbeefsignature"


class _Handler(BaseHTTPRequestHandler):
    """/image.jpg: 200 with bytes that are no image (a decode error); anything else: 404."""

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        found = self.path.split("?")[0] == "/image.jpg"
        body = b"not an image at all" if found else b"no"
        self.send_response(200 if found else 404)
        self.send_header("ETag", '"v1"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


@pytest.fixture(scope="module")
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model_path):
    """(spec, preparer) for a job that may fetch http from loopback."""
    from actors.loading import resolve_model
    from pipeline.prepare import PrepareContext, Preparer
    from schemas.spec import parse_spec
    from schemas.tasks import resolve_task

    root = tmp_path_factory.mktemp("item-errors")
    spec = parse_spec(
        {
            "name": "item-errors",
            "input": {"manifest": str(root / "m.jsonl"), "allow_http": True, "allow_private_http": True},
            "output": {"path": str(root / "out")},
            "task": {"preset": "moderation"},
            "media": {"isolation": "none", "fetch_retries": 0},
        }
    ).resolved()
    preparer = Preparer(PrepareContext(run_id="run-1", spec=spec, model=resolve_model(spec.model), task=resolve_task(spec.task)))
    yield spec, preparer
    preparer.close()


def manifest_row(row_id: str, uri: str, resume_version: str | None = None) -> dict:
    return {
        "id": row_id, "uris": [uri], "media_type": None, "fields_json": "{}", "source": "m.jsonl#L1",
        "position": 1, "error_code": None, "error_message": None, "resume_version": resume_version,
    }


def signed(http_server: str, path: str) -> str:
    return f"http://user:{PASSWORD}@{http_server}{path}?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature={SIGNATURE}"


def test_written_rows_carry_no_credentials(job, http_server):
    """A signed URL with user info that fails in fetch (404) and in decode (not an image):
    neither the written `uri` nor `error_message` holds the password or the signature."""
    from pipeline.sink import SinkContext, commit_batch
    from schemas.tasks import resolve_task

    spec, preparer = job
    rows = [manifest_row("fetch-fails", signed(http_server, "/missing.jpg")), manifest_row("decode-fails", signed(http_server, "/image.jpg"))]
    prepared = [out for row in rows for out in preparer.prepare_rows(row)]
    assert [row["error_code"] for row in prepared] == ["fetch.not_found", "decode.unsupported"]
    task = resolve_task(spec.task)
    ctx = SinkContext("run-1", spec, "builtin:tiny", "r", task.prompt_sha256, task.json_schema)
    stats = commit_batch(pa.Table.from_pylist(prepared), ctx).to_pylist()[0]
    written = pq.read_table(stats["file"]).to_pylist()
    assert sorted(row["uri"] for row in written) == [f"http://{http_server}/image.jpg?…", f"http://{http_server}/missing.jpg?…"]
    for row in written:
        for column in ("uri", "error_message"):
            assert PASSWORD not in row[column] and SIGNATURE not in row[column] and "AKIAEXAMPLE" not in row[column]


def test_a_failed_item_is_one_item_error_event(job, tmp_path):
    _, preparer = job
    with capture_logs() as events:
        (row,) = preparer.prepare_rows(manifest_row("gone", str(tmp_path / "missing.jpg")))
    assert row["error_code"] == "fetch.not_found"
    assert [event for event in events if event["event"] == "item_error"] == [
        {
            "event": "item_error", "log_level": "warning", "run_id": "run-1", "job": "item-errors", "id": "gone",
            "stage": "prepare", "error_code": "fetch.not_found", "error_message": row["error_message"],
        }
    ]


def test_item_errors_are_json_lines_in_an_unconfigured_worker(capsys):
    """A Ray worker starts with structlog unconfigured: the first item error sets up JSON."""
    from actors.logs import log_item_error

    configured, old = structlog.is_configured(), structlog.get_config()
    structlog.reset_defaults()
    try:
        log_item_error("run-1", "job", "a", "infer", "model.error", "boom")
        log_item_error("run-1", "job", "b", "infer", "model.error", "boom")
        lines = capsys.readouterr().err.splitlines()
    finally:
        structlog.reset_defaults()
        if configured:
            structlog.configure(**old)
    events = [json.loads(line) for line in lines]
    assert [(e["event"], e["id"], e["run_id"], e["error_code"], e["level"]) for e in events] == [
        ("item_error", "a", "run-1", "model.error", "warning"), ("item_error", "b", "run-1", "model.error", "warning")
    ]


def test_resume_version_check_of_http_obeys_the_guard(job, http_server):
    """An http row committed earlier is skipped only when a guarded HEAD says it is unchanged;
    a destination the policy refuses is never asked, so the row is processed (and refused)."""
    _, preparer = job
    url = f"http://{http_server}/image.jpg"
    (row,) = preparer.prepare_rows(manifest_row("same", url, resume_version="etag:v1"))
    assert row["error_code"] == SKIPPED
    guarded = preparer.fetch_policy
    preparer.fetch_policy = dataclasses.replace(guarded, allow_private_http=False)
    try:
        (row,) = preparer.prepare_rows(manifest_row("private", url, resume_version="etag:v1"))
    finally:
        preparer.fetch_policy = guarded
    assert row["error_code"] == "fetch.denied"

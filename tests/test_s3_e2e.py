"""End to end on object storage: manifest, images, videos and a PDF in one bucket of a real
S3-protocol server on loopback (moto, tests/s3server.py), results written to another bucket,
read back through s3fs + pyarrow and DuckDB, and compared with a local run of the same corpus.

- `tessera run` as a subprocess, configured the way README.md's "Running against S3" says
  (endpoint and credentials from the environment), against the in-process run on local files.
- A faulty run: a missing object, a private bucket read without credentials, an object over
  media.max_bytes, and the server stopped for a few seconds once the first result file is
  committed (progress, not a timer). Retries carry the run through; every id comes out once.

No mocks, no assertions on wall-clock time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pyarrow.dataset as pads
import pytest
import yaml

from s3server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server, credentials_env
from local_ray import init_ray

# One xdist worker runs this whole module: its module-scoped fixtures are costly runs.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("s3_e2e")]

INPUT, OUTPUT, PRIVATE = "tessera-e2e-in", "tessera-e2e-out", "tessera-e2e-private"
OUTAGE_S = 3.0
# Compared between the local and the S3 run: everything the model and the media decide.
COMPARED = "status, error_code, media_type, n_tiles, n_frames, n_pages, input_tokens, raw_text"
# The local and the S3 run compare storage, not decoding: a short free-text answer keeps them
# cheap (the tiny model writes a moderation object of ~550 tokens); the faulty run keeps the preset.
FREE_TEXT = {"preset": None, "prompt": "Describe it.", "sampling": {"max_new_tokens": 8}}


@pytest.fixture(scope="module")
def s3(sample_corpus, tiny_model_path):
    """The server, the corpus uploaded to it, and a Ray cluster whose workers carry the
    credentials (workers inherit the environment of the moment Ray starts)."""
    import ray

    with pytest.MonkeyPatch.context() as env:
        for name, value in credentials_env().items():
            env.setenv(name, value)
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            env.delenv(name, raising=False)
        with S3Server() as server:
            fs = server.filesystem()
            for bucket in (INPUT, OUTPUT, PRIVATE):
                fs.mkdir(bucket)
            fs.put(str(sample_corpus.parent), f"{INPUT}/corpus", recursive=True)
            if ray.is_initialized():
                ray.shutdown()
            init_ray(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
            try:
                yield server
            finally:
                ray.shutdown()


def _spec(manifest: str, output_path: str, **sections):
    from schemas.spec import parse_spec

    data = {
        "name": "s3-e2e",
        "input": {"manifest": manifest},
        "output": {"path": output_path},
        "task": {"preset": "moderation"},
        "media": {"video": {"max_frames": 4}},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return parse_spec(data).resolved()


def _read_s3_results(server: S3Server, prefix: str):
    """Committed results as a user reads them: s3fs + pyarrow datasets, then DuckDB."""
    fs = server.filesystem()
    files = [f for f in fs.find(prefix) if f.endswith(".parquet") and "/run-" in f and "/_" not in f]
    table = pads.dataset(files, filesystem=fs, format="parquet").to_table()
    return duckdb.connect(), table


def _normalise(rows):
    """Ids made from a manifest line (`<manifest uri>#L<n>`) differ only in the manifest's uri."""
    return {(r[0].rsplit("#", 1)[-1] if "#L" in r[0] else r[0]): r[1:] for r in rows}


@pytest.fixture(scope="module")
def local_run(s3, sample_corpus, tmp_path_factory):
    from pipeline.run import run_job

    spec = _spec(str(sample_corpus), str(tmp_path_factory.mktemp("local") / "results"), task=FREE_TEXT)
    summary = run_job(spec)
    rows = duckdb.sql(
        f"SELECT id, {COMPARED} FROM read_parquet('{spec.output.path}/run-*/*.parquet')"
    ).fetchall()
    return summary, _normalise(rows)


@pytest.fixture(scope="module")
def cli_run(s3, tmp_path_factory):
    """`tessera run` in a subprocess, configured as README.md shows: AWS_ENDPOINT_URL_S3 and
    credentials in the environment, every path an s3:// URI."""
    work = tmp_path_factory.mktemp("cli")
    spec_path = work / "s3-job.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "name": "s3-e2e",
                "input": {"manifest": f"s3://{INPUT}/corpus/manifest.jsonl"},
                "output": {"path": f"s3://{OUTPUT}/cli"},
                "task": {k: v for k, v in FREE_TEXT.items() if v is not None},
                "media": {"video": {"max_frames": 4}},
                "ray": {"num_cpus": 2},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(credentials_env(), AWS_ENDPOINT_URL_S3=s3.endpoint_url, TESSERA_LOG_LEVEL="INFO")
    tessera = shutil.which("tessera", path=str(Path(sys.executable).parent)) or "tessera"
    result = subprocess.run(
        [tessera, "run", str(spec_path)], cwd=work, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_results_on_s3_equal_the_local_run(s3, local_run, cli_run):
    local_summary, local_rows = local_run
    con, table = _read_s3_results(s3, f"{OUTPUT}/cli")
    con.register("results", table)
    rows = _normalise(con.execute(f"SELECT id, {COMPARED} FROM results").fetchall())
    assert rows == local_rows
    (count, distinct), = con.execute("SELECT count(*), count(DISTINCT id) FROM results").fetchall()
    assert count == distinct == local_summary["rows_out"]
    # The same layout as locally: run-<id>/part-*.parquet, the summary under _runs/, no staging left.
    fs = s3.filesystem()
    keys = [k.split(f"{OUTPUT}/cli/", 1)[1] for k in fs.find(f"{OUTPUT}/cli")]
    assert all(k.startswith(("run-", "_runs/")) for k in keys), keys
    summaries = [k for k in keys if k.endswith("summary.json")]
    assert len(summaries) == 1
    summary = json.loads(fs.cat_file(f"{OUTPUT}/cli/{summaries[0]}"))
    assert summary["invariant"]["ok"] and summary["errors_by_code"] == local_summary["errors_by_code"]
    assert "fetch.not_found" in summary["errors_by_code"]  # the corpus's missing-file row


def test_credentials_never_reach_results_summaries_or_logs(s3, cli_run):
    fs = s3.filesystem()
    for key in fs.find(f"{OUTPUT}/cli"):
        data = fs.cat_file(key)
        assert ACCESS_KEY_ID.encode() not in data and SECRET_ACCESS_KEY.encode() not in data, key
    for stream in (cli_run.stdout, cli_run.stderr):
        assert ACCESS_KEY_ID not in stream and SECRET_ACCESS_KEY not in stream


@pytest.fixture(scope="module")
def faulty_run(s3, sample_corpus):
    """An anonymous run (a public input bucket, a bucket open for writes) whose manifest also
    points at a private bucket, a missing object and an object over max_bytes; the server is
    stopped for OUTAGE_S seconds as soon as the first result file is committed."""
    from pipeline.run import run_job

    fs = s3.filesystem()
    media = sample_corpus.parent / "media"
    max_bytes = max(p.stat().st_size for p in media.iterdir()) + 1024
    public_read = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": "*", "Action": "s3:*",
                       "Resource": [f"arn:aws:s3:::{b}/*" for b in (INPUT, OUTPUT)]}],
    }
    for bucket in (INPUT, OUTPUT):
        fs.call_s3("put_bucket_policy", Bucket=bucket, Policy=json.dumps(public_read))
    fs.pipe(f"{PRIVATE}/secret.jpg", (media / "img-000.jpg").read_bytes())  # private: no ACL, no policy
    fs.pipe(f"{INPUT}/corpus/media/huge.jpg", b"\xff\xd8" + b"\0" * max_bytes)
    lines = [json.loads(line) for line in sample_corpus.read_text().splitlines()]
    lines += [
        {"id": "private-object", "uri": f"s3://{PRIVATE}/secret.jpg"},
        {"id": "missing-object", "uri": "media/not-there.jpg"},
        {"id": "over-size", "uri": "media/huge.jpg"},
    ]
    fs.pipe(f"{INPUT}/corpus/faulty.jsonl", "".join(json.dumps(r) + "\n" for r in lines).encode())

    spec = _spec(
        f"s3://{INPUT}/corpus/faulty.jsonl",
        f"s3://{OUTPUT}/faulty",
        storage={"endpoint_url": s3.endpoint_url, "anonymous": True},
        media={"max_bytes": max_bytes, "fetch_retries": 8},
        output={"rows_per_file": 2},
    )
    outage = _OutageOnFirstCommit(s3, f"{OUTPUT}/faulty")
    outage.start()
    try:
        summary = run_job(spec)
    finally:
        outage.finish()
    con, table = _read_s3_results(s3, f"{OUTPUT}/faulty")
    con.register("results", table)
    return summary, con, outage, lines


class _OutageOnFirstCommit(threading.Thread):
    """Watches the output prefix; when the first committed part file appears, stops the server
    (refusing new connections, cutting open ones), waits OUTAGE_S, starts it again."""

    def __init__(self, server: S3Server, prefix: str):
        super().__init__(daemon=True)
        self.server, self.prefix = server, prefix
        self.fs = server.filesystem()
        self.files_at_outage: int | None = None
        self.files_at_end: int | None = None
        self._done = threading.Event()

    def _committed(self) -> int:
        bucket, _, prefix = self.prefix.partition("/")
        keys = self.server.keys(bucket, prefix)  # read from the server's state: works while it is down
        return sum(1 for k in keys if "/run-" in k and k.endswith(".parquet"))

    def run(self) -> None:
        while not self._done.is_set():
            if self._committed() > 0:
                self.server.stop()
                self.files_at_outage = self._committed()
                time.sleep(OUTAGE_S)
                self.server.start()
                return
            time.sleep(0.1)

    def finish(self) -> None:
        self._done.set()
        self.join(timeout=OUTAGE_S + 30)
        if not self.server.running:
            self.server.start()
        self.files_at_end = self._committed()


def test_faults_become_rows_and_the_outage_loses_nothing(faulty_run):
    summary, con, outage, lines = faulty_run
    assert outage.files_at_outage is not None, "the run ended before any result file was committed"
    # The outage struck mid-run: result files were still to come when the server went down.
    assert outage.files_at_end > outage.files_at_outage
    (count, distinct), = con.execute("SELECT count(*), count(DISTINCT id) FROM results").fetchall()
    assert count == distinct == summary["rows_in"] == summary["rows_out"] == len(lines)
    assert summary["invariant"]["ok"]
    codes = dict(con.execute("SELECT id, error_code FROM results WHERE id IN "
                             "('private-object', 'missing-object', 'over-size', 'missing-file')").fetchall())
    assert codes == {
        "private-object": "fetch.denied",
        "missing-object": "fetch.not_found",
        "over-size": "fetch.too_large",
        "missing-file": "fetch.not_found",
    }
    # Every good item survived the outage: no fetch.error / fetch.timeout rows.
    bad = con.execute("SELECT id, error_code, error_message FROM results "
                      "WHERE error_code IN ('fetch.error', 'fetch.timeout')").fetchall()
    assert bad == []
    good = con.execute("SELECT count(*) FROM results WHERE status = 'ok'").fetchall()[0][0]
    assert good == sum(1 for r in lines if str(r.get("id", "")).startswith(("img-", "vid-", "doc-")))

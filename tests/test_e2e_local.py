"""End to end on a local Ray cluster with the tiny model over generated media, read back with
DuckDB as a user would: counts, uniqueness, statuses, error codes, column types."""

from __future__ import annotations

import json

import duckdb
import pytest
from local_ray import shared_cluster

# One xdist worker runs this whole module: its module-scoped fixtures are costly runs.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("e2e_local")]

EXPECTED_ERRORS = {
    "broken-truncated": "decode.corrupt",
    "broken-not-an-image": "decode.unsupported",
    "missing-file": "fetch.not_found",
}


@pytest.fixture(scope="module")
def moderation_run(sample_corpus, tmp_path_factory, tiny_model_path):
    from pipeline.run import run_job
    from schemas.spec import parse_spec

    shared_cluster()
    manifest = sample_corpus.parent / "manifest-with-duplicate.jsonl"
    lines = sample_corpus.read_text().splitlines()
    # A duplicate id: the first occurrence is processed, the second is only listed.
    lines.append(json.dumps({"id": "img-000", "uri": str(sample_corpus.parent / "media/img-001.png")}))
    manifest.write_text("\n".join(lines) + "\n")
    spec = parse_spec(
        {
            "name": "e2e-moderation",
            "input": {"manifest": str(manifest)},
            "output": {"path": str(tmp_path_factory.mktemp("out") / "results")},
            "task": {"preset": "moderation"},
            "media": {"video": {"max_frames": 4}},
        }
    ).resolved()
    summary = run_job(spec)
    return spec, summary, manifest, sample_corpus


def _query(spec, sql: str):
    return duckdb.sql(sql.replace("RESULTS", f"read_parquet('{spec.output.path}/**/*.parquet')")).fetchall()


def test_every_distinct_id_once(moderation_run):
    spec, summary, manifest, corpus = moderation_run
    n_lines = len(corpus.read_text().splitlines())  # the corpus manifest: all ids distinct
    (count, distinct), = _query(spec, "SELECT count(*), count(DISTINCT id) FROM RESULTS")
    assert count == distinct == n_lines
    assert summary["rows_in"] == summary["rows_out"] == n_lines
    assert summary["invariant"]["ok"]
    duplicates = summary["manifest.duplicate_id"]
    assert duplicates["count"] == 1 and duplicates["listed_max"] == 1000
    (listed,) = duplicates["listed"]
    assert listed["id"] == "img-000" and listed["position"].endswith(f"#L{n_lines + 1}")
    assert listed["first"].endswith("manifest-with-duplicate.jsonl#L1")  # the occurrence processed


def test_statuses_and_error_codes(moderation_run):
    spec, summary, *_ = moderation_run
    rows = {r[0]: r[1:] for r in _query(spec, "SELECT id, status, error_code, error_message, uri FROM RESULTS")}
    for item, code in EXPECTED_ERRORS.items():
        status, error_code, message, _ = rows[item]
        assert (status, error_code) == ("error", code), item
        assert message
    no_id = [i for i in rows if i.endswith("#L" + str(len(rows)))]
    assert no_id and rows[no_id[0]][1] == "manifest.invalid_row"
    good = [i for i in rows if i.startswith(("img-", "vid-", "doc-"))]
    assert good and all(rows[i][0] == "ok" for i in good), {i: rows[i] for i in good if rows[i][0] != "ok"}
    assert summary["errors_by_code"] == {c: 1 for c in [*EXPECTED_ERRORS.values(), "manifest.invalid_row"]}


def test_duplicate_first_occurrence_wins(moderation_run):
    spec, *_ = moderation_run
    (uri,), = _query(spec, "SELECT uri FROM RESULTS WHERE id = 'img-000'")
    assert uri.endswith("img-000.jpg")


def test_column_types_and_typed_output(moderation_run):
    spec, *_ = moderation_run
    types = dict((name, kind) for name, kind, *_ in _query(spec, "DESCRIBE SELECT * FROM RESULTS"))
    assert types["status"] == "VARCHAR" and types["error_code"] == "VARCHAR"
    assert types["output"].startswith("STRUCT(verdict VARCHAR, categories STRUCT(")
    assert types["finished_at"] == "TIMESTAMP WITH TIME ZONE"
    assert types["n_tiles"] == "INTEGER" and types["infer_ms"] == "DOUBLE"
    verdicts = _query(spec, "SELECT DISTINCT output.verdict FROM RESULTS WHERE status = 'ok'")
    assert {v for (v,) in verdicts} <= {"allow", "review", "block"} and verdicts


def test_media_counts_and_metadata(moderation_run):
    spec, *_ = moderation_run
    rows = {r[0]: r[1:] for r in _query(spec, "SELECT id, media_type, n_frames, n_pages, n_tiles, metadata FROM RESULTS")}
    assert rows["vid-00"][0] == "video" and 1 <= rows["vid-00"][1] <= 4
    assert rows["doc-00"][0] == "pdf" and rows["doc-00"][2] == 2
    assert rows["img-001"][0] == "image" and rows["img-001"][3] > 1  # thumbnail + grid tiles
    assert json.loads(rows["img-001"][4]) == {"context": "uploaded by user 1"}


def test_summary_written_next_to_results(moderation_run):
    spec, summary, *_ = moderation_run
    from pathlib import Path

    written = json.loads((Path(spec.output.path) / "_runs" / summary["run_id"] / "summary.json").read_text())
    assert written["rows_out"] == summary["rows_out"]
    assert written["latency_ms"]["infer_ms"]["p50"] > 0
    # nothing but results matches the documented glob
    files = _query(spec, "SELECT DISTINCT filename FROM read_parquet('" + spec.output.path + "/**/*.parquet', filename=true)")
    assert all("/run-" in f and "/_" not in f for (f,) in files)

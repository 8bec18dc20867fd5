"""The read path and the output's lifecycle on real files, without Ray: runs whose output
schemas differ, a compaction that died between committing and deleting, stale staging."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.results import SchemaConflict, commit_merged, compact, current_results, results_dataset, results_sql
from pipeline.resume import committed_files
from pipeline.run import remove_stale_staging
from pipeline.sink import SinkContext, to_result_table
from schemas.spec import StorageSpec, parse_spec


def commit_run(output: Path, run_id: str, outputs: dict[str, dict | None], json_schema: dict | None, per_file: int = 1) -> None:
    """Result files as the sink writes them (its own row builder), and a published summary."""
    spec = parse_spec({"name": "job", "input": {"manifest": "m.jsonl"}, "output": {"path": str(output)}, "task": {"prompt": "Label it."}})
    ctx = SinkContext(run_id=run_id, spec=spec, model_uri="builtin:tiny", model_revision="r1", prompt_sha256="p1", json_schema=json_schema)
    rows = [
        {"id": item, "manifest_id": item, "output_json": json.dumps(answer), "raw_text": json.dumps(answer)}
        for item, answer in outputs.items()
    ]
    folder = output / f"run-{run_id}"
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(rows), per_file):
        pq.write_table(to_result_table(rows[start : start + per_file], ctx), folder / f"part-{start:04d}.parquet")
    (output / "_runs" / run_id).mkdir(parents=True, exist_ok=True)
    (output / "_runs" / run_id / "summary.json").write_text(json.dumps({"run_id": run_id}))


def label_schema(**extra) -> dict:
    return {"type": "object", "properties": {"label": {"type": "string"}, **extra}, "required": ["label"]}


def raw_ids(output: Path) -> list[str]:
    """Every row id over the files the read path counts as committed (duplicates kept)."""
    return sorted(i for f in committed_files(str(output), StorageSpec()) for i in pq.read_table(f, columns=["id"]).column("id").to_pylist())


def test_a_struct_that_gained_a_field_reads_as_one_table(tmp_path):
    commit_run(tmp_path, "20261101T000000Z-aaaaaa", {"a": {"label": "x"}, "b": {"label": "y"}}, label_schema())
    commit_run(tmp_path, "20261102T000000Z-bbbbbb", {"b": {"label": "z", "score": 3}}, label_schema(score={"type": "integer"}))
    table = current_results(str(tmp_path))
    outputs = dict(zip(table.column("id").to_pylist(), table.column("output").to_pylist()))
    assert outputs == {"a": {"label": "x", "score": None}, "b": {"label": "z", "score": 3}}
    ((count,),) = duckdb.sql(f"SELECT count(*) FROM ({results_sql(str(tmp_path))})").fetchall()
    assert count == 2  # the documented DuckDB query agrees


def test_a_field_that_went_from_int_to_string_reads_as_string(tmp_path):
    commit_run(tmp_path, "20261101T000000Z-aaaaaa", {"a": {"label": "x", "score": 3}}, label_schema(score={"type": "integer"}))
    commit_run(tmp_path, "20261102T000000Z-bbbbbb", {"b": {"label": "y", "score": "high"}}, label_schema(score={"type": "string"}))
    table = current_results(str(tmp_path))
    assert table.schema.field("output").type.field("score").type == pa.string()
    scores = dict(zip(table.column("id").to_pylist(), [o["score"] for o in table.column("output").to_pylist()]))
    assert scores == {"a": "3", "b": "high"}  # as DuckDB's union_by_name reads it


def test_a_struct_that_became_a_string_is_a_clear_error(tmp_path):
    commit_run(tmp_path, "20261101T000000Z-aaaaaa", {"a": {"label": "x", "score": {"v": 1}}},
               label_schema(score={"type": "object", "properties": {"v": {"type": "integer"}}, "required": ["v"]}))
    commit_run(tmp_path, "20261102T000000Z-bbbbbb", {"b": {"label": "y", "score": "high"}}, label_schema(score={"type": "string"}))
    with pytest.raises(SchemaConflict, match=r"column 'output' is struct<.*> in .*run-20261101T000000Z-aaaaaa.* but .* in .*run-20261102"):
        results_dataset(str(tmp_path))


def test_a_compaction_that_died_before_deleting_shows_no_row_twice(tmp_path):
    run_id = "20261101T000000Z-aaaaaa"
    commit_run(tmp_path, run_id, {f"i{n}": {"label": str(n)} for n in range(4)}, label_schema())
    small = committed_files(str(tmp_path), StorageSpec())
    before = current_results(str(tmp_path)).select(["id", "output", "run_id"])
    # What a compaction leaves when it dies right after committing its merged file.
    commit_merged(small, str(tmp_path), run_id, StorageSpec())
    assert len(list((tmp_path / f"run-{run_id}").glob("*.parquet"))) == 5  # on disk: both copies
    assert raw_ids(tmp_path) == ["i0", "i1", "i2", "i3"]  # the read path counts each row once
    assert current_results(str(tmp_path)).select(["id", "output", "run_id"]).equals(before)

    report = compact(str(tmp_path))  # the next compaction finishes the job first
    assert report["files_written"] == 0
    assert [p.name.startswith("part-c") for p in (tmp_path / f"run-{run_id}").glob("*.parquet")] == [True]
    assert not list(tmp_path.glob("_compaction/**/*.json"))
    assert raw_ids(tmp_path) == ["i0", "i1", "i2", "i3"]
    assert current_results(str(tmp_path)).select(["id", "output", "run_id"]).equals(before)


def test_a_compaction_that_died_before_committing_replaced_nothing(tmp_path):
    run_id = "20261101T000000Z-aaaaaa"
    commit_run(tmp_path, run_id, {f"i{n}": {"label": str(n)} for n in range(3)}, label_schema())
    small = committed_files(str(tmp_path), StorageSpec())
    record = tmp_path / "_compaction" / run_id / "part-cnever.parquet.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"merged": "part-cnever.parquet", "replaces": [Path(p).name for p in small]}))
    assert committed_files(str(tmp_path), StorageSpec()) == small
    compact(str(tmp_path))
    assert not record.exists() and raw_ids(tmp_path) == ["i0", "i1", "i2"]


def test_stale_staging_is_removed_and_live_staging_kept(tmp_path):
    commit_run(tmp_path, "20261101T000000Z-aaaaaa", {"a": {"label": "x"}}, label_schema())
    old = tmp_path / "_staging" / "killed-run" / "part-1.parquet.tmp"
    live = tmp_path / "_staging" / "live-run" / "part-2.parquet.tmp"
    for path in (old, live):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"partial")
    week_ago = time.time() - 7 * 24 * 3600
    os.utime(old, (week_ago, week_ago))
    assert remove_stale_staging(str(tmp_path), StorageSpec()) == 1
    assert not old.exists() and live.exists()
    assert remove_stale_staging(str(tmp_path), StorageSpec(), older_than_s=0) == 1 and not live.exists()
    assert raw_ids(tmp_path) == ["a"]  # committed results are never staging
